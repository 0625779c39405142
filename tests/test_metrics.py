"""Metrics against hand-computed values on tiny arrays, plus statistical checks."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from badexpert.errors import BadExpertError
from badexpert.metrics import (
    ScoreAccumulator,
    auroc,
    auroc_rank,
    bootstrap_ci,
    calibration_needed,
    check_reachable_fpr,
    conformal_rank,
    conformal_threshold,
    detection_summary,
    per_class_rejection,
    rates,
    tpr_at_fpr,
)


# ---------------------------------------------------------------- conformal threshold
def test_conformal_threshold_hand_values():
    # n=9, alpha=0.1: k = ceil(10 * 0.9) = 9 -> the maximum
    assert conformal_threshold(np.arange(1, 10, dtype=float)[::-1], 0.1) == 9.0
    # n=99, alpha=0.05: k = ceil(100 * 0.95) = 95 -> the 95th smallest of 1..99
    assert conformal_threshold(np.random.default_rng(0).permutation(np.arange(1, 100.0)), 0.05) == 95.0
    # n=5, alpha=0.1: k = ceil(6 * 0.9) = 6 > 5 -> unreachable: an error, never a threshold rejecting nothing
    with pytest.raises(BadExpertError, match=r"smallest reachable rate is 1/\(n\+1\) = 0.167; .* at least 9 calibration"):
        conformal_threshold([1.0, 2.0, 3.0, 4.0, 5.0], 0.1)
    with pytest.raises(BadExpertError, match="finite"):
        conformal_threshold([1.0, 2.0, float("inf")] * 10, 0.1)
    # n=1 with a large alpha: k = ceil(2 * 0.5) = 1
    assert conformal_threshold([7.0], 0.5) == 7.0
    # n=10, alpha=0.25: k = ceil(11 * 0.75) = ceil(8.25) = 9
    assert conformal_threshold(np.arange(10.0), 0.25) == 8.0


@pytest.mark.parametrize("fpr", [0.5, 0.3, 0.1, 0.05, 0.01, 0.003, 0.001, 1e-4])
def test_smallest_reachable_fpr_is_exactly_where_the_rank_fits(fpr):
    # calibration_needed(fpr) is the least n whose conformal rank is <= n; one fewer is refused
    n = calibration_needed(fpr)
    assert conformal_rank(n, fpr) <= n and conformal_rank(n - 1, fpr) > n - 1
    check_reachable_fpr(fpr, n)
    with pytest.raises(BadExpertError, match=f"at least {n} calibration"):
        check_reachable_fpr(fpr, n - 1)
    # and the threshold at that n is the largest calibration score, a value the scores reached
    scores = np.random.default_rng(0).normal(size=n)
    assert conformal_threshold(scores, fpr) in scores


def test_conformal_rank_is_not_fooled_by_binary_rounding():
    # 1 - 0.3 = 0.7000000000000001 in binary; 10 * that must still count as exactly 7
    assert conformal_rank(9, 0.3) == 7
    assert conformal_rank(99, 0.05) == 95
    assert conformal_rank(9, 0.1) == 9
    assert conformal_rank(200, 0.05) == 191


def test_conformal_threshold_ties_explicit():
    s = torch.tensor([1.0, 1.0, 1.0, 2.0])
    # k = ceil(5 * 0.8) = 4 -> the 4th smallest = 2.0
    assert conformal_threshold(s, 0.2) == 2.0
    # k = ceil(5 * 0.4) = 2 -> 1.0; rejecting score > 1.0 rejects only the 2.0
    assert conformal_threshold(s, 0.6) == 1.0


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_conformal_threshold_rejects_bad_fpr(bad):
    with pytest.raises(BadExpertError):
        conformal_threshold([1.0, 2.0, 3.0], bad)


def test_conformal_threshold_rejects_empty_and_nan():
    with pytest.raises(BadExpertError, match="at least one"):
        conformal_threshold([], 0.1)
    with pytest.raises(BadExpertError, match="NaN") as exc:
        conformal_threshold([1.0, float("nan"), 2.0], 0.1)
    assert "\n" not in str(exc.value)
    with pytest.raises(BadExpertError, match="1-D"):
        conformal_threshold(np.zeros((3, 2)), 0.1)


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_conformal_threshold_controls_fpr_statistically(alpha):
    """Over many seeded repetitions the realized FPR on fresh clean data is at most alpha."""
    rng = np.random.default_rng(1234)
    reps, n, m = 2000, 200, 1000
    cal = rng.standard_normal((reps, n))
    fresh = rng.standard_normal((reps, m))
    thr = np.array([conformal_threshold(c, alpha) for c in cal])
    realized = (fresh > thr[:, None]).mean(axis=1)
    k = conformal_rank(n, alpha)
    expected = 1.0 - k / (n + 1)  # exact expectation for continuous exchangeable scores
    assert expected <= alpha
    mean = realized.mean()
    se = realized.std(ddof=1) / math.sqrt(reps)
    assert mean <= alpha + 4 * se
    assert abs(mean - expected) < 4 * se
    assert mean > alpha - 0.15 * alpha  # not far below the target either


# ---------------------------------------------------------------- AUROC
def test_auroc_separated_reversed_tied():
    assert auroc([0.1, 0.2, 0.3], [0.7, 0.8]) == 1.0
    assert auroc([0.7, 0.8], [0.1, 0.2, 0.3]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [0.5, 0.5]) == 0.5
    assert math.isnan(auroc([], [1.0]))
    assert math.isnan(auroc([1.0], []))
    # hand: pairs (b > c) + 0.5 ties over 2*2: b=0.3 vs c=0.2 (1), 0.4 (0); b=0.4 vs 0.2 (1), 0.4 (0.5)
    assert auroc(torch.tensor([0.2, 0.4]), torch.tensor([0.3, 0.4])) == pytest.approx(2.5 / 4)


def test_auroc_handles_infinite_scores():
    assert auroc([0.0, 1.0], [float("inf"), 2.0]) == 1.0
    assert auroc([float("-inf"), 1.0], [float("inf"), 0.5]) == pytest.approx(0.75)


def test_rank_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(7)
    for _ in range(20):
        nc, nb = rng.integers(1, 300, size=2)
        c = np.round(rng.normal(0, 1, nc), 1)  # heavy ties
        b = np.round(rng.normal(0.5, 1, nb), 1)
        ref = roc_auc_score(np.r_[np.zeros(nc), np.ones(nb)], np.r_[c, b])
        assert abs(auroc_rank(c, b) - ref) < 1e-9
        assert abs(auroc(c, b) - ref) < 1e-12


# ---------------------------------------------------------------- TPR at FPR
def test_tpr_at_fpr_hand_example():
    clean = np.arange(100) / 100.0  # 0.00 .. 0.99
    bd = np.array([0.995, 0.985, 0.975, 0.5, 0.2])
    # FPR 0 allows nothing above 0.99 -> only 0.995 (1/5); FPR 1% allows clean 0.99 -> 0.995,
    # 0.985 (2/5); FPR 5% allows 0.95..0.99 -> 0.995, 0.985, 0.975 (3/5)
    assert tpr_at_fpr(clean, bd) == {"0.1%": 0.2, "1%": 0.4, "5%": 0.6}
    out = tpr_at_fpr(clean, bd, fprs=(0.5,))
    assert out == {"50%": 0.8}  # clean >= 0.5 rejected: 50 of 100; bd 0.5 ties -> counted (>=)
    assert all(math.isnan(v) for v in tpr_at_fpr([], bd).values())


# ---------------------------------------------------------------- rates
def test_rates_and_per_class_rejection():
    flags = np.array([True, False, True, True, False, False])
    labels = np.array([0, 0, 1, 1, 3, 3])
    assert rates(flags) == pytest.approx(0.5)
    assert rates(flags, labels) == {0: 0.5, 1: 1.0, 3: 0.0}
    per = per_class_rejection(flags, labels, ["a", "b", "c", "d"])
    assert per == {"a": 0.5, "b": 1.0, "d": 0.0}  # "c" has no samples: omitted
    assert list(per) == ["a", "b", "d"]
    assert per_class_rejection(torch.tensor(flags), torch.tensor(labels), None) == {"0": 0.5, "1": 1.0, "3": 0.0}
    assert math.isnan(rates([]))
    with pytest.raises(BadExpertError, match="same length"):
        rates(flags, labels[:3])


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_ci_contains_estimate_and_narrows():
    rng = np.random.default_rng(0)
    small_c, small_b = rng.normal(0, 1, 100), rng.normal(1, 1, 100)
    big_c, big_b = rng.normal(0, 1, 5000), rng.normal(1, 1, 5000)
    lo_s, hi_s = bootstrap_ci(small_c, small_b, seed=1)
    lo_b, hi_b = bootstrap_ci(big_c, big_b, seed=1)
    assert lo_s <= auroc(small_c, small_b) <= hi_s
    assert lo_b <= auroc(big_c, big_b) <= hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 3
    # seeded: same numbers again; a different seed gives different ones
    assert bootstrap_ci(small_c, small_b, seed=1) == (lo_s, hi_s)
    assert bootstrap_ci(small_c, small_b, seed=2) != (lo_s, hi_s)
    # a wider level gives a wider interval
    lo90, hi90 = bootstrap_ci(small_c, small_b, level=0.9, seed=1)
    assert lo_s <= lo90 and hi90 <= hi_s


def test_fast_bootstrap_equals_per_resample_sklearn_with_ties():
    rng = np.random.default_rng(3)
    c = np.round(rng.normal(0, 1, 257), 1)
    b = np.round(rng.normal(0.7, 1, 131), 1)
    slow = lambda x, y: roc_auc_score(np.r_[np.zeros(len(x)), np.ones(len(y))], np.r_[x, y])  # noqa: E731
    for level in (0.5, 0.95):
        fast_ci = bootstrap_ci(c, b, auroc, n_boot=200, level=level, seed=5)
        slow_ci = bootstrap_ci(c, b, slow, n_boot=200, level=level, seed=5)
        assert fast_ci == pytest.approx(slow_ci, abs=1e-9)
    assert bootstrap_ci(c, b, auroc_rank, n_boot=50, seed=5) == bootstrap_ci(c, b, auroc, n_boot=50, seed=5)


def test_bootstrap_is_fast_enough():
    rng = np.random.default_rng(0)
    c, b = rng.normal(0, 1, 10_000), rng.normal(1, 1, 10_000)
    t = time.perf_counter()
    bootstrap_ci(c, b, n_boot=1000)
    assert time.perf_counter() - t < 10.0  # about 1 s on two CPU cores


def test_bootstrap_degenerate_inputs():
    assert all(math.isnan(v) for v in bootstrap_ci([], [1.0, 2.0]))
    with pytest.raises(BadExpertError):
        bootstrap_ci([1.0], [2.0], n_boot=0)
    with pytest.raises(BadExpertError):
        bootstrap_ci([1.0], [2.0], level=1.0)
    assert bootstrap_ci([1.0], [2.0], n_boot=10) == (1.0, 1.0)


# ---------------------------------------------------------------- accumulator
def test_score_accumulator():
    acc = ScoreAccumulator()
    assert len(acc) == 0
    acc.update(score=torch.tensor([0.1, 0.2]), pred=torch.tensor([3, 1]))
    acc.update(score=np.array([0.3]), pred=torch.tensor([0]))
    acc.update(score=torch.tensor(0.4, dtype=torch.bfloat16), pred=[7])
    out = acc.compute()
    assert out["score"] == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=1e-2)
    assert out["pred"].tolist() == [3, 1, 0, 7]
    assert isinstance(out["score"], np.ndarray)
    assert len(acc) == 4
    with pytest.raises(BadExpertError, match="known keys"):
        acc.get("nope")
    acc.reset()
    assert acc.compute() == {}


def test_score_accumulator_copies_its_input():
    acc = ScoreAccumulator()
    buf = np.array([1.0, 2.0])
    acc.update(s=buf)
    buf[:] = 0
    assert acc.get("s").tolist() == [1.0, 2.0]


# ---------------------------------------------------------------- the defense summary
def _hand_example(**kw):
    args = dict(
        clean_scores=[0.1, 0.9, 0.2, 0.6, 0.3, 0.4],
        clean_labels=[0, 0, 1, 1, 2, 2],
        clean_preds=[0, 1, 1, 1, 2, 0],  # correct: T F T T T F
        trig_scores=[0.8, 0.7, 0.3, 0.05],
        trig_preds=[0, 0, 0, 2],  # attack succeeds: T T T F
        trig_target=[0, 0, 0, 0],
        threshold=0.5,  # clean rejected: F T F T F F; triggered rejected: T T F F
        fpr_target=0.01,
        class_names=["a", "b", "c"],
        n_boot=200,
    )
    args.update(kw)
    return detection_summary(**args)


def test_detection_summary_hand_example():
    d = _hand_example()
    assert d["threshold"] == 0.5 and d["fpr_target"] == 0.01
    assert d["n_clean"] == 6 and d["n_triggered"] == 4
    assert d["n_clean_correct"] == 4 and d["n_triggered_success"] == 3
    # no defense
    assert d["clean_accuracy_no_defense"] == pytest.approx(4 / 6)
    assert d["attack_success_rate_no_defense"] == pytest.approx(3 / 4)
    # after defense: correct and not rejected = idx 0, 2, 4; attacked and not rejected = idx 2
    assert d["clean_accuracy"] == pytest.approx(3 / 6)
    assert d["attack_success_rate"] == pytest.approx(1 / 4)
    assert d["clean_accuracy_drop"] == pytest.approx(1 / 6)
    # detection rates
    assert d["fpr"] == pytest.approx(2 / 6)
    assert d["tpr"] == pytest.approx(2 / 4)
    assert d["fpr_filtered"] == pytest.approx(1 / 4)  # correct clean 0.1 0.2 0.6 0.3 -> one > 0.5
    assert d["tpr_filtered"] == pytest.approx(2 / 3)  # successful 0.8 0.7 0.3 -> two > 0.5
    # the realized FPR set beside the target is the one of the calibrated population
    assert d["calibration_population"] == "all" and d["realized_fpr"] == d["fpr"]
    c = _hand_example(calibration_population="correct")
    assert c["calibration_population"] == "correct" and c["realized_fpr"] == pytest.approx(1 / 4)
    # AUROC all: 0.8 beats 5 clean, 0.7 beats 5, 0.3 beats 2 and ties 1, 0.05 beats none -> 12.5/24
    assert d["auroc"] == pytest.approx(12.5 / 24)
    # filtered: 0.8 beats 4, 0.7 beats 4, 0.3 beats 2 and ties 1 -> 10.5/12
    assert d["auroc_filtered"] == pytest.approx(10.5 / 12)
    lo, hi = d["auroc_ci"]
    assert 0.0 <= lo <= d["auroc"] <= hi <= 1.0
    # oracle points: FPR <= 5% of 6 clean means no clean rejected, i.e. above 0.9: no trigger there
    assert d["tpr_at_fpr"] == {"0.1%": 0.0, "1%": 0.0, "5%": 0.0}
    assert d["per_class_false_rejection"] == {"a": 0.5, "b": 0.5, "c": 0.0}


def test_detection_summary_is_json_ready_and_accepts_tensors():
    d = _hand_example(
        clean_scores=torch.tensor([0.1, 0.9, 0.2, 0.6, 0.3, 0.4]),
        clean_labels=torch.tensor([0, 0, 1, 1, 2, 2]),
        trig_preds=torch.tensor([0, 0, 0, 2]),
        threshold=torch.tensor(0.5),
    )
    assert d["clean_accuracy"] == pytest.approx(0.5)
    json.dumps(d)  # plain Python types only

    def check(v):
        if isinstance(v, dict):
            for x in v.values():
                check(x)
        elif isinstance(v, list):
            for x in v:
                check(x)
        else:
            assert type(v) in (float, int, str), type(v)

    check(d)


def test_detection_summary_infinite_threshold_and_no_bootstrap():
    d = _hand_example(threshold=float("inf"), n_boot=0)
    assert d["auroc_ci"] is None
    assert d["fpr"] == 0.0 and d["tpr"] == 0.0
    assert d["clean_accuracy"] == d["clean_accuracy_no_defense"]
    assert d["attack_success_rate"] == d["attack_success_rate_no_defense"]
    assert d["clean_accuracy_drop"] == 0.0


def test_detection_summary_validates():
    with pytest.raises(BadExpertError, match="same length"):
        _hand_example(clean_preds=[0, 1])
    with pytest.raises(BadExpertError, match="NaN"):
        _hand_example(trig_scores=[0.8, float("nan"), 0.3, 0.05])
    with pytest.raises(BadExpertError, match="threshold"):
        _hand_example(threshold=float("nan"))
