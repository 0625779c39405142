"""Report writing: files, contents, atomicity, valid images."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import badexpert.reporting.report as report  # noqa: E402
from badexpert.metrics import detection_summary  # noqa: E402
from badexpert.reporting.report import format_table, plot_examples, write_report  # noqa: E402
from badexpert.utils import to_jsonable  # noqa: E402

NAMES = ["zero", "one", "two", "three"]


@pytest.fixture
def synthetic():
    rng = np.random.default_rng(0)
    n, m = 400, 300
    cx, cy = rng.beta(1, 6, n), rng.beta(6, 1, n)
    tx, ty = rng.beta(5, 1.5, m), rng.beta(1.5, 4, m)
    labels = rng.integers(0, 4, n)
    preds = np.where(rng.random(n) < 0.9, labels, (labels + 1) % 4)
    tpred = np.where(rng.random(m) < 0.95, 0, 2)
    cs, ts = cx - cy, tx - ty
    d = detection_summary(
        clean_scores=cs, clean_labels=labels, clean_preds=preds, trig_scores=ts, trig_preds=tpred,
        trig_target=np.zeros(m, dtype=int), threshold=float(np.quantile(cs, 0.99)), fpr_target=0.01,
        class_names=NAMES, n_boot=100,
    )
    d.update(
        name="badexpert", params={"metric": "triangle"}, calibration_size=500,
        cost={"forward_passes_per_input": 3, "throughput_ratio": 0.31, "model_images_per_s": 9000.0,
              "detector_images_per_s": 2790.0},
        timings={"fit_s": 4.25, "calibrate_s": 0.5, "score_s": 1.0},
    )
    metrics = {
        "config": {"dataset": "toy", "seed": 3}, "dataset": {"name": "toy-mnist"}, "model": {"arch": "tinycnn"},
        "attack": {"name": "badnet", "target": 0}, "seed": 3,
        "clean_accuracy": d["clean_accuracy_no_defense"], "attack_success_rate": d["attack_success_rate_no_defense"],
        "attack_failed": False, "asr_bar": 0.5, "defense": d,
    }
    imgs = torch.rand(10, 1, 12, 12)
    trig = imgs.clone()
    trig[:, :, -3:, -3:] = 1.0
    kwargs = dict(
        clean_scores=cs, trig_scores=ts, clean_xy=np.c_[cx, cy], trig_xy=torch.tensor(np.c_[tx, ty]),
        clean_examples=imgs, trig_examples=trig, class_names=NAMES,
        clean_correct=preds == labels, trig_success=tpred == 0,
    )
    return metrics, kwargs


def _listing(path):
    return sorted(os.listdir(path))


def test_write_report_writes_everything(tmp_path, synthetic):
    metrics, kwargs = synthetic
    out = tmp_path / "run"
    paths = write_report(out, metrics, **kwargs)
    names = {p.name for p in paths}
    assert names == {"metrics.json", "report.md", "roc.png", "scatter.png", "examples.png"}
    assert _listing(out) == sorted(names)  # no temporary files left behind
    for p in paths:
        assert p.parent == out and p.stat().st_size > 0
        assert p.stat().st_mode & 0o044  # readable by others, not mkstemp's 0600
    for name in ("roc.png", "scatter.png", "examples.png"):
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert plt.get_fignums() == []  # no figure left registered


def test_metrics_json_round_trips(tmp_path, synthetic):
    metrics, kwargs = synthetic
    metrics["defense"]["weird"] = {"nan": float("nan"), "arr": np.arange(3), "t": torch.tensor([1.5])}
    write_report(tmp_path, metrics, **kwargs)
    loaded = json.loads((tmp_path / "metrics.json").read_text())
    assert loaded == to_jsonable(metrics)
    assert loaded["defense"]["auroc"] == metrics["defense"]["auroc"]
    assert loaded["defense"]["weird"] == {"nan": None, "arr": [0, 1, 2], "t": [1.5]}


def test_report_md_contains_the_numbers(tmp_path, synthetic):
    metrics, kwargs = synthetic
    d = metrics["defense"]
    write_report(tmp_path, metrics, **kwargs)
    md = (tmp_path / "report.md").read_text()
    for v in (d["clean_accuracy"], d["attack_success_rate"], d["clean_accuracy_no_defense"],
              d["attack_success_rate_no_defense"], d["auroc"], d["auroc_filtered"], d["tpr"]):
        assert f"{100 * v:.1f}%" in md
    assert f"{100 * d['fpr']:.1f}%" in md and "1.0%" in md  # realized and target FPR
    assert "realized FPR" in md and "500 held-out clean inputs" in md
    for item in ("toy-mnist", "tinycnn", "badnet", "Seed: 3", "0 (zero)", "badexpert"):
        assert item in md
    for name, rate in d["per_class_false_rejection"].items():
        assert f"| {name} | {100 * rate:.1f}% |" in md
    assert "AUROC" in md and "oracle" in md
    assert "forward passes per input: 3" in md and "0.31x" in md and "4.25 s" in md
    for png in ("roc.png", "scatter.png", "examples.png"):
        assert f"]({png})" in md


def test_failed_attack_report(tmp_path, synthetic):
    metrics, kwargs = synthetic
    metrics.update(attack_failed=True, attack_success_rate=0.123, message="badnet did not implant at this rate")
    metrics["defense"]["attack_success_rate_no_defense"] = 0.123
    paths = write_report(tmp_path, metrics, **kwargs)
    md = (tmp_path / "report.md").read_text()
    assert "did not implant" in md
    assert "12.3%" in md and "50.0%" in md
    assert "not presented" in md
    assert "auroc" not in md.lower() and "TPR" not in md
    assert {p.name for p in paths} == {"metrics.json", "report.md", "examples.png"}
    table = format_table(metrics)
    assert "FAILED" in table and "AUROC" not in table


def test_exception_midway_leaves_no_partial_files(tmp_path, synthetic, monkeypatch):
    metrics, kwargs = synthetic

    def boom(*a, **k):
        raise RuntimeError("plotting exploded")

    monkeypatch.setattr(report, "plot_scatter", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        write_report(tmp_path / "a", metrics, **kwargs)
    assert _listing(tmp_path / "a") == []  # roc.png was rendered to a temp name, then removed

    # an existing report is left untouched when a rewrite fails late (in the JSON writer)
    monkeypatch.undo()
    write_report(tmp_path / "b", metrics, **kwargs)
    before = {n: (tmp_path / "b" / n).read_bytes() for n in _listing(tmp_path / "b")}
    monkeypatch.setattr(report, "write_json", boom)
    metrics["defense"]["auroc"] = 0.123456
    with pytest.raises(RuntimeError):
        write_report(tmp_path / "b", metrics, **kwargs)
    after = {n: (tmp_path / "b" / n).read_bytes() for n in _listing(tmp_path / "b")}
    assert after == before
    assert plt.get_fignums() == []


def test_skips_plots_without_inputs(tmp_path, synthetic):
    metrics, _ = synthetic
    paths = write_report(tmp_path, metrics)
    assert {p.name for p in paths} == {"metrics.json", "report.md"}
    assert "## Plots" not in (tmp_path / "report.md").read_text()
    # a bare detection_summary dict is accepted too
    paths = write_report(tmp_path / "bare", metrics["defense"], clean_scores=[0.0, 1.0], trig_scores=[2.0])
    assert {p.name for p in paths} == {"metrics.json", "report.md", "roc.png"}


def test_format_table(synthetic):
    metrics, _ = synthetic
    d = metrics["defense"]
    t = format_table(metrics)
    assert "no defense" in t and "with defense" in t
    assert f"{100 * d['clean_accuracy']:.1f}%" in t
    assert f"{100 * d['auroc']:.1f}% [" in t  # with its bootstrap interval
    assert "1.0% / " in t and "4.2 s" in t and "0.31x" in t
    assert len(t.splitlines()) <= 14
    minimal = format_table({"clean_accuracy": 0.9, "attack_success_rate": 0.99, "defense": {"threshold": 0.3}})
    assert "90.0%" in minimal and "99.0%" in minimal and "n/a" in minimal
    # an infinite threshold (too few calibration samples) is spelled out
    assert "inf" in format_table({"defense": {"threshold": float("inf")}})


def test_infinite_threshold_is_explained(tmp_path):
    d = {"threshold": float("inf"), "fpr_target": 0.001, "fpr": 0.0, "n_clean": 10, "calibration_size": 50}
    write_report(tmp_path, {"defense": d})
    md = (tmp_path / "report.md").read_text()
    assert "infinite" in md and "0.10%" in md  # two decimals below a 1% target


def test_examples_grid_shapes(tmp_path):
    rgb = np.random.default_rng(0).random((12, 3, 16, 16))
    fig = plot_examples(rgb, rgb * 0.5, class_names=NAMES, example_labels=[0, 1, 2, 3] * 3)
    assert len(fig.axes) == 24  # clean, triggered, difference; at most 8 columns
    assert fig.axes[1].get_title() == "one"
    fig = plot_examples(torch.rand(3, 1, 8, 8))
    assert len(fig.axes) == 3
    with pytest.raises(ValueError):
        plot_examples(np.zeros((2, 5, 8, 8)))


def test_examples_show_a_faint_trigger_in_the_amplified_difference():
    """A trigger changing pixels by 2/255 (a warp, colour quantisation) is invisible in the
    triggered row but fills the difference row's range once amplified."""
    clean = np.random.default_rng(1).random((4, 3, 16, 16)).astype(np.float32) * 0.9
    trig = clean.copy()
    trig[:, :, 4:8, 4:8] += 2 / 255
    fig = plot_examples(clean, trig)
    diff_axes = fig.axes[8:12]
    assert diff_axes[0].get_ylabel().startswith("|difference| x50")  # capped gain
    shown = np.asarray(diff_axes[0].images[0].get_array())
    assert shown[4:8, 4:8].min() > 0.35 and shown[:4].max() == 0.0  # only the trigger lights up
    strong = clean.copy()
    strong[:, :, 0, 0] = 1.0 - strong[:, :, 0, 0]
    fig = plot_examples(clean, strong)
    gain = float(fig.axes[8].get_ylabel().split("x")[-1])
    assert 1.0 <= gain < 50  # scaled so the strongest change shown is white
    assert float(np.asarray(fig.axes[8].images[0].get_array()).max()) <= 1.0


def test_mismatched_masks_raise_and_leave_nothing(tmp_path, synthetic):
    metrics, kwargs = synthetic
    kwargs["clean_correct"] = kwargs["clean_correct"][:-1]
    with pytest.raises(ValueError, match="masks"):
        write_report(tmp_path, metrics, **kwargs)
    assert _listing(tmp_path) == []
