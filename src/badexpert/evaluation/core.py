"""Evaluate a suspect model and a calibrated detector on a test split under an attack.

The protocol (see the spec README, "Metrics that cannot flatter"):

- clean accuracy (CA) and attack success rate (ASR) of the suspect model without defense;
- triggered inputs are the test inputs that count for the attack (true class not the target;
  source classes only for source-specific attacks), triggered and quantised to 8 bits like any
  real input;
- if the ASR is below ``asr_bar`` the backdoor did not implant: the result says so and carries
  no detection numbers;
- otherwise the detector's scores on all clean and all counted triggered inputs give AUROC (with
  a bootstrap interval), the research code's filtered AUROC, TPR/FPR at the calibrated threshold,
  CA and ASR after filtering, per-class false rejections, and the cost of scoring;
- with ``noisy_clean`` (the paper's AUROC protocol) the clean test inputs are joined by a
  Gaussian-noised copy of themselves (:func:`noisy_copy`: sigma 0.05 in [0, 1] pixel space,
  clipped, seeded) as further negatives, so that a detector that merely flags unusual inputs
  pays: ``auroc_noisy`` and ``auroc_noisy_filtered`` beside ``auroc`` and ``auroc_filtered``.
  The copies are made from the test split only, so they stay disjoint from the calibration split.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from ..attacks import Attack
from ..data.core import Dataset, batches, to_uint8
from ..detectors.base import Detector
from ..errors import BadExpertError, NotFittedError
from ..metrics import ScoreAccumulator, clean_rejection, detection_summary
from ..training import predict_logits
from ..utils import eval_mode, model_device
from ..validation import Fraction, NonNegativeInt, PositiveInt, Range, checked, expect, expect_finite_model


@dataclass
class Evaluation:
    """Metrics (JSON-ready) plus the per-input arrays the report plots."""

    metrics: dict
    arrays: dict = field(default_factory=dict)


def trigger_dataset(attack: Attack, data: Dataset, *, batch_size: int = 1024, seed: int = 0) -> tuple[Dataset, torch.Tensor]:
    """The counted inputs of ``data`` with the trigger applied (uint8), and the attacker's targets.

    A test-time trigger that is random per input draws from a generator derived from ``seed``,
    so the same seed gives the same triggered test set.
    """
    from ..utils import derive_generator

    mask = attack.counts(data.labels, data.num_classes)
    idx = mask.nonzero().flatten()
    out = torch.empty((len(idx), *data.images.shape[1:]), dtype=torch.uint8)
    generator = derive_generator(seed, "test-trigger")
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        out[start : start + len(chunk)] = to_uint8(attack.apply(data.images[chunk], generator))
    labels = data.labels[idx]
    targets = attack.target_of(labels, data.num_classes)
    trig = data.with_data(out, labels, name=f"{data.name}+{attack.name}", source_indices=idx.tolist())
    return trig, targets


@dataclass
class TriggeredImages:
    """Triggered test inputs given as images instead of made by an attack: a defender's own images
    that carry a trigger they know of (a sticker, a stamp, a pattern), labelled with their true
    classes (what they show without the trigger), and the ``target`` class the trigger leads to.
    :func:`evaluate` takes it where it takes an attack; images of the target class do not count
    (their success cannot be told from a right answer), as for an attack."""

    images: Dataset
    target: int

    name: ClassVar[str] = "triggered-images"

    def check(self, num_classes: int) -> None:
        if isinstance(self.target, bool) or not isinstance(self.target, int) or not 0 <= self.target < num_classes:
            raise BadExpertError(f"target class {self.target!r} is outside 0..{num_classes - 1}")
        if self.images.num_classes != num_classes:
            raise BadExpertError(f"the triggered images are labelled with {self.images.num_classes} classes but the "
                                 f"test split has {num_classes}")

    def counted(self) -> tuple[Dataset, torch.Tensor]:
        """The images that count (true class not the target), and their targets."""
        idx = (self.images.labels != self.target).nonzero().flatten()
        trig = self.images.subset(idx, name=f"{self.images.name}+{self.name}")
        return trig, torch.full_like(trig.labels, self.target)

    def params(self) -> dict:
        return {"target": self.target, "images": len(self.images), "source": self.images.meta.get("source")}

    def describe_target(self, class_names: list[str] | None = None) -> str:
        """The class the trigger leads to, named (as :meth:`Attack.describe_target`)."""
        named = class_names is not None and 0 <= self.target < len(class_names)
        return f"{self.target} ({class_names[self.target]})" if named else str(self.target)

    def to_dict(self) -> dict:
        return {"name": self.name, **self.params()}


#: Standard deviation of the noise of :func:`noisy_copy`, in [0, 1] pixel space (the paper's protocol).
NOISY_SIGMA = 0.05


def noisy_copy(data: Dataset, *, seed: int = 0, sigma: float = NOISY_SIGMA, batch_size: int = 1024) -> Dataset:
    """A copy of ``data`` with Gaussian noise of standard deviation ``sigma`` added in [0, 1] pixel
    space, clipped to [0, 1] and quantised to 8 bits like any real input; labels kept.

    The noise is drawn from a generator derived from ``seed`` (the same seed gives the same copy).
    The noise-augmented clean negatives of the paper's AUROC protocol are ``data`` plus this copy.
    """
    from ..utils import derive_generator

    generator = derive_generator(seed, "noisy-clean")
    out = torch.empty_like(data.images)
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size].float() / 255
        noise = torch.randn(x.shape, generator=generator) * sigma
        out[start : start + len(x)] = to_uint8((x + noise).clamp_(0, 1))
    return data.with_data(out, data.labels.clone(), name=f"{data.name}+noise{sigma:g}",
                          source_indices=list(range(len(data))), noise_sigma=sigma)


def _details(detector: Detector, images: torch.Tensor) -> dict[str, np.ndarray]:
    acc = ScoreAccumulator()
    for start in range(0, len(images), 4096):
        acc.update(**detector.score_details(images[start : start + 4096]))
    return acc.compute()


def measure_throughput(model: nn.Module, detector: Detector, images: torch.Tensor, *, batch_size: int = 256,
                       repeats: int = 3) -> dict:
    """Images per second of the bare model and of the detector's scoring, on the same batches.

    Each is timed ``repeats`` times after a warm-up pass and the fastest run is kept.
    """
    device = model_device(model)
    # about 2,048 model passes' worth of inputs (at least one batch): an expensive detector (STRIP's
    # 100 passes per input) is timed on fewer inputs, and the bare model on the same ones
    images = images[: max(min(batch_size, len(images)), min(len(images), 2048 // max(1, detector.cost["forward"])))]

    def run_model():
        with torch.no_grad():
            for xb, _ in batches(images, None, batch_size=batch_size, device=device):
                model(xb).argmax(1).cpu()

    def run_detector():
        detector.score(images)

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times)

    with eval_mode(model):
        t_model = best(run_model)
        t_det = best(run_detector)
    n = len(images)
    return {
        "forward_passes_per_input": detector.cost["forward"],
        "backward_passes_per_input": detector.cost["backward"],
        "model_images_per_s": n / t_model,
        "detector_images_per_s": n / t_det,
        "throughput_ratio": t_model / t_det,
        "batch_size": batch_size,
        "images_timed": n,
    }


@dataclass
class TestOutputs:
    """The suspect model's predictions on a test split and on its triggered copy, computed once
    and shared by every detector evaluated on them (:func:`evaluate`, :func:`badexpert.compare`)."""

    test: Dataset
    attack: Attack | None
    clean_pred: torch.Tensor
    trig: Dataset | None
    targets: torch.Tensor | None
    trig_pred: torch.Tensor | None
    metrics: dict
    arrays: dict
    noisy: Dataset | None = None
    noisy_pred: torch.Tensor | None = None


def model_outputs(model: nn.Module, test: Dataset, attack: Attack | None, *, asr_bar: float = 0.5, seed: int = 0,
                  batch_size: int = 256, examples: int = 8, noisy_clean: bool = False) -> TestOutputs:
    """Clean accuracy and attack success rate of ``model`` on ``test`` (the triggered copy built
    with ``seed``), with the predictions kept for the detectors; ``metrics["attack_failed"]``
    when the ASR is below ``asr_bar``. With ``noisy_clean``, also the noisy copy of ``test``
    (:func:`noisy_copy`, built with ``seed``) and the model's predictions on it; its size is
    ``metrics["sizes"]["test_noisy"]`` and the model's accuracy on it ``metrics["noisy_clean"]``."""
    expect_finite_model(expect(model, nn.Module, "the model"))
    expect(test, Dataset, "the test split")
    if attack is not None:
        expect(attack, (Attack, TriggeredImages), "the attack (from get_attack, or TriggeredImages)")
        attack.check(test.num_classes)
    if len(test) == 0:
        raise BadExpertError("the test split is empty")
    clean_logits = predict_logits(model, test.images, batch_size=batch_size)
    if clean_logits.shape[1] != test.num_classes:
        raise BadExpertError(
            f"the model has {clean_logits.shape[1]} outputs but the dataset has {test.num_classes} classes"
        )
    clean_pred = clean_logits.argmax(1)
    metrics: dict = {
        "clean_accuracy": float((clean_pred == test.labels).float().mean()),
        "sizes": {"test_clean": len(test)},
    }
    arrays: dict = {"clean_examples": test.images[:examples].float() / 255}
    noisy = noisy_pred = None
    if noisy_clean:
        noisy = noisy_copy(test, seed=seed)
        noisy_pred = predict_logits(model, noisy.images, batch_size=batch_size).argmax(1)
        metrics["sizes"]["test_noisy"] = len(noisy)
        metrics["noisy_clean"] = {"sigma": NOISY_SIGMA,
                                  "clean_accuracy": float((noisy_pred == noisy.labels).float().mean())}
    if attack is None:
        metrics["attack_success_rate"] = None
        metrics["attack_failed"] = False
        metrics["message"] = "no attack: only clean accuracy and the realized false-positive rate are measured"
        return TestOutputs(test, None, clean_pred, None, None, None, metrics, arrays, noisy, noisy_pred)
    given = isinstance(attack, TriggeredImages)
    trig, targets = attack.counted() if given else trigger_dataset(attack, test, seed=seed)
    if len(trig) == 0:
        raise BadExpertError("no test input counts for this attack (all are of the target class?)")
    trig_pred = predict_logits(model, trig.images, batch_size=batch_size).argmax(1)
    asr = float((trig_pred == targets).float().mean())
    metrics["attack_success_rate"] = asr
    metrics["target"] = attack.describe_target(test.classes)  # what the report prints: the attack says it
    metrics["sizes"]["test_triggered"] = len(trig)
    metrics["asr_bar"] = asr_bar
    arrays["trig_examples"] = trig.images[:examples].float() / 255
    if given:  # no clean originals to show beside them
        del arrays["clean_examples"]
    else:
        src = torch.tensor(trig.meta["source_indices"][:examples], dtype=torch.int64)
        arrays["clean_examples"] = test.images[src].float() / 255
        arrays["example_labels"] = test.labels[src].numpy()
    arrays["trig_example_preds"] = trig_pred[:examples].numpy()
    metrics["attack_failed"] = asr < asr_bar
    if metrics["attack_failed"]:
        metrics["message"] = (
            f"the triggered images do not fool the model: attack success rate {asr:.1%} is below the bar "
            f"{asr_bar:.0%}; detection numbers are not reported (check that they carry the model's trigger and that "
            "the target class is the one it leads to)" if given else
            f"the backdoor did not implant: attack success rate {asr:.1%} is below the bar {asr_bar:.0%}; "
            "detection numbers are not reported (raise the poison rate or training epochs)"
        )
    return TestOutputs(test, attack, clean_pred, trig, targets, trig_pred, metrics, arrays, noisy, noisy_pred)


def check_detector_for(model: nn.Module, detector: Detector, test: Dataset, *, allow_overlap: bool = False) -> dict:
    """Refuse a detector that is not calibrated, was fitted on another model, or has seen images of
    ``test`` (unless ``allow_overlap``, which warns); returns the overlap counts."""
    expect(detector, Detector, "the detector")
    if not hasattr(detector, "threshold_"):
        raise NotFittedError("evaluate needs a fitted and calibrated detector: call fit() then calibrate()")
    detector.check_model(model)
    overlap = detector.overlap(test.images)
    if overlap["fit"] or overlap["calibration"]:
        msg = (f"the test split shares {overlap['fit']} image(s) with the data the detector was fitted on and "
               f"{overlap['calibration']} with its calibration data (of {overlap['total']})")
        if not allow_overlap:
            raise BadExpertError(f"{msg}; evaluate on data the detector has not seen (the CLI rebuilds the "
                                 "detector's own split), or allow the overlap to measure anyway")
        warnings.warn(f"{msg}; the numbers below flatter the detector", stacklevel=3)
    return overlap


def extra_thresholds(detector: Detector, extra_fprs: Sequence[float]) -> list[tuple[float, float]]:
    """``(target, threshold)`` for each further target FPR: the conformal threshold on the
    detector's own calibration scores (those its threshold was set on), as if it had been
    calibrated at that target; one line when the calibration inputs cannot reach a target."""
    from ..metrics import check_reachable_fpr, conformal_threshold

    scores = detector.calibration_scores_.double().cpu().numpy()
    out = []
    for f in extra_fprs:
        check_reachable_fpr(f, len(scores), f"calibration inputs ({detector.calibration_population_} population)",
                            f"{detector.name}: the further target FPR")
        out.append((float(f), float(conformal_threshold(scores, f))))
    return out


def detector_metrics(model: nn.Module, detector: Detector, out: TestOutputs, *, overlap: dict | None = None,
                     n_boot: int = 1000, seed: int = 0, batch_size: int = 256,
                     throughput: bool = True, extra_fprs: Sequence[float] = ()) -> tuple[dict, dict]:
    """``(defense metrics, per-input arrays)`` of a calibrated ``detector`` on the shared model
    outputs ``out`` (whose attack implanted, or which has no attack). ``extra_fprs``: further
    target FPRs, each reported as an ``operating_points`` entry
    (:func:`~badexpert.metrics.operating_point`) with the threshold the detector's calibration
    scores give at that target (no refitting, no recalibration of the detector itself)."""
    from ..metrics import operating_point

    points = extra_thresholds(detector, extra_fprs)
    test = out.test
    passes = {"forward_passes_per_input": detector.cost["forward"],
              "backward_passes_per_input": detector.cost["backward"]}
    population = detector.calibration_population_
    if out.attack is None:
        det = _details(detector, test.images)
        flags = detector.decide(torch.from_numpy(det["score"])).numpy()
        correct = out.clean_pred.numpy() == test.labels.numpy()
        defense = {
            "name": detector.name, "params": detector.get_params(), "fpr_target": detector.fpr_target_,
            "threshold": detector.threshold_, "calibration_size": detector.calibration_size_, "overlap": overlap,
            **clean_rejection(flags, correct, population),
            "clean_accuracy": float((correct & ~flags).mean()),
            "cost": dict(passes),
        }
        if out.noisy is not None:  # the calibrated threshold's rejections among the noisy copies
            noisy_flags = detector.decide(torch.from_numpy(_details(detector, out.noisy.images)["score"])).numpy()
            rej = clean_rejection(noisy_flags, out.noisy_pred.numpy() == out.noisy.labels.numpy(), population)
            defense.update(fpr_noisy=rej["fpr"], fpr_noisy_filtered=rej["fpr_filtered"],
                           realized_fpr_noisy=rej["realized_fpr"], n_noisy=len(out.noisy))
        if points:
            defense["operating_points"] = [
                operating_point(t, f, clean_scores=det["score"], clean_correct=correct,
                                calibration_population=population) for f, t in points]
        return defense, {}
    t0 = time.perf_counter()
    det_clean = _details(detector, test.images)
    det_trig = _details(detector, out.trig.images)
    score_s = time.perf_counter() - t0
    noisy = {}
    if out.noisy is not None:  # not in score_s: the timing stays comparable with and without the protocol
        noisy = {"noisy_scores": _details(detector, out.noisy.images)["score"],
                 "noisy_labels": out.noisy.labels.numpy(), "noisy_preds": out.noisy_pred.numpy()}
    summary = detection_summary(
        clean_scores=det_clean["score"], clean_labels=test.labels.numpy(), clean_preds=out.clean_pred.numpy(),
        trig_scores=det_trig["score"], trig_preds=out.trig_pred.numpy(), trig_target=out.targets.numpy(),
        threshold=detector.threshold_, fpr_target=detector.fpr_target_, class_names=test.classes,
        n_boot=n_boot, seed=seed, calibration_population=population, **noisy,
    )
    defense = {"name": detector.name, "params": detector.get_params(), **summary,
               "calibration_size": detector.calibration_size_, "overlap": overlap}
    if points:
        defense["operating_points"] = [
            operating_point(t, f, clean_scores=det_clean["score"],
                            clean_correct=out.clean_pred.numpy() == test.labels.numpy(),
                            calibration_population=population, trig_scores=det_trig["score"],
                            trig_success=(out.trig_pred == out.targets).numpy()) for f, t in points]
    fit_report = detector.fit_report()
    if fit_report:
        defense["fit_report"] = fit_report
    defense["timings"] = {"fit_s": getattr(detector, "fit_seconds_", None),
                          "calibrate_s": getattr(detector, "calibrate_seconds_", None), "score_s": score_s}
    if throughput:
        defense["cost"] = measure_throughput(model, detector, test.images, batch_size=batch_size)
    else:
        defense["cost"] = dict(passes)
    diagnostics = detector.diagnostics(det_clean, det_trig)
    if diagnostics:
        defense["diagnostics"] = diagnostics
    arrays = {}
    axes = detector.scatter_axes
    if axes and axes["x"] in det_clean and axes["y"] in det_clean:  # the detector's own decision space
        arrays["clean_xy"] = np.stack([det_clean[axes["x"]], det_clean[axes["y"]]], 1)
        arrays["trig_xy"] = np.stack([det_trig[axes["x"]], det_trig[axes["y"]]], 1)
        arrays["scatter_axes"] = dict(axes)
    arrays.update(
        clean_scores=det_clean["score"], trig_scores=det_trig["score"],
        clean_correct=(out.clean_pred == test.labels).numpy(), trig_success=(out.trig_pred == out.targets).numpy(),
    )
    if noisy:
        arrays.update(noisy_scores=noisy["noisy_scores"], noisy_correct=noisy["noisy_preds"] == noisy["noisy_labels"])
    return defense, arrays


@checked()
def evaluate(
    model: nn.Module,
    detector: Detector | None,
    test: Dataset,
    attack: Attack | TriggeredImages | None,
    *,
    asr_bar: Fraction = 0.5,
    n_boot: NonNegativeInt = 1000,
    seed: NonNegativeInt = 0,
    batch_size: PositiveInt = 256,
    throughput: bool = True,
    examples: NonNegativeInt = 8,
    allow_overlap: bool = False,
    noisy_clean: bool = False,
    extra_fprs: tuple[Annotated[float, Range(gt=0, lt=1)], ...] = (),
) -> Evaluation:
    """Evaluate ``model`` (and ``detector``, fitted and calibrated) on ``test`` under ``attack``
    (an :class:`~badexpert.attacks.Attack` that triggers the test inputs, or the defender's own
    :class:`TriggeredImages`).

    The detector must have been fitted on ``model`` (same weights fingerprint), and ``test`` must
    share no image with the data it was fitted or calibrated on (compared by content): otherwise
    the numbers would flatter it, and evaluation refuses. ``allow_overlap=True`` measures anyway,
    with a warning and the overlap recorded under ``defense.overlap``.

    ``noisy_clean``: the paper's AUROC protocol as well: a Gaussian-noised copy of ``test``
    (:func:`noisy_copy`, seeded by ``seed``) joins the clean negatives, and ``defense`` gains
    ``auroc_noisy``, ``auroc_noisy_ci``, ``auroc_noisy_filtered`` and the rejections among the
    copies (:func:`~badexpert.metrics.detection_summary`); ``auroc`` keeps its population.

    ``extra_fprs``: further target FPRs, reported as ``defense.operating_points`` at the
    thresholds the detector's calibration scores give for them (:func:`detector_metrics`).
    """
    expect(model, nn.Module, "the model")
    expect(test, Dataset, "the test split")
    overlap = None
    if detector is not None:
        overlap = check_detector_for(model, detector, test, allow_overlap=allow_overlap)
    out = model_outputs(model, test, attack, asr_bar=asr_bar, seed=seed, batch_size=batch_size, examples=examples,
                        noisy_clean=noisy_clean)
    metrics, arrays = dict(out.metrics), dict(out.arrays)
    if detector is None or metrics["attack_failed"]:
        return Evaluation(metrics, arrays)
    defense, det_arrays = detector_metrics(model, detector, out, overlap=overlap, n_boot=n_boot, seed=seed,
                                           batch_size=batch_size, throughput=throughput, extra_fprs=extra_fprs)
    metrics["defense"] = defense
    arrays.update(det_arrays)
    return Evaluation(metrics, arrays)
