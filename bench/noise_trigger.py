"""Does Gaussian noise fire the backdoor? The noisy copies of the paper's protocol, per grid cell.

    OMP_NUM_THREADS=1 python bench/noise_trigger.py --grid configs/grids/adaptive-cifar10.json \\
        [--cache-dir .cache/grid] [--attacks blend,expert_aware-s1]

Under ``noisy_clean`` the grid counts a Gaussian-noised copy of every clean test image (sigma 0.05
in [0, 1] pixel space) as a clean negative (``auroc_noisy``). When the noise itself fires the
backdoor (a trigger that is random noise, blended: Blend's, the BaDExpert-aware attack's), those
copies are backdoor inputs in all but name, and a detector that rejects them loses noisy AUROC
for doing its job. For every cell of the grid whose suspect model is in the cache, this prints the
model's clean accuracy and attack success rate, its accuracy on the noisy copy, and the share of
the counted test images (those of a class the attack sends elsewhere) that the model sends to the
attack's target, clean and noisy; and how many noisy copies the model gets right, and how many of
those are of the target class (where the noise fires the backdoor, the model is right on them by
coincidence, and the paper's population keeps them as clean negatives; n/a for all-to-all). The test split, the triggered copy and the noisy copy are the
grid's own (:func:`badexpert.evaluation.core.model_outputs` with the cell's seed); nothing is
trained or written.
"""

from __future__ import annotations

import argparse
import sys


def noise_row(spec: dict, cache_dir: str, splits_cache: dict) -> dict | None:
    """The cell's numbers, or ``None`` when its suspect model is not in the cache."""
    from badexpert.attacks import attack_from_meta
    from badexpert.evaluation.core import model_outputs
    from badexpert.io import load_model
    from badexpert.pipeline.experiment import ExperimentConfig, make_splits, suspect_file

    path = suspect_file(cache_dir, spec["suspect"])
    if not path.is_file():
        return None
    cfg = ExperimentConfig.from_dict(spec["config"]).validate()
    data_key = (cfg.dataset, cfg.data_path, cfg.image_size, cfg.seed, cfg.reserved, cfg.calibration, cfg.train_size,
                cfg.test_size)
    if data_key not in splits_cache:
        splits_cache[data_key] = make_splits(cfg)
    test = splits_cache[data_key].test
    model, meta = load_model(path, device=cfg.device)
    attack = attack_from_meta(meta)
    out = model_outputs(model.eval(), test, attack, asr_bar=cfg.asr_bar, seed=cfg.seed, noisy_clean=True)
    counted = attack.counts(test.labels, test.num_classes)
    targets = attack.target_of(test.labels, test.num_classes)[counted]
    noisy_right = out.noisy_pred == test.labels
    return {"dataset": spec["dataset"], "arch": spec["arch"], "attack": spec["attack"], "seed": spec["seed"],
            "clean_accuracy": out.metrics["clean_accuracy"], "attack_success_rate": out.metrics["attack_success_rate"],
            "noisy_accuracy": out.metrics["noisy_clean"]["clean_accuracy"],
            "clean_to_target": float((out.clean_pred[counted] == targets).float().mean()),
            "noisy_to_target": float((out.noisy_pred[counted] == targets).float().mean()),
            # the noisy copies the model gets right whose class is the target: where the noise fires
            # the backdoor, right by coincidence (the paper's population keeps them as clean negatives)
            "noisy_right": int(noisy_right.sum()),
            "noisy_right_target_class": None if attack.all_to_all else
            int((noisy_right & (test.labels == attack.target)).sum())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", required=True, help="a grid config (configs/grids/*.json)")
    ap.add_argument("--cache-dir", default=".cache/grid", help="the grid's cache, where its suspect models are")
    ap.add_argument("--attacks", default=None, help="comma-separated attack labels of the grid (default: every one)")
    args = ap.parse_args(argv)

    from badexpert.errors import BadExpertError
    from badexpert.pipeline.grid import load_grid, plan

    try:
        specs = plan(load_grid(args.grid), cache_dir=args.cache_dir)
        wanted = None if args.attacks is None else [a.strip() for a in args.attacks.split(",") if a.strip()]
        if wanted is not None:
            unknown = sorted(set(wanted) - {s["attack"] for s in specs})
            if unknown:
                raise BadExpertError(f"--attacks: {', '.join(unknown)} not in the grid's attacks "
                                     f"({', '.join(dict.fromkeys(s['attack'] for s in specs))})")
            specs = [s for s in specs if s["attack"] in wanted]
        splits_cache: dict = {}
        print(f"Command: `OMP_NUM_THREADS=1 python bench/noise_trigger.py --grid {args.grid}"
              + (f" --attacks {args.attacks}" if args.attacks else "") + "`\n")
        print("| dataset | arch | attack | seed | CA | ASR | CA on the noisy copy | counted clean -> target | "
              "counted noisy -> target | noisy copies right: of the target class |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for spec in specs:
            row = noise_row(spec, args.cache_dir, splits_cache)
            cells = ["suspect model not in the cache"] + [""] * 5 if row is None else [
                f"{row[k]:.1%}" for k in ("clean_accuracy", "attack_success_rate", "noisy_accuracy", "clean_to_target",
                                          "noisy_to_target")] + [
                f"{row['noisy_right']}: {'n/a' if row['noisy_right_target_class'] is None else row['noisy_right_target_class']}"]
            print(f"| {spec['dataset']} | {spec['arch']} | {spec['attack']} | {spec['seed']} | " + " | ".join(cells) + " |",
                  flush=True)
    except BadExpertError as exc:
        print(f"noise_trigger: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
