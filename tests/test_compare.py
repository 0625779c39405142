"""`compare` / `badexpert compare`: several detectors under one protocol, sharing the model's pass."""

from typing import ClassVar

import numpy as np
import pytest

from badexpert.evaluation.compare import compare
from badexpert.reporting.compare import COMPARE_OUTPUTS, format_comparison, write_comparison
from badexpert.data import Splits
from badexpert.detectors import BaDExpert, Detector
from badexpert.errors import BadExpertError


class MaxSoftmax(Detector):
    """A deliberately simple detector from outside the registry: score = max softmax probability
    (a backdoored model is very confident on triggered inputs)."""

    name: ClassVar[str] = "max_softmax"

    def _fit(self, model, images, labels):
        pass

    def _score_batch(self, x):
        return self.model_(x).softmax(1).max(1).values


@pytest.fixture(scope="module")
def setting(backdoored):
    model, attack, _, te = backdoored
    splits = Splits(train=te.subset(range(0, 10)), reserved=te.subset(range(0, 800)),
                    calibration=te.subset(range(800, 1600)), test=te.subset(range(1600, 2400)))
    return model, attack, splits


def _badexpert():
    return BaDExpert(expert_lr=1e-2, aux_lr=0.1, aux_epochs=4, hflip=False, seed=0)


def test_detectors_share_one_model_pass_and_one_protocol(setting, monkeypatch, tmp_path):
    import badexpert.evaluation.compare as comparison

    model, attack, splits = setting
    calls = []
    real = comparison.model_outputs
    monkeypatch.setattr(comparison, "model_outputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = compare(model, [_badexpert(), MaxSoftmax()], splits, attack, fpr=0.05, n_boot=50, log=lambda m: None)
    assert len(calls) == 1  # the suspect model's outputs on the test inputs, computed once
    rows = {d["name"]: d for d in result.metrics["detectors"]}
    assert list(rows) == ["badexpert", "max_softmax"]
    assert rows["badexpert"]["auroc"] > 0.95
    for d in rows.values():
        assert d["fpr_target"] == 0.05 and d["calibration_size"] == 800
        assert d["fpr"] <= 0.05 + 0.04  # same calibration split and target for every detector
        cost = d["cost"]  # the ratio is the two measured throughputs' (positive by construction, so compare them)
        assert cost["throughput_ratio"] == pytest.approx(cost["detector_images_per_s"] / cost["model_images_per_s"])
    assert rows["badexpert"]["cost"]["forward_passes_per_input"] == 3
    assert rows["max_softmax"]["cost"]["forward_passes_per_input"] == 1
    assert result.metrics["model"]["attack_success_rate"] > 0.9
    table = format_comparison(result.metrics)
    assert "| badexpert |" in table and "| max_softmax |" in table and "TPR at 0.1% / 1% / 5% FPR" in table
    paths = write_comparison(tmp_path / "cmp", result)
    assert {p.name for p in paths} == COMPARE_OUTPUTS and (tmp_path / "cmp" / "roc.png").stat().st_size > 1000
    with pytest.raises(BadExpertError, match="--overwrite|overwrite"):
        write_comparison(tmp_path / "cmp", result)


def test_a_failed_implant_fits_no_detector(setting):
    model, attack, splits = setting
    from badexpert.attacks import get_attack

    weak = get_attack("blend", alpha=0.01, target=0)  # not the model's backdoor
    det = _badexpert()
    result = compare(model, [det], splits, weak, log=lambda m: None)
    assert result.metrics["model"]["attack_failed"] and result.metrics["detectors"] == []
    assert not det.is_fitted and "did not implant" in format_comparison(result.metrics)


def test_compare_argument_errors(setting):
    model, attack, splits = setting
    with pytest.raises(BadExpertError, match="listed twice"):
        compare(model, [_badexpert(), "badexpert"], splits, attack, log=lambda m: None)
    with pytest.raises(BadExpertError, match="non-empty list"):
        compare(model, [], splits, attack)
    with pytest.raises(BadExpertError, match="unknown detector 'nope'"):
        compare(model, ["nope"], splits, attack)


def test_two_variants_of_one_detector_compare_side_by_side_under_labels(setting, tmp_path):
    """A mapping of labels to detectors: BaDExpert beside another variant of itself, each
    record labelled, the report and the ROC figure keyed by the labels; unlabelled records keep
    their form (no 'label' key)."""
    model, attack, splits = setting
    plain, other = _badexpert(), BaDExpert(expert_lr=1e-2, aux_lr=0.05, aux_epochs=4, hflip=False, seed=1)
    res = compare(model, {"badexpert": plain, "variant": other}, splits, attack, n_boot=0, throughput=False,
                  log=lambda m: None)
    recs = res.metrics["detectors"]
    assert [r["name"] for r in recs] == ["badexpert", "badexpert"]
    assert "label" not in recs[0] and recs[1]["label"] == "variant"
    assert set(res.arrays) == {"badexpert", "variant"}
    assert recs[0]["auroc"] > 0.9 and recs[1]["auroc"] > 0.9
    a, b = (np.asarray(res.arrays[k]["clean_scores"]) for k in ("badexpert", "variant"))
    assert a.shape == b.shape and not np.allclose(a, b)  # two detectors, not one reported twice
    table = format_comparison(res.metrics)
    assert "| badexpert |" in table and "| variant |" in table
    assert {p.name for p in write_comparison(tmp_path / "cmp", res)} == {"compare.json", "compare.md", "roc.png"}
    for bad in ({"a|b": plain}, {"": plain}):
        with pytest.raises(BadExpertError, match="a compared detector: .label. must be a short name"):
            compare(model, bad, splits, attack, log=lambda m: None)


@pytest.mark.parametrize("argv, match", [
    (["--detectors", "nope"], "unknown detector 'nope'"),
    (["--detectors", ","], "names no detector"),
    (["--detector-param", "n=5"], "DETECTOR:KEY=VALUE"),
    (["--detector-param", "badexpert:bogus=1"], "bogus"),
    (["--fpr", "2"], "fpr"),
])
def test_cli_compare_mistakes_are_one_line_before_any_data_is_read(argv, match, tmp_path, capsys):
    from badexpert.cli import main

    code = main(["compare", "--model", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err
    assert not (tmp_path / "o").exists()


def test_compare_without_an_attack_measures_false_positives(setting):
    """No attack: every detector's realized FPR and clean accuracy after filtering on the test split."""
    model, _, splits = setting
    result = compare(model, [MaxSoftmax()], splits, None, fpr=0.05, log=lambda m: None)
    d = result.metrics["detectors"][0]
    assert d["name"] == "max_softmax" and 0.0 <= d["fpr"] <= 0.05 + 0.04
    assert d["cost"]["forward_passes_per_input"] == 1 and "| max_softmax |" in format_comparison(result.metrics)


def test_a_further_target_fpr_reports_what_calibrating_there_would(setting):
    """``extra_fprs``: each detector is also reported at further targets, at the threshold its
    own calibration scores give there: the numbers a detector calibrated at that target reports,
    without fitting or calibrating again; an unreachable target is one line before any fit."""
    import copy

    model, attack, splits = setting
    det = MaxSoftmax()
    result = compare(model, [det], splits, attack, fpr=0.01, extra_fprs=(0.05, 0.2), n_boot=0, log=lambda m: None)
    record = result.metrics["detectors"][0]
    assert result.metrics["extra_fprs"] == [0.05, 0.2]
    points = {p["fpr_target"]: p for p in record["operating_points"]}
    assert list(points) == [0.05, 0.2]
    for f in (0.05, 0.2):
        again = copy.deepcopy(det).calibrate(splits.calibration, f)
        direct = compare(model, [again], splits, attack, fpr=f, n_boot=0, log=lambda m: None).metrics["detectors"][0]
        for key in ("threshold", "fpr", "fpr_filtered", "realized_fpr", "tpr", "clean_accuracy", "attack_success_rate"):
            assert points[f][key] == pytest.approx(direct[key]), key
    # a looser target rejects more: more clean inputs, more triggered ones
    assert record["fpr"] <= points[0.05]["fpr"] <= points[0.2]["fpr"] and points[0.2]["fpr"] > record["fpr"]
    assert record["attack_success_rate"] >= points[0.05]["attack_success_rate"] >= points[0.2]["attack_success_rate"]
    with pytest.raises(BadExpertError, match="further target FPR 0.0001 cannot be reached with 800 calibration inputs"):
        compare(model, [MaxSoftmax()], splits, attack, extra_fprs=(1e-4,), log=lambda m: None)
    with pytest.raises(BadExpertError, match="extra_fprs"):
        compare(model, [MaxSoftmax()], splits, attack, extra_fprs=(1.5,), log=lambda m: None)
