"""The detector contract shared by BaDExpert and every baseline (PyOD-like).

- ``fit(model, clean)`` builds the detector from the suspect model and a clean labelled set and
  returns ``self``; fitted attributes end with ``_``.
- ``score(x)``: one float per input, **higher means more likely a backdoor input**.
- ``calibrate(clean, fpr)`` sets ``threshold_`` to the split-conformal quantile of the scores of
  a clean calibration set disjoint from the fitting data, so that the false-positive rate on new
  clean inputs is at most ``fpr`` in expectation. By default (``population="correct"``, the
  paper's protocol) the quantile is over the calibration inputs the suspect model classifies
  correctly: at most ``fpr`` of the clean inputs it gets right are rejected, and rejecting one it
  gets wrong costs no accuracy. ``population="all"`` uses every calibration input (no labels
  needed).
- ``predict(x)``: boolean tensor, True = reject (``score > threshold_``, or a score that is not a
  number).

What every detector guarantees, whatever its method (the checks live here, once):

- inputs follow the one conversion rule (:func:`badexpert.data.core.check_images`): uint8 in
  ``[0, 255]`` or float in ``[0, 1]``; any other dtype or scale is refused;
- an input that cannot be scored (a NaN or inf pixel) gets a NaN score, and a NaN score is
  always rejected: ``predict`` never lets through what it could not score
  (:meth:`Detector.predict_details` says why each input was rejected). ``fit`` and
  ``calibrate`` refuse non-finite data outright;
- the detector records a fingerprint of the suspect model's weights and content hashes of the
  images it was fitted and calibrated on, so it refuses to run in front of another model, and
  evaluation refuses test data that overlaps them;
- facts about the data (whether horizontal flips preserve labels, the classes) come from the
  data it is fitted on (:class:`badexpert.data.Dataset`); a bare ``(images, labels)`` pair
  declares none, so no flips.

What is specific to a method comes from the method, declared on its class, never from a
command or a report that knows its name:

- its command-line options (:attr:`Detector.cli_options`: :class:`Option` specs that ``defend`` and
  ``compare`` offer, grouped under the detector; every parameter is also ``--detector-param``);
- what fitting found and chose (:meth:`Detector.fit_report`, ``fit_report_`` where the method
  records one), findings on evaluated inputs (:meth:`Detector.diagnostics`) and a 2-D view of its
  decision space for reports (:attr:`Detector.scatter_axes`);
- the capability to be exported (:attr:`Detector.exportable`): its score is then a pure torch
  function of the inputs, the suspect model's logits and its own networks
  (:meth:`Detector.score_given_logits` on the attributes named in :attr:`Detector.submodels`),
  which :meth:`Detector.export_scorer` packs into one ``nn.Module`` for ONNX export.

Cost (:attr:`Detector.cost`) is a property of the instance: model forward and backward passes
per input (STRIP's ``n`` superimpositions, TeCo's corruptions), reported next to the measured
throughput. Randomised detectors draw from :meth:`Detector.input_generators`, seeded from the
detector's seed and each input's content, so a score never depends on the batch it came in, its
order or its size. scikit-learn conventions: ``get_params(deep)``, ``set_params``, :func:`clone`,
a readable ``repr``.
"""

from __future__ import annotations

import abc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal

import torch
from torch import nn

from ..data.core import Dataset, as_tensors, image_hashes, nonfinite_rows
from ..errors import BadExpertError, NotFittedError
# why predict_details accepted or rejected an input (re-exported)
from ..runtime.reasons import ACCEPTED, REJECT_NONFINITE_INPUT, REJECT_NONFINITE_SCORE, REJECT_SCORE  # noqa: F401
from ..utils import atomic_write_bytes, resolve_device, to_jsonable
from ..validation import NonNegativeInt, PositiveInt, Range, check_value, expect, expect_finite_model, validate_params

#: /2 adds the model fingerprint, the data record (content hashes, calibration scores) and the
#: detector's own split; /1 files (badexpert 0.1.0 before hardening) are refused with a message.
FORMAT = "badexpert-detector/2"

#: Which calibration inputs set the threshold: those the suspect model classifies correctly (the
#: paper's protocol; needs labels) or all of them.
CALIBRATION_POPULATIONS = ("correct", "all")
#: The population :meth:`Detector.calibrate` uses unless told otherwise (the pipeline never is).
DEFAULT_POPULATION = "correct"


def correctly_classified(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                         batch_size: int) -> torch.Tensor:
    """The ``"correct"`` population: a mask of the images ``model`` classifies as their label."""
    from ..training import predict_logits

    return predict_logits(model, images, batch_size=batch_size).argmax(1).cpu() == labels.cpu()


@dataclass(frozen=True)
class Option:
    """A command-line option a detector declares (:attr:`Detector.cli_options`): ``defend`` and
    ``compare`` offer ``flag`` in a group of the detector's own and pass its value as the
    constructor parameter ``param`` (which ``--detector-param param=VALUE`` sets as well); given
    with another detector it is a one-line error naming the detector it belongs to. ``type`` parses
    the text, ``choices`` limits it (checked by the parser), and ``default`` (when not ``None``) is
    the value the CLI passes when the option is not given (named in the CLI's "fitting" line)."""

    flag: str
    param: str
    type: Callable[[str], Any] = str
    help: str = ""
    choices: tuple | None = None
    default: Any = None
    metavar: str | None = None


class Detector(abc.ABC):
    """The abstract contract. Subclasses implement :meth:`_fit` and :meth:`_score_batch`; the rest
    (options, reports, export) they declare (see the module docstring)."""

    name: ClassVar[str] = "detector"
    #: the detector's own command-line options (``defend``, ``compare``); any parameter without one
    #: is still given with ``--detector-param KEY=VALUE``
    cli_options: ClassVar[tuple[Option, ...]] = ()
    #: capability: the score is a pure torch function of a finite float batch, the suspect model's
    #: logits on it and the detector's own networks (:meth:`score_given_logits`, no randomness, no
    #: data-dependent Python control flow), so :meth:`export_scorer` can be traced into ONNX
    exportable: ClassVar[bool] = False
    #: the fitted attributes holding the detector's own networks (``nn.Module``), exported with it
    submodels: ClassVar[tuple[str, ...]] = ()
    #: model forward / backward passes per scored input; instances whose cost depends on their
    #: parameters override :attr:`cost`
    forward_passes_per_input: ClassVar[int] = 1
    backward_passes_per_input: ClassVar[int] = 0
    #: a 2-D view of the detector's decision space for reports (``scatter.png``): which two keys of
    #: :meth:`score_details` to plot and how to label them (``x``, ``y``, ``x_label``, ``y_label``,
    #: ``title``, ``caption``, optional ``limits``); ``None``: no such plot
    scatter_axes: ClassVar[dict[str, Any] | None] = None
    #: whether :meth:`score_given_logits` uses the suspect model's logits instead of running the
    #: model again (a guard then costs ``forward_passes_per_input`` passes in all)
    shares_model_pass: ClassVar[bool] = False
    #: whether fitting and scoring use the suspect model at all; a detector that does not (Frequency)
    #: can be moved to another model on the same data (``load_detector(..., rebind=True)``)
    uses_model: ClassVar[bool] = True

    def __new__(cls, *args, **kwargs):
        # constructor arguments are checked by name before __init__ runs, so an unknown or
        # positional parameter is the same one-line error as in get_detector / set_params (types
        # and ranges are checked by check_params, at get_detector and fit)
        import inspect

        params = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
        if args:
            raise BadExpertError(f"detector '{cls.name}' takes its parameters by keyword "
                                 f"(e.g. {cls.__name__}(seed=0)), got {len(args)} positional argument(s)")
        bad = sorted(set(kwargs) - set(params))
        if bad:
            raise BadExpertError(f"detector '{cls.name}' has no parameter(s) {bad}; valid: {sorted(params)}")
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            raise BadExpertError(f"detector class {cls.__name__} does not implement {', '.join(missing)} "
                                 "(the contract of badexpert.detectors.base.Detector)")
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs) -> None:
        # a declared option must name a constructor parameter: checked once, where it is declared
        import inspect

        super().__init_subclass__(**kwargs)
        params = {p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY}
        for opt in cls.cli_options:
            if not isinstance(opt, Option) or not opt.flag.startswith("--") or opt.param not in params:
                raise TypeError(f"{cls.__name__}.cli_options: {opt!r} must be an Option whose flag starts with "
                                f"'--' and whose param is a constructor parameter of {cls.__name__}")

    def __init__(
        self, *, batch_size: PositiveInt = 256, seed: NonNegativeInt = 0,
        device: str | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    # --- configuration -------------------------------------------------------------------
    @property
    def cost(self) -> dict[str, int]:
        """Model passes per scored input: ``{"forward": ..., "backward": ...}``."""
        return {"forward": int(self.forward_passes_per_input), "backward": int(self.backward_passes_per_input)}

    @property
    def needs_gradients(self) -> bool:
        """Whether scoring back-propagates through the model (it then runs with gradients enabled)."""
        return self.cost["backward"] > 0

    def __repr__(self) -> str:
        defaults = {}
        import inspect

        for cls in type(self).__mro__:
            if cls is object:
                continue
            for p in inspect.signature(cls.__init__).parameters.values():
                if p.kind is p.KEYWORD_ONLY and p.name not in defaults:
                    defaults[p.name] = p.default
        changed = {k: v for k, v in self.get_params().items() if defaults.get(k, inspect.Parameter.empty) != v}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        fitted = "" if not self.is_fitted else (", fitted" + (", calibrated" if hasattr(self, "threshold_") else ""))
        return f"{type(self).__name__}({args}){' <' + fitted[2:] + '>' if fitted else ''}"

    def set_params(self, **params) -> "Detector":
        """Change constructor parameters (scikit-learn style), validated like the constructor's;
        fitted state is kept, so refit after changing what the fit depends on."""
        valid = set(self.get_params())
        bad = sorted(set(params) - valid)
        if bad:
            raise BadExpertError(f"detector '{self.name}' has no parameter(s) {bad}; valid: {sorted(valid)}")
        old = {k: getattr(self, k) for k in params}
        for k, v in params.items():
            setattr(self, k, v)
        try:
            self.check_params()
        except BadExpertError:
            for k, v in old.items():
                setattr(self, k, v)
            raise
        return self

    def input_generators(self, x: torch.Tensor, purpose: str = "score") -> list[torch.Generator]:
        """One CPU generator per input of ``x``, seeded from the detector's seed, ``purpose`` and
        the input's content: a randomised score (STRIP's overlays, noise) is then the same
        whatever batch, batch size or order the input arrives in."""
        import hashlib

        hashes = image_hashes(x.detach().cpu())
        gens = []
        for h in hashes.tolist():
            digest = hashlib.sha256(f"{self.seed}|{purpose}|{h}".encode()).digest()
            gens.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)))
        return gens

    def draw_indices(self, x: torch.Tensor, size: int, n: int, purpose: str) -> torch.Tensor:
        """``[len(x), n]`` indices into a pool of ``size`` items (clean images to blend or paste
        onto), drawn per input from :meth:`input_generators`: without replacement when the pool
        holds at least ``n`` items, with replacement otherwise."""
        rows = [torch.randperm(size, generator=g)[:n] if n <= size else torch.randint(size, (n,), generator=g)
                for g in self.input_generators(x, purpose)]
        return torch.stack(rows) if rows else torch.empty(0, n, dtype=torch.int64)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor arguments (scikit-learn style), for configs and reports. (No parameter
        holds another estimator, so ``deep`` changes nothing.)"""
        import inspect

        out = {}
        for cls in type(self).__mro__:
            if cls is object:
                continue
            for p in inspect.signature(cls.__init__).parameters.values():
                if p.kind is p.KEYWORD_ONLY and p.name not in out and hasattr(self, p.name):
                    out[p.name] = getattr(self, p.name)
        return out

    def check_params(self) -> "Detector":
        """Validate every constructor parameter against its annotation (type and range); a
        one-line error names the parameter. Called by :func:`get_detector` and :meth:`fit`."""
        params = validate_params(type(self).__init__, self.get_params(), f"detector '{self.name}'")
        for k, v in params.items():
            setattr(self, k, v)
        return self

    # --- verbs ---------------------------------------------------------------------------
    def fit(self, model: nn.Module, clean) -> "Detector":
        """Build the detector for ``model`` from clean labelled data; returns ``self``.

        ``clean`` is a :class:`~badexpert.data.Dataset` (its ``hflip`` flag and classes are used)
        or an ``(images, labels)`` pair (no flips). Non-finite images are refused.
        """
        from ..io import model_fingerprint

        self.check_params()
        if not isinstance(model, nn.Module):
            raise BadExpertError(f"fit expects a torch.nn.Module classifier, got {type(model).__name__}")
        expect_finite_model(model, "the suspect model")
        images, labels = as_tensors(clean)
        if labels is None:
            raise BadExpertError("fit needs labelled clean data: a Dataset or an (images, labels) pair")
        if len(images) < 2:
            raise BadExpertError(f"fit needs at least 2 clean samples, got {len(images)}")
        self.data_info_ = {
            "hflip": bool(clean.hflip) if isinstance(clean, Dataset) else False,
            "classes": list(clean.classes) if isinstance(clean, Dataset) else None,
        }
        self.device_ = resolve_device(self.device)
        model = on_device(model, self.device_)
        self.model_fingerprint_ = model_fingerprint(model)
        start = time.perf_counter()
        # the detector's own seed drives every random choice of the fit (dropout included), whatever
        # the caller's global RNG state; the caller's state is restored afterwards
        cuda = [self.device_.index or 0] if self.device_.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed)
            self._fit(model, images, labels)
        self.fit_seconds_ = time.perf_counter() - start
        self.model_ = model
        self.input_shape_ = tuple(images.shape[1:])
        self.fit_hashes_ = image_hashes(images)
        self._drop_calibration()
        return self

    @abc.abstractmethod
    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Build the method's state from the suspect model (on the detector's device) and checked,
        finite clean images and labels; set fitted attributes (ending with ``_``)."""

    def _drop_calibration(self) -> None:
        for attr in ("threshold_", "fpr_target_", "calibration_population_", "clean_rejection_rate_",
                     "calibration_size_", "calibration_scores_", "calibration_hashes_"):
            self.__dict__.pop(attr, None)

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "model_")

    def _check_fitted(self, verb: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{self.name}: call fit(model, clean_data) before {verb}()")

    def _check_input(self, x, *, nonfinite: str = "error") -> torch.Tensor:
        images, _ = as_tensors(x, nonfinite=nonfinite)
        if tuple(images.shape[1:]) != self.input_shape_:
            raise BadExpertError(
                f"{self.name}: inputs of shape {tuple(images.shape[1:])} but the detector was fitted on "
                f"{self.input_shape_}"
            )
        return images

    def _scorable(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked inputs with every non-finite image zeroed (so the models never see NaN), and
        the mask of those images, whose scores must be NaN (= always rejected)."""
        images = self._check_input(x, nonfinite="allow")
        bad = nonfinite_rows(images)
        if bool(bad.any()):
            images = torch.where(bad[:, None, None, None], torch.zeros((), dtype=images.dtype), images)
        return images, bad

    @torch.no_grad()
    def score(self, x) -> torch.Tensor:
        """Scores for a batch (uint8 or float images, or a Dataset): higher = more suspicious.

        An image with a NaN or inf value cannot be scored: its score is NaN, which
        :meth:`decide` always rejects.
        """
        self._check_fitted("score")
        return self._score_scorable(*self._scorable(x))

    def _score_scorable(self, images: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        out = [self._score_batch(xb) for xb in self._batches(images)]
        scores = torch.cat(out).float() if out else torch.empty(0)
        scores[bad] = float("nan")
        return scores

    def _batches(self, images: torch.Tensor):
        from ..data.core import batches

        for xb, _ in batches(images, None, batch_size=self.batch_size, device=self.device_):
            yield xb

    @abc.abstractmethod
    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (higher = more suspicious) of a checked, finite float batch on the detector's device."""

    def score_given_logits(self, xb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Scores for a checked, finite float batch on the detector's device, given the suspect
        model's logits on it (the guard's shared pass). Detectors that need the model's output
        override this to reuse ``logits``; the default scores the batch on its own."""
        return self._score_batch(xb)

    def logits_and_score(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The suspect model's logits and the scores for a checked, finite float batch on the
        detector's device, computed together: what the guard and the exported graph run per batch.
        The default runs the model and hands its logits to :meth:`score_given_logits`; a detector
        whose networks share the model's leading layers (BaDExpert's shared trunk) overrides it to
        compute those layers once."""
        logits = self.model_(xb).float()
        return logits, self.score_given_logits(xb, logits)

    def score_details(self, x) -> dict:
        """``score`` plus any per-input quantities the detector computes on the way (as numpy
        arrays); evaluation and reports use this to avoid a second pass."""
        return {"score": self.score(x).numpy()}

    def fit_summary(self) -> str:
        """What fitting chose, in a few words for the CLI (BaDExpert: its learning rates); default: none."""
        return ""

    def fit_report(self) -> dict[str, Any]:
        """What fitting found and chose, as JSON-ready data, for evaluation records
        (``defense.fit_report``): the ``fit_report_`` a method records while fitting (and saves with
        its state); default: none."""
        return getattr(self, "fit_report_", None) or {}

    @property
    def score_kind(self) -> str:
        """What the score is, in a word, for exported files and messages (BaDExpert: its score
        rule); default: the detector's name."""
        return self.name

    def export_scorer(self, prepare: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
        """The fitted detector's scoring as one ``nn.Module`` (capability :attr:`exportable`):
        ``forward(x) -> (logits, score)`` for a finite float batch ``x`` in ``[0, 1]``, the suspect
        model's logits and the scores (:meth:`logits_and_score`: by default :meth:`score_given_logits`
        on the logits), run on copies of the model and of
        the networks named in :attr:`submodels`, each passed through ``prepare`` (export makes
        them traceable; default: an eval-mode copy). A detector without the capability is a
        one-line error."""
        check_exportable(self)
        self._check_fitted("export_scorer")
        return _ExportScorer(self, prepare)

    def diagnostics(self, clean: dict, triggered: dict) -> dict[str, Any]:
        """Detector-specific findings for the evaluation record (``defense.diagnostics``), from the
        :meth:`score_details` of the clean and triggered test inputs (numpy arrays). Default: none."""
        return {}

    def calibrate(self, clean, fpr: float = 0.01, *, population: str = DEFAULT_POPULATION) -> "Detector":
        """Set ``threshold_`` so that at most ``fpr`` of new clean inputs are rejected (in expectation).

        ``clean`` must be disjoint from the data the detector was fitted on (checked by content)
        and from the data it will be evaluated on. Uses the finite-sample conformal quantile: the
        ``ceil((n+1)(1-fpr))``-th smallest clean score. Non-finite images are refused.

        ``population``: ``"correct"`` (default, the paper's protocol) takes the quantile over the
        calibration inputs the suspect model classifies correctly, so ``fpr`` bounds the share of
        clean inputs the model gets right that are rejected; a clean input the model gets wrong
        may be rejected more often (it costs no accuracy: its answer was wrong anyway, and a
        backdoor that fires on clean inputs makes such errors). Needs labelled data (a Dataset or
        an ``(images, labels)`` pair). ``"all"`` takes every calibration input (no labels needed):
        ``fpr`` then bounds the share of all clean inputs rejected.
        """
        from ..metrics import check_reachable_fpr, conformal_threshold

        self._check_fitted("calibrate")
        fpr = check_value(fpr, Annotated[float, Range(gt=0, lt=1)], "fpr", "the target false-positive rate")
        population = check_value(population, Literal[CALIBRATION_POPULATIONS], "population",
                                 "the calibration population")
        images, labels = as_tensors(clean)
        if len(images) == 0:
            raise BadExpertError(f"{self.name}: calibrate needs clean samples, got none")
        check_reachable_fpr(fpr, len(images), "calibration inputs", f"{self.name}: target FPR")
        if population == "correct" and labels is None:
            raise BadExpertError(
                f"{self.name}: calibrate(population='correct') needs the calibration labels (a Dataset or an "
                "(images, labels) pair), to keep the inputs the model classifies correctly; pass them, or "
                "population='all' for unlabelled clean data"
            )
        hashes = image_hashes(images)
        shared = int(torch.isin(hashes, self.fit_hashes_).sum())
        if shared:
            raise BadExpertError(
                f"{self.name}: {shared} of the {len(hashes)} calibration images are among the images the detector was "
                "fitted on; calibrate on clean data disjoint from the fitting data"
            )
        start = time.perf_counter()
        keep = torch.ones(len(images), dtype=torch.bool)
        if population == "correct":
            self._check_input(images)
            keep = correctly_classified(self.model_, images, labels, batch_size=self.batch_size)
            if not bool(keep.any()):
                raise BadExpertError(
                    f"{self.name}: the model classifies none of the {len(images)} calibration images correctly; "
                    "check that the labels belong to this model's classes, or use population='all'"
                )
        all_scores = self.score(images)
        if not bool(torch.isfinite(all_scores).all()):
            raise BadExpertError(f"{self.name}: calibration scores are not finite; the detector's models are broken")
        scores = all_scores[keep]
        if population == "correct":
            check_reachable_fpr(fpr, len(scores), "calibration inputs the model classifies correctly",
                                f"{self.name}: target FPR")
        thr = conformal_threshold(scores.numpy(), fpr)
        self.threshold_ = float(thr)
        self.fpr_target_ = float(fpr)
        self.calibration_population_ = population
        # the expected share of *all* clean inputs rejected (the drift monitor's reference): the
        # conformal bound on the inputs the model gets right, the measured rate on the others
        wrong_rejected = int((all_scores[~keep] > thr).sum())
        self.clean_rejection_rate_ = float(min(1.0, (int(keep.sum()) * fpr + wrong_rejected) / len(all_scores)))
        self.calibration_size_ = int(len(scores))
        self.calibration_scores_ = scores.clone()
        self.calibration_hashes_ = hashes
        self.calibrate_seconds_ = time.perf_counter() - start
        return self

    def predict(self, x) -> torch.Tensor:
        """True for inputs to reject: ``score > threshold_``, and every input whose score is not
        a number (a NaN or inf pixel, or models that produced NaN)."""
        return self.decide(self.score(x))

    def decide(self, scores: torch.Tensor) -> torch.Tensor:
        """Reject flags for scores: ``not (score <= threshold_)``, so a NaN score is rejected."""
        if not hasattr(self, "threshold_"):
            raise NotFittedError(f"{self.name}: call calibrate(clean_data, fpr) before predict()")
        return ~(torch.as_tensor(scores) <= self.threshold_)

    def predict_details(self, x) -> dict:
        """Per input: ``score``, ``reject`` and the ``reason`` for the decision (one of
        :data:`ACCEPTED`, :data:`REJECT_SCORE`, :data:`REJECT_NONFINITE_INPUT`,
        :data:`REJECT_NONFINITE_SCORE`)."""
        self._check_fitted("predict_details")
        images, bad = self._scorable(x)
        with torch.no_grad():
            scores = self._score_scorable(images, bad)
        reject = self.decide(scores)
        reasons = []
        for i, s in enumerate(scores.tolist()):
            if bool(bad[i]):
                reasons.append(REJECT_NONFINITE_INPUT)
            elif math.isnan(s):
                reasons.append(REJECT_NONFINITE_SCORE)
            else:
                reasons.append(REJECT_SCORE if bool(reject[i]) else ACCEPTED)
        return {"score": scores, "reject": reject, "reason": reasons}

    # --- provenance ----------------------------------------------------------------------
    def check_model(self, model: nn.Module, *, model_name: str | None = None) -> None:
        """Refuse a model whose weights differ from those this detector was fitted on."""
        from ..io import model_fingerprint, short_fingerprint

        mine = getattr(self, "model_fingerprint_", None)
        if mine is None:
            return
        theirs = model_fingerprint(model)
        if theirs != mine:
            fitted_on = getattr(self, "model_name_", None)
            raise BadExpertError(
                f"{self.name}: the detector was fitted on model {short_fingerprint(mine)}"
                f"{f' ({fitted_on})' if fitted_on else ''} but was given model {short_fingerprint(theirs)}"
                f"{f' ({model_name})' if model_name else ''}; use it with the model it was fitted on, or fit a new one"
            )

    def overlap(self, x) -> dict[str, int]:
        """How many images of ``x`` (compared by content) the detector was fitted or calibrated on."""
        self._check_fitted("overlap")
        images, _ = as_tensors(x, nonfinite="allow")
        if images.is_floating_point():
            images = torch.nan_to_num(images).clamp(0, 1)
        hashes = image_hashes(images)
        cal = getattr(self, "calibration_hashes_", None)
        return {
            "fit": int(torch.isin(hashes, self.fit_hashes_).sum()),
            "calibration": int(torch.isin(hashes, cal).sum()) if cal is not None else 0,
            "total": len(hashes),
        }

    # --- persistence ---------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def _state_meta(self) -> dict[str, Any]:
        return {}

    def _load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass

    def to_state(self, extra: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything a saved detector holds: tensors (the method's own state and the data
        record) and JSON-ready metadata. :meth:`save` writes them; a deployment bundle embeds them."""
        self._check_fitted("save")
        meta = {
            "format": FORMAT,
            "detector": self.name,
            "params": self.get_params(),
            "input_shape": list(self.input_shape_),
            "model": {"fingerprint": self.model_fingerprint_, "name": getattr(self, "model_name_", None)},
            "data": self.data_info_,
            "threshold": getattr(self, "threshold_", None),
            "fpr_target": getattr(self, "fpr_target_", None),
            "calibration_population": getattr(self, "calibration_population_", None),
            "clean_rejection_rate": getattr(self, "clean_rejection_rate_", None),
            "calibration_size": getattr(self, "calibration_size_", None),
            "fit_seconds": getattr(self, "fit_seconds_", None),
            "state": self._state_meta(),
            "extra": extra if extra is not None else getattr(self, "extra_", {}),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._state_tensors().items()}
        if any(k.startswith("record.") for k in tensors):
            raise BadExpertError(f"{self.name}: state tensor names must not start with 'record.'")
        tensors["record.fit_hashes"] = self.fit_hashes_
        if hasattr(self, "threshold_"):
            tensors["record.calibration_hashes"] = self.calibration_hashes_
            tensors["record.calibration_scores"] = self.calibration_scores_
        return tensors, to_jsonable(meta)

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Save the fitted detector to one safetensors file (weights) with JSON metadata.

        The suspect model itself is not stored: :func:`load_detector` takes it as an argument and
        checks it against the fingerprint recorded here. The content hashes of the fitting and
        calibration images and the calibration scores are stored as tensors.
        """
        from safetensors.torch import save

        tensors, meta = self.to_state(extra)
        path = Path(path)
        atomic_write_bytes(path, save(tensors, metadata={"badexpert": json.dumps(meta)}))
        return path


def check_exportable(detector: Detector) -> Detector:
    """``detector`` if it has the capability to be exported (:attr:`Detector.exportable`), else
    the one-line refusal, whatever its class."""
    if not detector.exportable:
        raise BadExpertError(f"detector '{detector.name}' cannot be exported to ONNX: its score is not a pure function "
                             "of the model's outputs and its own networks; serve its bundle with "
                             "`badexpert serve BUNDLE` instead")
    return detector


class _ExportScorer(nn.Module):
    """:meth:`Detector.export_scorer`: the model and the detector's networks registered as
    submodules (so tracing sees their weights), and a shallow copy of the detector pointing at them
    whose :meth:`~Detector.score_given_logits` is the very code the eager detector runs."""

    def __init__(self, detector: Detector, prepare: Callable[[nn.Module], nn.Module] | None) -> None:
        import copy

        super().__init__()
        prepare = prepare or (lambda m: copy.deepcopy(m).cpu().eval())
        self.model = prepare(detector.model_)
        self.nets = nn.ModuleDict({attr.strip("_"): prepare(getattr(detector, attr)) for attr in detector.submodels})
        scorer = copy.copy(detector)
        scorer.model_ = self.model
        for attr in detector.submodels:
            setattr(scorer, attr, self.nets[attr.strip("_")])
        scorer.device_ = torch.device("cpu")
        self.scorer = scorer  # a plain attribute (not a module): its networks are the ones above

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, score = self.scorer.logits_and_score(x)
        return logits.float(), score.float()


def clone(detector: Detector) -> Detector:
    """A new, unfitted detector with the same parameters (scikit-learn's ``clone``)."""
    expect(detector, Detector, "the detector")
    return type(detector)(**detector.get_params()).check_params()


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when it already lives on ``device``, else a copy moved there (the
    caller's model is never moved behind its back)."""
    import copy

    from ..utils import model_device

    here = model_device(model)
    if here.type == device.type and (device.index is None or here.index == device.index):
        return model
    return copy.deepcopy(model).to(device)


def check_detector_meta(meta: dict, source: str, fix: str | None = None) -> dict:
    """Type-check a detector's metadata (from a detector file or a bundle); one-line errors
    ending with ``fix``."""
    from ..metadata import check_fields

    Dim = Annotated[int, Range(ge=1, le=4096)]
    checks = {
        "detector": str, "params": dict, "input_shape": tuple[Dim, Dim, Dim], "model": dict, "data": dict,
        "threshold": float | None, "fpr_target": Annotated[float, Range(gt=0, lt=1)] | None,
        "calibration_size": Annotated[int, Range(ge=1)] | None, "state": dict, "extra": dict,
        # absent in files written before it was recorded: those were calibrated on every input
        "calibration_population": Literal[CALIBRATION_POPULATIONS] | None,
        "clean_rejection_rate": Annotated[float, Range(ge=0, le=1)] | None,
    }
    check_fields(meta, checks, source, fix)
    check_fields({"model.fingerprint": meta["model"].get("fingerprint")}, {"model.fingerprint": str}, source, fix)
    # what the guard and the service read from the data record (its classes, its flips)
    data = {f"data.{k}": meta["data"].get(k) for k in ("classes", "hflip")}
    check_fields(data, {"data.classes": list[str] | None, "data.hflip": bool | None}, source, fix)
    return meta


def read_detector_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a saved detector's tensors and metadata without building anything; the metadata's
    types are checked (a malformed or tampered file is a one-line error)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..io import read_meta

    meta = read_meta(path, fmt=FORMAT, what="detector file", hint="create one with `badexpert defend`")
    check_detector_meta(meta, f"detector file '{path}'", "rebuild it with `badexpert defend`")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BadExpertError(f"cannot read the weights in '{path}': the file is corrupt") from exc
    check_record(tensors, meta, f"detector file '{path}'")
    return tensors, meta


def check_record(tensors: dict[str, torch.Tensor], meta: dict, source: str) -> None:
    """The data record a fitted (and calibrated) detector must carry; a calibrated one's scores
    and threshold are checked by :func:`badexpert.metadata.check_calibration` (present, finite,
    as many as declared; the threshold one of them)."""
    from ..metadata import check_calibration

    need = ["record.fit_hashes"]
    if meta["threshold"] is not None:
        need += ["record.calibration_hashes", "record.calibration_scores"]
    if any(k not in tensors for k in need):
        raise BadExpertError(f"{source} lacks its data record; it is damaged or was made by another tool")
    if meta["threshold"] is not None:
        scores = tensors["record.calibration_scores"]
        if not scores.is_floating_point():
            raise BadExpertError(f"{source}: its calibration scores are {scores.dtype}, not floats; the file is damaged")
        check_calibration(scores.detach().cpu().double().numpy(), meta["threshold"], meta["calibration_size"], source)


def load_detector(path: str | Path, model: nn.Module, *, device: str | None = None,
                  model_name: str | None = None, rebind: bool = False) -> Detector:
    """Load a detector saved with :meth:`Detector.save` for the suspect ``model`` it was fitted on.

    A model whose weights differ from the fitted one's (by fingerprint) is refused; ``model_name``
    (a file name) is used in that message. ``rebind=True`` moves a detector that never uses the
    suspect model (:attr:`Detector.uses_model` false: Frequency) to ``model`` instead; any other
    detector is still refused. A detector moved to another model comes back uncalibrated when its
    threshold was set on the inputs the old model classified correctly (``population="correct"``):
    calibrate it again for the new model.
    """
    expect(model, nn.Module, "the model")
    tensors, meta = read_detector_file(path)
    return detector_from_state(tensors, meta, model, device=device, model_name=model_name,
                               source=f"detector file '{path}'", rebind=rebind)


def detector_from_state(tensors: dict[str, torch.Tensor], meta: dict, model: nn.Module, *,
                        device: str | None = None, model_name: str | None = None,
                        source: str = "the detector", rebind: bool = False) -> Detector:
    """Rebuild a detector from :meth:`Detector.to_state` output (metadata already checked with
    :func:`check_detector_meta`) for the suspect ``model`` whose fingerprint it records (or, with
    ``rebind`` and a detector that does not use the model, for ``model`` whatever its weights)."""
    from . import DETECTORS

    tensors = dict(tensors)
    check_record(tensors, meta, source)
    name = meta["detector"]
    if name not in DETECTORS:
        raise BadExpertError(f"{source} holds an unknown detector '{name}'")
    params = dict(meta["params"])
    if device is not None:
        params["device"] = device
    params = validate_params(DETECTORS[name].__init__, params, f"{source}: detector '{name}'")
    det = DETECTORS[name](**params)
    det.model_fingerprint_ = meta["model"]["fingerprint"]
    det.model_name_ = meta["model"].get("name")
    rebound = False
    if rebind and not det.uses_model:  # moved to this model: it records this model's fingerprint
        from ..io import model_fingerprint

        fingerprint = model_fingerprint(model)
        rebound = fingerprint != det.model_fingerprint_
        det.model_fingerprint_, det.model_name_ = fingerprint, model_name
    else:
        det.check_model(model, model_name=model_name)
    det.device_ = resolve_device(det.device)
    det.input_shape_ = tuple(meta["input_shape"])
    det.fit_seconds_ = meta.get("fit_seconds")
    det.data_info_ = meta["data"]
    det.extra_ = meta.get("extra") or {}
    det.fit_hashes_ = tensors.pop("record.fit_hashes")
    model = on_device(model, det.device_)
    scores = tensors.pop("record.calibration_scores", None)
    cal_hashes = tensors.pop("record.calibration_hashes", None)
    det._load_state(model, tensors, meta["state"])
    det.model_ = model
    # a threshold set on the inputs the old model got right does not carry over to another model:
    # a rebound detector comes back fitted but uncalibrated
    carried = not (rebound and (meta["calibration_population"] or "all") == "correct")
    if meta["threshold"] is not None and carried:
        if meta["fpr_target"] is None or meta["calibration_size"] is None or scores is None:
            raise BadExpertError(f"{source} has a threshold but no calibration record; it is damaged")
        det.threshold_ = float(meta["threshold"])
        det.fpr_target_ = float(meta["fpr_target"])
        det.calibration_population_ = meta["calibration_population"] or "all"
        cr = meta["clean_rejection_rate"]
        det.clean_rejection_rate_ = float(cr) if cr is not None else det.fpr_target_
        det.calibration_size_ = int(meta["calibration_size"])
        det.calibration_scores_ = scores
        det.calibration_hashes_ = cal_hashes
    return det
