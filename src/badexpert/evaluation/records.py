"""Typed records between evaluation, comparison, the grid and reporting.

An evaluation hands its numbers on as JSON-ready dicts (``metrics.json``, ``compare.json``,
``results.jsonl``); the code that reads them back reads them through these frozen dataclasses,
so a field this build always writes is an attribute, and a record that lacks one is a one-line
:class:`~badexpert.errors.BadExpertError` naming it instead of a silent "n/a" further down.

Each record has one JSON form. :meth:`from_dict` keeps the keys it was read from, in their
order, and any key this build does not know, so :meth:`to_dict` gives back the same dict: the
file formats do not change. A record made in code writes every field, in declaration order. A
record held inside another (the ``defense`` of an :class:`EvaluationRecord`) is read and written
with it.

:class:`ReportArrays` is the one record here without a JSON form: the per-input arrays an
evaluation hands to the report (they become its plots, not a file of their own).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

from ..errors import BadExpertError


def _require(d: dict, keys: tuple[str, ...] | list[str], where: str) -> None:
    """One line naming the ``keys`` that ``d`` lacks (none: nothing happens)."""
    missing = [k for k in keys if k not in d]
    if missing:
        named = ", ".join(repr(k) for k in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise BadExpertError(f"{where} lacks {named}: it was not written by this version of badexpert")


@dataclass(frozen=True, kw_only=True)
class _Record:
    """Base: ``keys_`` (the JSON keys, in order, a record read by :meth:`from_dict` came with) and
    ``extra_`` (those of them no field names), both written back by :meth:`to_dict`."""

    what: ClassVar[str] = "a record"
    #: fields that hold another record, read and written with this one (``None`` stays ``None``)
    nested: ClassVar[Mapping[str, type]] = {}
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
        _require(d, cls.required(), where)
        names = {f.name for f in cls._fields()}
        values = {k: v for k, v in d.items() if k in names}
        for key, record in cls.nested.items():
            if values.get(key) is not None:
                values[key] = record.from_dict(values[key], f"the {key!r} block of {where}")
        return cls(**values, keys_=tuple(d), extra_={k: v for k, v in d.items() if k not in names})

    def has(self, key: str) -> bool:
        """Whether the record holds ``key``: for a record read by :meth:`from_dict`, whether its
        JSON form has the key; for one made in code, whether the field is not ``None``."""
        if self.keys_:
            return key in self.keys_
        return any(f.name == key for f in self._fields()) and getattr(self, key) is not None

    def to_dict(self) -> dict:
        """The JSON form: the keys it was read from, in their order (every field for a record
        made in code); a nested record as its own JSON form."""
        def form(v: Any) -> Any:
            return v.to_dict() if isinstance(v, _Record) else v

        if not self.keys_:
            return {f.name: form(getattr(self, f.name)) for f in self._fields()}
        return {k: self.extra_[k] if k in self.extra_ else form(getattr(self, k)) for k in self.keys_}


@dataclass(frozen=True, kw_only=True)
class DefenseRecord(_Record):
    """One calibrated detector's numbers on a test split (the ``defense`` block of ``metrics.json``,
    one entry of ``compare.json``'s ``detectors``): made by
    :func:`badexpert.evaluation.core.detector_metrics`; the numbers are defined in
    :func:`badexpert.metrics.detection_summary`.

    The calibration and clean-side fields are always there. The detection numbers (``auroc`` to
    ``n_triggered_success``, ``fit_report``, ``timings``) are ``None`` for a record measured
    without an attack (only clean inputs: :meth:`detection` is False); the noisy-clean numbers
    are ``None`` unless the evaluation ran with ``noisy_clean``; ``operating_points`` (one dict
    per further target FPR, :func:`badexpert.metrics.operating_point`) unless it ran with
    ``extra_fprs``.
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
    label: str | None = None
    operating_points: list | None = None

    @property
    def shown_as(self) -> str:
        """What names the record in a comparison: its ``label`` (a variant of a detector compared
        beside another, :func:`~badexpert.evaluation.compare.compare`), else the detector's name."""
        return self.label or self.name

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
class EvaluationRecord(_Record):
    """One evaluation of a suspect model (and a calibrated detector) under an attack: the top level
    of ``metrics.json``, what :func:`~badexpert.reporting.report.format_table` and
    :func:`~badexpert.reporting.report.write_report` render.

    Built by :func:`badexpert.evaluation.core.model_outputs` (``clean_accuracy`` to ``message``),
    :func:`~badexpert.evaluation.core.evaluate` (``defense``, from
    :func:`~badexpert.evaluation.core.detector_metrics`) and, for a run's files,
    :func:`badexpert.pipeline.experiment.experiment_metrics` (the provenance: ``badexpert_version``
    to ``attack``). Always there: ``clean_accuracy`` and ``attack_success_rate`` of the suspect
    model without defense (the ASR ``None`` without an attack), the test ``sizes`` and
    ``attack_failed``. ``target`` (the attack's own description of it), ``asr_bar`` come with an
    attack; ``message`` with no attack or a failed one; ``noisy_clean`` (the noise's ``sigma`` and
    the model's accuracy on the noisy copies) with the paper's AUROC protocol; ``defense`` (a
    :class:`DefenseRecord`) with a detector whose attack implanted or that ran without one.
    """

    what: ClassVar[str] = "an evaluation record"
    nested: ClassVar[Mapping[str, type]] = {"defense": DefenseRecord}
    #: the keys each provenance block holds, where it is there (checked by :meth:`from_dict`)
    BLOCKS: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "config": (), "dataset": ("name",), "model": ("arch",), "attack": ("name",), "sizes": ("test_clean",),
        "noisy_clean": ("sigma",)}
    badexpert_version: str | None = None
    config: dict | None = None
    seed: int | None = None
    dataset: dict | None = None
    model: dict | None = None
    attack: dict | None = None
    clean_accuracy: float
    sizes: dict
    noisy_clean: dict | None = None
    attack_success_rate: float | None
    target: str | None = None
    asr_bar: float | None = None
    attack_failed: bool
    message: str | None = None
    defense: DefenseRecord | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> "EvaluationRecord":
        """The record of a metrics dict (one-line error for a missing field, a provenance block
        that is not an object or lacks its name, or an incomplete ``defense``)."""
        where = where or cls.what
        if isinstance(d, dict):
            for key, needed in cls.BLOCKS.items():
                block = d.get(key)
                if block is None:
                    continue
                if not isinstance(block, dict):
                    raise BadExpertError(f"the {key!r} block of {where} must be a JSON object, got "
                                         f"{type(block).__name__}")
                _require(block, needed, f"the {key!r} block of {where}")
        return super().from_dict(d, where)

    @property
    def clean_accuracy_no_defense(self) -> float:
        """The suspect model's clean accuracy: the defense record's own figure when it holds
        detection numbers (the same inputs, counted in double precision), else ``clean_accuracy``."""
        d = self.defense
        return d.clean_accuracy_no_defense if d is not None and d.clean_accuracy_no_defense is not None \
            else self.clean_accuracy

    @property
    def attack_success_rate_no_defense(self) -> float | None:
        """The suspect model's ASR, as :attr:`clean_accuracy_no_defense` chooses its source."""
        d = self.defense
        return d.attack_success_rate_no_defense if d is not None and d.attack_success_rate_no_defense is not None \
            else self.attack_success_rate

    @property
    def dataset_name(self) -> str | None:
        return None if self.dataset is None else self.dataset["name"]

    @property
    def arch(self) -> str | None:
        return None if self.model is None else self.model["arch"]

    @property
    def attack_name(self) -> str | None:
        return None if self.attack is None else self.attack["name"]


@dataclass(frozen=True, eq=False, kw_only=True)
class ReportArrays:
    """The per-input arrays an evaluation hands to the report, every one optional (tensors or
    numpy arrays; :func:`~badexpert.reporting.report.write_report` draws the plots whose inputs
    are there). Made from an :class:`~badexpert.evaluation.core.Evaluation`'s ``arrays`` (or one
    detector's arrays of a comparison) by :meth:`from_arrays`.

    It lives beside the records, not in the report, because the evaluation makes it: the
    reporting layer imports the evaluation's types, never the reverse.

    - ``roc.png``: ``clean_scores`` and ``trig_scores``; with ``clean_correct`` and
      ``trig_success`` (masks over them) the research code's filtered curve; with
      ``noisy_scores`` the curve with the noisy clean negatives (``noisy_correct`` is their mask,
      kept with them but not plotted);
    - ``scatter.png``: ``clean_xy`` and/or ``trig_xy`` ([n, 2]: two per-input quantities of the
      detector), labelled by ``scatter_axes`` (its :attr:`~badexpert.detectors.Detector.scatter_axes`);
    - ``examples.png``: ``clean_examples`` and/or ``trig_examples`` ([n, C, H, W] in [0, 1]),
      captioned by ``example_labels`` (true classes) and ``trig_example_preds`` (the model's answers).
    """

    clean_scores: Any = None
    trig_scores: Any = None
    clean_correct: Any = None
    trig_success: Any = None
    noisy_scores: Any = None
    noisy_correct: Any = None
    clean_xy: Any = None
    trig_xy: Any = None
    scatter_axes: dict | None = None
    clean_examples: Any = None
    trig_examples: Any = None
    example_labels: Any = None
    trig_example_preds: Any = None

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "ReportArrays":
        """The record of an evaluation's ``arrays`` dict; one line naming a key it does not know."""
        if not isinstance(arrays, Mapping):
            raise BadExpertError(f"the report's arrays must be a dict of arrays, got {type(arrays).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(arrays) - set(names))
        if unknown:
            raise BadExpertError(f"unknown report array(s) {unknown}; valid: {names}")
        return cls(**arrays)


@dataclass(frozen=True, kw_only=True)
class GridRow(_Record):
    """One (cell, detector) line of a grid's ``results.jsonl`` (:func:`badexpert.pipeline.grid.run_cell`).

    The detector numbers (``auroc`` to ``seconds``) are ``None`` when the backdoor did not
    implant (``status`` ``"attack_failed"``); the noisy-clean ones (``auroc_noisy`` to
    ``fpr_noisy``, ``n_noisy``) also when the grid ran without ``noisy_clean`` (rows written
    before the protocol existed lack them, and read as ``None``). ``fpr`` is the realized FPR on
    the population the threshold was calibrated for, beside ``fpr_target``; ``auroc_filtered``
    is the paper's population, the one the summary aggregates. ``operating_points`` holds, per
    further target FPR of the grid (``extra_fprs``), ``fpr_target``, ``threshold``, ``fpr``,
    ``tpr``, ``ca_after`` and ``asr_after`` at that target; ``fit_report`` what fitting found and
    chose (:meth:`~badexpert.detectors.base.Detector.fit_report`; rows written before it existed
    lack it). ``seconds`` is the detector's fit, calibration and scoring time; a detector reused from the grid's cache (``detector_cached``)
    reports the fit time recorded when it was fitted, so the column reads the same on a rerun.
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
    operating_points: list | None = None
    fit_report: dict | None = None
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
        "auroc_noisy", "auroc_noisy_ci", "auroc_noisy_filtered", "fpr_noisy", "operating_points", "fit_report")

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
            # the further target FPRs, in the row's own terms (fpr: on the calibrated population)
            "operating_points": None if d.operating_points is None else [
                {"fpr_target": p["fpr_target"], "threshold": p["threshold"], "fpr": p["realized_fpr"],
                 "tpr": p.get("tpr"), "ca_after": p["clean_accuracy"], "asr_after": p.get("attack_success_rate")}
                for p in d.operating_points],
            "fit_report": d.fit_report,  # what fitting found and chose (the expert's learning rate and steps)
        }


__all__ = ["DefenseRecord", "EvaluationRecord", "GridRow", "ReportArrays"]
