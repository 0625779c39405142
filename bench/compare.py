"""Detectors side by side on several suspect models: ``badexpert compare`` per model, then one
summary (AUROC on the paper's population and ASR after defense per attack and detector, mean
per detector, measured cost).

Not part of CI. Each model's comparison goes to ``--out/<name>/`` (the name of the model file's
directory, or of the file); a finished one is reused, so an interrupted run resumes. Record
results in bench/RESULTS.md with the command, the machine and the date.

Example (the Fashion-MNIST models of ``bench/run.py``)::

    python bench/compare.py --models runs/bench-fmnist-recover/*-auto/model.safetensors \\
        --detectors badexpert,strip,scale_up --test-size 2000 --out runs/compare-fmnist

``--merge DIR ...`` runs nothing: it summarises the finished comparisons of several earlier
``--out`` directories in one table (per model, each detector from the first directory that has
it; rows in the attack registry's order)::

    python bench/compare.py --merge runs/compare-c10 runs/compare-c10-more --detectors badexpert,strip
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from badexpert.attacks import ATTACKS
from badexpert.cli import main as cli
from badexpert.utils import write_json


def cell_name(model: Path) -> str:
    return model.parent.name if model.name == "model.safetensors" else model.stem


def summary(results: dict[str, dict], detectors: list[str]) -> str:
    head = "| attack | ASR (no defense) | " + " | ".join(f"{d} AUROC / ASR after" for d in detectors) + " |"
    lines = [head, "|---|---|" + "---|" * len(detectors)]
    per: dict[str, list[tuple[float, float]]] = {d: [] for d in detectors}
    cost: dict[str, list[tuple[int, float]]] = {d: [] for d in detectors}
    for name, m in results.items():
        attack = (m.get("attack") or {}).get("name", name)
        rows = {d["name"]: d for d in m["detectors"]}
        asr = m["model"].get("attack_success_rate")
        cells = []
        for det in detectors:
            d = rows.get(det)
            if d is None:
                cells.append("n/a")
                continue
            per[det].append((d["auroc_filtered"], d["attack_success_rate"]))
            cost[det].append((d["cost"]["forward_passes_per_input"], d["cost"].get("throughput_ratio")))
            cells.append(f"{100 * d['auroc_filtered']:.2f}% / {100 * d['attack_success_rate']:.1f}%")
        lines.append(f"| {attack} | {'n/a' if asr is None else f'{100 * asr:.1f}%'} | " + " | ".join(cells) + " |")
    means = []
    for det in detectors:
        v = per[det]
        means.append("n/a" if not v else
                     f"{100 * sum(a for a, _ in v) / len(v):.2f}% / {100 * sum(s for _, s in v) / len(v):.1f}%")
    lines.append("| **mean** | | " + " | ".join(means) + " |")
    lines += ["", "| detector | forward passes per input | throughput vs bare model (median over models) |", "|---|---|---|"]
    for det in detectors:
        c = cost[det]
        if c:
            ratios = sorted(r for _, r in c if r is not None)
            med = ratios[len(ratios) // 2] if ratios else None
            lines.append(f"| {det} | {c[0][0]} | {'n/a' if med is None else f'{med:.4f}x'} |")
    return "\n".join(lines) + "\n"


def merged(dirs: list[Path]) -> dict[str, dict]:
    """The finished comparisons (``<dir>/<model>/compare.json``) of several ``--out`` directories:
    per model, the detectors of every directory (the first one that has a detector wins), in the
    attack registry's order."""
    results: dict[str, dict] = {}
    for d in dirs:
        for f in sorted(d.glob("*/compare.json")):
            r = json.loads(f.read_text())
            have = results.setdefault(f.parent.name, {**r, "detectors": []})
            names = {x["name"] for x in have["detectors"]}
            have["detectors"] += [x for x in r["detectors"] if x["name"] not in names]
    order = list(ATTACKS)

    def rank(item):
        attack = (item[1].get("attack") or {}).get("name")
        return (order.index(attack) if attack in order else len(order), item[0])

    return dict(sorted(results.items(), key=rank))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="suspect model files (from bench/run.py or train)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                   help="run nothing: summarise the finished comparisons of these earlier --out directories")
    p.add_argument("--detectors", default="badexpert,strip,scale_up")
    p.add_argument("--detector-param", action="append", default=[], metavar="DETECTOR:KEY=VALUE")
    p.add_argument("--fpr", type=float, default=0.01)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out")
    args = p.parse_args(argv)
    detectors = [d.strip() for d in args.detectors.split(",")]
    if args.merge:
        if args.models:
            p.error("give --models (run) or --merge (summarise), not both")
        print(summary(merged(args.merge), detectors))
        return 0
    if not args.models or not args.out:
        p.error("--models and --out are required (or --merge DIR ... to summarise earlier runs)")
    out = Path(args.out)
    results = {}
    for model in map(Path, args.models):
        name = cell_name(model)
        done = out / name / "compare.json"
        if not done.is_file():
            argv = ["compare", "--model", str(model), "--detectors", args.detectors, "--fpr", str(args.fpr),
                    "--seed", str(args.seed), "--device", args.device, "--out", str(out / name)]
            for item in args.detector_param:
                argv += ["--detector-param", item]
            if args.test_size:
                argv += ["--test-size", str(args.test_size)]
            print(f"[{name}] badexpert {' '.join(argv)}", file=sys.stderr, flush=True)
            if cli(argv) != 0:
                print(f"[{name}] failed; see the error above", file=sys.stderr)
                continue
        results[name] = json.loads(done.read_text())
    table = summary(results, detectors)
    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    write_json(out / "summary.json", {"args": vars(args), "machine": machine, "results": results})
    (out / "summary.md").write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
