"""BaDExpert's clean-data-only knobs and score rules, explored on cached suspect models.

Not part of CI. For each model, BaDExpert is fitted once per ``--detector-param`` set (on the
model's own reserved split, seed 0, as the grid does) and the per-input log-odds of the
suspect model (``logit_m``), the backdoor expert (``logit_x``) and the auxiliary model
(``logit_y``) in M's label are cached under ``--out`` on the calibration, test and triggered test
inputs. Every rule is then evaluated from the cache without refitting: the threshold is the
conformal quantile at ``--fpr`` of the calibration scores of ``--calibrate-on`` (``correct``, the
detector's default: the calibration inputs M classifies correctly; ``all``: every one, the
detector's default before 2026-11-22); the AUROC is on the paper's population
(clean inputs M gets right vs triggered inputs the backdoor flips); ASR after defense counts
triggered inputs that are flipped and not rejected.

The rules are the detector's own (:data:`badexpert.detectors.badexpert.SCORES`) plus the
experimental ones below, which also use M's log-odds. A rule that wins here still has to win on
data it was not chosen on before it becomes a default. Record results in bench/RESULTS.md with
the command, the machine and the date.

Example::

    python bench/explore_rules.py --models .cache/grid/suspect-*.safetensors \\
        --detector-param expert_agreement=0.5 --rules logodds,with_model --out runs/explore-rules

(the suspect models a grid run with ``--cache-dir .cache/grid`` left in its cache)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from badexpert.attacks import attack_from_meta
from badexpert.cli import _kv, _splits_for
from badexpert.detectors import get_detector
from badexpert.detectors.badexpert import SCORES, _label_log_odds, combine
from badexpert.detectors.base import CALIBRATION_POPULATIONS, DEFAULT_POPULATION
from badexpert.evaluation.core import trigger_dataset
from badexpert.io import load_model
from badexpert.metrics import auroc, conformal_threshold
from badexpert.training import predict_logits



def cell_name(model: Path) -> str:
    """A model's row name: its folder for a ``model.safetensors``, else the file's stem."""
    return model.parent.name if model.name == "model.safetensors" else model.stem

#: Experimental rules over the log-odds of M (``m``), the expert (``x``) and the auxiliary model (``y``).
EXTRA = {
    # the expert's and M's confidence both count as evidence for the backdoor label
    "with_model": lambda m, x, y: x + m - 2 * y,
    # the expert's confidence relative to M's (how much of M's confidence the expert kept)
    "relative": lambda m, x, y: x - m - y,
    # M against the auxiliary model, no expert
    "model_aux": lambda m, x, y: m - y,
}


#: Digest of the source of BaDExpert and the detector base class.
DETECTOR_CODE = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (
    sys.modules["badexpert.detectors.badexpert"], sys.modules["badexpert.detectors.base"]))).hexdigest()[:16]


def dump(model_path: Path, params: dict, out: Path) -> dict[str, np.ndarray]:
    """Fit BaDExpert with ``params`` on the model's reserved split and cache the log-odds."""
    # the cache knows the model file (path and modification time), the parameters and the
    # detector's code (a change of its defaults or its fitting is a new entry)
    ident = {"params": params, "model": str(model_path.resolve()), "mtime_ns": model_path.stat().st_mtime_ns,
             "code": DETECTOR_CODE}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    path = out / f"{cell_name(model_path)}-{key}.npz"
    if path.exists():
        return dict(np.load(path))
    model, meta = load_model(model_path)
    _, splits = _splits_for(meta, meta, argparse.Namespace(dataset=None, data_path=None, image_size=None))
    attack = attack_from_meta(meta, source=f"'{model_path}'")
    det = get_detector("badexpert", seed=0, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det.fit(model, splits.reserved)
    trig, targets = trigger_dataset(attack, splits.test, seed=0)
    res: dict[str, np.ndarray] = {}
    for part, images in (("cal", splits.calibration.images), ("clean", splits.test.images), ("trig", trig.images)):
        conf = det.confidences(images)
        _, logit_m = _label_log_odds(predict_logits(model, images), conf["pred"])
        res.update({f"{part}_pred": conf["pred"].numpy(), f"{part}_m": logit_m.numpy(),
                    f"{part}_x": conf["logit_x"].numpy(), f"{part}_y": conf["logit_y"].numpy(),
                    f"{part}_px": conf["x"].numpy(), f"{part}_py": conf["y"].numpy()})
    res["cal_label"] = splits.calibration.labels.numpy()
    res["clean_label"] = splits.test.labels.numpy()
    res["trig_target"] = targets.numpy()
    out.mkdir(parents=True, exist_ok=True)
    np.savez(path, **res)
    print(f"[{cell_name(model_path)}] fitted with {params or 'defaults'}: {det.fit_summary()}", file=sys.stderr, flush=True)
    return res


def scores(d: dict[str, np.ndarray], part: str, rule: str) -> np.ndarray:
    m, x, y = (d[f"{part}_{k}"] for k in ("m", "x", "y"))
    if rule in EXTRA:
        return EXTRA[rule](m, x, y)
    if rule == "logodds":
        return x - y
    # the detector's own rules on its own confidences: exactly the numbers it would score
    return combine(torch.from_numpy(d[f"{part}_px"]), torch.from_numpy(d[f"{part}_py"]), rule).numpy()


def evaluate(d: dict[str, np.ndarray], rule: str, fpr: float, population: str) -> tuple[float, float, float, float]:
    """(AUROC on the paper's population, ASR after defense, realized FPR on ``population``, share
    of all clean test inputs rejected)."""
    s = {p: scores(d, p, rule) for p in ("cal", "clean", "trig")}
    cal = s["cal"][d["cal_pred"] == d["cal_label"]] if population == "correct" else s["cal"]
    thr = conformal_threshold(cal, fpr)
    correct = d["clean_pred"] == d["clean_label"]
    flipped = d["trig_pred"] == d["trig_target"]
    clean = s["clean"][correct] if population == "correct" else s["clean"]
    return (auroc(s["clean"][correct], s["trig"][flipped]), float(np.mean(flipped & (s["trig"] <= thr))),
            float(np.mean(clean > thr)), float(np.mean(s["clean"] > thr)))


def over_threshold(d: dict[str, np.ndarray], rule: str, fpr: float, population: str, classes: int) -> str:
    """Who the clean test inputs over the calibrated threshold are: how many, how many M gets
    wrong, M's labels and the true labels among them, and the auxiliary model's median log-odds
    in M's label for them and for the triggered inputs the backdoor flips."""
    s = {p: scores(d, p, rule) for p in ("cal", "clean", "trig")}
    cal = s["cal"][d["cal_pred"] == d["cal_label"]] if population == "correct" else s["cal"]
    thr = conformal_threshold(cal, fpr)
    over = s["clean"] > thr
    wrong = over & (d["clean_pred"] != d["clean_label"])
    flipped = d["trig_pred"] == d["trig_target"]
    count = lambda a: ", ".join(f"{c}: {n}" for c, n in enumerate(np.bincount(a, minlength=classes)) if n)  # noqa: E731
    return (f"threshold {thr:.2f}; {int(over.sum())} clean test inputs over it, {int(wrong.sum())} of them M's errors; "
            f"M's labels {{{count(d['clean_pred'][over])}}}, true labels {{{count(d['clean_label'][over])}}}; "
            f"auxiliary log-odds in M's label, median: {np.median(d['clean_y'][over]):.1f} for them, "
            f"{np.median(d['trig_y'][flipped]):.1f} for the flipped triggered inputs")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, type=Path)
    p.add_argument("--detector-param", action="append", default=[], metavar="KEY=VALUE",
                   help="BaDExpert parameter for this exploration (JSON values), e.g. expert_agreement=0.5")
    p.add_argument("--rules", default="logodds", help=f"comma-separated, of {', '.join((*SCORES, *EXTRA))}")
    p.add_argument("--fpr", type=float, default=0.01)
    p.add_argument("--calibrate-on", choices=CALIBRATION_POPULATIONS, default=DEFAULT_POPULATION,
                   help="calibration inputs that set the threshold (default: the detector's, %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/explore-rules"))
    p.add_argument("--over-threshold", action="store_true",
                   help="also say, per model, who the clean test inputs over the first rule's threshold are")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    params = _kv(args.detector_param)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    bad = [r for r in rules if r not in (*SCORES, *EXTRA)]
    if bad:
        p.error(f"unknown rule(s) {bad}")
    names = [cell_name(m) for m in args.models]
    if len(set(names)) != len(names):
        p.error("two --models share a row name (their directory's name); give each model its own directory name")
    rows = {name: dump(m, params, args.out) for name, m in zip(names, args.models)}
    print(f"BaDExpert {params or 'defaults'}, calibrated on {args.calibrate_on}; cells: AUROC (paper's population) / "
          f"ASR after / realized FPR at target {args.fpr:g} / all clean inputs rejected\n")
    print("| model | " + " | ".join(rules) + " |")
    print("|---|" + "---|" * len(rules))
    per = {r: [] for r in rules}
    for name, d in rows.items():
        cells = []
        for r in rules:
            a, s, f, f_all = evaluate(d, r, args.fpr, args.calibrate_on)
            per[r].append((a, s, f, f_all))
            cells.append(f"{100 * a:.2f}% / {100 * s:.1f}% / {100 * f:.2f}% / {100 * f_all:.2f}%")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| **mean** | " + " | ".join(
        " / ".join(f"{100 * np.mean([v[i] for v in per[r]]):.{2 if i != 1 else 1}f}%" for i in range(4)) for r in rules) + " |")
    if args.over_threshold:
        print(f"\nClean test inputs over the `{rules[0]}` threshold:\n")
        for name, d in rows.items():
            classes = int(max(d["clean_label"].max(), d["clean_pred"].max())) + 1
            print(f"- {name}: {over_threshold(d, rules[0], args.fpr, args.calibrate_on, classes)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
