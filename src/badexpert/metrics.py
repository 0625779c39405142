"""Detection metrics: conformal threshold, AUROC, TPR at fixed FPR, bootstrap intervals, CA/ASR.

Conventions everywhere in this module:

* a **score** is oriented so that HIGHER means MORE likely backdoor;
* an input is **rejected** iff ``score > threshold`` (strictly greater);
* a **label** 1 means backdoor / triggered, 0 means clean.

Inputs may be 1-D numpy arrays, torch tensors (any device) or lists. Every returned number is a
plain Python ``float`` (or ``int``), ready for JSON. ROC computations use scikit-learn.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from .errors import BadExpertError

__all__ = [
    "calibration_needed",
    "check_reachable_fpr",
    "conformal_threshold",
    "operating_point",
    "auroc",
    "auroc_rank",
    "tpr_at_fpr",
    "rates",
    "per_class_rejection",
    "bootstrap_ci",
    "ScoreAccumulator",
    "detection_summary",
]

DEFAULT_FPRS = (0.001, 0.01, 0.05)


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # bfloat16 / half have no numpy equivalent
        return x.numpy()
    return np.asarray(x)


def _vec(x: Any, name: str, dtype=np.float64, *, allow_nan: bool = False) -> np.ndarray:
    """``x`` as a 1-D numpy array of ``dtype``; one-line BadExpertError when it is not 1-D."""
    arr = _to_numpy(x)
    if arr.ndim != 1:
        raise BadExpertError(f"{name} must be a 1-D array of per-input values, got shape {tuple(arr.shape)}")
    arr = arr.astype(dtype, copy=False)
    if not allow_nan and arr.dtype.kind == "f" and np.isnan(arr).any():
        raise BadExpertError(
            f"{name} contains {int(np.isnan(arr).sum())} NaN value(s); the detector produced invalid scores"
        )
    return arr


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise BadExpertError(f"per-input arrays must have the same length; got {desc}")


def _mean(mask: np.ndarray) -> float:
    """Fraction of True in a boolean array; NaN for an empty one."""
    return float(mask.mean()) if mask.size else float("nan")


def _sklearn_inputs(clean: np.ndarray, backdoor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores for scikit-learn.

    scikit-learn refuses infinite scores; ROC curves (hence AUROC and TPR at FPR) are invariant
    under strictly increasing maps, so non-finite scores are replaced by their ranks.
    """
    y = np.concatenate([np.zeros(len(clean), dtype=np.int64), np.ones(len(backdoor), dtype=np.int64)])
    s = np.concatenate([clean, backdoor])
    if not np.isfinite(s).all():
        s = rankdata(s, method="average")
    return y, s


# --------------------------------------------------------------------------------------------
# threshold
# --------------------------------------------------------------------------------------------
def conformal_rank(n: int, fpr: float) -> int:
    """The 1-based rank k = ceil((n+1)(1-fpr)) of the split-conformal threshold.

    (n+1)(1-fpr) within 1e-9 (relative) of an integer counts as that integer, so that decimal
    targets such as 0.3 are not pushed one rank up by binary rounding of ``1 - 0.3``.
    """
    kr = (n + 1) * (1.0 - fpr)
    r = round(kr)
    if abs(kr - r) <= 1e-9 * max(1.0, kr):
        return int(r)
    return int(math.ceil(kr))


def smallest_reachable_fpr(n: int) -> float:
    """The smallest false-positive rate ``n`` calibration scores can guarantee: 1 / (n + 1).

    Below it the conformal rank ``ceil((n+1)(1-fpr))`` exceeds ``n``: no calibration score is high
    enough, and the only "threshold" would be one that rejects nothing.
    """
    return 1.0 / (int(n) + 1)


def calibration_needed(fpr: float) -> int:
    """The fewest calibration scores with which target ``fpr`` is reachable: the conformal rank
    ``ceil((n+1)(1-fpr))`` is at most ``n`` exactly when ``n >= (1-fpr)/fpr`` (a quotient within
    1e-9 of an integer counts as that integer, as in :func:`conformal_rank`)."""
    q = (1.0 - fpr) / fpr
    r = round(q)
    return max(1, int(r) if abs(q - r) <= 1e-9 * max(1.0, q) else math.ceil(q))


def check_reachable_fpr(fpr: float, n: int, what: str = "calibration inputs", option: str = "the target FPR") -> None:
    """Refuse, in one line, a target ``fpr`` that ``n`` calibration inputs cannot reach.

    With n calibration scores the conformal threshold exists only for ``fpr >= 1/(n+1)`` (up to
    decimal rounding, :func:`conformal_rank`); below it a detector would reject nothing. The
    message gives the smallest reachable rate and how many inputs the target needs. ``what``
    names the inputs ("calibration inputs the model classifies correctly"), ``option`` the knob
    (``--fpr``).
    """
    n = int(n)
    if n >= calibration_needed(fpr):
        return
    raise BadExpertError(
        f"{option} {fpr:g} cannot be reached with {n} {what}: the smallest reachable rate is "
        f"1/(n+1) = {smallest_reachable_fpr(n):.3g}; raise it to at least that, or use at least "
        f"{calibration_needed(fpr)} {what}"
    )


def conformal_threshold(clean_scores: Any, fpr: float) -> float:
    """Split-conformal threshold on clean calibration scores for a target false-positive rate.

    With n calibration scores and alpha = ``fpr``, returns the k-th smallest score (1-based) with
    k = ceil((n+1)(1-alpha)). Rejecting iff ``score > threshold`` then gives a false-positive rate
    of at most alpha in expectation on new clean inputs exchangeable with the calibration ones
    (ties only lower it). The calibration set must be disjoint from the evaluation data.

    With fewer than about 1/alpha - 1 calibration scores (k > n) no score is high enough: that
    is a one-line error (:func:`check_reachable_fpr`), never a threshold that rejects nothing.
    """
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float, np.floating, np.integer)):
        raise BadExpertError(f"fpr must be a number strictly between 0 and 1, got {fpr!r}")
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:
        raise BadExpertError(f"fpr must be strictly between 0 and 1 (for example 0.01), got {fpr}")
    s = _vec(clean_scores, "clean calibration scores")
    n = len(s)
    if n < 1:
        raise BadExpertError("conformal threshold needs at least one clean calibration score, got none")
    if not np.isfinite(s).all():
        raise BadExpertError("clean calibration scores must be finite numbers; the detector produced infinite scores")
    check_reachable_fpr(fpr, n, "calibration scores")
    k = max(conformal_rank(n, fpr), 1)
    return float(np.partition(s, k - 1)[k - 1])


# --------------------------------------------------------------------------------------------
# ranking metrics
# --------------------------------------------------------------------------------------------
def auroc(clean_scores: Any, backdoor_scores: Any) -> float:
    """Area under the ROC curve, clean (label 0) vs backdoor (label 1), with scikit-learn.

    NaN when either side is empty.
    """
    c = _vec(clean_scores, "clean scores")
    b = _vec(backdoor_scores, "backdoor scores")
    if len(c) == 0 or len(b) == 0:
        return float("nan")
    y, s = _sklearn_inputs(c, b)
    return float(roc_auc_score(y, s))


def auroc_rank(clean_scores: Any, backdoor_scores: Any) -> float:
    """AUROC by the Mann-Whitney rank formula (ties count one half); equals :func:`auroc`."""
    c = _vec(clean_scores, "clean scores")
    b = _vec(backdoor_scores, "backdoor scores")
    nc, nb = len(c), len(b)
    if nc == 0 or nb == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([c, b]), method="average")
    u = ranks[nc:].sum() - nb * (nb + 1) / 2.0
    return float(u / (nc * nb))


def _fpr_key(f: float) -> str:
    return f"{f * 100:g}%"


def tpr_at_fpr(clean_scores: Any, backdoor_scores: Any, fprs: Sequence[float] = DEFAULT_FPRS) -> dict[str, float]:
    """For each FPR f, the largest TPR over thresholds whose FPR on these clean scores is <= f.

    This is an *oracle* operating point: the threshold is chosen on the very test scores it is
    evaluated on (as the research code does). It describes the ranking, not a deployable
    detector; the calibrated threshold's realized TPR/FPR are in :func:`detection_summary`.
    Keys are formatted like ``"0.1%"``, ``"1%"``, ``"5%"``. NaN values when a side is empty.
    """
    c = _vec(clean_scores, "clean scores")
    b = _vec(backdoor_scores, "backdoor scores")
    fprs = [float(f) for f in fprs]
    for f in fprs:
        if not 0.0 <= f <= 1.0:
            raise BadExpertError(f"FPR levels must lie in [0, 1], got {f}")
    if len(c) == 0 or len(b) == 0:
        return {_fpr_key(f): float("nan") for f in fprs}
    y, s = _sklearn_inputs(c, b)
    fpr_curve, tpr_curve, _ = roc_curve(y, s, drop_intermediate=False)
    out = {}
    for f in fprs:
        ok = fpr_curve <= f + 1e-12  # the curve always starts at (0, 0), so ``ok`` is never empty
        out[_fpr_key(f)] = float(tpr_curve[ok].max())
    return out


# --------------------------------------------------------------------------------------------
# rates
# --------------------------------------------------------------------------------------------
def rates(flags: Any, labels: Any = None) -> float | dict[int, float]:
    """Fraction of True ``flags``; with ``labels``, a dict label -> fraction for each label present.

    NaN (a single float) for empty flags without labels; labels with no samples are absent.
    """
    f = _vec(flags, "flags", dtype=bool)
    if labels is None:
        return _mean(f)
    lab = _vec(labels, "labels", dtype=np.int64)
    _same_length(flags=f, labels=lab)
    return {int(c): _mean(f[lab == c]) for c in np.unique(lab)}


def per_class_rejection(flags: Any, labels: Any, class_names: Sequence[str] | None) -> dict[str, float]:
    """Fraction of clean inputs of each true class that were rejected (per-class false rejection).

    ``flags`` are the reject decisions on clean inputs, ``labels`` their true classes. Keys are
    ``class_names[c]`` (the class index as a string when no names are given), in class order;
    classes with no samples are omitted, so no value is NaN.
    """
    per = rates(flags, labels)
    out: dict[str, float] = {}
    for c, r in sorted(per.items()):
        if class_names is not None and 0 <= c < len(class_names):
            out[str(class_names[c])] = r
        else:
            out[str(c)] = r
    return out


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------
def _resample_chunks(rng: np.random.Generator, nc: int, nb: int, n_boot: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Resample indices of both sides, a chunk of resamples at a time (bounded memory)."""
    chunk = max(1, min(n_boot, 1_000_000 // max(nc, nb, 1)))  # ~50 MB of work arrays
    done = 0
    while done < n_boot:
        k = min(chunk, n_boot - done)
        yield rng.integers(0, nc, size=(k, nc)), rng.integers(0, nb, size=(k, nb))
        done += k


def _auroc_resamples(c: np.ndarray, b: np.ndarray, chunks) -> np.ndarray:
    """AUROC of every bootstrap resample without re-sorting anything.

    Sort the clean scores once. For a resample, the count of resampled clean scores below a
    backdoor value b_j (and equal to it) is a cumulative sum of how often each sorted clean
    position was drawn, read at the positions where b_j would be inserted. The resample's AUROC
    is the mean over resampled backdoor inputs of (#clean below + 0.5 #clean equal) / n_clean.
    """
    nc, nb = len(c), len(b)
    order = np.argsort(c, kind="stable")
    cs = c[order]
    pos = np.empty(nc, dtype=np.int64)
    pos[order] = np.arange(nc)  # position of clean i in sorted order
    left = np.searchsorted(cs, b, side="left")  # clean strictly below b_j
    right = np.searchsorted(cs, b, side="right")  # clean at or below b_j
    out = []
    for idx_c, idx_b in chunks:
        k = idx_c.shape[0]
        flat = (pos[idx_c] + (np.arange(k) * nc)[:, None]).ravel()
        counts = np.bincount(flat, minlength=k * nc).reshape(k, nc)
        cum = np.zeros((k, nc + 1), dtype=np.int64)
        np.cumsum(counts, axis=1, out=cum[:, 1:])
        placement = cum[:, left] + cum[:, right]  # 2 * (below + 0.5 * equal), per original b_j
        s = np.take_along_axis(placement, idx_b, axis=1).sum(axis=1, dtype=np.float64)
        out.append(s / (2.0 * nc * nb))
    return np.concatenate(out)


def bootstrap_ci(
    clean_scores: Any,
    backdoor_scores: Any,
    statistic: Callable[[np.ndarray, np.ndarray], float] = auroc,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(clean, backdoor)``.

    Clean and backdoor sides are resampled independently (with replacement, each to its own
    size), driven by ``numpy.random.default_rng(seed)``. For :func:`auroc` (or
    :func:`auroc_rank`) a vectorised rank computation is used; any other statistic is called once
    per resample. Returns ``(nan, nan)`` when a side is empty.
    """
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise BadExpertError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < float(level) < 1.0:
        raise BadExpertError(f"level must be strictly between 0 and 1 (for example 0.95), got {level}")
    c = _vec(clean_scores, "clean scores")
    b = _vec(backdoor_scores, "backdoor scores")
    if len(c) == 0 or len(b) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunks = _resample_chunks(rng, len(c), len(b), int(n_boot))
    if statistic is auroc or statistic is auroc_rank:
        stats = _auroc_resamples(c, b, chunks)
    else:
        stats = np.array(
            [float(statistic(c[ic], b[ib])) for idx_c, idx_b in chunks for ic, ib in zip(idx_c, idx_b)],
            dtype=np.float64,
        )
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - float(level)) / 2.0 * 100.0
    lo, hi = np.percentile(stats, [tail, 100.0 - tail])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------
# accumulation over batches
# --------------------------------------------------------------------------------------------
class ScoreAccumulator:
    """Collect per-input values batch by batch (pytorch-ood style), stored as CPU numpy chunks.

    >>> acc = ScoreAccumulator()
    >>> acc.update(score=torch.tensor([0.1, 0.2]), pred=torch.tensor([3, 1]))
    >>> acc.update(score=torch.tensor([0.3]), pred=torch.tensor([0]))
    >>> acc.get("score").tolist()
    [0.1, 0.2, 0.3]
    """

    def __init__(self) -> None:
        self._chunks: dict[str, list[np.ndarray]] = {}

    def update(self, **values: Any) -> "ScoreAccumulator":
        for key, v in values.items():
            arr = np.atleast_1d(_to_numpy(v)).copy()
            self._chunks.setdefault(key, []).append(arr)
        return self

    def get(self, key: str) -> np.ndarray:
        if key not in self._chunks:
            known = ", ".join(sorted(self._chunks)) or "none yet"
            raise BadExpertError(f"no values accumulated under '{key}'; known keys: {known}")
        return np.concatenate(self._chunks[key], axis=0)

    def compute(self) -> dict[str, np.ndarray]:
        return {k: self.get(k) for k in self._chunks}

    def reset(self) -> None:
        self._chunks.clear()

    def __len__(self) -> int:
        """Number of inputs accumulated under the first key (0 when empty)."""
        for chunks in self._chunks.values():
            return sum(len(c) for c in chunks)
        return 0


# --------------------------------------------------------------------------------------------
# the defense summary
# --------------------------------------------------------------------------------------------
def clean_rejection(clean_rejected: Any, correct: Any, calibration_population: str = "all") -> dict[str, Any]:
    """The clean side of a calibrated threshold's rates: ``fpr`` (all clean inputs rejected),
    ``fpr_filtered`` (those the model gets right), and ``realized_fpr``, the one of the two the
    threshold was calibrated to bound (``calibration_population`` ``"correct"`` or ``"all"``)."""
    rej, ok = np.asarray(clean_rejected, dtype=bool), np.asarray(correct, dtype=bool)
    fpr_all, fpr_correct = _mean(rej), _mean(rej[ok])
    return {"calibration_population": calibration_population, "fpr": fpr_all, "fpr_filtered": fpr_correct,
            "realized_fpr": fpr_correct if calibration_population == "correct" else fpr_all}


def operating_point(threshold: float, fpr_target: float, *, clean_scores: Any, clean_correct: Any,
                    calibration_population: str = "all", trig_scores: Any = None,
                    trig_success: Any = None) -> dict[str, Any]:
    """A calibrated threshold's numbers at one more target FPR, beside the detector's own
    (:func:`detection_summary` gives those): ``fpr_target``, ``threshold``, the clean rejection
    rates (:func:`clean_rejection`), ``clean_accuracy`` after filtering and, with triggered
    inputs, ``tpr`` and ``attack_success_rate`` after filtering, as in :func:`detection_summary`."""
    cs = _vec(clean_scores, "clean_scores")
    correct = np.asarray(clean_correct, dtype=bool)
    clean_rej = cs > threshold
    point = {"fpr_target": float(fpr_target), "threshold": float(threshold),
             **clean_rejection(clean_rej, correct, calibration_population),
             "clean_accuracy": _mean(correct & ~clean_rej)}
    if trig_scores is not None:
        trig_rej = _vec(trig_scores, "trig_scores") > threshold
        point.update(tpr=_mean(trig_rej), attack_success_rate=_mean(np.asarray(trig_success, dtype=bool) & ~trig_rej))
    return point


def detection_summary(
    *,
    clean_scores: Any,
    clean_labels: Any,
    clean_preds: Any,
    trig_scores: Any,
    trig_preds: Any,
    trig_target: Any,
    threshold: float,
    fpr_target: float,
    class_names: Sequence[str] | None,
    n_boot: int = 1000,
    seed: int = 0,
    calibration_population: str = "all",
    noisy_scores: Any = None,
    noisy_labels: Any = None,
    noisy_preds: Any = None,
) -> dict[str, Any]:
    """Every detection number of the report, from per-input arrays.

    ``clean_*`` describe the clean test inputs (true labels, the suspect model's predictions,
    detector scores); ``trig_*`` the triggered test inputs that count for the attack (the caller
    has already dropped target-class inputs and whatever the attack's threat model excludes),
    with ``trig_target`` the attacker's target label per input. An input is rejected iff
    ``score > threshold``; a rejected input counts as neither correct nor attacked.

    ``auroc_ci`` is a bootstrap percentile interval (``None`` when ``n_boot`` is 0). The
    ``*_filtered`` numbers use the research code's population (clean inputs the model gets right
    vs triggered inputs whose attack succeeds), for comparison with the paper. ``tpr_at_fpr``
    holds oracle operating points (threshold chosen on the test scores), not the calibrated one.

    ``fpr`` is the share of all clean test inputs rejected, ``fpr_filtered`` the share of those
    the model gets right; ``realized_fpr`` is the one the threshold was calibrated to bound
    (``calibration_population`` ``"correct"``: ``fpr_filtered``; ``"all"``: ``fpr``), to set
    beside ``fpr_target``.

    ``noisy_*`` (optional, all three or none) describe the noise-augmented clean negatives of the
    paper's AUROC protocol: a Gaussian-noised copy of the clean test inputs
    (:func:`badexpert.evaluation.core.noisy_copy`). With them the clean side of the ranking is the
    clean inputs plus their noisy copies: ``auroc_noisy`` (all clean and noisy vs all triggered,
    with ``auroc_noisy_ci``) and ``auroc_noisy_filtered`` (by the same rule as ``auroc_filtered``:
    the clean and noisy inputs the model gets right vs triggered inputs whose attack succeeds);
    ``fpr_noisy`` / ``fpr_noisy_filtered`` / ``realized_fpr_noisy`` are the calibrated
    threshold's rejections among the noisy copies (as ``fpr`` / ``fpr_filtered`` /
    ``realized_fpr`` among the clean ones), and ``n_noisy`` / ``n_noisy_correct`` their counts.
    Without them none of these keys is present.
    """
    cs = _vec(clean_scores, "clean_scores")
    cl = _vec(clean_labels, "clean_labels", dtype=np.int64)
    cp = _vec(clean_preds, "clean_preds", dtype=np.int64)
    ts = _vec(trig_scores, "trig_scores")
    tp = _vec(trig_preds, "trig_preds", dtype=np.int64)
    tt = _vec(trig_target, "trig_target", dtype=np.int64)
    _same_length(clean_scores=cs, clean_labels=cl, clean_preds=cp)
    _same_length(trig_scores=ts, trig_preds=tp, trig_target=tt)
    threshold = float(threshold.item() if isinstance(threshold, (torch.Tensor, np.ndarray)) else threshold)
    if math.isnan(threshold):
        raise BadExpertError("threshold is NaN; calibrate the detector on valid clean scores first")

    clean_rej = cs > threshold
    trig_rej = ts > threshold
    correct = cp == cl
    success = tp == tt

    if n_boot and len(cs) and len(ts):
        auroc_ci: list[float] | None = list(bootstrap_ci(cs, ts, auroc, n_boot=n_boot, seed=seed))
    else:
        auroc_ci = None if not n_boot else [float("nan"), float("nan")]

    ca_nd = _mean(correct)
    ca = _mean(correct & ~clean_rej)
    noisy = _noisy_summary(noisy_scores, noisy_labels, noisy_preds, clean_scores=cs, clean_correct=correct,
                           trig_scores=ts, trig_success=success, threshold=threshold, n_boot=n_boot, seed=seed,
                           calibration_population=calibration_population)
    return {
        "threshold": threshold,
        "fpr_target": float(fpr_target),
        **clean_rejection(clean_rej, correct, calibration_population),
        "auroc": auroc(cs, ts),
        "auroc_ci": auroc_ci,
        "auroc_filtered": auroc(cs[correct], ts[success]),
        "tpr": _mean(trig_rej),
        "tpr_filtered": _mean(trig_rej[success]),
        "tpr_at_fpr": tpr_at_fpr(cs, ts),
        "clean_accuracy": ca,
        "attack_success_rate": _mean(success & ~trig_rej),
        "clean_accuracy_no_defense": ca_nd,
        "attack_success_rate_no_defense": _mean(success),
        "clean_accuracy_drop": float(ca_nd - ca),
        "per_class_false_rejection": per_class_rejection(clean_rej, cl, class_names),
        "n_clean": int(len(cs)),
        "n_triggered": int(len(ts)),
        "n_clean_correct": int(correct.sum()),
        "n_triggered_success": int(success.sum()),
        **noisy,
    }


def _noisy_summary(noisy_scores: Any, noisy_labels: Any, noisy_preds: Any, *, clean_scores: np.ndarray,
                   clean_correct: np.ndarray, trig_scores: np.ndarray, trig_success: np.ndarray, threshold: float,
                   n_boot: int, seed: int, calibration_population: str) -> dict[str, Any]:
    """The noisy-negatives numbers of :func:`detection_summary` (empty without noisy inputs)."""
    given = [v is not None for v in (noisy_scores, noisy_labels, noisy_preds)]
    if not any(given):
        return {}
    if not all(given):
        raise BadExpertError("noisy_scores, noisy_labels and noisy_preds go together: give all three or none")
    ns = _vec(noisy_scores, "noisy_scores")
    nl = _vec(noisy_labels, "noisy_labels", dtype=np.int64)
    npred = _vec(noisy_preds, "noisy_preds", dtype=np.int64)
    _same_length(noisy_scores=ns, noisy_labels=nl, noisy_preds=npred)
    ok = npred == nl
    negatives = np.concatenate([clean_scores, ns])
    if n_boot and len(negatives) and len(trig_scores):
        ci: list[float] | None = list(bootstrap_ci(negatives, trig_scores, auroc, n_boot=n_boot, seed=seed))
    else:
        ci = None if not n_boot else [float("nan"), float("nan")]
    rejection = clean_rejection(ns > threshold, ok, calibration_population)
    return {
        "auroc_noisy": auroc(negatives, trig_scores),
        "auroc_noisy_ci": ci,
        "auroc_noisy_filtered": auroc(np.concatenate([clean_scores[clean_correct], ns[ok]]), trig_scores[trig_success]),
        "fpr_noisy": rejection["fpr"],
        "fpr_noisy_filtered": rejection["fpr_filtered"],
        "realized_fpr_noisy": rejection["realized_fpr"],
        "n_noisy": int(len(ns)),
        "n_noisy_correct": int(ok.sum()),
    }
