"""Benchmark grid: dataset x attack x BaDExpert preset, checked against the project's targets.

Not part of CI. Each cell runs the whole pipeline (suspect models are cached by content hash in
``--cache-dir``, so presets share one trained model and an interrupted grid resumes) and writes
its full report under ``--out/<dataset>-<arch>-<attack>-<preset>/``. A summary table (Markdown)
and ``summary.json`` go to ``--out``. Record results in bench/RESULTS.md with the command, the
machine and the date.

Examples::

    python bench/run.py --dataset fashion-mnist --out runs/bench-fmnist
    python bench/run.py --dataset cifar10 --data-path ../shared/data/cifar10-jpeg.zip \
        --arch resnet18 --width 16 --epochs 15 --out runs/bench-c10
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from badexpert.experiment import ExperimentConfig, run
from badexpert.utils import write_json

#: Targets from the issue: AUROC >= 99%; at 1% target FPR, ASR after defense <= 5% (Blend: the
#: paper's 11.4%), clean-accuracy drop <= 1.5 points, realized FPR within 1% +/- 0.5;
#: throughput no worse than 1/3.3 of the bare model.
TARGETS = {"auroc": 0.99, "asr": 0.05, "asr_blend": 0.114, "ca_drop": 0.015, "fpr_lo": 0.005, "fpr_hi": 0.015,
           "throughput": 1 / 3.3}


def check(m: dict) -> dict[str, bool]:
    d = m["defense"]
    asr_bar = TARGETS["asr_blend"] if m["attack"]["name"] == "blend" else TARGETS["asr"]
    return {
        "auroc": d["auroc"] >= TARGETS["auroc"],
        "asr": d["attack_success_rate"] <= asr_bar,
        "ca_drop": d["clean_accuracy_drop"] <= TARGETS["ca_drop"],
        "fpr": TARGETS["fpr_lo"] <= d["fpr"] <= TARGETS["fpr_hi"],
        "throughput": d["cost"]["throughput_ratio"] >= TARGETS["throughput"],
    }


def row(m: dict, preset: str, wall: float) -> str:
    if m.get("attack_failed"):
        return (f"| {m['attack']['name']} | {preset} | {m['clean_accuracy']:.1%} | {m['attack_success_rate']:.1%} | "
                "attack failed: no detection numbers | | | | | | |")
    d = m["defense"]
    ok = check(m)
    mark = lambda k: "" if ok[k] else " ✗"  # noqa: E731
    return (
        f"| {m['attack']['name']} | {preset} | {m['clean_accuracy']:.1%} | {m['attack_success_rate']:.1%} | "
        f"{d['auroc']:.2%}{mark('auroc')} | {d['auroc_filtered']:.2%} | "
        f"{d['attack_success_rate']:.1%}{mark('asr')} | {100 * d['clean_accuracy_drop']:.2f}{mark('ca_drop')} | "
        f"{d['fpr']:.2%}{mark('fpr')} | {d['timings']['fit_s']:.0f} | {d['cost']['throughput_ratio']:.2f}{mark('throughput')} |"
    )


HEADER = (
    "| attack | preset | CA | ASR | AUROC | AUROC (filtered) | ASR after | CA drop (pts) | FPR (target 1%) | fit (s) | "
    "throughput vs model |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-path", default=None)
    p.add_argument("--arch", default="cnn")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="suspect-model training epochs (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--attacks", default="badnet,blend,trojan")
    p.add_argument("--presets", default="auto,paper")
    p.add_argument("--poison-rate", type=float, default=0.01)
    p.add_argument("--fpr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=".cache/bench")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    out = Path(args.out)
    recipe = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
    rows, results = [], []
    for attack in args.attacks.split(","):
        for preset in args.presets.split(","):
            cfg = ExperimentConfig(
                dataset=args.dataset, data_path=args.data_path, arch=args.arch, width=args.width, attack=attack,
                attack_params={"poison_rate": args.poison_rate}, recipe=recipe, train_size=args.train_size,
                detector_params={"preset": preset}, fpr=args.fpr, seed=args.seed, device=args.device,
            )
            name = f"{args.dataset}-{args.arch}" + (f"-w{args.width}" if args.width else "") + f"-{attack}-{preset}"
            t0 = time.perf_counter()
            m = run(cfg, out / name, cache_dir=args.cache_dir, log=lambda s: print(f"[{name}] {s}", file=sys.stderr, flush=True))
            wall = time.perf_counter() - t0
            rows.append(row(m, preset, wall))
            results.append({"cell": name, "wall_s": wall, "checks": None if m.get("attack_failed") else check(m),
                            "metrics": m})
            print(HEADER.splitlines()[0] if len(rows) == 1 else "", rows[-1], sep="\n" if len(rows) == 1 else "", flush=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    table = HEADER + "\n" + "\n".join(rows)
    write_json(out / "summary.json", {"args": vars(args), "machine": machine, "targets": TARGETS, "cells": results})
    (out / "summary.md").write_text(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
