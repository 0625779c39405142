"""Report writing: files, contents, atomicity, valid images; the records it reads."""

from __future__ import annotations

import dataclasses
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
from badexpert.errors import BadExpertError  # noqa: E402
from badexpert.evaluation.records import EvaluationRecord, ReportArrays  # noqa: E402
from badexpert.metrics import clean_rejection, detection_summary  # noqa: E402
from badexpert.reporting.report import format_table, plot_examples, write_report  # noqa: E402
from badexpert.utils import to_jsonable  # noqa: E402

NAMES = ["zero", "one", "two", "three"]


def evaluation_dict(defense: dict | None = None, **fields) -> dict:
    """A complete metrics dict (the JSON form of an EvaluationRecord, as a run writes it) of a
    BadNet run whose backdoor implanted, with ``fields`` over it and ``defense`` as its block."""
    m = {
        "badexpert_version": "0.1.0", "config": {"dataset": "toy", "seed": 3}, "seed": 3,
        "dataset": {"name": "toy-mnist"}, "model": {"arch": "tinycnn"}, "attack": {"name": "badnet", "target": 0},
        "clean_accuracy": 0.9, "sizes": {"test_clean": 400, "test_triggered": 300}, "attack_success_rate": 0.99,
        "target": "0 (zero)", "asr_bar": 0.5, "attack_failed": False,
    }
    m.update(fields)
    if defense is not None:
        m["defense"] = defense
    return m


def clean_defense(threshold: float = 0.3, fpr_target: float = 0.05, rejected=(False, True, False, False)) -> dict:
    """A complete defense block measured without an attack (clean inputs only), as evaluate writes it."""
    flags = np.array(rejected)
    return {"name": "badexpert", "params": {}, "fpr_target": fpr_target, "threshold": threshold,
            "calibration_size": 50, "overlap": None, **clean_rejection(flags, np.ones_like(flags)),
            "clean_accuracy": float((~flags).mean()), "cost": {"forward_passes_per_input": 3,
                                                                "backward_passes_per_input": 0}}


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
    d.update(overlap=None)
    metrics = evaluation_dict(d, clean_accuracy=d["clean_accuracy_no_defense"],
                              attack_success_rate=d["attack_success_rate_no_defense"],
                              sizes={"test_clean": n, "test_triggered": m})
    imgs = torch.rand(10, 1, 12, 12)
    trig = imgs.clone()
    trig[:, :, -3:, -3:] = 1.0
    arrays = ReportArrays(
        clean_scores=cs, trig_scores=ts, clean_xy=np.c_[cx, cy], trig_xy=torch.tensor(np.c_[tx, ty]),
        clean_examples=imgs, trig_examples=trig, clean_correct=preds == labels, trig_success=tpred == 0,
    )
    return metrics, arrays


def _listing(path):
    return sorted(os.listdir(path))


def test_write_report_writes_everything(tmp_path, synthetic):
    metrics, arrays = synthetic
    out = tmp_path / "run"
    paths = write_report(out, metrics, arrays, class_names=NAMES)
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
    metrics, arrays = synthetic
    metrics["defense"]["weird"] = {"nan": float("nan"), "arr": np.arange(3), "t": torch.tensor([1.5])}
    write_report(tmp_path, metrics, arrays, class_names=NAMES)
    loaded = json.loads((tmp_path / "metrics.json").read_text())
    assert loaded == to_jsonable(metrics)
    assert loaded["defense"]["auroc"] == metrics["defense"]["auroc"]
    assert loaded["defense"]["weird"] == {"nan": None, "arr": [0, 1, 2], "t": [1.5]}


def test_report_md_contains_the_numbers(tmp_path, synthetic):
    metrics, arrays = synthetic
    d = metrics["defense"]
    write_report(tmp_path, metrics, arrays, class_names=NAMES)
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
    _, arrays = synthetic
    # as evaluate writes it: no defense block (no detector is measured against a failed backdoor)
    metrics = evaluation_dict(attack_failed=True, attack_success_rate=0.123,
                              message="badnet did not implant at this rate")
    paths = write_report(tmp_path, metrics, arrays, class_names=NAMES)
    md = (tmp_path / "report.md").read_text()
    assert "did not implant" in md
    assert "12.3%" in md and "50.0%" in md
    assert "not presented" in md
    assert "auroc" not in md.lower() and "TPR" not in md
    assert {p.name for p in paths} == {"metrics.json", "report.md", "examples.png"}
    table = format_table(metrics)
    assert "FAILED" in table and "AUROC" not in table


def test_exception_midway_leaves_no_partial_files(tmp_path, synthetic, monkeypatch):
    metrics, arrays = synthetic

    def boom(*a, **k):
        raise RuntimeError("plotting exploded")

    monkeypatch.setattr(report, "plot_scatter", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        write_report(tmp_path / "a", metrics, arrays, class_names=NAMES)
    assert _listing(tmp_path / "a") == []  # roc.png was rendered to a temp name, then removed

    # an existing report is left untouched when a rewrite fails late (in the JSON writer)
    monkeypatch.undo()
    write_report(tmp_path / "b", metrics, arrays, class_names=NAMES)
    before = {n: (tmp_path / "b" / n).read_bytes() for n in _listing(tmp_path / "b")}
    monkeypatch.setattr(report, "write_json", boom)
    metrics["defense"]["auroc"] = 0.123456
    with pytest.raises(RuntimeError):
        write_report(tmp_path / "b", metrics, arrays, class_names=NAMES)
    after = {n: (tmp_path / "b" / n).read_bytes() for n in _listing(tmp_path / "b")}
    assert after == before
    assert plt.get_fignums() == []


def test_skips_plots_without_inputs(tmp_path, synthetic):
    metrics, _ = synthetic
    paths = write_report(tmp_path, metrics)
    assert {p.name for p in paths} == {"metrics.json", "report.md"}
    assert "## Plots" not in (tmp_path / "report.md").read_text()
    # the arrays as an evaluation hands them (a dict) are read into the record once
    paths = write_report(tmp_path / "scores", metrics, {"clean_scores": [0.0, 1.0], "trig_scores": [2.0]})
    assert {p.name for p in paths} == {"metrics.json", "report.md", "roc.png"}


def test_incomplete_metrics_are_one_line_naming_the_field_and_write_nothing(tmp_path, synthetic):
    metrics, arrays = synthetic
    cases = [
        ({k: v for k, v in metrics.items() if k != "attack_failed"}, "the metrics lacks 'attack_failed'"),
        ({**metrics, "defense": {k: v for k, v in metrics["defense"].items() if k != "realized_fpr"}},
         "the 'defense' block of the metrics lacks 'realized_fpr'"),
        ({**metrics, "dataset": {"path": "x"}}, "the 'dataset' block of the metrics lacks 'name'"),
        ({**metrics, "model": "tinycnn"}, "the 'model' block of the metrics must be a JSON object"),
        # a bare detection_summary() dict is not an evaluation
        (metrics["defense"], "the metrics lacks 'sizes', 'attack_failed'"),
    ]
    for bad, message in cases:
        with pytest.raises(BadExpertError, match=message) as e:
            write_report(tmp_path / "out", bad, arrays)
        assert "\n" not in str(e.value)
        with pytest.raises(BadExpertError, match=message):
            format_table(bad)
    assert not (tmp_path / "out").exists()
    with pytest.raises(BadExpertError, match=r"unknown report array\(s\) \['clean_score'\]"):
        write_report(tmp_path / "out", metrics, {"clean_score": [0.0]})
    assert not (tmp_path / "out").exists()


def test_format_table(synthetic):
    metrics, _ = synthetic
    d = metrics["defense"]
    t = format_table(metrics)
    assert "no defense" in t and "with defense" in t
    assert f"{100 * d['clean_accuracy']:.1f}%" in t
    assert f"{100 * d['auroc']:.1f}% [" in t  # with its bootstrap interval
    assert "1.0% / " in t and "4.2 s" in t and "0.31x" in t
    assert len(t.splitlines()) <= 14
    assert format_table(EvaluationRecord.from_dict(metrics)) == t  # the record, or its dict read once
    # no detector measured: the suspect model's numbers, nothing with defense
    bare = format_table(evaluation_dict())
    assert "90.0%" in bare and "99.0%" in bare and "n/a" in bare and "AUROC" not in bare
    # an infinite threshold (too few calibration samples) is spelled out
    assert "inf (rejects nothing)" in format_table(evaluation_dict(clean_defense(threshold=float("inf"))))


def test_infinite_threshold_is_explained(tmp_path):
    d = clean_defense(threshold=float("inf"), fpr_target=0.001, rejected=(False,) * 10)
    write_report(tmp_path, evaluation_dict(d, attack=None, attack_success_rate=None, target=None, asr_bar=None))
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
    metrics, arrays = synthetic
    arrays = dataclasses.replace(arrays, clean_correct=arrays.clean_correct[:-1])
    with pytest.raises(ValueError, match="masks"):
        write_report(tmp_path, metrics, arrays, class_names=NAMES)
    assert _listing(tmp_path) == []


# --------------------------------------------------------------------------------------------
# the records of real evaluations (the conftest's BadNet-backdoored CNN and a fitted BaDExpert)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(backdoored):
    """Real evaluations, with a run's provenance: the backdoor implanted (with the noisy-clean
    protocol), no attack at all, and an attack the model never learned (which fails)."""
    from badexpert.attacks import get_attack
    from badexpert.detectors import BaDExpert
    from badexpert.evaluation.core import evaluate

    model, attack, _, te = backdoored
    det = BaDExpert(expert_lr=1e-2, aux_lr=0.1, aux_epochs=4, hflip=False).fit(model, te.subset(range(800)))
    det.calibrate(te.subset(range(800, 1600)), 0.05)
    test = te.subset(range(1600, 2400))
    runs = {"implanted": (attack, True), "no attack": (None, True), "failed": (get_attack("blend", target=0), False)}
    out = {}
    for name, (a, noisy) in runs.items():
        r = evaluate(model, det, test, a, n_boot=20, throughput=False, noisy_clean=noisy)
        provenance = {"badexpert_version": "0.1.0", "config": {"seed": 0}, "seed": 0,
                      "dataset": {"name": "blobs", "classes": test.classes}, "model": {"arch": "cnn", "width": 8},
                      "attack": a.to_dict() if a else None}
        out[name] = ({**provenance, **r.metrics}, r, test.classes)
    return out


def test_a_real_metrics_json_round_trips_through_its_record(tmp_path, real):
    for name, (metrics, result, classes) in real.items():
        write_report(tmp_path / name, metrics, ReportArrays.from_arrays(result.arrays), class_names=classes)
        on_disk = json.loads((tmp_path / name / "metrics.json").read_text())
        rec = EvaluationRecord.from_dict(on_disk)
        assert rec.to_dict() == on_disk and list(rec.to_dict()) == list(on_disk), name  # same keys, same order
        if "defense" in on_disk:
            assert list(rec.to_dict()["defense"]) == list(on_disk["defense"])
            assert rec.defense.threshold == on_disk["defense"]["threshold"]
        # the file holds everything the report reads: the same table from the file as from memory
        assert format_table(on_disk) == format_table(metrics), name
        assert rec.attack_failed is (name == "failed") and rec.clean_accuracy == on_disk["clean_accuracy"]
    implanted = EvaluationRecord.from_dict(real["implanted"][0])
    assert implanted.defense.detection and implanted.noisy_clean["sigma"] == 0.05
    assert implanted.target == "0 (c0)" and implanted.attack_name == "badnet"


def test_the_no_attack_and_the_failed_attack_records_render(tmp_path, real):
    metrics, result, classes = real["no attack"]
    rec = EvaluationRecord.from_dict(metrics)
    assert rec.attack is None and rec.attack_success_rate is None and not rec.defense.detection
    paths = write_report(tmp_path / "clean", rec, ReportArrays.from_arrays(result.arrays), class_names=classes)
    assert {p.name for p in paths} == {"metrics.json", "report.md", "examples.png"}
    md = (tmp_path / "clean" / "report.md").read_text()
    d = rec.defense
    assert "no attack: only clean accuracy" in md and "- Attack:" not in md and "Target class" not in md
    assert f"it rejected {100 * d.realized_fpr:.1f}%" in md and "noisy copies rejected" in md
    table = format_table(rec)
    assert f"{100 * rec.clean_accuracy:.1f}%" in table and f"{100 * d.clean_accuracy:.1f}%" in table
    assert "attack success rate (ASR)               n/a            n/a" in table and "FAILED" not in table

    metrics, result, classes = real["failed"]
    rec = EvaluationRecord.from_dict(metrics)
    assert rec.attack_failed and rec.defense is None and rec.attack_success_rate < rec.asr_bar
    paths = write_report(tmp_path / "failed", metrics, ReportArrays.from_arrays(result.arrays), class_names=classes)
    assert {p.name for p in paths} == {"metrics.json", "report.md", "examples.png"}
    md = (tmp_path / "failed" / "report.md").read_text()
    assert "## Attack failed" in md and "- Attack: blend" in md and rec.message in md
    assert f"{100 * rec.attack_success_rate:.1f}%" in md and "AUROC" not in md
    assert "attack FAILED: ASR below the 50.0% bar" in format_table(rec)


def test_pct_is_the_one_percentage_format_and_says_n_a_for_what_is_not_one_rate():
    from badexpert.reporting.formats import pct

    assert pct(0.12345) == "12.3%" and pct(0.12345, 2) == "12.35%" and pct(1) == "100.0%"
    assert pct(torch.tensor(0.5)) == "50.0%" and pct(np.float32(0.25)) == "25.0%"
    for missing in (None, float("nan"), True, "x", np.array([0.1, 0.2]), torch.tensor([]), np.array([])):
        assert pct(missing) == "n/a", missing
