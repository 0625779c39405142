"""Reports: a terminal table, ``metrics.json``, ``report.md`` and PNG plots.

Every file is first written under a temporary name in the output directory and renamed only once
all of them were produced, so an error half-way leaves no partial report behind. Plots are drawn
on :class:`matplotlib.figure.Figure` objects with the Agg canvas (no pyplot, no display, nothing
registered globally), and released after saving.

The renderers read an :class:`~badexpert.evaluation.records.EvaluationRecord` (the top level of
``metrics.json``) and the evaluation's :class:`~badexpert.evaluation.records.ReportArrays`; the
public entry points also take a metrics dict, converted once through
:meth:`EvaluationRecord.from_dict <badexpert.evaluation.records.EvaluationRecord.from_dict>`, so an
incomplete one is a one-line error naming the missing field.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from ..errors import BadExpertError
from ..evaluation.records import DefenseRecord, EvaluationRecord, ReportArrays
from ..metrics import _sklearn_inputs
from ..utils import atomic_write_bytes, write_json
from .formats import number as _num, pct

__all__ = ["format_table", "write_report", "plot_roc", "plot_scatter", "plot_examples"]

CLEAN_COLOR = "tab:blue"
TRIG_COLOR = "tab:red"


# --------------------------------------------------------------------------------------------
# number formatting
# --------------------------------------------------------------------------------------------
def _fpr_digits(target: Any) -> int:
    """One decimal, but two when the FPR target is below 1% (0.1% vs 0.05% must not both read 0.1%)."""
    t = _num(target)
    return 2 if t is not None and t < 0.01 else 1


def _float(v: Any, fmt: str = "{:.4g}") -> str:
    f = _num(v)
    if f is None:
        return "n/a"
    if math.isinf(f) or abs(f) >= 1e300:
        return "inf (rejects nothing)" if f > 0 else "-inf"
    return fmt.format(f)


def _ci(ci: Any) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return ""
    lo, hi = _num(ci[0]), _num(ci[1])
    if lo is None or hi is None:
        return ""
    return f" [{100 * lo:.1f}, {100 * hi:.1f}]"


def _record(metrics: EvaluationRecord | dict) -> EvaluationRecord:
    """The record of ``metrics`` (a dict is read once, here, by :meth:`EvaluationRecord.from_dict`)."""
    if isinstance(metrics, EvaluationRecord):
        return metrics
    if not isinstance(metrics, dict):
        raise BadExpertError(f"metrics must be an EvaluationRecord or its dict, got {type(metrics).__name__}")
    return EvaluationRecord.from_dict(metrics, "the metrics")


# --------------------------------------------------------------------------------------------
# terminal table
# --------------------------------------------------------------------------------------------
def format_table(metrics: EvaluationRecord | dict) -> str:
    """A short fixed-width table: CA/ASR without and with defense, AUROC, TPR, FPR, threshold, cost."""
    rec = _record(metrics)
    d = rec.defense
    w = 28
    rows: list[str] = []

    def row(label: str, *cells: str) -> None:
        rows.append(f"{label:<{w}}" + "".join(f"{c:>15}" for c in cells).rstrip())

    failed = rec.attack_failed
    row("", "no defense", "" if failed else "with defense")
    ca_d = "" if failed else pct(None if d is None else d.clean_accuracy)
    asr_d = "" if failed else pct(None if d is None else d.attack_success_rate)
    row("clean accuracy (CA)", pct(rec.clean_accuracy_no_defense), ca_d)
    row("attack success rate (ASR)", pct(rec.attack_success_rate_no_defense), asr_d)
    if failed:
        bar = rec.asr_bar
        rows.append(
            f"attack FAILED: ASR below the {pct(bar)} bar; no detection numbers are shown"
            if _num(bar) is not None
            else "attack FAILED: ASR below the bar; no detection numbers are shown"
        )
        return "\n".join(rows)
    if d is None:
        return "\n".join(rows)

    rows.append("-" * (w + 30))

    def line(label: str, value: str) -> None:
        rows.append(f"{label:<{w}}{value}")

    line("AUROC (all vs all)", pct(d.auroc) + _ci(d.auroc_ci))
    line("AUROC (filtered, paper)", pct(d.auroc_filtered))
    if d.has("auroc_noisy"):  # the paper's protocol: the clean negatives plus their noisy copies
        line("AUROC +noisy (all vs all)", pct(d.auroc_noisy) + _ci(d.auroc_noisy_ci))
        line("AUROC +noisy (filtered)", pct(d.auroc_noisy_filtered))
    line("TPR (triggered rejected)", pct(d.tpr))
    digits = _fpr_digits(d.fpr_target)
    correct = d.calibration_population == "correct"
    line("FPR target / realized", f"{pct(d.fpr_target, digits)} / {pct(d.realized_fpr, digits)}"
         + (" (clean inputs the model gets right)" if correct else ""))
    if correct:
        line("clean inputs rejected (all)", pct(d.fpr, digits))
    if d.has("realized_fpr_noisy"):
        line("noisy copies rejected", pct(d.realized_fpr_noisy, digits))
    line("threshold", _float(d.threshold))
    for point in d.operating_points or ():  # further target FPRs (evaluate --extra-fpr)
        pd = _fpr_digits(point["fpr_target"])
        line(f"at {pct(point['fpr_target'], pd)} target FPR",
             f"realized {pct(point['realized_fpr'], pd)}, CA {pct(point['clean_accuracy'])}"
             + (f", ASR {pct(point['attack_success_rate'])}" if "attack_success_rate" in point else "")
             + f" (threshold {_float(point['threshold'])})")
    fit_s = None if d.timings is None else _num(d.timings["fit_s"])
    if fit_s is not None:
        line("fit time", f"{fit_s:.1f} s")
    ratio = _num(d.throughput_ratio)
    if ratio is not None:
        line("throughput vs bare model", f"{ratio:.2f}x")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# plots (each returns a Figure; the caller saves it)
# --------------------------------------------------------------------------------------------
def _arr(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _scores(x: Any, name: str) -> np.ndarray:
    a = _arr(x, name).astype(np.float64).reshape(-1)
    if np.isnan(a).any():
        raise BadExpertError(f"{name} contains NaN values; cannot plot a ROC curve")
    return a


def _new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _roc(clean: np.ndarray, trig: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    if len(clean) == 0 or len(trig) == 0:
        return None
    y, s = _sklearn_inputs(clean, trig)  # ranks replace infinite scores; the ROC only needs the order
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def plot_roc(
    clean_scores: Any,
    trig_scores: Any,
    *,
    clean_correct: Any = None,
    trig_success: Any = None,
    threshold: float | None = None,
    fpr_target: float | None = None,
    auroc: float | None = None,
    auroc_filtered: float | None = None,
    noisy_scores: Any = None,
    auroc_noisy: float | None = None,
) -> Figure:
    """ROC curves (all vs all, filtered when masks are given, and with ``noisy_scores`` the clean
    inputs plus their noisy copies vs all triggered), linear and log-FPR panels."""
    c = _scores(clean_scores, "clean_scores")
    t = _scores(trig_scores, "trig_scores")
    curves = []
    roc_all = _roc(c, t)
    if roc_all is not None:
        lab = "all clean vs all triggered"
        if _num(auroc) is not None:
            lab += f" (AUROC {100 * auroc:.1f}%)"
        curves.append((roc_all, lab, "tab:purple", "-"))
    if clean_correct is not None and trig_success is not None:
        cm = _arr(clean_correct, "clean_correct").astype(bool).reshape(-1)
        ts = _arr(trig_success, "trig_success").astype(bool).reshape(-1)
        if len(cm) != len(c) or len(ts) != len(t):
            raise BadExpertError(
                f"clean_correct/trig_success masks ({len(cm)}, {len(ts)}) must match the scores ({len(c)}, {len(t)})"
            )
        roc_f = _roc(c[cm], t[ts])
        if roc_f is not None:
            lab = "filtered: correct clean vs successful triggered"
            if _num(auroc_filtered) is not None:
                lab += f" (AUROC {100 * auroc_filtered:.1f}%)"
            curves.append((roc_f, lab, "tab:orange", "--"))
    if noisy_scores is not None:
        roc_n = _roc(np.concatenate([c, _scores(noisy_scores, "noisy_scores")]), t)
        if roc_n is not None:
            lab = "clean and noisy copies vs all triggered"
            if _num(auroc_noisy) is not None:
                lab += f" (AUROC {100 * auroc_noisy:.1f}%)"
            curves.append((roc_n, lab, "tab:green", "-."))

    fig = _new_figure(11.5, 4.8)
    ax_lin, ax_log = fig.subplots(1, 2)
    n_clean = max(len(c), 1)
    log_min = min(1e-3, 0.5 / n_clean)
    for ax, log in ((ax_lin, False), (ax_log, True)):
        for (fpr, tpr), lab, color, ls in curves:
            if log:  # FPR 0 has no place on a log axis: start the curve at log_min with TPR(FPR=0)
                keep = fpr > 0
                ax.plot(np.r_[log_min, fpr[keep]], np.r_[tpr[~keep].max(), tpr[keep]],
                        color=color, ls=ls, lw=1.8, label=lab)
            else:
                ax.plot(fpr, tpr, color=color, ls=ls, lw=1.8, label=lab)
        thr = _num(threshold)
        if thr is not None and len(c) and len(t):
            op_fpr, op_tpr = float((c > thr).mean()), float((t > thr).mean())
            x = max(op_fpr, log_min) if log else op_fpr
            ax.plot([x], [op_tpr], "o", ms=9, mfc="none", mec="black", mew=2,
                    label=f"calibrated threshold: FPR {100 * op_fpr:.2f}%, TPR {100 * op_tpr:.1f}%")
        tgt = _num(fpr_target)
        if tgt is not None and tgt > 0:
            ax.axvline(tgt, color="gray", ls=":", lw=1.2, label=f"target FPR {100 * tgt:g}%")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("true-positive rate (triggered inputs rejected)")
        ax.grid(True, alpha=0.3)
        if log:
            ax.set_xscale("log")
            ax.set_xlim(log_min, 1.0)
            ax.set_xlabel("false-positive rate (clean inputs rejected), log scale")
            ax.set_title("ROC, low-FPR region (log scale)")
        else:
            ax.set_xlim(-0.02, 1.02)
            ax.plot([0, 1], [0, 1], color="lightgray", lw=1, zorder=0)
            ax.set_xlabel("false-positive rate (clean inputs rejected)")
            ax.set_title("ROC")
    ax_lin.legend(loc="lower right", fontsize=7.5, framealpha=0.9)
    fig.suptitle("Backdoor-input detection: ROC (higher score = more suspicious)", fontsize=11)
    fig.tight_layout()
    return fig


def _subsample(a: np.ndarray, k: int, seed: int) -> np.ndarray:
    if len(a) <= k:
        return a
    idx = np.random.default_rng(seed).choice(len(a), size=k, replace=False)
    return a[np.sort(idx)]


#: Labels of the decision-space scatter when the caller gives none: plain ones, since the labels
#: belong to the detector (its :attr:`~badexpert.detectors.Detector.scatter_axes`, which the
#: evaluation record carries as ``scatter_axes``).
DEFAULT_SCATTER_AXES = {"x_label": "x", "y_label": "y", "caption": "Decision space of the detector"}


def plot_scatter(clean_xy: Any = None, trig_xy: Any = None, *, axes: dict | None = None,
                 max_points: int = 20000) -> Figure:
    """A detector's 2-D decision space (``axes``: its :attr:`Detector.scatter_axes`, from the
    evaluation record; default: plain ``x`` and ``y`` labels)."""
    axes = dict(axes) if axes else dict(DEFAULT_SCATTER_AXES)
    fig = _new_figure(6.4, 6.0)
    ax = fig.subplots()
    for xy, name, color, seed in ((clean_xy, "clean", CLEAN_COLOR, 1), (trig_xy, "triggered", TRIG_COLOR, 2)):
        if xy is None:
            continue
        a = _arr(xy, f"{name}_xy").astype(np.float64)
        if a.ndim != 2 or a.shape[1] != 2:
            raise BadExpertError(f"{name}_xy must be an [n, 2] array of (x, y) confidences, got shape {a.shape}")
        shown = _subsample(a, max_points, seed)
        lab = f"{name} inputs (n={len(a)}" + (f", {len(shown)} shown)" if len(shown) < len(a) else ")")
        ax.scatter(shown[:, 0], shown[:, 1], s=6, alpha=0.35, color=color, edgecolors="none", label=lab,
                   rasterized=True)
    limits = axes.get("limits")
    if limits is not None:
        lo, hi = limits
        pad = 0.02 * (hi - lo)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
    ax.set_xlabel(axes.get("x_label", "x"))
    ax.set_ylabel(axes.get("y_label", "y"))
    if axes.get("title"):
        ax.set_title(axes["title"], fontsize=10)
    ax.grid(True, alpha=0.3)
    leg = ax.legend(loc="lower left", fontsize=8, markerscale=2.5, framealpha=0.9)
    for h in leg.legend_handles:
        h.set_alpha(1.0)
    fig.tight_layout()
    return fig


def _images(x: Any, name: str) -> np.ndarray:
    """[n, H, W] or [n, H, W, 3] floats in [0, 1] for imshow, from [n, C, H, W] (or [n, H, W])."""
    a = _arr(x, name)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if a.ndim == 3:
        return np.clip(a, 0.0, 1.0)
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise BadExpertError(f"{name} must be images shaped [n, C, H, W] with C = 1 or 3, got {a.shape}")
    a = np.clip(a, 0.0, 1.0)
    return a[:, 0] if a.shape[1] == 1 else a.transpose(0, 2, 3, 1)


#: The largest gain of the difference row (a trigger changing pixels by 1/255 is shown x50).
MAX_DIFFERENCE_GAIN = 50.0


def _difference_row(clean: np.ndarray, trig: np.ndarray, max_cols: int) -> tuple:
    """``|triggered - clean|`` (largest over channels), times one gain for the whole row so the
    strongest change shown is white: faint triggers (a warp, colour quantisation) become visible,
    and their relative strength across images stays readable."""
    diff = np.abs(trig - clean)
    if diff.ndim == 4:
        diff = diff.max(axis=3)
    top = float(diff[:max_cols].max()) if diff.size else 0.0
    gain = min(MAX_DIFFERENCE_GAIN, 1.0 / top) if top > 0 else 1.0
    return (f"|difference| x{gain:.3g}", np.clip(diff * gain, 0.0, 1.0), None, "")


def plot_examples(
    clean_examples: Any = None,
    trig_examples: Any = None,
    *,
    class_names: Sequence[str] | None = None,
    example_labels: Any = None,
    trig_example_preds: Any = None,
    max_cols: int = 8,
) -> Figure:
    """A grid: top row clean images, then the same images with the trigger (<= 8 columns), then
    the difference between the two, amplified (one gain for the row, at most x50, named on the
    row) so that faint triggers are visible.

    Column titles: the true class (``example_labels``) on the clean row and the suspect model's
    prediction (``trig_example_preds``) on the triggered row, named through ``class_names``.
    """
    rows = []
    if clean_examples is not None:
        rows.append(("clean", _images(clean_examples, "clean_examples"), example_labels, "class"))
    if trig_examples is not None:
        rows.append(("triggered", _images(trig_examples, "trig_examples"), trig_example_preds, "model says"))
    if not rows:
        raise BadExpertError("plot_examples needs clean_examples or trig_examples")
    if len(rows) == 2 and rows[0][1].shape == rows[1][1].shape:
        rows.append(_difference_row(rows[0][1], rows[1][1], max_cols))
    ncol = max(1, min(max_cols, min(len(r[1]) for r in rows)))

    def name(c: int) -> str:
        if class_names is not None and 0 <= c < len(class_names):
            return str(class_names[c])
        return str(c)

    fig = _new_figure(1.5 * ncol + 0.9, 1.75 * len(rows) + 0.5)
    axes = np.atleast_2d(fig.subplots(len(rows), ncol, squeeze=False))
    for r, (row_name, imgs, labels, verb) in enumerate(rows):
        lab = None if labels is None else _arr(labels, "labels").reshape(-1).astype(np.int64)
        for j in range(ncol):
            ax = axes[r, j]
            img = imgs[j]
            if img.ndim == 2:
                ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if lab is not None and j < len(lab):
                ax.set_title(f"{verb}: {name(int(lab[j]))}" if j == 0 else name(int(lab[j])), fontsize=8)
            if j == 0:
                ax.set_ylabel(row_name, fontsize=10)
    fig.suptitle("Test inputs: clean, with the trigger applied, and the amplified difference" if len(rows) == 3
                 else "Test inputs: clean (top) and with the trigger applied (bottom)", fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------
def _describe(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_describe(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _what_was_run(rec: EvaluationRecord) -> list[str]:
    d = rec.defense
    items = [
        ("Dataset", rec.dataset_name),
        ("Model", rec.arch),
        ("Attack", rec.attack_name),
        ("Target class", rec.target),  # the attack's own description (all-to-all, source classes)
        ("Seed", rec.seed),
        ("Defense", None if d is None else d.name),
        ("Defense parameters", _describe(d.params) if d is not None and d.params else None),
    ]
    lines = [f"- {k}: {_describe(v)}" for k, v in items if v is not None]
    return lines or ["- (no configuration recorded)"]


def _fpr_sentence(d: DefenseRecord) -> str:
    tgt, real = d.fpr_target, d.realized_fpr
    digits = _fpr_digits(tgt)
    n_cal = d.calibration_size
    n_clean = d.n_clean
    if d.calibration_population == "correct":
        cal = f" on {n_cal} held-out clean inputs the model classifies correctly" if n_cal is not None else \
            " on held-out clean inputs the model classifies correctly"
        n_ok = d.n_clean_correct
        test = f" of the {n_ok} clean test inputs it gets right" if n_ok is not None else \
            " of the clean test inputs it gets right"
        after = (f" Counting the clean inputs it gets wrong too (whose answer was wrong anyway), it rejected "
                 f"{pct(d.fpr, digits)} of all clean test inputs.")
    else:
        cal = f" on {n_cal} held-out clean inputs" if n_cal is not None else ""
        test = f" of the {n_clean} clean test inputs" if n_clean is not None else " of the clean test inputs"
        after = ""
    s = (
        f"The threshold was calibrated{cal} for a target false-positive rate of {pct(tgt, digits)} "
        f"(split-conformal quantile: at most the target in expectation on new clean data); "
        f"it rejected {pct(real, digits)}{test} (realized FPR).{after}"
    )
    thr = _num(d.threshold)
    if thr is not None and (math.isinf(thr) or thr >= 1e300):
        s += (" The threshold is infinite: the calibration set is too small for this target FPR, so the "
              "detector rejects nothing. Use more calibration samples or a larger FPR.")
    return s


def _noisy_sentence(rec: EvaluationRecord, d: DefenseRecord) -> str:
    """What the noise-augmented AUROC measures, with its numbers."""
    sigma = None if rec.noisy_clean is None else rec.noisy_clean["sigma"]
    noise = f"Gaussian noise of standard deviation {sigma:g}" if _num(sigma) is not None else "Gaussian noise"
    return (f"With noisy clean negatives (the paper's AUROC protocol): the {d.n_clean} clean test inputs and "
            f"{d.n_noisy} copies of them with {noise} added in [0, 1] pixel space (clipped) against the same "
            f"triggered inputs, AUROC {pct(d.auroc_noisy, 2)}{_ci(d.auroc_noisy_ci)} over all of them and "
            f"{pct(d.auroc_noisy_filtered, 2)} on the research code's population (those the model gets "
            f"right). The calibrated threshold rejected {pct(d.realized_fpr_noisy, _fpr_digits(d.fpr_target))} "
            "of the noisy copies. A detector that flags merely unusual inputs loses AUROC here; the copies are made "
            "from the test split, so the calibration split stays unseen.")


def _markdown(rec: EvaluationRecord, plots: list[str], *,
              scatter_caption: str = DEFAULT_SCATTER_AXES["caption"]) -> str:
    d = rec.defense
    failed = rec.attack_failed
    out = ["# Backdoor detection report", "", "## What was run", "", *_what_was_run(rec), ""]
    if failed:
        asr = rec.attack_success_rate_no_defense
        bar = rec.asr_bar
        out += [
            "## Attack failed",
            "",
            f"**The backdoor did not implant.** The attack success rate on the suspect model is "
            f"{pct(asr)}, below the bar of {pct(bar)}. Detection numbers are not presented: "
            f"with no working backdoor there is nothing to detect, and any detection score would be "
            f"meaningless.",
            "",
        ]
        if rec.message:
            out += [str(rec.message), ""]
        out += ["## Suspect model", "", "```text", format_table(rec), "```", ""]
    else:
        out += ["## Results", "", "```text", format_table(rec), "```", ""]
        if rec.message:
            out += [str(rec.message), ""]
        if d is not None:
            out += [_fpr_sentence(d), ""]
            out += [
                "CA and ASR with defense count a rejected input as neither correct nor attacked. AUROC is over "
                "all clean test inputs vs all counted triggered inputs (true class not the target); the "
                "filtered AUROC uses the research code's population (clean inputs the model gets right vs "
                "triggered inputs whose attack succeeds), for comparison with the paper.",
                "",
            ]
            if d.has("auroc_noisy"):
                out += [_noisy_sentence(rec, d), ""]
            drop = _num(d.clean_accuracy_drop)
            if drop is not None:
                out += [f"Clean-accuracy drop caused by the defense: {100 * drop:.2f} percentage points.", ""]
            tpr_at = d.tpr_at_fpr
            if tpr_at:
                out += [
                    "### TPR at fixed FPR (oracle operating points)",
                    "",
                    "Thresholds chosen on the test scores themselves: these describe the ranking, not a "
                    "deployable detector (the calibrated threshold above is the deployable one).",
                    "",
                    "| FPR | TPR |",
                    "|---:|---:|",
                    *[f"| {k} | {pct(v)} |" for k, v in tpr_at.items()],
                    "",
                ]
            per = d.per_class_false_rejection
            if per:
                digits = _fpr_digits(d.fpr_target)
                out += [
                    "## Per-class false rejection",
                    "",
                    "Fraction of clean test inputs of each true class that the detector rejected.",
                    "",
                    "| class | rejected |",
                    "|---|---:|",
                    *[f"| {k} | {pct(v, digits)} |" for k, v in per.items()],
                    "",
                ]
    cost, timings = (None, None) if d is None else (d.cost, d.timings)
    cost_lines = []
    if cost:
        labels = {
            "forward_passes_per_input": ("forward passes per input", "{:g}"),
            "backward_passes_per_input": ("backward passes per input", "{:g}"),
            "throughput_ratio": ("scoring throughput relative to the bare model", "{:.2f}x"),
            "model_images_per_s": ("bare model throughput", "{:,.0f} images/s"),
            "detector_images_per_s": ("detector throughput", "{:,.0f} images/s"),
        }
        for k, v in cost.items():
            lab, fmt = labels.get(k, (k, "{:g}"))
            f = _num(v)
            cost_lines.append(f"- {lab}: {fmt.format(f) if f is not None else v}")
    if timings:
        names = {"fit_s": "fit", "calibrate_s": "calibrate", "score_s": "score test inputs"}
        for k, v in timings.items():
            f = _num(v)
            cost_lines.append(f"- time to {names.get(k, k)}: {f:.2f} s" if f is not None else f"- {k}: {v}")
    if cost_lines:
        out += ["## Cost and timings", "", *cost_lines, ""]
    if plots:
        captions = {
            "roc.png": "ROC curves (linear and log-FPR), calibrated operating point circled",
            "scatter.png": scatter_caption,
            "examples.png": "Clean test inputs, the same inputs with the trigger, and their amplified difference",
        }
        out += ["## Plots", ""]
        for p in plots:
            out += [f"![{captions.get(p, p)}]({p})", ""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        fig.clear()  # drop artists now; the Figure is not registered anywhere else
    return buf.getvalue()


def write_report(
    out_dir: str | Path,
    metrics: EvaluationRecord | dict,
    arrays: ReportArrays | dict | None = None,
    *,
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``metrics.json``, ``report.md`` and the plots whose inputs ``arrays`` holds; return the paths.

    ``metrics``: the evaluation's :class:`~badexpert.evaluation.records.EvaluationRecord` (or its
    dict, read once by :meth:`~badexpert.evaluation.records.EvaluationRecord.from_dict`: an
    incomplete one is a one-line error naming the missing field); ``metrics.json`` is its JSON
    form. ``arrays``: the evaluation's :class:`~badexpert.evaluation.records.ReportArrays` (or its
    ``arrays`` dict, read by :meth:`~badexpert.evaluation.records.ReportArrays.from_arrays`), which
    says which arrays each plot needs; ``class_names`` caption the examples. For a failed attack
    (``attack_failed``) no ROC or scatter plot is drawn.

    Every file is rendered in memory first, then written by the package's one atomic writer
    (:func:`badexpert.utils.atomic_write_bytes`): if rendering raises, ``out_dir`` holds nothing new.
    """
    rec = _record(metrics)
    a = arrays if isinstance(arrays, ReportArrays) else ReportArrays.from_arrays({} if arrays is None else arrays)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = rec.defense
    failed = rec.attack_failed
    rendered: list[tuple[str, bytes]] = []  # (name, content): written once everything is rendered
    figures: list[tuple[str, Any]] = []
    if not failed and a.clean_scores is not None and a.trig_scores is not None:
        marks = {k: None if d is None else getattr(d, k)  # the operating point and AUROCs the curves carry
                 for k in ("threshold", "fpr_target", "auroc", "auroc_filtered", "auroc_noisy")}
        figures.append(("roc.png", lambda: plot_roc(
            a.clean_scores, a.trig_scores, clean_correct=a.clean_correct, trig_success=a.trig_success,
            noisy_scores=a.noisy_scores, **marks)))
    if not failed and (a.clean_xy is not None or a.trig_xy is not None):
        figures.append(("scatter.png", lambda: plot_scatter(a.clean_xy, a.trig_xy, axes=a.scatter_axes)))
    if a.clean_examples is not None or a.trig_examples is not None:
        figures.append(("examples.png", lambda: plot_examples(
            a.clean_examples, a.trig_examples, class_names=class_names,
            example_labels=a.example_labels, trig_example_preds=a.trig_example_preds)))
    for name, make in figures:
        rendered.append((name, _png(make())))

    caption = (a.scatter_axes or DEFAULT_SCATTER_AXES).get("caption", DEFAULT_SCATTER_AXES["caption"])
    md = _markdown(rec, [name for name, _ in figures], scatter_caption=caption)
    rendered.append(("report.md", md.encode("utf-8")))

    write_json(out / "metrics.json", rec.to_dict())
    written = [out / "metrics.json"]
    for name, data in rendered:
        atomic_write_bytes(out / name, data)
        written.append(out / name)
    return written
