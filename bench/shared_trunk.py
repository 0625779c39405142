"""BaDExpert with a shared trunk (issue 22): detection and guard throughput per cut point.

    OMP_NUM_THREADS=1 python bench/shared_trunk.py [--grid configs/grids/baselines-fmnist.json] \
        [--attacks badnet,blend,trojan,wanet,sig,bpp,adaptive_blend,adaptive_patch,tact] \
        [--cuts full,block1,block2,block3] [--cache .cache/shared-trunk] [--out runs/shared-trunk.json]

For every attack of the grid (its cells: dataset, architecture, poisoning, recipe, splits, seed)
the suspect model is read from the grid's cache (``.cache/grid``, read only) where it is, or
trained by :func:`badexpert.pipeline.experiment.train_suspect` into ``--cache``. For each cut
(``full``: today's BaDExpert; a cut point of the architecture: ``shared_trunk=CUT``) BaDExpert is
fitted with the grid's parameters (``preset="auto"``) on the reserved split, calibrated at the
grid's FPR on the calibration split and evaluated on the test split by
:func:`badexpert.compare` (AUROC over every input and on the paper's population, CA and ASR after
filtering). Each (attack, cut) result and its detector file are cached under ``--cache``: an
interrupted run resumes where it stopped.

Throughput (on the first attack's model; it depends on the architecture and cut, not on the
attack): images per second of the bare model and of the guard, in eager PyTorch (:class:`Guard`)
and under onnxruntime (the bare model exported alone, and the guard's one graph through
:class:`OnnxGuard`), measured side by side in one process on the test and calibration splits
(3,000 Fashion-MNIST images) in uint8 batches,
best of ``--repeats`` passes after a warm-up (``bench/onnx_speed.py``'s timer), the four
interleaved pass by pass. ``trunk_flops``
is the trunk's share of the model's multiply-adds (torch's FLOP counter, one input): a guard then
computes ``1 + 2 (1 - share)`` model passes' worth instead of 3.

Prints a Markdown table and writes the whole record as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_speed import _best  # noqa: E402  the one timer of the throughput benchmarks

DEFAULT_ATTACKS = "badnet,blend,trojan,wanet,sig,bpp,adaptive_blend,adaptive_patch,tact"
GRID_CACHE = Path(".cache/grid")


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trunk_flops_share(model, cut: str | None, input_shape) -> float:
    """The trunk's share of the model's FLOPs (0 for the full method: nothing is shared)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from badexpert.models import split_model

    if cut is None:
        return 0.0
    x = torch.rand(1, *input_shape)
    with torch.no_grad():
        with FlopCounterMode(display=False) as whole:
            model(x)
        trunk, _ = split_model(model, cut)
        with FlopCounterMode(display=False) as part:
            trunk(x)
    return part.get_total_flops() / max(1, whole.get_total_flops())


def detection(spec: dict, cut: str | None, cache: Path, log, *, extra: dict | None = None,
              label: str | None = None) -> tuple[dict, object, object]:
    """One (attack, cut) cell: its metrics (cached as JSON) and the fitted detector, model, splits.
    ``extra``: further BaDExpert parameters of the variant (``label`` names it in the row and the cache)."""
    from badexpert import compare
    from badexpert.attacks import attack_from_meta
    from badexpert.detectors import get_detector, load_detector
    from badexpert.pipeline.experiment import ExperimentConfig, make_splits, suspect_key, train_suspect
    from badexpert.utils import seed_everything

    cfg = ExperimentConfig.from_dict(spec["config"]).validate()
    skey = suspect_key(cfg, cfg.make_recipe())
    source = GRID_CACHE if (GRID_CACHE / f"suspect-{skey}.safetensors").is_file() else cache
    splits = make_splits(cfg)
    model, meta = train_suspect(cfg, splits, cache_dir=source, log=log)
    attack = attack_from_meta(meta)
    params = {"preset": "auto", **spec["detector_params"], "seed": cfg.seed, "shared_trunk": cut, **(extra or {})}
    key = _key({"suspect": skey, "params": params, "fpr": cfg.fpr, "split": [cfg.reserved, cfg.calibration,
                                                                             cfg.test_size]})
    variant = label or cut or "full"
    name = f"{spec['attack']}-{variant}-{key}"
    result_path, det_path = cache / f"result-{name}.json", cache / f"detector-{name}.safetensors"
    det = None
    if det_path.is_file():
        det = load_detector(det_path, model)
    if result_path.is_file() and det is not None:
        return json.loads(result_path.read_text()), det, (model, splits)
    det = det or get_detector("badexpert", device=cfg.device, **params)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    res = compare(model, [det], splits, attack, fpr=cfg.fpr, seed=cfg.seed, device=cfg.device, asr_bar=cfg.asr_bar,
                  n_boot=0, throughput=False, log=log)
    m, d = res.metrics["model"], res.metrics["detectors"][0]
    row = {"attack": spec["attack"], "cut": variant, "suspect": f"{source}/suspect-{skey}.safetensors",
           "clean_accuracy": m["clean_accuracy"], "attack_success_rate": m["attack_success_rate"],
           "auroc": d["auroc"], "auroc_filtered": d["auroc_filtered"], "ca_after": d["clean_accuracy"],
           "asr_after": d["attack_success_rate"], "fit": det.fit_summary(), "seconds": time.perf_counter() - t0}
    cache.mkdir(parents=True, exist_ok=True)
    det.save(det_path)
    from badexpert.utils import atomic_write_bytes

    atomic_write_bytes(result_path, json.dumps(row, indent=1).encode())
    return row, det, (model, splits)


def throughput(model, det, images, *, batch_size: int, repeats: int, threads: int) -> dict:
    """Images per second of the bare model and the guard, eager and onnxruntime, side by side."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from badexpert import Guard
    from badexpert.deploy.export import build_onnx, export_model_onnx
    from badexpert.runtime.onnx import OnnxGuard

    guard = Guard(model, det)
    torch_batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    np_batches = [b.numpy() for b in torch_batches]
    onnx_guard = OnnxGuard(build_onnx(guard), providers=["CPUExecutionProvider"], intra_op_threads=threads,
                           batch_size=batch_size)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    bare = ort.InferenceSession(export_model_onnx(model, guard.input_shape), sess_options=opts,
                                providers=["CPUExecutionProvider"])

    def eager_model(b):
        with torch.no_grad():
            return model(b.float().div_(255))

    def onnx_model(b):
        return bare.run(None, {"images": b.astype(np.float32) / np.float32(255)})

    agree = float(np.mean(np.concatenate([onnx_guard(b)["reject"] for b in np_batches])
                          == torch.cat([guard(b).reject for b in torch_batches]).numpy()))
    runs = {"eager_model": (eager_model, torch_batches), "eager_guard": (guard, torch_batches),
            "onnx_model": (onnx_model, np_batches), "onnx_guard": (onnx_guard, np_batches)}
    seconds = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):  # interleaved, so that a busy spell of a shared machine hits all four alike
        for k, (fn, batches) in runs.items():
            seconds[k] = min(seconds[k], _best(fn, batches, 1))
    ips = {k: len(images) / v for k, v in seconds.items()}
    return {"images_per_s": {k: round(v, 1) for k, v in ips.items()},
            "eager": ips["eager_guard"] / ips["eager_model"], "onnx": ips["onnx_guard"] / ips["onnx_model"],
            "reject_agreement": agree}


def summary_table(rows: list[dict], speed: dict, cuts: list[str]) -> str:
    import numpy as np

    full = {r["attack"]: r for r in rows if r["cut"] == "full"}
    lines = ["| variant | trunk FLOPs | guard / model, eager | guard / model, onnxruntime | AUROC (paper's population) "
             "mean / worst | ΔAUROC vs full mean / worst (points) | ASR after mean / worst | ΔASR after mean | "
             "CA after mean |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cut in cuts:
        rs = [r for r in rows if r["cut"] == cut and r.get("auroc_filtered") is not None]
        if not rs:
            continue
        au = np.array([r["auroc_filtered"] for r in rs])
        asr = np.array([r["asr_after"] for r in rs])
        ca = np.array([r["ca_after"] for r in rs])
        pairs = [(r, full[r["attack"]]) for r in rs if r["attack"] in full]
        d_au = np.array([100 * (r["auroc_filtered"] - b["auroc_filtered"]) for r, b in pairs])
        d_asr = np.array([100 * (r["asr_after"] - b["asr_after"]) for r, b in pairs])
        s = speed.get(cut, {})
        lines.append(
            f"| {cut} | {s.get('trunk_flops', float('nan')):.0%} | {s.get('eager', float('nan')):.2f}x | "
            f"{s.get('onnx', float('nan')):.2f}x | {100 * au.mean():.2f}% / {100 * au.min():.2f}% | "
            f"{d_au.mean():+.2f} / {d_au.min():+.2f} | {100 * asr.mean():.1f}% / {100 * asr.max():.1f}% | "
            f"{d_asr.mean():+.2f} | {100 * ca.mean():.1f}% |")
    lines += ["", "| attack | " + " | ".join(cuts) + " |", "|---|" + "---|" * len(cuts)]
    by = {(r["attack"], r["cut"]): r for r in rows}
    for attack in dict.fromkeys(r["attack"] for r in rows):
        cells = []
        for cut in cuts:
            r = by.get((attack, cut))
            cells.append("—" if r is None or r.get("auroc_filtered") is None
                         else f"{100 * r['auroc_filtered']:.2f}% / {100 * r['asr_after']:.1f}%")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rule(rows: list[dict], cuts: list[str]) -> dict:
    """Issue 22's rule on this suite: mean AUROC within 0.5 points of the full method's, no attack
    more than 2 points below, mean ASR after no more than 1 point worse."""
    import numpy as np

    full = {r["attack"]: r for r in rows if r["cut"] == "full"}
    out = {}
    for cut in cuts:
        if cut == "full":
            continue
        rs = [r for r in rows if r["cut"] == cut and r["attack"] in full and r.get("auroc_filtered") is not None]
        if not rs:
            continue
        d_au = np.array([100 * (r["auroc_filtered"] - full[r["attack"]]["auroc_filtered"]) for r in rs])
        d_asr = np.array([100 * (r["asr_after"] - full[r["attack"]]["asr_after"]) for r in rs])
        out[cut] = {"mean_auroc_delta": float(d_au.mean()), "worst_auroc_delta": float(d_au.min()),
                    "mean_asr_delta": float(d_asr.mean()),
                    "meets_rule": bool(d_au.mean() >= -0.5 and d_au.min() >= -2 and d_asr.mean() <= 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="configs/grids/baselines-fmnist.json")
    ap.add_argument("--attacks", default=DEFAULT_ATTACKS)
    ap.add_argument("--cuts", default=None, help="comma-separated: full and cut points (default: full and every cut)")
    ap.add_argument("--cache", default=".cache/shared-trunk")
    ap.add_argument("--out", default=None, help="write the JSON record here")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from badexpert.models import cut_points
    from badexpert.pipeline.grid import load_grid, plan

    torch.set_num_threads(args.threads)
    os.environ.setdefault("BADEXPERT_QUIET", "1")
    cache = Path(args.cache)
    grid = load_grid(args.grid)
    det_params = next(d["params"] for d in grid["detectors"] if d["name"] == "badexpert")
    wanted = args.attacks.split(",")
    specs = {s["attack"]: {**s, "detector_params": det_params} for s in plan(grid)}
    missing = [a for a in wanted if a not in specs]
    if missing:
        ap.error(f"attacks not in the grid: {missing}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows, speed, cuts = [], {}, None
    for i, attack in enumerate(wanted):
        started = time.perf_counter()
        first, det, (model, splits) = detection(specs[attack], None, cache, log)
        if cuts is None:  # the cut points the (first) model declares: every model of the suite has the same
            cuts = ["full", *cut_points(model)] if args.cuts is None else args.cuts.split(",")
        rows.append(first)
        dets = {"full": det}
        for cut in cuts:
            if cut == "full":
                continue
            row, dets[cut], _ = detection(specs[attack], cut, cache, log)
            rows.append(row)
        log(f"[{i + 1}/{len(wanted)}] {attack}: " + ", ".join(
            f"{r['cut']} {r['auroc_filtered']:.4f}/{r['asr_after']:.3f}" for r in rows if r["attack"] == attack
            and r.get("auroc_filtered") is not None) + f" ({time.perf_counter() - started:.0f} s)")
        if i == 0:  # throughput on the first model, every cut side by side (test and calibration images)
            images = torch.cat([splits.test.images, splits.calibration.images])
            for cut in cuts:
                speed[cut] = {"trunk_flops": trunk_flops_share(model, None if cut == "full" else cut,
                                                               tuple(images.shape[1:])),
                              **throughput(model, dets[cut], images, batch_size=args.batch_size,
                                           repeats=args.repeats, threads=args.threads)}
                log(f"throughput {cut}: eager {speed[cut]['eager']:.3f}x, onnxruntime {speed[cut]['onnx']:.3f}x")
    import onnxruntime as ort

    record = {"grid": args.grid, "attacks": wanted, "cuts": cuts, "rows": rows, "throughput": speed,
              "throughput_model": rows[0]["suspect"], "rule_on_this_suite": rule(rows, cuts),
              "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                           "python": platform.python_version()},
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "threads": args.threads}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    print(summary_table(rows, speed, cuts))
    print()
    print(json.dumps(record["rule_on_this_suite"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
