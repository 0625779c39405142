"""End to end on real Fashion-MNIST: a BadNet backdoor really implanted, and really detected."""

import json

import pytest

from badexpert.cli import main
from badexpert.pipeline.experiment import ExperimentConfig, run

from .conftest import FASHION_MNIST

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"),
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = ExperimentConfig(
        dataset="fashion-mnist", arch="cnn", width=16, attack="badnet", attack_params={"poison_rate": 0.03},
        train_size=8000, reserved=1000, calibration=1000, test_size=3000, fpr=0.01, seed=0, n_boot=200,
        recipe={"epochs": 4},
    )
    return out, run(cfg, out, log=lambda m: None)


def test_backdoor_is_implanted_and_detected(demo_run):
    _, m = demo_run
    assert m["attack_failed"] is False
    assert m["clean_accuracy"] > 0.8
    assert m["attack_success_rate"] >= 0.9
    d = m["defense"]
    assert d["auroc"] >= 0.95
    assert d["auroc_ci"][0] <= d["auroc"] <= d["auroc_ci"][1]
    assert d["attack_success_rate"] < 0.5 * m["attack_success_rate"]
    assert d["fpr"] <= 0.04  # calibrated at 1% on 1,000 disjoint clean images; 3,000 test images
    assert d["clean_accuracy"] >= m["clean_accuracy"] - 0.05
    cost = d["cost"]
    assert cost["forward_passes_per_input"] == 3
    assert cost["throughput_ratio"] == pytest.approx(cost["detector_images_per_s"] / cost["model_images_per_s"])
    assert d["fit_report"]["expert"]["reached_target"]


def test_outputs_are_written(demo_run):
    out, m = demo_run
    for name in ("metrics.json", "report.md", "roc.png", "scatter.png", "examples.png", "config.json",
                 "model.safetensors", "detector.safetensors"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("clean_accuracy", "attack_success_rate"):
        assert on_disk[key] == pytest.approx(m[key])
    for key in ("name", "fpr_target", "threshold", "auroc", "auroc_filtered", "tpr", "fpr", "clean_accuracy",
                "attack_success_rate", "timings"):
        assert key in on_disk["defense"], key
    assert "AUROC" in (out / "report.md").read_text()
    # the run's metrics.json is the JSON form of its evaluation record: read back, written back the same,
    # and it holds everything the table the demo prints reads
    from badexpert.evaluation.records import EvaluationRecord
    from badexpert.reporting.report import format_table

    assert EvaluationRecord.from_dict(on_disk).to_dict() == on_disk
    assert format_table(on_disk) == format_table(m)


def test_cli_evaluate_reproduces_the_run(demo_run, tmp_path, capsys):
    out, m = demo_run
    rc = main(["evaluate", "--model", str(out / "model.safetensors"), "--detector", str(out / "detector.safetensors"),
               "--n-boot", "200", "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert rc == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["defense"]["auroc"] == pytest.approx(m["defense"]["auroc"])
    assert again["defense"]["threshold"] == pytest.approx(m["defense"]["threshold"])
    assert "AUROC" in capsys.readouterr().out


def test_cli_defend_with_the_paper_preset(demo_run, tmp_path):
    out, _ = demo_run
    det = tmp_path / "paper.safetensors"
    assert main(["defend", "--model", str(out / "model.safetensors"), "--preset", "paper", "--fpr", "0.05",
                 "--out", str(det), "--device", "cpu"]) == 0
    from badexpert.detectors import read_detector_file

    _, meta = read_detector_file(det)
    assert meta["params"]["preset"] == "paper" and meta["fpr_target"] == 0.05
    assert meta["state"]["expert_lr"] == 1e-4 and meta["state"]["aux_lr"] == 0.1


def test_cli_detector_records_its_own_split(demo_run, tmp_path, capsys):
    """A detector fitted on another split than the model's record is evaluated on the test split
    of *its* split: disjoint from its fitting and calibration images (checked by content)."""
    out, _ = demo_run
    det = tmp_path / "small.safetensors"
    assert main(["defend", "--model", str(out / "model.safetensors"), "--reserved", "600", "--calibration", "700",
                 "--out", str(det), "--device", "cpu"]) == 0
    assert main(["defend", "--model", str(out / "model.safetensors"), "--out", str(det)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    rc = main(["evaluate", "--model", str(out / "model.safetensors"), "--detector", str(det), "--n-boot", "0",
               "--test-size", "1000", "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["dataset"]["splits"]["reserved"] == 600 and m["dataset"]["splits"]["calibration"] == 700
    assert m["dataset"]["splits"]["test"] == 1000
    assert m["defense"]["overlap"] == {"fit": 0, "calibration": 0, "total": 1000}
    # the run's own model with the run's own detector evaluated on this detector's split would
    # reuse images the run's detector was calibrated on: refused
    from badexpert.detectors import load_detector
    from badexpert.evaluation.core import evaluate
    from badexpert.pipeline.experiment import ExperimentConfig, make_splits
    from badexpert.io import load_model

    model, _ = load_model(out / "model.safetensors")
    run_detector = load_detector(out / "detector.safetensors", model)
    other = make_splits(ExperimentConfig(reserved=600, calibration=700, test_size=3000, seed=0))
    with pytest.raises(Exception, match="shares 0 image.*fitted on and [1-9][0-9]* with its calibration data"):
        evaluate(model, run_detector, other.test, None, n_boot=0, throughput=False)


def test_cli_compare_on_the_demo_model(demo_run, tmp_path, capsys):
    """`badexpert compare` rebuilds the model's recorded split, applies its recorded attack and
    writes one table and one ROC figure."""
    out, m = demo_run
    code = main(["compare", "--model", str(out / "model.safetensors"), "--detectors", "badexpert",
                 "--out", str(tmp_path / "cmp")])
    assert code == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    d = rows["detectors"][0]
    assert d["name"] == "badexpert" and d["auroc"] > 0.95 and d["cost"]["forward_passes_per_input"] == 3
    assert rows["model"]["attack_success_rate"] == m["attack_success_rate"]  # same split, same trigger
    assert "| badexpert |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "roc.png").is_file()


def test_cli_defend_evaluate_and_bundle_any_detector(demo_run, tmp_path, capsys):
    """defend --method builds any registered detector; evaluate, bundle and the guard take it as
    they take BaDExpert (ONNX export stays BaDExpert's and says so in one line)."""
    from badexpert.attacks import attack_from_meta
    from badexpert.deploy.guard import load_bundle
    from badexpert.io import load_model

    out, _ = demo_run
    det = tmp_path / "strip.safetensors"
    assert main(["defend", "--model", str(out / "model.safetensors"), "--method", "strip", "--detector-param", "n=16",
                 "--reserved", "300", "--calibration", "500", "--fpr", "0.05", "--out", str(det), "--device", "cpu"]) == 0
    assert "fitted strip in" in capsys.readouterr().out
    rc = main(["evaluate", "--model", str(out / "model.safetensors"), "--detector", str(det), "--n-boot", "0",
               "--test-size", "600", "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["defense"]["name"] == "strip" and m["defense"]["auroc"] > 0.9
    bundle = tmp_path / "strip.bundle.safetensors"
    assert main(["bundle", "--model", str(out / "model.safetensors"), "--detector", str(det), "--out", str(bundle)]) == 0
    guard = load_bundle(bundle)
    model, meta = load_model(out / "model.safetensors")
    attack = attack_from_meta(meta)
    from badexpert.data import load_dataset

    _, test = load_dataset("fashion-mnist")
    x = test.images[test.labels != 0][:200]
    clean, trig = guard(x), guard(attack.apply(x))
    assert float(trig.reject.float().mean()) > 0.7 and float(clean.reject.float().mean()) < 0.2
    pytest.importorskip("onnxruntime")
    assert main(["export", str(bundle), "--onnx", str(tmp_path / "g.onnx")]) == 2
    err = capsys.readouterr().err
    assert "detector 'strip' cannot be exported to ONNX" in err and not (tmp_path / "g.onnx").exists()
