"""Renderers of a :class:`~badexpert.evaluation.compare.Comparison` record: the Markdown table,
the ROC figure, and the files ``badexpert compare`` writes (all or nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..evaluation.compare import Comparison
from ..evaluation.records import DefenseRecord
from ..utils import atomic_directory, check_output_dir, write_json
from .formats import pct
from .report import _new_figure

#: What ``badexpert compare`` writes into its output directory.
COMPARE_OUTPUTS = frozenset({"compare.json", "compare.md", "roc.png"})


def format_comparison(metrics: dict) -> str:
    """The comparison as a Markdown table (one row per detector). With the noisy-clean protocol
    (``compare --noisy-clean``) a column gives the AUROC with the noise-augmented clean negatives,
    on all inputs / on the paper's population, and a note says what it measures."""
    m = metrics["model"]
    head = (f"Suspect model: clean accuracy {pct(m['clean_accuracy'])}"
            + (f", attack success rate {pct(m['attack_success_rate'])}" if m["attack_success_rate"] is not None else "")
            + f"; every detector calibrated at {100 * metrics['fpr_target']:g}% target FPR on the same clean split.")
    if m["attack_failed"]:
        return head + "\n\n" + m["message"] + "\n"
    records = [DefenseRecord.from_dict(d, "a detector record of the comparison") for d in metrics["detectors"]]
    noisy = any(d.has("auroc_noisy") for d in records)
    rows = ["| detector | AUROC | AUROC (paper's population) | "
            + ("AUROC with noisy negatives (all / paper's population) | " if noisy else "")
            + "TPR at 0.1% / 1% / 5% FPR | CA after | ASR after | realized FPR | passes per input (fwd / bwd) | "
            "throughput vs model |",
            "|---|---|---|" + ("---|" if noisy else "") + "---|---|---|---|---|---|"]
    for d in records:
        ratio = d.throughput_ratio
        rows.append(
            f"| {d.shown_as}{' (out of scope)' if d.out_of_scope else ''} | {pct(d.auroc, 2)} | {pct(d.auroc_filtered, 2)} | "
            + (f"{pct(d.auroc_noisy, 2)} / {pct(d.auroc_noisy_filtered, 2)} | " if noisy else "")
            + f"{pct(d.tpr_at('0.1%'))} / {pct(d.tpr_at('1%'))} / {pct(d.tpr_at('5%'))} | {pct(d.clean_accuracy)} | "
            f"{pct(d.attack_success_rate)} | {pct(d.realized_fpr, 2)} | {d.forward_passes} / {d.backward_passes} | "
            f"{'n/a' if ratio is None else f'{ratio:.3f}x'} |"
        )
    points = [(d, p) for d in records for p in d.operating_points or ()]
    if points:  # compare --extra-fpr: the same detectors at further target FPRs
        rows += ["", "At further target FPRs (the threshold each detector's calibration scores give there):", "",
                 "| detector | target FPR | realized FPR | CA after | ASR after | threshold |", "|---|---|---|---|---|---|"]
        rows += [f"| {d.shown_as} | {pct(p['fpr_target'], 2)} | {pct(p['realized_fpr'], 2)} | "
                 f"{pct(p['clean_accuracy'])} | {pct(p.get('attack_success_rate'))} | {p['threshold']:.4g} |"
                 for d, p in points]
    notes = [f"Out of scope: {d.out_of_scope}." for d in records if d.out_of_scope]
    if noisy:
        notes.append(f"Noisy negatives (the paper's AUROC protocol): the clean test inputs plus a copy of each with "
                     f"Gaussian noise (sigma {m['noisy_clean']['sigma']:g}) added, against the same "
                     "triggered inputs; a detector that merely flags unusual inputs loses AUROC there.")
    return head + "\n\n" + "\n".join(rows) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def plot_comparison(comparison: Comparison):
    """Every detector's ROC curve (all clean vs all triggered inputs), linear and log FPR."""
    from sklearn.metrics import roc_curve

    fig = _new_figure(11.5, 4.8)
    ax_lin, ax_log = fig.subplots(1, 2)
    by_name = {r.shown_as: r for r in (DefenseRecord.from_dict(d) for d in comparison.metrics["detectors"])}
    for name, a in comparison.arrays.items():
        c, t = np.asarray(a["clean_scores"], float), np.asarray(a["trig_scores"], float)
        scores = np.nan_to_num(np.concatenate([c, t]), nan=np.inf)  # an unscorable input is always flagged
        fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(c)), np.ones(len(t))], scores)
        label = f"{name} (AUROC {pct(by_name[name].auroc, 2)})"
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
        (out / "compare.md").write_text("# Detector comparison\n\n" + format_comparison(comparison.metrics))
        written = [out / "compare.json", out / "compare.md"]
        if comparison.arrays:
            fig = plot_comparison(comparison)
            fig.savefig(out / "roc.png", format="png")
            written.append(out / "roc.png")
    return [Path(out_dir) / p.name for p in written]


__all__ = ["COMPARE_OUTPUTS", "format_comparison", "plot_comparison", "write_comparison"]
