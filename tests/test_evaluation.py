import numpy as np
import pytest
import torch

from badexpert.detectors import BaDExpert
from badexpert.errors import NotFittedError
from badexpert.evaluation.core import evaluate, trigger_dataset
from badexpert.models import build_model
from badexpert.training import Recipe, train


@pytest.fixture(scope="module")
def parts(backdoored):
    model, attack, _, te = backdoored
    det = BaDExpert(expert_lr=1e-2, aux_lr=0.1, aux_epochs=4, hflip=False).fit(model, te.subset(range(800)))
    det.calibrate(te.subset(range(800, 1600)), 0.05)
    return model, attack, det, te.subset(range(1600, 2400))


def test_trigger_dataset_keeps_only_inputs_that_count(parts):
    _, attack, _, test = parts
    trig, targets = trigger_dataset(attack, test)
    assert len(trig) == int((test.labels != 0).sum()) and (trig.labels != 0).all() and (targets == 0).all()
    src = torch.tensor(trig.meta["source_indices"])
    assert torch.equal(trig.images, (attack.apply(test.images[src]) * 255).round().to(torch.uint8))


def test_metrics_are_consistent(parts):
    model, attack, det, test = parts
    r = evaluate(model, det, test, attack, n_boot=100, throughput=False)
    m, d = r.metrics, r.metrics["defense"]
    assert m["attack_failed"] is False and m["attack_success_rate"] > 0.9
    assert d["clean_accuracy"] <= m["clean_accuracy"] and d["attack_success_rate"] <= m["attack_success_rate"]
    assert d["clean_accuracy_drop"] == pytest.approx(m["clean_accuracy"] - d["clean_accuracy"])
    # recompute the after-defense numbers by hand from the per-input arrays
    rejected_clean = r.arrays["clean_scores"] > det.threshold_
    rejected_trig = r.arrays["trig_scores"] > det.threshold_
    assert d["fpr"] == pytest.approx(rejected_clean.mean())
    assert d["tpr"] == pytest.approx(rejected_trig.mean())
    assert d["attack_success_rate"] == pytest.approx((r.arrays["trig_success"] & ~rejected_trig).mean())
    assert d["clean_accuracy"] == pytest.approx((r.arrays["clean_correct"] & ~rejected_clean).mean())
    assert set(d["per_class_false_rejection"]) == set(test.classes)
    assert np.allclose(r.arrays["clean_scores"], det.score(test).numpy())


def test_a_backdoor_that_did_not_implant_gets_no_detection_numbers(blobs, parts):
    _, attack, det, test = parts
    tr, _ = blobs
    torch.manual_seed(0)
    clean_model = build_model("cnn", in_channels=1, num_classes=4, image_size=12, mean=tr.mean, std=tr.std, width=8)
    train(clean_model, tr, Recipe(optimizer="adam", lr=3e-3, epochs=3, batch_size=64, weight_decay=0, augment=False))
    r = evaluate(clean_model, None, test, attack, asr_bar=0.5)
    assert r.metrics["attack_failed"] is True and "did not implant" in r.metrics["message"]
    assert r.metrics["attack_success_rate"] < 0.5 and "defense" not in r.metrics


def test_evaluate_needs_a_calibrated_detector(parts):
    model, attack, _, test = parts
    with pytest.raises(NotFittedError):
        evaluate(model, BaDExpert(), test, attack)


def test_defense_records_round_trip_and_name_what_is_missing(parts):
    from badexpert.errors import BadExpertError
    from badexpert.evaluation.records import DefenseRecord

    model, attack, det, test = parts
    d = evaluate(model, det, test, attack, n_boot=20, throughput=False, noisy_clean=True).metrics["defense"]
    rec = DefenseRecord.from_dict(d)
    assert rec.to_dict() == d and list(rec.to_dict()) == list(d)  # the same keys, in the same order
    assert rec.detection and rec.auroc == d["auroc"] and rec.auroc_noisy == d["auroc_noisy"]
    assert rec.tpr_at("1%") == d["tpr_at_fpr"]["1%"] and rec.forward_passes == det.cost["forward"]
    assert rec.throughput_ratio is None  # not measured (throughput=False), said as None, not guessed
    assert rec.seconds == pytest.approx(sum(v for v in d["timings"].values() if v is not None))
    # measured on clean inputs only: the detection fields are None and absent from the JSON form
    clean = evaluate(model, det, test, None).metrics["defense"]
    rec = DefenseRecord.from_dict(clean)
    assert not rec.detection and rec.auroc is None and rec.tpr_at("1%") is None and rec.to_dict() == clean
    # a key this build does not know is kept; a missing one is a one-line error naming it
    assert DefenseRecord.from_dict({**d, "later": 1}).to_dict()["later"] == 1
    with pytest.raises(BadExpertError, match="a defense record lacks 'realized_fpr'"):
        DefenseRecord.from_dict({k: v for k, v in d.items() if k != "realized_fpr"})
    with pytest.raises(BadExpertError, match="must be a JSON object"):
        DefenseRecord.from_dict([d])


def test_the_attack_describes_its_target_once_and_the_report_prints_it(parts):
    """The record carries the attack's own description of its target (all-to-all, source classes);
    the report prints that string and never rebuilds the attack to ask it."""
    from badexpert.attacks import get_attack
    from badexpert.evaluation.records import EvaluationRecord
    from badexpert.reporting.report import _what_was_run

    model, _, det, test = parts
    a2a = get_attack("all_to_all", poison_rate=0.1)
    r = evaluate(model, None, test, a2a, asr_bar=0.0)
    assert "(y + 1) mod C" in r.metrics["target"]
    src = get_attack("badnet", poison_rate=0.1, source_classes=(1,))
    m = evaluate(model, None, test, src, asr_bar=0.0).metrics
    assert m["target"] == src.describe_target(test.classes) and "source class(es) 1 (c1)" in m["target"]
    lines = "\n".join(_what_was_run(EvaluationRecord.from_dict({**m, "attack": {"name": "not-a-registered-attack"}})))
    assert m["target"] in lines
