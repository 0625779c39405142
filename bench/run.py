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
import json
import platform
import sys
import time
from pathlib import Path

import torch

from badexpert.pipeline.experiment import ExperimentConfig, make_splits, run, train_suspect
from badexpert.utils import write_json

#: Targets from the issue: AUROC >= 99%; at 1% target FPR, ASR after defense <= 5% (Blend: the
#: paper's 11.4%), clean-accuracy drop <= 1.5 points, realized FPR within 1% +/- 0.5;
#: throughput no worse than 1/3.3 of the bare model.
TARGETS = {"auroc": 0.99, "asr": 0.05, "asr_blend": 0.114, "ca_drop": 0.015, "fpr_lo": 0.005, "fpr_hi": 0.015,
           "throughput": 1 / 3.3}
#: Targets of the attack suites (issues #6, #7): an implant reaches ASR >= 85% with clean accuracy
#: within 2 points of a clean model trained with the same recipe; BaDExpert's AUROC on the paper's
#: (filtered) population >= 99% on average and >= 95% on every attack, ASR after defense <= 5% on average.
SUITE_TARGETS = {"implant_asr": 0.85, "implant_ca_gap": 0.02, "auroc_mean": 0.99, "auroc_min": 0.95, "asr_after_mean": 0.05}


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


def row(m: dict, preset: str) -> str:
    if m.get("attack_failed"):
        return (f"| {m['attack']['name']} | {preset} | {m['clean_accuracy']:.1%} | {m['attack_success_rate']:.1%} | "
                "attack failed: no detection numbers | | | | | | | |")
    d = m["defense"]
    ok = check(m)
    mark = lambda k: "" if ok[k] else " ✗"  # noqa: E731
    return (
        f"| {m['attack']['name']} | {preset} | {m['clean_accuracy']:.1%} | {m['attack_success_rate']:.1%} | "
        f"{d['auroc']:.2%}{mark('auroc')} | {d['auroc_filtered']:.2%} | "
        f"{d['attack_success_rate']:.1%}{mark('asr')} | {100 * d['clean_accuracy_drop']:.2f}{mark('ca_drop')} | "
        f"{d['fpr']:.2%}{mark('fpr')} | {d['tpr_at_fpr']['1%']:.1%} | {d['timings']['fit_s']:.0f} | "
        f"{d['cost']['throughput_ratio']:.2f}{mark('throughput')} |"
    )


HEADER = (
    "| attack | preset | CA | ASR | AUROC | AUROC (filtered) | ASR after | CA drop (pts) | FPR (target 1%) | "
    "TPR at 1% FPR | fit (s) | throughput vs model |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def clean_baseline(args, recipe: dict) -> dict:
    """A model trained on clean data with the same recipe, split and seed (cached like the suspect
    models): the clean accuracy each attack's model is compared with."""
    from badexpert.training import accuracy

    cfg = ExperimentConfig(dataset=args.dataset, data_path=args.data_path, arch=args.arch, width=args.width,
                           attack=None, recipe=recipe, train_size=args.train_size, seed=args.seed, device=args.device)
    splits = make_splits(cfg)
    model, meta = train_suspect(cfg, splits, cache_dir=args.cache_dir,
                                log=lambda s: print(f"[clean] {s}", file=sys.stderr, flush=True))
    return {"clean_accuracy": accuracy(model, splits.test), "train_seconds": meta.get("train_seconds")}


def implant_rows(results: list[dict], clean_ca: float) -> list[str]:
    """Per attack: ASR and CA next to the clean model's CA, against the suite's implant target."""
    out, seen = [], set()
    for r in results:
        m = r["metrics"]
        name = m["attack"]["name"]
        if name in seen:
            continue
        seen.add(name)
        gap = m["clean_accuracy"] - clean_ca
        ok = m["attack_success_rate"] >= SUITE_TARGETS["implant_asr"] and gap >= -SUITE_TARGETS["implant_ca_gap"]
        out.append(f"| {name} | {m['clean_accuracy']:.1%} | {clean_ca:.1%} | {100 * gap:+.2f} | "
                   f"{m['attack_success_rate']:.1%} | {'yes' if ok else 'no'} |")
    return out


def suite_summary(results: list[dict]) -> str:
    """Mean and minimum filtered AUROC and mean ASR after defense over the attacks that implanted."""
    ok = [r["metrics"]["defense"] for r in results if not r["metrics"].get("attack_failed")]
    if not ok:
        return "No attack implanted: no detection numbers."
    au = [d["auroc_filtered"] for d in ok]
    asr = [d["attack_success_rate"] for d in ok]
    t = SUITE_TARGETS
    return (f"Over the {len(ok)} cells with an implanted backdoor: AUROC (paper's population) mean {sum(au) / len(au):.2%} "
            f"(target >= {t['auroc_mean']:.0%}: {'met' if sum(au) / len(au) >= t['auroc_mean'] else 'missed'}), "
            f"minimum {min(au):.2%} (target >= {t['auroc_min']:.0%}: {'met' if min(au) >= t['auroc_min'] else 'missed'}); "
            f"ASR after defense mean {sum(asr) / len(asr):.2%} (target <= {t['asr_after_mean']:.0%}: "
            f"{'met' if sum(asr) / len(asr) <= t['asr_after_mean'] else 'missed'}).")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-path", default=None)
    p.add_argument("--arch", default="cnn")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="suspect-model training epochs (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                   help="other training-recipe fields, JSON values (e.g. pad=0 for flips without crops)")
    p.add_argument("--attacks", default="badnet,blend,trojan")
    p.add_argument("--presets", default="auto,paper")
    p.add_argument("--poison-rate", type=float, default=None,
                   help="every attack's poison rate (default: each attack's own reference rate)")
    p.add_argument("--attack-param", action="append", default=[], metavar="[ATTACK:]KEY=VALUE",
                   help="another attack parameter, JSON value, for every attack or only ATTACK (repeatable), "
                        "e.g. tact:cover_rate=0.02")
    p.add_argument("--detector-param", action="append", default=[], metavar="KEY=VALUE",
                   help="another BaDExpert parameter for every cell, JSON value (e.g. expert_agreement=0.95)")
    p.add_argument("--fpr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=".cache/bench")
    p.add_argument("--out", required=True)
    p.add_argument("--clean-baseline", action="store_true",
                   help="also train a clean model with the same recipe and compare each attack's CA and ASR with it")
    p.add_argument("--overwrite", action="store_true",
                   help="re-run cells that already have results under --out (default: reuse them, so an "
                        "interrupted grid resumes where it stopped)")
    args = p.parse_args(argv)

    out = Path(args.out)
    recipe = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
    for item in args.recipe:
        key, _, value = item.partition("=")
        recipe[key] = json.loads(value)
    detector_params = {}
    for item in args.detector_param:
        key, _, value = item.partition("=")
        detector_params[key] = json.loads(value)
    rows, results, rule_rows = [], [], []
    baseline = clean_baseline(args, recipe) if args.clean_baseline else None
    if baseline:
        print(f"clean model: CA {baseline['clean_accuracy']:.2%}", file=sys.stderr, flush=True)
    for attack in args.attacks.split(","):
        attack_params = {} if args.poison_rate is None else {"poison_rate": args.poison_rate}
        for item in args.attack_param:
            key, _, value = item.partition("=")
            scope, _, key = key.rpartition(":")
            if scope in ("", attack):
                attack_params[key] = json.loads(value)
        for preset in args.presets.split(","):
            cfg = ExperimentConfig(
                dataset=args.dataset, data_path=args.data_path, arch=args.arch, width=args.width, attack=attack,
                attack_params=attack_params, recipe=recipe, train_size=args.train_size,
                detector_params={"preset": preset, **detector_params}, fpr=args.fpr, seed=args.seed, device=args.device,
            )
            name = f"{args.dataset}-{args.arch}" + (f"-w{args.width}" if args.width else "") + f"-{attack}-{preset}"
            t0 = time.perf_counter()
            done = out / name / "metrics.json"
            reused = done.is_file() and not args.overwrite
            if reused:  # a finished cell (runs are written atomically)
                m = json.loads(done.read_text())
                print(f"[{name}] reusing the finished cell {out / name}", file=sys.stderr, flush=True)
            else:
                m = run(cfg, out / name, cache_dir=args.cache_dir, overwrite=args.overwrite,
                        log=lambda s: print(f"[{name}] {s}", file=sys.stderr, flush=True))
            wall = None if reused else time.perf_counter() - t0
            rows.append(row(m, preset))
            rules = None if m.get("attack_failed") else m["defense"].get("diagnostics", {}).get("auroc_by_score_rule")
            results.append({"cell": name, "wall_s": wall, "checks": None if m.get("attack_failed") else check(m),
                            "auroc_by_score_rule": rules, "metrics": m})
            rule_rows.append((attack, preset, rules))  # the detector's own diagnostics (BaDExpert: every score rule)
            if len(rows) == 1:
                print(HEADER.splitlines()[0])
            print(rows[-1], flush=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    table = HEADER + "\n" + "\n".join(rows) + "\n\n" + suite_summary(results)
    if baseline:
        table = ("| attack | CA | clean model CA | CA vs clean (pts) | ASR | ASR >= 85% and CA within 2 pts |\n"
                 "|---|---|---|---|---|---|\n" + "\n".join(implant_rows(results, baseline["clean_accuracy"]))
                 + "\n\n" + table)
    names = next((list(r) for _, _, r in rule_rows if r), [])
    if names:
        table += ("\n\nAUROC of each score rule on the same fitted models:\n\n| attack | preset | " + " | ".join(names)
                  + " |\n|---|---|" + "---|" * len(names) + "\n" + "\n".join(
                      f"| {a} | {p} | " + " | ".join("n/a" if r is None else f"{r[k]:.2%}" for k in names) + " |"
                      for a, p, r in rule_rows))
    write_json(out / "summary.json", {"args": vars(args), "machine": machine, "targets": TARGETS,
                                      "suite_targets": SUITE_TARGETS, "clean_baseline": baseline, "cells": results})
    (out / "summary.md").write_text(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
