"""The contract kit: certify a detector or an attack, as scikit-learn's ``check_estimator`` does.

:func:`check_detector` and :func:`check_attack` run the guarantees every method in badexpert must
keep, whatever it computes, on a few dozen images (seconds on a CPU). The first broken guarantee
raises :class:`ContractError` (an ``AssertionError``), whose message starts with the method and the
guarantee's name, e.g. ``MyDetector breaks 'batch independence': ...``. On success both return
``{guarantee: "ok" | "skipped: <why>"}``.

The registry-wide tests (``tests/test_detectors.py``, ``tests/test_attacks.py``) run them on
every registered detector and attack; a method's own test file keeps only what is specific to it.

Certifying one's own detector::

    import torch
    from badexpert.detectors import Detector
    from badexpert.testing import check_detector
    from badexpert.validation import NonNegativeInt, PositiveFloat, PositiveInt

    class Brightness(Detector):
        name = "brightness"
        forward_passes_per_input = 0   # never runs the model
        uses_model = False

        def __init__(self, *, gain: PositiveFloat = 1.0, batch_size: PositiveInt = 256,
                     seed: NonNegativeInt = 0, device: str | None = None) -> None:
            super().__init__(batch_size=batch_size, seed=seed, device=device)
            self.gain = gain

        def _fit(self, model, images, labels):
            self.mean_ = images.float().mean()          # fitted attributes end with "_"

        def _score_batch(self, x):                       # x: float images in [0, 1]
            return self.gain * (x.flatten(1).mean(1) - self.mean_.to(x.device)).abs()

    report = check_detector(Brightness(), model, (images, labels), triggered=attack.apply(test_images))

``check_detector`` needs a model and at least :data:`MIN_DETECTOR_IMAGES` clean labelled images;
``triggered`` (inputs carrying the model's backdoor trigger) is optional: without it the sign is
not checked. The save/load round trip runs for a detector registered under its ``name`` in
:data:`badexpert.detectors.DETECTORS` (``load_detector`` finds classes there) and is reported as
skipped otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import tempfile
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .data.core import Dataset, as_tensors, to_float, to_uint8
from .errors import BadExpertError, NotFittedError
from .validation import OneOf, Range, signature_hints

#: The fewest clean labelled images :func:`check_detector` works with (half fit, a quarter calibrate).
MIN_DETECTOR_IMAGES = 16

_STATUS_OK = "ok"


class ContractError(AssertionError):
    """A method breaks one of the guarantees of its contract (the message names it)."""


def _fail(who: str, guarantee: str, detail: str) -> ContractError:
    return ContractError(f"{who} breaks '{guarantee}': {detail}")


@contextmanager
def _guarantee(who: str, guarantee: str):
    """Turn an unexpected exception inside a check into a ContractError naming the guarantee."""
    try:
        yield
    except ContractError:
        raise
    except Exception as exc:  # noqa: BLE001 - any crash is a broken guarantee, named
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise _fail(who, guarantee, f"raised {type(exc).__name__}: {first}") from exc


def _expect_error(who: str, guarantee: str, fn: Callable[[], Any], exc_type: type = BadExpertError,
                  mentions: str | None = None) -> str:
    """``fn()`` must raise ``exc_type`` with a one-line message (mentioning ``mentions``)."""
    try:
        fn()
    except exc_type as exc:
        msg = str(exc)
        if "\n" in msg or not msg.strip():
            raise _fail(who, guarantee, f"the {exc_type.__name__} is not one line: {msg!r}") from exc
        if mentions is not None and mentions not in msg:
            raise _fail(who, guarantee, f"the message does not name {mentions}: {msg!r}") from exc
        return msg
    except Exception as exc:  # noqa: BLE001
        raise _fail(who, guarantee, f"raised {type(exc).__name__} instead of {exc_type.__name__}: {exc}") from exc
    raise _fail(who, guarantee, f"no {exc_type.__name__} was raised")


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=atol, equal_nan=True))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
    d = (a.double() - b.double()).abs()
    d = torch.where(torch.isnan(a.double()) & torch.isnan(b.double()), torch.zeros_like(d), d)
    return f"largest difference {float(torch.nan_to_num(d, nan=math.inf).max()):.3g}"


# --- parameters: bad values derived from the annotations -------------------------------------------
def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def bad_values(tp) -> list[Any]:
    """Values an annotation refuses: just past each bound of a ``Range``, an unknown choice of a
    ``Literal`` / ``OneOf``, a string for a number. Empty when the annotation admits anything
    the kit can guess."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    out: list[Any] = []
    if origin is typing.Literal:
        return ["no-such-choice"]
    if origin is typing.Annotated:
        base, *extra = typing.get_args(tp)
        base = _unwrap_optional(base)
        integer = base is int
        for c in extra:
            if isinstance(c, Range):
                if c.ge is not None:
                    out.append(int(c.ge) - 1 if integer else c.ge - 0.5)
                if c.gt is not None:
                    out.append(int(c.gt) if integer else c.gt)
                if c.le is not None:
                    out.append(int(c.le) + 1 if integer else c.le + 0.5)
                if c.lt is not None:
                    out.append(int(c.lt) if integer else c.lt)
            elif isinstance(c, OneOf):
                out.append("no-such-choice")
        return out + _wrong_type(base)
    return _wrong_type(tp)


def _wrong_type(tp) -> list[Any]:
    if tp is bool:
        return [1]
    if tp is int:
        return [2.5, "not-a-number"]
    if tp is float:
        return [math.nan, "not-a-number"]
    return []


def _param_hints(func) -> dict[str, Any]:
    try:
        return signature_hints(func)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to derive
        return {}


# --- detectors -------------------------------------------------------------------------------------
def _split(data, n_probe: int):
    images, labels = as_tensors(data)
    if labels is None:
        raise BadExpertError("check_detector needs labelled clean data: a Dataset or an (images, labels) pair")
    n = len(images)
    if n < MIN_DETECTOR_IMAGES:
        raise BadExpertError(f"check_detector needs at least {MIN_DETECTOR_IMAGES} clean images, got {n}")
    n_fit, n_cal = n // 2, n // 4
    probe_at = n_fit + n_cal
    n_probe = max(4, min(n_probe, n - probe_at))

    def part(lo, hi):
        if isinstance(data, Dataset):
            return data.subset(range(lo, hi))
        return images[lo:hi], labels[lo:hi]

    return part(0, n_fit), part(n_fit, probe_at), images[probe_at:probe_at + n_probe]


def check_detector(detector, model: nn.Module, data, *, triggered=None, fpr: float = 0.25,
                   atol: float = 1e-5, n_probe: int = 12, min_auroc: float = 0.5) -> dict[str, str]:
    """Run every guarantee of the detector contract (:mod:`badexpert.detectors.base`) on
    ``detector`` (an unfitted instance; it is cloned, never fitted itself).

    ``data``: clean labelled images (a :class:`~badexpert.data.Dataset` or ``(images, labels)``),
    at least :data:`MIN_DETECTOR_IMAGES`: the first half fits, the next quarter calibrates, and up
    to ``n_probe`` of the rest are scored. ``triggered``: inputs carrying ``model``'s backdoor
    trigger; given, the detector must score them higher than the clean calibration inputs (mean,
    and AUROC above ``min_auroc``). Scores that the contract says are equal must agree to
    ``atol`` (plus a relative 1e-5); the same seed and a save/load round trip must give
    identical scores.

    Guarantees checked, in order: ``parameters`` (``get_params`` / ``clone`` / ``repr``;
    unknown names and every out-of-range or mistyped value the annotations forbid are one-line
    :class:`~badexpert.errors.BadExpertError` naming the parameter, and a refused change leaves the
    detector as it was), ``cost`` (declared forward/backward passes, consistent with
    ``needs_gradients``), ``not fitted`` (score before fit, predict before calibrate:
    :class:`~badexpert.errors.NotFittedError`), ``fit returns self``, ``fitted attributes end
    with _`` (and fit leaves the parameters unchanged), ``scores`` (one finite float per input),
    ``repeatable`` (scoring twice, whatever the global RNG, gives the same scores), ``batch
    independence`` (a batch's scores equal its parts', in any order and batch size), ``uint8 and
    float agree``, ``same seed same scores``, ``calibrate`` (returns self, a finite threshold;
    ``predict`` is ``score > threshold_``), ``non-finite inputs`` (NaN and inf images get NaN
    scores and are rejected, the others keep their scores), ``one-line input errors`` (wrong
    shape, unreachable FPR), ``sign`` (with ``triggered``) and ``save/load round trip``
    (registered detectors; a changed model is refused).

    Returns ``{guarantee: "ok" | "skipped: <why>"}``; raises :class:`ContractError` at the
    first broken guarantee.
    """
    from .detectors.base import Detector

    if isinstance(detector, type):
        raise BadExpertError(f"check_detector takes a detector instance, e.g. {detector.__name__}(), not the class")
    if not isinstance(detector, Detector):
        raise BadExpertError(f"check_detector takes a badexpert Detector, got {type(detector).__name__}")
    if not isinstance(model, nn.Module):
        raise BadExpertError(f"check_detector takes a torch.nn.Module model, got {type(model).__name__}")
    who = type(detector).__name__
    fit_set, cal_set, probe = _split(data, n_probe)
    results: dict[str, str] = {}

    _check_detector_params(who, detector, results)
    _check_cost(who, detector, results)

    with torch.random.fork_rng(devices=[]):  # the kit moves the global RNG; the caller's state is kept
        _check_fitted_detector(who, detector, model, fit_set, cal_set, probe, triggered, fpr, atol, min_auroc, results)
    return results


def _check_fitted_detector(who, detector, model, fit_set, cal_set, probe, triggered, fpr, atol, min_auroc,
                           results) -> None:
    from .detectors.base import clone

    det = clone(detector)
    _expect_error(who, "not fitted", lambda: det.score(probe), NotFittedError, "fit")
    _expect_error(who, "not fitted", lambda: det.calibrate(cal_set, fpr), NotFittedError, "fit")
    _expect_error(who, "one-line input errors", lambda: clone(detector).fit("model.pt", fit_set), mentions="nn.Module")
    before, params = set(vars(det)), det.get_params()
    with _guarantee(who, "fit returns self"):
        out = det.fit(model, fit_set)
    if out is not det:
        raise _fail(who, "fit returns self", f"fit returned {type(out).__name__}, not the detector")
    results["fit returns self"] = _STATUS_OK
    added = sorted(a for a in set(vars(det)) - before if not a.startswith("_") and not a.endswith("_"))
    if added:
        raise _fail(who, "fitted attributes end with _", f"fit set {added}")
    if det.get_params() != params:
        raise _fail(who, "fitted attributes end with _", f"fit changed the parameters {params} -> {det.get_params()}")
    if not det.is_fitted:
        raise _fail(who, "fitted attributes end with _", "is_fitted is False after fit")
    results["fitted attributes end with _"] = _STATUS_OK
    _expect_error(who, "not fitted", lambda: det.predict(probe), NotFittedError, "calibrate")
    results["not fitted"] = _STATUS_OK

    with _guarantee(who, "scores"):
        scores = det.score(probe)
    if not isinstance(scores, torch.Tensor) or not scores.dtype.is_floating_point or tuple(scores.shape) != (len(probe),):
        got = f"{scores.dtype} {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise _fail(who, "scores", f"score must return one float per input ({len(probe)}), got {got}")
    if not bool(torch.isfinite(scores).all()):
        raise _fail(who, "scores", f"clean inputs got non-finite scores {scores.tolist()}")
    results["scores"] = _STATUS_OK

    with _guarantee(who, "repeatable"):
        torch.manual_seed(12345)  # another global RNG state: the detector must not depend on it
        again = det.score(probe)
    if not _close(again, scores, atol):
        raise _fail(who, "repeatable", f"scoring the same inputs twice gave different scores ({_max_diff(again, scores)})")
    results["repeatable"] = _STATUS_OK

    _check_batch_independence(who, det, probe, scores, atol)
    results["batch independence"] = _STATUS_OK

    with _guarantee(who, "uint8 and float agree"):
        x8 = to_uint8(to_float(probe))
        s8, sf = det.score(x8), det.score(to_float(x8))
    if not _close(s8, sf, atol):
        raise _fail(who, "uint8 and float agree", f"uint8 images and the same images as floats / 255 score differently ({_max_diff(s8, sf)})")
    results["uint8 and float agree"] = _STATUS_OK

    with _guarantee(who, "same seed same scores"):
        torch.manual_seed(54321)
        twin = clone(detector).fit(model, fit_set).score(probe)
    if not torch.equal(twin, scores):
        raise _fail(who, "same seed same scores", f"two fits with seed {det.seed} on the same data score differently ({_max_diff(twin, scores)})")
    results["same seed same scores"] = _STATUS_OK

    with _guarantee(who, "calibrate"):
        out = det.calibrate(cal_set, fpr, population="all")
    if out is not det:
        raise _fail(who, "calibrate", f"calibrate returned {type(out).__name__}, not the detector")
    thr = getattr(det, "threshold_", None)
    if not isinstance(thr, float) or not math.isfinite(thr):
        raise _fail(who, "calibrate", f"threshold_ is {thr!r}, not a finite float")
    with _guarantee(who, "calibrate"):
        flags = det.predict(probe)
    if flags.dtype != torch.bool or not torch.equal(flags, scores > thr):
        raise _fail(who, "calibrate", "predict(x) is not the boolean score(x) > threshold_")
    results["calibrate"] = _STATUS_OK

    _check_nonfinite(who, det, probe, scores, atol)
    results["non-finite inputs"] = _STATUS_OK

    c, h, w = det.input_shape_
    _expect_error(who, "one-line input errors", lambda: det.score(torch.zeros(2, c + 1, h, w)), mentions="shape")
    _expect_error(who, "one-line input errors", lambda: det.score(torch.zeros(h, w)), mentions="[N, C, H, W]")
    _expect_error(who, "one-line input errors", lambda: det.calibrate(cal_set, 1.5), mentions="false-positive rate")
    det.calibrate(cal_set, fpr, population="all")  # a refused calibration must not matter; restore anyway
    results["one-line input errors"] = _STATUS_OK

    if triggered is None:
        results["sign"] = "skipped: no triggered inputs given"
    else:
        _check_sign(who, det, triggered, min_auroc)
        results["sign"] = _STATUS_OK

    _check_save_load(who, det, model, probe, results)


def _check_detector_params(who: str, detector, results: dict) -> None:
    from .detectors import DETECTORS, get_detector
    from .detectors.base import clone

    g = "parameters"
    cls = type(detector)
    with _guarantee(who, g):
        params = detector.get_params()
        twin = clone(detector)
    names = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    if sorted(params) != sorted(names):
        raise _fail(who, g, f"get_params() gives {sorted(params)} but the constructor takes {sorted(names)} "
                            "(every constructor parameter must be stored under its own name)")
    missing = {"batch_size", "seed", "device"} - set(params)
    if missing:
        raise _fail(who, g, f"the constructor lacks {sorted(missing)} (pass them on to Detector.__init__)")
    if detector.get_params(deep=True) != params:
        raise _fail(who, g, "get_params(deep=True) differs from get_params()")
    if type(twin) is not cls or twin.get_params() != params or twin.is_fitted:
        raise _fail(who, g, "clone() does not give an unfitted detector with the same parameters")
    if not repr(detector).startswith(cls.__name__ + "("):
        raise _fail(who, g, f"repr {repr(detector)!r} does not start with {cls.__name__}(")
    _expect_error(who, g, lambda: cls(no_such_parameter=1), mentions="no_such_parameter")
    probe = clone(detector)
    _expect_error(who, g, lambda: probe.set_params(no_such_parameter=1), mentions="no_such_parameter")
    seed = params["seed"] + 1
    if probe.set_params(seed=seed) is not probe or probe.get_params()["seed"] != seed:
        raise _fail(who, g, "set_params(seed=...) must set the parameter and return the detector")
    if f"seed={seed}" not in repr(probe):
        raise _fail(who, g, f"repr {repr(probe)!r} does not show the changed parameter seed={seed}")
    probe.set_params(seed=params["seed"])
    registered = DETECTORS.get(detector.name) is cls
    hints = _param_hints(cls.__init__)
    for name in names:
        for bad in bad_values(hints.get(name)):
            _expect_error(who, g, lambda: probe.set_params(**{name: bad}), mentions=f"'{name}' must be")
            if probe.get_params() != params:
                raise _fail(who, g, f"a refused set_params({name}={bad!r}) changed the detector")
            if registered:
                _expect_error(who, g, lambda: get_detector(detector.name, **{name: bad}), mentions=f"'{name}' must be")
    results[g] = _STATUS_OK


def _check_cost(who: str, detector, results: dict) -> None:
    g = "cost"
    with _guarantee(who, g):
        cost = detector.cost
        grads = detector.needs_gradients
    if not isinstance(cost, dict) or set(cost) != {"forward", "backward"}:
        raise _fail(who, g, f"cost must be {{'forward': int, 'backward': int}}, got {cost!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in cost.values()):
        raise _fail(who, g, f"passes per input must be integers >= 0, got {cost!r}")
    if getattr(detector, "uses_model", True) and cost["forward"] < 1:
        raise _fail(who, g, f"a detector that uses the model makes at least one forward pass per input, got {cost!r}")
    if grads != (cost["backward"] > 0):
        raise _fail(who, g, f"needs_gradients is {grads} but cost declares {cost['backward']} backward passes")
    results[g] = _STATUS_OK


def _check_batch_independence(who: str, det, probe: torch.Tensor, scores: torch.Tensor, atol: float) -> None:
    g = "batch independence"
    k = max(1, len(probe) // 3)
    with _guarantee(who, g):
        views = {
            f"split into {k} + {len(probe) - k}": torch.cat([det.score(probe[:k]), det.score(probe[k:])]),
            "in reverse order": det.score(probe.flip(0)).flip(0),
            "one at a time": torch.cat([det.score(probe[i:i + 1]) for i in range(min(3, len(probe)))]),
        }
        small = copy.copy(det)
        small.set_params(batch_size=max(1, len(probe) // 4))
        views[f"with batch_size={small.batch_size}"] = small.score(probe)
    for how, got in views.items():
        want = scores[:len(got)]
        if not _close(got, want, atol):
            raise _fail(who, g, f"the scores of a batch scored {how} differ from the whole batch's ({_max_diff(got, want)}); "
                                "a score may depend only on its own input (draw randomness from input_generators)")


def _check_nonfinite(who: str, det, probe: torch.Tensor, scores: torch.Tensor, atol: float) -> None:
    from .runtime.reasons import REJECT_NONFINITE_INPUT

    g = "non-finite inputs"
    x = to_float(probe[:4]).clone()
    x[1, 0, 0, 0] = float("nan")
    x[2, -1, -1, -1] = float("inf")
    with _guarantee(who, g):
        s = det.score(x)
        flags = det.predict(x)
        reasons = det.predict_details(x)["reason"]
    if not (bool(torch.isnan(s[1])) and bool(torch.isnan(s[2]))):
        raise _fail(who, g, f"images with a NaN or inf pixel must get NaN scores, got {s[1].item()} and {s[2].item()}")
    if not _close(s[[0, 3]], scores[[0, 3]], atol):
        raise _fail(who, g, "a non-finite image in the batch changed the other images' scores")
    if not (bool(flags[1]) and bool(flags[2])):
        raise _fail(who, g, "predict let through an image it could not score")
    if reasons[1] != REJECT_NONFINITE_INPUT or reasons[2] != REJECT_NONFINITE_INPUT:
        raise _fail(who, g, f"predict_details gives reasons {reasons[1]!r}, {reasons[2]!r}, not {REJECT_NONFINITE_INPUT!r}")


def _check_sign(who: str, det, triggered, min_auroc: float) -> None:
    from .metrics import auroc

    g = "sign"
    with _guarantee(who, g):
        trig = det.score(triggered)
    clean = det.calibration_scores_
    area = auroc(clean.numpy(), trig.numpy())
    if not float(trig.mean()) > float(clean.mean()) or not area > min_auroc:
        raise _fail(who, g, f"higher scores must mean more suspicious, but triggered inputs score "
                            f"{float(trig.mean()):.4g} on average against {float(clean.mean()):.4g} for clean ones "
                            f"(AUROC {area:.3f}, needs > {min_auroc})")


def _check_save_load(who: str, det, model: nn.Module, probe: torch.Tensor, results: dict) -> None:
    from .detectors import DETECTORS
    from .detectors.base import load_detector

    g = "save/load round trip"
    if DETECTORS.get(det.name) is not type(det):
        results[g] = f"skipped: '{det.name}' is not registered in badexpert.detectors.DETECTORS"
        return
    with tempfile.TemporaryDirectory() as tmp, _guarantee(who, g):
        path = det.save(Path(tmp) / "detector.safetensors")
        loaded = load_detector(path, model)
        if type(loaded) is not type(det) or loaded.get_params() != det.get_params():
            raise _fail(who, g, "the loaded detector has another class or other parameters")
        if loaded.threshold_ != det.threshold_:
            raise _fail(who, g, f"threshold {det.threshold_} came back as {loaded.threshold_}")
        a, b = det.score(probe), loaded.score(probe)
        if not torch.equal(a, b):
            raise _fail(who, g, f"the loaded detector scores differently ({_max_diff(a, b)})")
        if not torch.equal(loaded.predict(probe), det.predict(probe)):
            raise _fail(who, g, "the loaded detector decides differently")
        other = copy.deepcopy(model)
        with torch.no_grad():
            p = next(other.parameters(), None)
            if p is not None:
                p.view(-1)[0] += 1e-3
        if p is not None:
            _expect_error(who, g, lambda: load_detector(path, other), mentions="but was given model")
    results[g] = _STATUS_OK


# --- attacks ---------------------------------------------------------------------------------------
def _random_images(n: int, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


def _ready(attack, shape):
    """A learned attack gets its seeded initial state (the machinery runs without training)."""
    if attack.learned:
        attack.restore_state(tuple(shape), attack.initial_state(tuple(shape)), source="its initial state")
    return attack


def check_attack(attack, *, shape: tuple[int, int, int] = (3, 16, 16), classes: int = 10,
                 params: dict | None = None) -> dict[str, str]:
    """Run every guarantee of the attack contract (:mod:`badexpert.attacks.base`) on ``attack``:
    an :class:`~badexpert.attacks.Attack` instance, or a class built with ``params`` (files it
    needs, such as Refool's reflections, go there). A learned attack (a generator, an encoder)
    is checked with its seeded initial state (:meth:`Attack.initial_state`), without training.

    Guarantees checked: ``parameters`` (every out-of-range or mistyped value the field annotations
    forbid, and, for a registered attack, an unknown name, is a one-line
    :class:`~badexpert.errors.BadExpertError` naming it; ``params()`` / ``to_dict()`` hold every
    field and rebuild the same attack), ``apply`` (uint8 or float ``[N, C, H, W]`` in, float32 of
    the same shape in ``[0, 1]`` out; the input is not modified; uint8 and float inputs give the
    same output; the same generator seed gives the same output), ``seeded poison`` (the same seed
    gives the same poisoned set; the input set is not modified; only the recorded poison and
    cover samples change; dirty-label poisons get :meth:`Attack.target_of`, clean-label ones and
    covers keep their labels), ``poison count`` (as many poisons as :meth:`Attack.poison_count`
    says, from :meth:`Attack.poison_candidates`; a rate that poisons nothing is a one-line error)
    and ``trigger state round trip`` (the state saved in a model file and restored gives exactly
    the same trigger). An attack whose :meth:`poison` needs :meth:`implant` first (it says so in a
    one-line error) has the poisoning checks reported as skipped.

    Returns ``{guarantee: "ok" | "skipped: <why>"}``; raises :class:`ContractError` at the
    first broken guarantee.
    """
    from .attacks.base import Attack

    if isinstance(attack, type):
        if not issubclass(attack, Attack):
            raise BadExpertError(f"check_attack takes a badexpert Attack, got {attack.__name__}")
        attack = attack(**(params or {}))
    elif not isinstance(attack, Attack):
        raise BadExpertError(f"check_attack takes a badexpert Attack (class or instance), got {type(attack).__name__}")
    elif params:
        attack = dataclasses.replace(attack, **params)
    who = type(attack).__name__
    results: dict[str, str] = {}
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is kept
        _check_attack_params(who, attack, results)
        _check_apply(who, attack, shape, results)
        _check_poison(who, attack, shape, classes, results)
        _check_trigger_state(who, attack, shape, results)
    return results


def _check_attack_params(who: str, attack, results: dict) -> None:
    from .attacks import ATTACKS, attack_from_dict, get_attack
    from .attacks.base import restoring

    g = "parameters"
    cls = type(attack)
    fields = [f.name for f in dataclasses.fields(attack) if f.init]
    # a field marked ``omit_default`` (``online``) is left out of the record while at its default
    held = [f.name for f in dataclasses.fields(attack) if f.init
            and not (f.metadata.get("omit_default") and getattr(attack, f.name) == f.default)]
    with _guarantee(who, g):
        p = attack.params()
        d = attack.to_dict()
    if sorted(p) != sorted(held) or d.get("name") != attack.name or {k: v for k, v in d.items() if k != "name"} != p:
        raise _fail(who, g, f"params() / to_dict() must hold every field {sorted(held)} (and the name), got {sorted(d)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    registered = ATTACKS.get(attack.name) is cls
    for name in fields:
        for bad in bad_values(hints.get(name)):
            def build(name=name, bad=bad):
                with restoring():
                    return dataclasses.replace(attack, **{name: bad})
            _expect_error(who, g, build, mentions=f"parameter '{name}' must be")
    if registered:
        _expect_error(who, g, lambda: get_attack(attack.name, no_such_parameter=1), mentions="no_such_parameter")
        with _guarantee(who, g), restoring():
            again = attack_from_dict(d, check_files=False)
        if type(again) is not cls or again.to_dict() != d:
            raise _fail(who, g, "attack_from_dict(to_dict()) does not rebuild the same attack")
    results[g] = _STATUS_OK


def _check_apply(who: str, attack, shape, results: dict) -> None:
    g = "apply"
    x8 = _random_images(6, shape, seed=1)
    xf = to_float(x8)
    keep8, keepf = x8.clone(), xf.clone()
    with _guarantee(who, g):
        _ready(attack, shape)
        out = attack.apply(xf, torch.Generator().manual_seed(3))
        again = attack.apply(xf, torch.Generator().manual_seed(3))
        from8 = attack.apply(x8, torch.Generator().manual_seed(3))
    if not torch.equal(x8, keep8) or not torch.equal(xf, keepf):
        raise _fail(who, g, "apply modified its input")
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != tuple(xf.shape):
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise _fail(who, g, f"apply must return float32 images of shape {tuple(xf.shape)}, got {got}")
    if not bool(torch.isfinite(out).all()) or float(out.min()) < 0 or float(out.max()) > 1:
        raise _fail(who, g, "apply returned values outside [0, 1]")
    if not torch.equal(out, again):
        raise _fail(who, g, "the same generator seed gave different triggered images")
    if not torch.equal(out, from8):
        raise _fail(who, g, "uint8 images and the same images as floats / 255 are triggered differently")
    results[g] = _STATUS_OK


def _check_poison(who: str, attack, shape, classes: int, results: dict) -> None:
    from .attacks.base import restoring
    from .utils import derive_generator

    n = 200
    labels = torch.arange(n) % classes
    data = Dataset(images=_random_images(n, shape, seed=2), labels=labels, classes=[str(c) for c in range(classes)],
                   name="check")
    kept = data.images.clone()
    rate = attack.poison_rate if round(attack.poison_rate * n) >= 1 else 0.1
    try:
        fresh = _ready(dataclasses.replace(attack, poison_rate=rate), shape) if rate != attack.poison_rate else attack
        first = fresh.poison(data, derive_generator(0, "check"))
    except BadExpertError as exc:
        if "\n" in str(exc):
            raise _fail(who, "seeded poison", f"poison raised a multi-line error: {exc}") from exc
        results["seeded poison"] = results["poison count"] = f"skipped: {exc}"
        return
    except Exception as exc:  # noqa: BLE001
        raise _fail(who, "seeded poison", f"poison raised {type(exc).__name__}: {exc}") from exc
    with _guarantee(who, "seeded poison"):
        second = fresh.poison(data, derive_generator(0, "check"))
    if not torch.equal(data.images, kept) or not torch.equal(data.labels, labels):
        raise _fail(who, "seeded poison", "poison modified the dataset it was given")
    if (first.meta.get("poison_indices") != second.meta.get("poison_indices")
            or first.meta.get("cover_indices") != second.meta.get("cover_indices")
            or not torch.equal(first.images, second.images) or not torch.equal(first.labels, second.labels)):
        raise _fail(who, "seeded poison", "the same seed gave a different poisoned set")
    if first.images.dtype != data.images.dtype or first.images.shape != data.images.shape or len(first.labels) != n:
        raise _fail(who, "seeded poison", "the poisoned set's images changed dtype or shape")
    poison = torch.as_tensor(first.meta["poison_indices"], dtype=torch.int64)
    cover = torch.as_tensor(first.meta["cover_indices"], dtype=torch.int64)
    touched = torch.zeros(n, dtype=torch.bool)
    touched[poison] = True
    touched[cover] = True
    if not torch.equal(first.images[~touched], data.images[~touched]) or not torch.equal(first.labels[~touched], labels[~touched]):
        raise _fail(who, "seeded poison", "samples recorded as neither poison nor cover were changed")
    if bool(torch.isin(poison, cover).any()):
        raise _fail(who, "seeded poison", "a sample is both poison and cover")
    if not torch.equal(first.labels[cover], labels[cover]):
        raise _fail(who, "seeded poison", "cover samples must keep their labels")
    want = labels[poison] if fresh.clean_label else fresh.target_of(labels[poison], classes)
    if not torch.equal(first.labels[poison], want):
        raise _fail(who, "seeded poison", "poisoned samples' labels are not the attack's target_of (dirty-label) "
                                          "or their own (clean-label)")
    results["seeded poison"] = _STATUS_OK

    g = "poison count"
    with _guarantee(who, g):
        cand, count = fresh.poison_count(data)
    if len(poison) != count or not bool(torch.isin(poison, cand).all()):
        raise _fail(who, g, f"poisoned {len(poison)} samples, poison_count says {count} from its candidates")
    if not fresh.clean_label and count != round(fresh.poison_rate * n):
        raise _fail(who, g, f"a dirty-label rate {fresh.poison_rate} of {n} samples poisons {count}, not {round(fresh.poison_rate * n)}")
    if fresh.clean_label and count != min(round(fresh.poison_rate * n), len(cand)):
        raise _fail(who, g, f"a clean-label rate {fresh.poison_rate} poisons {count}, not min(rate x n, candidates)")
    with _guarantee(who, g), restoring():
        tiny = dataclasses.replace(fresh, poison_rate=1e-4)
    _expect_error(who, g, lambda: tiny.poison_count(data), mentions="poisons no")
    results[g] = _STATUS_OK


def _check_trigger_state(who: str, attack, shape, results: dict) -> None:
    from .attacks import ATTACKS, attack_from_meta
    from .attacks.base import restoring
    from .io import load_model, save_model
    from .models import build_model

    g = "trigger state round trip"
    c, h, w = shape
    x = to_float(_random_images(5, shape, seed=4))
    with _guarantee(who, g):
        _ready(attack, shape)
        want = attack.apply(x, torch.Generator().manual_seed(5))
        state = attack.trigger_state(shape)
        model = build_model("cnn", in_channels=c, num_classes=4, image_size=(h, w), mean=[0.5] * c, std=[0.25] * c, width=4)
        meta = {"arch": "cnn", "width": 4, "in_channels": c, "num_classes": 4, "image_size": [h, w],
                "mean": [0.5] * c, "std": [0.25] * c, "attack": attack.to_dict(), "attack_state": state}
        with tempfile.TemporaryDirectory() as tmp:
            path = save_model(Path(tmp) / "suspect.safetensors", model, meta)
            _, loaded = load_model(path)
        back = loaded.get("attack_state") or {}
        if set(back) != set(state) or not all(torch.equal(back[k], state[k]) for k in state):
            raise _fail(who, g, "the trigger state read back from the model file differs from the one saved")
        with restoring():
            fresh = type(attack)(**{f.name: getattr(attack, f.name) for f in dataclasses.fields(attack) if f.init})
        fresh.restore_state(shape, back, source="the checked model file")
        got = fresh.apply(x, torch.Generator().manual_seed(5))
        if ATTACKS.get(attack.name) is type(attack):
            via_meta = attack_from_meta(loaded).apply(x, torch.Generator().manual_seed(5))
            if not torch.equal(via_meta, want):
                raise _fail(who, g, "attack_from_meta(the model file) triggers differently from the attack saved")
    if not torch.equal(got, want):
        raise _fail(who, g, "the restored trigger state triggers differently from the attack saved")
    results[g] = _STATUS_OK


__all__ = ["MIN_DETECTOR_IMAGES", "ContractError", "bad_values", "check_attack", "check_detector"]
