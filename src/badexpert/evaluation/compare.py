"""Several detectors side by side under one protocol: ``badexpert compare`` and :func:`compare`.

Every detector is fitted on the same reserved clean split, calibrated at the same target FPR on
the same calibration split, and evaluated on the same test split and triggered copy; the suspect
model's predictions on those inputs are computed once (:func:`badexpert.evaluation.core.model_outputs`)
and shared. The result is one table (AUROC on both populations, TPR at 0.1/1/5% FPR, CA and ASR
after filtering, realized FPR, model passes per input and measured throughput relative to the
bare model) and one figure with every ROC curve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Sequence

import numpy as np
from torch import nn

from ..attacks import Attack
from ..data import Splits
from ..detectors import Detector, get_detector
from ..errors import BadExpertError
from .core import check_detector_for, detector_metrics, model_outputs
from ..metrics import check_reachable_fpr, realized_fpr
from ..utils import atomic_directory, check_output_dir, write_json
from ..validation import Fraction, NonNegativeInt, PositiveInt, Range, checked, expect

#: What ``badexpert compare`` writes into its output directory.
COMPARE_OUTPUTS = frozenset({"compare.json", "compare.md", "roc.png"})


@dataclass
class Comparison:
    """``metrics``: JSON-ready (``model``: CA/ASR without defense; ``detectors``: one defense
    record per detector, in the order given). ``arrays``: per detector, its clean and triggered
    scores and the masks of the paper's population, for the ROC figure."""

    metrics: dict
    arrays: dict = field(default_factory=dict)

    def table(self) -> str:
        return format_comparison(self.metrics)


def _detectors(detectors: Sequence[Detector | str], seed: int, device: str | None) -> list[Detector]:
    if isinstance(detectors, (str, Detector)) or not isinstance(detectors, Sequence) or not detectors:
        raise BadExpertError("compare needs a non-empty list of detectors (names or Detector instances)")
    out = []
    for d in detectors:
        if isinstance(d, str):
            out.append(get_detector(d, seed=seed, device=device))
        else:
            out.append(expect(d, Detector, "each detector"))
    names = [d.name for d in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadExpertError(f"detector(s) {dup} listed twice; compare each detector once")
    return out


@checked()
def compare(model: nn.Module, detectors: Sequence[Detector | str], splits: Splits, attack: Attack | None, *,
            fpr: Annotated[float, Range(gt=0, lt=1)] = 0.01, seed: NonNegativeInt = 0, device: str | None = None,
            asr_bar: Fraction = 0.5, n_boot: NonNegativeInt = 1000, batch_size: PositiveInt = 256,
            throughput: bool = True, log: Callable[[str], Any] = print) -> Comparison:
    """Fit (on ``splits.reserved``), calibrate (on ``splits.calibration``, at ``fpr``) and evaluate
    (on ``splits.test`` under ``attack``) every detector, sharing the suspect model's predictions.

    ``detectors``: registry names (built with ``seed`` and ``device``) or :class:`Detector`
    instances; an instance that is already fitted (on ``model``, not on the test images) is not
    fitted again, and one already calibrated is used as it is. If the backdoor did not implant
    (ASR below ``asr_bar``) no detector is fitted and the result says so.
    """
    expect(model, nn.Module, "the model")
    expect(splits, Splits, "the splits")
    dets = _detectors(detectors, seed, device)
    if any(not hasattr(d, "threshold_") for d in dets):  # before any detector is fitted
        check_reachable_fpr(fpr, len(splits.calibration), "calibration inputs", "the target FPR")
    out = model_outputs(model, splits.test, attack, asr_bar=asr_bar, seed=seed, batch_size=batch_size)
    metrics: dict = {"model": dict(out.metrics), "fpr_target": fpr, "seed": seed,
                     "attack": attack.to_dict() if attack is not None else None,
                     "sizes": {"reserved": len(splits.reserved), "calibration": len(splits.calibration),
                               "test": len(splits.test)},
                     "detectors": []}
    arrays: dict = {}
    if out.metrics["attack_failed"]:
        log(out.metrics["message"])
        return Comparison(metrics, arrays)
    for det in dets:
        if not det.is_fitted:
            log(f"fitting {det.name} on {len(splits.reserved)} reserved clean samples")
            det.fit(model, splits.reserved)
        if not hasattr(det, "threshold_"):
            det.calibrate(splits.calibration, fpr)
        overlap = check_detector_for(model, det, splits.test)
        log(f"evaluating {det.name} ({det.cost['forward']} forward, {det.cost['backward']} backward passes per input)")
        defense, det_arrays = detector_metrics(model, det, out, overlap=overlap, n_boot=n_boot, seed=seed,
                                               batch_size=batch_size, throughput=throughput)
        why = out_of_scope(det, attack)
        if why:
            defense["out_of_scope"] = why
        metrics["detectors"].append(defense)
        arrays[det.name] = det_arrays
    return Comparison(metrics, arrays)


def out_of_scope(detector: Detector, attack: Attack | None) -> str | None:
    """Why ``attack``'s trigger is outside what ``detector`` is designed for, or ``None``: a
    detector declaring a ``trigger_scope`` (SentiNet: ``"local"``) against an attack whose
    ``trigger_extent`` differs (SIG, Blend, BPP, Refool, WaNet, ISSBA: ``"image"``)."""
    scope = getattr(detector, "trigger_scope", None)
    extent = getattr(attack, "trigger_extent", None) if attack is not None else None
    if scope is None or extent is None or scope == extent:
        return None
    return f"{detector.name} targets {scope} triggers; {attack.name}'s trigger is {'image-wide' if extent == 'image' else extent}"


def _pct(v: Any, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * float(v):.{digits}f}%"


def format_comparison(metrics: dict) -> str:
    """The comparison as a Markdown table (one row per detector)."""
    m = metrics["model"]
    head = (f"Suspect model: clean accuracy {_pct(m['clean_accuracy'])}"
            + (f", attack success rate {_pct(m['attack_success_rate'])}" if m.get("attack_success_rate") is not None else "")
            + f"; every detector calibrated at {100 * metrics['fpr_target']:g}% target FPR on the same clean split.")
    if m.get("attack_failed"):
        return head + "\n\n" + m["message"] + "\n"
    rows = ["| detector | AUROC | AUROC (paper's population) | TPR at 0.1% / 1% / 5% FPR | CA after | ASR after | "
            "realized FPR | passes per input (fwd / bwd) | throughput vs model |",
            "|---|---|---|---|---|---|---|---|---|"]
    for d in metrics["detectors"]:
        t = d.get("tpr_at_fpr", {})
        cost = d.get("cost", {})
        ratio = cost.get("throughput_ratio")
        rows.append(
            f"| {d['name']}{' (out of scope)' if d.get('out_of_scope') else ''} | {_pct(d.get('auroc'), 2)} | {_pct(d.get('auroc_filtered'), 2)} | "
            f"{_pct(t.get('0.1%'))} / {_pct(t.get('1%'))} / {_pct(t.get('5%'))} | {_pct(d.get('clean_accuracy'))} | "
            f"{_pct(d.get('attack_success_rate'))} | {_pct(realized_fpr(d), 2)} | "
            f"{cost.get('forward_passes_per_input')} / {cost.get('backward_passes_per_input')} | "
            f"{'n/a' if ratio is None else f'{ratio:.3f}x'} |"
        )
    notes = [f"Out of scope: {d['out_of_scope']}." for d in metrics["detectors"] if d.get("out_of_scope")]
    return head + "\n\n" + "\n".join(rows) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def plot_comparison(comparison: Comparison):
    """Every detector's ROC curve (all clean vs all triggered inputs), linear and log FPR."""
    from sklearn.metrics import roc_curve

    from ..reporting.report import _new_figure

    fig = _new_figure(11.5, 4.8)
    ax_lin, ax_log = fig.subplots(1, 2)
    by_name = {d["name"]: d for d in comparison.metrics["detectors"]}
    for name, a in comparison.arrays.items():
        c, t = np.asarray(a["clean_scores"], float), np.asarray(a["trig_scores"], float)
        scores = np.nan_to_num(np.concatenate([c, t]), nan=np.inf)  # an unscorable input is always flagged
        fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(c)), np.ones(len(t))], scores)
        label = f"{name} (AUROC {_pct(by_name[name].get('auroc'), 2)})"
        for ax in (ax_lin, ax_log):
            ax.plot(np.maximum(fpr, 1e-4) if ax is ax_log else fpr, tpr, label=label)
    for ax, log in ((ax_lin, False), (ax_log, True)):
        ax.set_xlabel("false-positive rate (clean inputs rejected)" + (", log scale" if log else ""))
        ax.set_ylabel("true-positive rate (triggered inputs rejected)")
        if log:
            ax.set_xscale("log")
            ax.set_xlim(1e-4, 1)
        ax.grid(alpha=0.3)
    ax_lin.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax_lin.legend(fontsize=8, loc="lower right")
    fig.suptitle("Detectors on the same model, test inputs and triggered copies", fontsize=10)
    fig.tight_layout()
    return fig


def write_comparison(out_dir: str | Path, comparison: Comparison, *, overwrite: bool = False) -> list[Path]:
    """``compare.json``, ``compare.md`` and ``roc.png`` (when any detector was evaluated), all or nothing."""
    check_output_dir(out_dir, owned=COMPARE_OUTPUTS, overwrite=overwrite)
    with atomic_directory(out_dir, owned=COMPARE_OUTPUTS, overwrite=overwrite) as out:
        write_json(out / "compare.json", comparison.metrics)
        (out / "compare.md").write_text("# Detector comparison\n\n" + comparison.table())
        written = [out / "compare.json", out / "compare.md"]
        if comparison.arrays:
            fig = plot_comparison(comparison)
            fig.savefig(out / "roc.png", format="png")
            written.append(out / "roc.png")
    return [Path(out_dir) / p.name for p in written]


__all__ = ["COMPARE_OUTPUTS", "Comparison", "compare", "format_comparison", "plot_comparison", "write_comparison"]
