"""Several detectors side by side under one protocol: ``badexpert compare`` and :func:`compare`.

Every detector is fitted on the same reserved clean split, calibrated at the same target FPR on
the same calibration split, and evaluated on the same test split and triggered copy; the suspect
model's predictions on those inputs are computed once (:func:`badexpert.evaluation.core.model_outputs`)
and shared. The result is a :class:`Comparison` record, which :mod:`badexpert.reporting.compare`
renders (one table: AUROC on both populations, TPR at 0.1/1/5% FPR, CA and ASR after filtering,
realized FPR, model passes per input and measured throughput relative to the bare model; one
figure with every ROC curve).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Mapping, Sequence

from torch import nn

from ..attacks import Attack
from ..data import Splits
from ..detectors import Detector, get_detector
from ..errors import BadExpertError
from .core import check_detector_for, detector_metrics, model_outputs
from ..metrics import check_reachable_fpr
from ..validation import Fraction, NonNegativeInt, PositiveInt, Range, check_label, checked, expect

@dataclass
class Comparison:
    """``metrics``: JSON-ready (``model``: CA/ASR without defense; ``detectors``: one defense
    record per detector, in the order given). ``arrays``: per detector, its clean and triggered
    scores and the masks of the paper's population, for the ROC figure."""

    metrics: dict
    arrays: dict = field(default_factory=dict)


def _detectors(detectors: Sequence[Detector | str] | Mapping[str, Detector | str], seed: int,
               device: str | None) -> list[tuple[str, Detector]]:
    """``(label, detector)`` pairs: a list's labels are the detectors' names, a mapping's its keys."""
    labelled = isinstance(detectors, Mapping)
    if not labelled and (isinstance(detectors, (str, Detector)) or not isinstance(detectors, Sequence)) \
            or not detectors:
        raise BadExpertError("compare needs a non-empty list of detectors (names or Detector instances), or a "
                             "mapping of labels to them")
    out = []
    for label, d in (detectors.items() if labelled else ((None, d) for d in detectors)):
        det = get_detector(d, seed=seed, device=device) if isinstance(d, str) else expect(d, Detector, "each detector")
        if labelled:
            check_label(label, "a compared detector")
        out.append((det.name if label is None else label, det))
    labels = [label for label, _ in out]
    dup = sorted({n for n in labels if labels.count(n) > 1})
    if dup:
        raise BadExpertError(f"detector(s) {dup} listed twice; compare each detector once (give two variants of one "
                             "detector distinct labels: a mapping of labels to detectors)")
    return out


@checked()
def compare(model: nn.Module, detectors: Sequence[Detector | str] | Mapping[str, Detector | str], splits: Splits,
            attack: Attack | None, *,
            fpr: Annotated[float, Range(gt=0, lt=1)] = 0.01, seed: NonNegativeInt = 0, device: str | None = None,
            asr_bar: Fraction = 0.5, n_boot: NonNegativeInt = 1000, batch_size: PositiveInt = 256,
            throughput: bool = True, noisy_clean: bool = False,
            extra_fprs: tuple[Annotated[float, Range(gt=0, lt=1)], ...] = (),
            log: Callable[[str], Any] = print) -> Comparison:
    """Fit (on ``splits.reserved``), calibrate (on ``splits.calibration``, at ``fpr``) and evaluate
    (on ``splits.test`` under ``attack``) every detector, sharing the suspect model's predictions.

    ``detectors``: registry names (built with ``seed`` and ``device``) or :class:`Detector`
    instances; an instance that is already fitted (on ``model``, not on the test images) is not
    fitted again, and one already calibrated is used as it is. A mapping of labels to them
    compares two variants of one detector side by side (``{"badexpert": BaDExpert(), "ensemble":
    BaDExpert(expert_ensemble=(0.4,))}``): each defense record then carries its ``label``, and
    ``arrays`` is keyed by it. If the backdoor did not implant
    (ASR below ``asr_bar``) no detector is fitted and the result says so.

    ``noisy_clean``: every detector is also ranked with the noise-augmented clean negatives of the
    paper's protocol (the test split plus its seeded Gaussian-noised copy, made once and shared;
    :func:`badexpert.evaluation.core.evaluate`): ``auroc_noisy`` and ``auroc_noisy_filtered`` in
    each defense record, ``model.noisy_clean`` (the noise and the model's accuracy on the copies)
    and ``sizes.test_noisy`` in the comparison.

    ``extra_fprs``: further target FPRs (the paper reports GTSRB at 0.1%): each detector's record
    gains an ``operating_points`` entry per target, at the threshold its calibration scores give
    for that target (:func:`~badexpert.evaluation.core.detector_metrics`); nothing is refitted.
    """
    expect(model, nn.Module, "the model")
    expect(splits, Splits, "the splits")
    dets = _detectors(detectors, seed, device)
    if any(not hasattr(d, "threshold_") for _, d in dets):  # before any detector is fitted
        check_reachable_fpr(fpr, len(splits.calibration), "calibration inputs", "the target FPR")
        for f in extra_fprs:
            check_reachable_fpr(f, len(splits.calibration), "calibration inputs", "the further target FPR")
    out = model_outputs(model, splits.test, attack, asr_bar=asr_bar, seed=seed, batch_size=batch_size,
                        noisy_clean=noisy_clean)
    metrics: dict = {"model": dict(out.metrics), "fpr_target": fpr, "seed": seed,
                     **({"extra_fprs": list(extra_fprs)} if extra_fprs else {}),
                     "attack": attack.to_dict() if attack is not None else None,
                     "sizes": {"reserved": len(splits.reserved), "calibration": len(splits.calibration),
                               "test": len(splits.test),
                               **({"test_noisy": len(out.noisy)} if out.noisy is not None else {})},
                     "detectors": []}
    arrays: dict = {}
    if out.metrics["attack_failed"]:
        log(out.metrics["message"])
        return Comparison(metrics, arrays)
    for label, det in dets:
        if not det.is_fitted:
            log(f"fitting {label} on {len(splits.reserved)} reserved clean samples")
            det.fit(model, splits.reserved)
        if not hasattr(det, "threshold_"):
            det.calibrate(splits.calibration, fpr)
        overlap = check_detector_for(model, det, splits.test)
        log(f"evaluating {label} ({det.cost['forward']} forward, {det.cost['backward']} backward passes per input)")
        defense, det_arrays = detector_metrics(model, det, out, overlap=overlap, n_boot=n_boot, seed=seed,
                                               batch_size=batch_size, throughput=throughput, extra_fprs=extra_fprs)
        why = out_of_scope(det, attack)
        if why:
            defense["out_of_scope"] = why
        if label != det.name:  # a variant's label (the records of unlabelled detectors keep their form)
            defense["label"] = label
        metrics["detectors"].append(defense)
        arrays[label] = det_arrays
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


__all__ = ["Comparison", "compare", "out_of_scope"]
