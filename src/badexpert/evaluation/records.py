"""Typed records between evaluation, comparison, the grid and reporting.

An evaluation hands its numbers on as JSON-ready dicts (``metrics.json``, ``compare.json``,
``results.jsonl``); the code that reads them back reads them through these frozen dataclasses,
so a field this build always writes is an attribute, and a record that lacks one is a one-line
:class:`~badexpert.errors.BadExpertError` naming it instead of a silent "n/a" further down.

Each record has one JSON form. :meth:`from_dict` keeps the keys it was read from, in their
order, and any key this build does not know, so :meth:`to_dict` gives back the same dict: the
file formats do not change. A record made in code writes every field, in declaration order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

from ..errors import BadExpertError


@dataclass(frozen=True, kw_only=True)
class _Record:
    """Base: ``keys_`` (the JSON keys, in order, a record read by :meth:`from_dict` came with) and
    ``extra_`` (those of them no field names), both written back by :meth:`to_dict`."""

    what: ClassVar[str] = "a record"
    keys_: tuple[str, ...] = field(default=(), repr=False, compare=False)
    extra_: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def _fields(cls) -> list:
        return [f for f in fields(cls) if f.name not in ("keys_", "extra_")]

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """The keys every record of this kind holds (the fields without a default)."""
        from dataclasses import MISSING

        return tuple(f.name for f in cls._fields() if f.default is MISSING and f.default_factory is MISSING)

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> "_Record":
        """The record of a JSON dict; one-line error for a non-dict or a missing field."""
        where = where or cls.what
        if not isinstance(d, dict):
            raise BadExpertError(f"{where} must be a JSON object, got {type(d).__name__}")
        missing = [k for k in cls.required() if k not in d]
        if missing:
            named = ", ".join(repr(k) for k in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise BadExpertError(f"{where} lacks {named}: it was not written by this version of badexpert")
        names = {f.name for f in cls._fields()}
        return cls(**{k: v for k, v in d.items() if k in names}, keys_=tuple(d),
                   extra_={k: v for k, v in d.items() if k not in names})

    def has(self, key: str) -> bool:
        """Whether the JSON form holds ``key`` (a field left at its default in code counts as held)."""
        return key in self.keys_ if self.keys_ else any(f.name == key for f in self._fields())

    def to_dict(self) -> dict:
        """The JSON form: the keys it was read from, in their order (every field for a record
        made in code)."""
        if not self.keys_:
            return {f.name: getattr(self, f.name) for f in self._fields()}
        return {k: self.extra_[k] if k in self.extra_ else getattr(self, k) for k in self.keys_}


@dataclass(frozen=True, kw_only=True)
class DefenseRecord(_Record):
    """One calibrated detector's numbers on a test split (the ``defense`` block of ``metrics.json``,
    one entry of ``compare.json``'s ``detectors``): made by
    :func:`badexpert.evaluation.core.detector_metrics`; the numbers are defined in
    :func:`badexpert.metrics.detection_summary`.

    The calibration and clean-side fields are always there. The detection numbers (``auroc`` to
    ``n_triggered_success``, ``fit_report``, ``timings``) are ``None`` for a record measured
    without an attack (only clean inputs: :meth:`detection` is False); the noisy-clean numbers
    are ``None`` unless the evaluation ran with ``noisy_clean``.
    """

    what: ClassVar[str] = "a defense record"
    name: str
    params: dict
    threshold: float
    fpr_target: float
    calibration_population: str
    fpr: float
    fpr_filtered: float
    realized_fpr: float
    clean_accuracy: float
    calibration_size: int | None
    overlap: dict | None
    cost: dict
    auroc: float | None = None
    auroc_ci: list | None = None
    auroc_filtered: float | None = None
    tpr: float | None = None
    tpr_filtered: float | None = None
    tpr_at_fpr: dict | None = None
    attack_success_rate: float | None = None
    clean_accuracy_no_defense: float | None = None
    attack_success_rate_no_defense: float | None = None
    clean_accuracy_drop: float | None = None
    per_class_false_rejection: dict | None = None
    n_clean: int | None = None
    n_triggered: int | None = None
    n_clean_correct: int | None = None
    n_triggered_success: int | None = None
    auroc_noisy: float | None = None
    auroc_noisy_ci: list | None = None
    auroc_noisy_filtered: float | None = None
    fpr_noisy: float | None = None
    fpr_noisy_filtered: float | None = None
    realized_fpr_noisy: float | None = None
    n_noisy: int | None = None
    n_noisy_correct: int | None = None
    fit_report: dict | None = None
    timings: dict | None = None
    diagnostics: dict | None = None
    out_of_scope: str | None = None

    @property
    def detection(self) -> bool:
        """Whether the record holds detection numbers (it was measured against triggered inputs)."""
        return self.has("auroc")

    def tpr_at(self, level: str) -> float | None:
        """The oracle TPR at FPR ``level`` (``"0.1%"``, ``"1%"``, ``"5%"``); ``None`` without detection."""
        return None if self.tpr_at_fpr is None else self.tpr_at_fpr[level]

    @property
    def forward_passes(self) -> int:
        return self.cost["forward_passes_per_input"]

    @property
    def backward_passes(self) -> int:
        return self.cost["backward_passes_per_input"]

    @property
    def throughput_ratio(self) -> float | None:
        """Scoring throughput relative to the bare model; ``None`` when it was not measured."""
        return self.cost.get("throughput_ratio")  # measured only with throughput=True

    @property
    def seconds(self) -> float | None:
        """Fit, calibration and scoring time together (the parts recorded); ``None`` without timings."""
        if self.timings is None:
            return None
        parts = [v for v in (self.timings["fit_s"], self.timings["calibrate_s"], self.timings["score_s"])
                 if v is not None]  # a detector loaded from a file has no fit time
        return float(sum(parts)) if parts else None


@dataclass(frozen=True, kw_only=True)
class GridRow(_Record):
    """One (cell, detector) line of a grid's ``results.jsonl`` (:func:`badexpert.pipeline.grid.run_cell`).

    The detector numbers (``auroc`` to ``seconds``) are ``None`` when the backdoor did not
    implant (``status`` ``"attack_failed"``); the noisy-clean ones (``auroc_noisy`` to
    ``fpr_noisy``, ``n_noisy``) also when the grid ran without ``noisy_clean`` (rows written
    before the protocol existed lack them, and read as ``None``). ``fpr`` is the realized FPR on
    the population the threshold was calibrated for, beside ``fpr_target``; ``auroc_filtered``
    is the paper's population, the one the summary aggregates.
    """

    what: ClassVar[str] = "a grid row"
    key: str
    cell: str
    dataset: str
    arch: str
    attack: str
    seed: int
    detector: str
    detector_params: dict
    status: str
    clean_accuracy: float
    attack_success_rate: float | None
    attack_failed: bool
    auroc: float | None
    auroc_ci: list | None
    auroc_filtered: float | None
    tpr_at_1pct_fpr: float | None
    tpr: float | None
    fpr: float | None
    fpr_target: float | None
    threshold: float | None
    ca_after: float | None
    asr_after: float | None
    forward_passes: int | None
    backward_passes: int | None
    throughput_ratio: float | None
    seconds: float | None
    out_of_scope: str | None = None
    auroc_noisy: float | None = None
    auroc_noisy_ci: list | None = None
    auroc_noisy_filtered: float | None = None
    fpr_noisy: float | None = None
    n_test: int
    n_triggered: int | None
    n_noisy: int | None = None
    train_seconds: float | None
    cell_seconds: float
    model_cached: bool
    detector_cached: bool
    badexpert_version: str

    #: the fields that carry a detector's numbers (``None`` when the backdoor did not implant)
    DETECTOR_NUMBERS: ClassVar[tuple[str, ...]] = (
        "auroc", "auroc_ci", "auroc_filtered", "tpr_at_1pct_fpr", "tpr", "fpr", "fpr_target", "threshold",
        "ca_after", "asr_after", "forward_passes", "backward_passes", "throughput_ratio", "seconds",
        "auroc_noisy", "auroc_noisy_ci", "auroc_noisy_filtered", "fpr_noisy")

    @staticmethod
    def numbers(defense: DefenseRecord | None) -> dict:
        """The detector-number fields of a row from a defense record (all ``None`` without one)."""
        if defense is None:
            return dict.fromkeys(GridRow.DETECTOR_NUMBERS)
        d = defense
        return {
            "auroc": d.auroc, "auroc_ci": d.auroc_ci, "auroc_filtered": d.auroc_filtered,
            "tpr_at_1pct_fpr": d.tpr_at("1%"), "tpr": d.tpr,
            "fpr": d.realized_fpr,  # on the population the threshold was calibrated for
            "fpr_target": d.fpr_target, "threshold": d.threshold, "ca_after": d.clean_accuracy,
            "asr_after": d.attack_success_rate, "forward_passes": d.forward_passes,
            "backward_passes": d.backward_passes, "throughput_ratio": d.throughput_ratio, "seconds": d.seconds,
            "auroc_noisy": d.auroc_noisy, "auroc_noisy_ci": d.auroc_noisy_ci,
            "auroc_noisy_filtered": d.auroc_noisy_filtered, "fpr_noisy": d.realized_fpr_noisy,
        }


__all__ = ["DefenseRecord", "GridRow"]
