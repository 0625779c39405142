"""BaDExpert with an expert ensemble (issue 20): detection of the default against ``expert_ensemble``.

    OMP_NUM_THREADS=1 python bench/expert_ensemble.py [--grid configs/grids/baselines-fmnist.json] \\
        [--attacks badnet,blend,...] [--levels 0.4] [--cache .cache/shared-trunk] [--out runs/expert-ensemble.json]

For every attack of the grid (its cells: dataset, architecture, poisoning, recipe, splits, seed)
the suspect model is read from the grid's cache (``.cache/grid``) where it is, or trained into
``--cache``; BaDExpert with the grid's parameters (``full``, the default) and with
``expert_ensemble=LEVELS`` is fitted on the reserved split, calibrated at the grid's FPR and
evaluated by :func:`badexpert.compare`, exactly as ``bench/shared_trunk.py`` evaluates its cuts
(the same cache: the ``full`` rows are shared). Prints AUROC (all and the paper's population) and
ASR after per attack, the mean and worst differences, and writes the rows as JSON (``--out``).
Run it once per grid (``configs/grids/adaptive-fmnist.json --attacks expert_aware-s1,expert_aware-s3``
for the BaDExpert-aware attack).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_trunk import detection  # noqa: E402  the one (attack, variant) evaluation of the bench scripts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="configs/grids/baselines-fmnist.json")
    ap.add_argument("--attacks", default=None, help="comma-separated attack labels of the grid (default: every one)")
    ap.add_argument("--levels", default="0.4", help="the expert_ensemble agreement levels, comma-separated")
    ap.add_argument("--cache", default=".cache/shared-trunk")
    ap.add_argument("--out", default=None, help="write the rows here as JSON")
    args = ap.parse_args(argv)

    from badexpert.pipeline.grid import load_grid, plan

    os.environ.setdefault("BADEXPERT_QUIET", "1")
    grid = load_grid(args.grid)
    det_params = next(d["params"] for d in grid["detectors"] if d["name"] == "badexpert")
    specs = {s["attack"]: {**s, "detector_params": det_params} for s in plan(grid)}
    wanted = args.attacks.split(",") if args.attacks else list(specs)
    missing = [a for a in wanted if a not in specs]
    if missing:
        ap.error(f"attacks not in the grid: {missing}")
    levels = [float(v) for v in args.levels.split(",")]
    label = "ensemble-" + "-".join(f"{v:g}" for v in levels)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for i, attack in enumerate(wanted):
        full, _, _ = detection(specs[attack], None, Path(args.cache), log)
        ens, _, _ = detection(specs[attack], None, Path(args.cache), log, extra={"expert_ensemble": levels},
                              label=label)
        rows += [full, ens]
        log(f"[{i + 1}/{len(wanted)}] {attack}: full {full['auroc_filtered']:.4f}/{full['asr_after']:.3f}, "
            f"{label} {ens['auroc_filtered']:.4f}/{ens['asr_after']:.3f}")
    lines = [f"| attack | full: AUROC / paper's / ASR after | {label}: AUROC / paper's / ASR after |", "|---|---|---|"]
    deltas, asr = [], []
    for a in wanted:
        f, e = (next(r for r in rows if r["attack"] == a and r["cut"] == v) for v in ("full", label))
        cell = lambda r: f"{100 * r['auroc']:.2f}% / {100 * r['auroc_filtered']:.2f}% / {100 * r['asr_after']:.1f}%"  # noqa: E731
        lines.append(f"| {a} | {cell(f)} | {cell(e)} |")
        deltas.append(100 * (e["auroc_filtered"] - f["auroc_filtered"]))
        asr.append(100 * (e["asr_after"] - f["asr_after"]))
    d = np.array(deltas)
    lines.append(f"\nΔAUROC (paper's population) mean {d.mean():+.2f}, worst {d.min():+.2f} "
                 f"({wanted[int(d.argmin())]}); ΔASR after mean {np.mean(asr):+.2f} points")
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"grid": args.grid, "levels": levels, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
