"""The detector contract, run for every registered detector, and BaDExpert's own behaviour."""

import json
import warnings

import pytest
import torch
from torch import nn

from badexpert.data import to_float
from badexpert.detectors import DETECTORS, BaDExpert, combine, load_detector
from badexpert.errors import BadExpertError
from badexpert.metrics import auroc

# Every detector in the registry must appear here with settings small enough for a unit test, and
# the separation it must reach on the strongly backdoored tiny model (clean test inputs vs triggered
# ones): AUROC, and the share of triggered inputs rejected at a 5% calibrated FPR (None: no claim).
CONTRACT = {
    "badexpert": (lambda: BaDExpert(expert_lr=1e-2, aux_lr=0.1, aux_epochs=4, hflip=False, seed=0), 0.95, 0.8),
    "strip": (lambda: DETECTORS["strip"](n=32, seed=0), 0.97, 0.9),  # measured AUROC 1.000, TPR 1.000 (n=32 and n=100)
    "scale_up": (lambda: DETECTORS["scale_up"](seed=0), 0.85, None),  # measured AUROC 0.887, TPR 0.000: the white-patch target class keeps SPC=1 on 23% of clean inputs, so the 5% threshold sits at SPC=1 (ties)
    "teco": (lambda: DETECTORS["teco"](seed=0), 0.97, 0.9),  # measured AUROC 1.000, TPR 1.000 (seeds 0, 1, 2): the patch breaks under blur/elastic/pixelate (flip at 2-4) and survives noise/brightness (6); clean inputs rarely flip at all (mean score 0.25 vs 1.9 triggered)
    "ibd_psc": (lambda: DETECTORS["ibd_psc"](seed=0), 0.87, 0.3),  # measured AUROC 0.901, TPR 0.362: omega=1.5 never lifts this 3-BN CNN's clean error above xi (0% with 1..3 layers; k=3, so all 5 models amplify every layer), it only sharpens the softmax, more on triggered inputs (PSC 1 - 1e-15 vs 1 - 1e-11; the bare model's confidence gives AUROC 0.35)
    "cd": (lambda: DETECTORS["cd"](steps=30, seed=0), 0.58, 0.05),  # measured AUROC 0.634, TPR 0.087 with steps=30 after the reference's procedure (L1 summed, solid random colour fill, mask from 0.88): on this tiny CNN the masks of patch-triggered inputs are slightly larger than clean ones overall, as on the Fashion-MNIST patch models (tests/test_cd.py, bench/RESULTS.md); the reference's method separates blend-like triggers far better
    "sentinet": (lambda: DETECTORS["sentinet"](n=32, layer="net.features.4", seed=0), 0.55, 0.35),  # measured AUROC 0.609/0.596/0.604, TPR 0.454/0.452/0.449 (seeds 0/1/2; n=32 for speed, n=100 gives AUROC 0.593): Grad-CAM at the last conv (3x3 maps on 12x12 inputs) is too coarse to find the 3x3 corner patch (0.7 of its 9 pixels in the region, AUROC 0.38-0.56), so the 6x6 middle conv is named; even there the region holds ~3.9 of the 9 trigger pixels, so pasted triggers fool only ~62% of clean images (clean inputs ~36%)
    "frequency": (lambda: DETECTORS["frequency"](width=8, epochs=20, seed=0), 0.97, 0.9),  # measured AUROC 0.998/1.000/1.000/1.000/0.998, TPR 0.990/1.000/1.000/1.000/0.995 (seeds 0-4): never queries the model; its DCT CNN, trained on clean vs synthetic random patches/blends/noise/shadows, finds the high-frequency corner patch (epochs=15: AUROC 0.948 with seed 0)
    "ted": (lambda: DETECTORS["ted"](seed=0), 0.97, 0.9),  # measured AUROC 1.000 (tests/test_ted.py): clean inputs rank 0 at every layer, triggered ones ~20 of 80 references until the logits
    # measured AUROC 1.000, TPR 1.000: BaDExpert and Frequency, each fitted on 640 of the 800 reserved
    # images and ranked on the other 160 (tests/test_fusion.py)
    "fusion": (lambda: DETECTORS["fusion"](member_params={
        "badexpert": {"expert_lr": 1e-2, "aux_lr": 0.1, "aux_epochs": 4, "hflip": False},
        "frequency": {"width": 8, "epochs": 20}}, seed=0), 0.97, 0.9),
}
FACTORIES = {name: spec[0] for name, spec in CONTRACT.items()}


def test_every_registered_detector_is_in_the_contract_test():
    assert set(FACTORIES) == set(DETECTORS)


@pytest.fixture(scope="module")
def splits(backdoored):
    model, attack, _, te = backdoored
    reserved, calib, test = te.subset(range(0, 800)), te.subset(range(800, 1600)), te.subset(range(1600, 2400))
    mask = attack.counts(test.labels)
    triggered = attack.apply(test.images[mask])
    return model, reserved, calib, test, triggered


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def fitted(request, splits):
    model, reserved, calib, _, _ = splits
    det = FACTORIES[request.param]()
    assert det.fit(model, reserved) is det
    det.calibrate(calib, fpr=0.05)
    return det


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_detector_keeps_the_contract(name, splits):
    """badexpert.testing.check_detector: parameters, cost, not-fitted errors, fit returns self,
    fitted attributes, repeatable and batch-independent scores, uint8 = float, same seed same
    scores, calibrate/predict, NaN and inf rejected, one-line input errors, the sign on the
    backdoored model, and the save/load round trip (a changed model refused)."""
    from badexpert.testing import check_detector

    model, reserved, _, _, triggered = splits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # IBD-PSC says it degenerates on this tiny CNN (tests/test_ibd_psc.py)
        report = check_detector(FACTORIES[name](), model, reserved.subset(range(256)), triggered=triggered[:40])
    assert report == dict.fromkeys(report, "ok") and len(report) == 15, report


def test_the_model_really_carries_the_backdoor(splits):
    model, _, _, _, triggered = splits
    with torch.no_grad():
        pred = model.eval()(triggered).argmax(1)
    assert (pred == 0).float().mean() > 0.9


def test_higher_score_means_backdoor(fitted, splits):
    _, _, _, test, triggered = splits
    clean, trig = fitted.score(test), fitted.score(triggered)
    assert clean.dtype.is_floating_point and clean.shape == (len(test),)
    assert trig.mean() > clean.mean()
    assert auroc(clean.numpy(), trig.numpy()) > CONTRACT[fitted.name][1]


def test_calibrated_threshold_controls_false_positives(fitted, splits):
    model, _, calib, test, triggered = splits
    with torch.no_grad():
        right = model.eval()(to_float(calib.images)).argmax(1) == calib.labels
    # the paper's protocol: the threshold comes from the calibration inputs the model gets right
    assert fitted.calibration_population_ == "correct" and fitted.calibration_size_ == int(right.sum())
    assert fitted.threshold_ is not None and fitted.fpr_target_ == 0.05
    assert fitted.predict(calib.images[right]).float().mean() <= 0.05
    realized = fitted.predict(test).float().mean().item()
    assert realized <= 0.05 + 0.03  # 800 fresh clean inputs: binomial noise around <= 5%
    flags = fitted.predict(triggered)
    assert flags.dtype == torch.bool and torch.equal(flags, fitted.score(triggered) > fitted.threshold_)
    if CONTRACT[fitted.name][2] is not None:  # None: the detector makes no claim at this FPR (see its entry)
        assert flags.float().mean() > CONTRACT[fitted.name][2]


def test_calibration_population(splits, tmp_path):
    """``correct`` (the default) sets the threshold on the calibration inputs the model classifies
    correctly, ``all`` on every one; each is the conformal quantile of exactly those scores."""
    from badexpert.metrics import conformal_threshold

    model, reserved, calib, _, _ = splits
    det = FACTORIES["strip"]().fit(model, reserved)
    # a quarter of the labels wrong: the model now "misclassifies" those inputs
    labels = calib.labels.clone()
    labels[::4] = (labels[::4] + 1) % 4
    scores = det.score(calib.images)
    with torch.no_grad():
        right = model.eval()(to_float(calib.images)).argmax(1) == labels
    assert 500 < int(right.sum()) < 700
    det.calibrate((calib.images, labels), fpr=0.05)
    assert det.calibration_population_ == "correct" and det.calibration_size_ == int(right.sum())
    assert det.threshold_ == pytest.approx(conformal_threshold(scores[right].numpy(), 0.05))
    # clean traffic is rejected at the target on what the model gets right, at the measured rate on the rest
    wrong_rejected = int((scores[~right] > det.threshold_).sum())
    assert wrong_rejected > 0
    assert det.clean_rejection_rate_ == pytest.approx((int(right.sum()) * 0.05 + wrong_rejected) / len(calib))
    det.calibrate(calib.images, fpr=0.05, population="all")  # no labels needed
    assert det.calibration_population_ == "all" and det.calibration_size_ == len(calib)
    assert det.clean_rejection_rate_ == pytest.approx(0.05)
    assert det.threshold_ == pytest.approx(conformal_threshold(scores.numpy(), 0.05))
    for args, kwargs, msg in [
        ((calib.images, 0.05), {}, r"needs the calibration labels .* or population='all'"),
        ((calib, 0.05), {"population": "wrong"}, "population"),
        (((calib.images, (calib.labels + 1) % 4), 0.05), {}, "classifies none of the 800 calibration images"),
    ]:
        with pytest.raises(BadExpertError, match=msg) as err:
            det.calibrate(*args, **kwargs)
        assert "\n" not in str(err.value)
    # the population travels with the saved detector
    det.calibrate((calib.images, labels), fpr=0.05)
    path = det.save(tmp_path / "strip.safetensors")
    loaded = load_detector(path, model)
    assert loaded.calibration_population_ == "correct" and loaded.threshold_ == det.threshold_
    assert loaded.clean_rejection_rate_ == det.clean_rejection_rate_
    # a file written before the population was recorded was calibrated on every input
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["badexpert"])
    del meta["calibration_population"], meta["clean_rejection_rate"]
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata={"badexpert": json.dumps(meta)})
    old = load_detector(tmp_path / "old.safetensors", model)
    assert old.calibration_population_ == "all" and old.clean_rejection_rate_ == old.fpr_target_


def test_load_errors(fitted, splits, tmp_path):
    from badexpert.models import build_model

    path = fitted.save(tmp_path / "det.safetensors")
    other = build_model("cnn", in_channels=1, num_classes=4, image_size=12, width=16)
    with pytest.raises(BadExpertError, match="fitted on model sha256:[0-9a-f]+ but was given model sha256:"):
        load_detector(path, other)
    # same architecture and shapes, one weight changed: still another model
    import copy

    tampered = copy.deepcopy(splits[0])
    with torch.no_grad():
        next(tampered.parameters()).view(-1)[0] += 1e-3
    with pytest.raises(BadExpertError, match="but was given model sha256:.*\\(m2.safetensors\\)"):
        load_detector(path, tampered, model_name="m2.safetensors")
    assert load_detector(path, splits[0]).threshold_ == fitted.threshold_
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BadExpertError, match="corrupt or wrong format"):
        load_detector(bad, splits[0])
    with pytest.raises(BadExpertError, match="does not exist"):
        load_detector(tmp_path / "none.safetensors", splits[0])


# --- BaDExpert specifics ------------------------------------------------------------------------
def test_score_rules_by_hand():
    x = torch.tensor([0.9, 0.05, 0.5])
    y = torch.tensor([0.1, 0.95, 0.5])
    assert torch.allclose(combine(x, y, "ratio"), -y / x)
    assert torch.allclose(combine(x, y, "logratio"), torch.log(x) - torch.log(y))
    logit = lambda p: torch.log(p / (1 - p))  # noqa: E731
    assert torch.allclose(combine(x, y, "logodds"), logit(x) - logit(y))
    tri = combine(x, y, "triangle")
    assert tri[0].item() == pytest.approx(-min(2 * 0.1 / 0.9, 0.1 / 0.4))
    assert tri[1].item() == pytest.approx(-(2 * 0.95 / 0.05))  # y > 0.5: second term clamps to 0.05 / 1e-8
    assert torch.equal(combine(x, y, "expert"), x) and torch.equal(combine(x, y, "auxiliary"), -y)
    # the log-ratio ranks inputs exactly as the ratio does
    xs, ys = torch.rand(500) * 0.98 + 0.01, torch.rand(500) * 0.98 + 0.01
    assert torch.equal(combine(xs, ys, "ratio").argsort(), combine(xs, ys, "logratio").argsort())
    with pytest.raises(BadExpertError, match="unknown score rule"):
        combine(x, y, "square")


def test_auto_preset_chooses_strengths_from_clean_data_only(splits):
    model, reserved, _, test, triggered = splits
    # crops forced on: on these easy blobs only the shifted inputs make the auxiliary model's
    # accuracy dip (without them even lr 1.0 keeps 100%), which is the rule under test here
    det = BaDExpert(hflip=False, augment=True, seed=0).fit(model, reserved)
    rep = det.fit_report_
    assert rep["holdout_size"] == 160 and rep["fit_size"] == 640
    ex = rep["expert"]
    # at least the paper's one epoch (5 steps here), then until it agrees with M on <= 90% of held-out
    # clean inputs; larger lrs only if the step budget runs out first
    assert ex["rule"] == "auto" and ex["reached_target"] and ex["agreement"] <= det.expert_agreement
    assert ex["steps"] >= 5
    assert all(t["agreement"] > det.expert_agreement for t in ex["trace"][:-1])
    aux = rep["auxiliary"]
    # the smallest probed lr whose held-out accuracy dips in the first epoch, then a full run that recovers
    assert aux["probes"][-1]["lowest_accuracy"] <= aux["dip_target"]
    assert all(p["lowest_accuracy"] > aux["dip_target"] for p in aux["probes"][:-1])
    assert aux["accuracy"] >= aux["recover_target"] == det.aux_recover * aux["model_accuracy"]
    # the expert began to forget the clean task but kept the backdoor
    with torch.no_grad():
        clean_agree = (det.expert_(to_float(test.images)).argmax(1) == model(to_float(test.images)).argmax(1)).float().mean()
        kept = (det.expert_(triggered).argmax(1) == 0).float().mean()
    assert clean_agree < 0.95 and kept > 0.9
    assert det.rule == "logodds"
    assert auroc(det.score(test).numpy(), det.score(triggered).numpy()) > 0.95


def test_auto_finetunes_only_with_the_augmentations_the_model_is_invariant_to(splits, blobs, tmp_path):
    """``augment=None`` under ``auto``: crops (flips) only where M keeps ``augment_accuracy`` of
    its held-out accuracy on cropped (flipped) inputs, i.e. where it was trained with them."""
    from badexpert.models import build_model
    from badexpert.training import Recipe, train

    model, reserved, _, _, _ = splits  # trained without augmentation
    tr, _ = blobs
    rep = BaDExpert(hflip=True, expert_lr=1e-2, aux_lr=0.1, aux_epochs=1, seed=0).fit(model, reserved).fit_report_
    aug = rep["augmentation"]
    assert aug["rule"] == "auto" and aug["cropped_accuracy"] < 0.9 * aug["accuracy"] and not aug["crop"]
    assert aug["flip"] == (aug["flipped_accuracy"] >= 0.9 * aug["accuracy"])
    # the same architecture trained with crops and flips keeps its accuracy on them: both are used
    crop_trained = build_model("cnn", in_channels=1, num_classes=4, image_size=12, mean=tr.mean, std=tr.std, width=8)
    train(crop_trained, tr, Recipe(optimizer="adam", lr=3e-3, epochs=6, batch_size=64, weight_decay=0,
                                   schedule="cosine", augment=True, hflip=True), seed=0)
    det = BaDExpert(hflip=True, expert_lr=1e-2, aux_lr=0.1, aux_epochs=1, seed=0).fit(crop_trained.eval(), reserved)
    aug = det.fit_report_["augmentation"]
    assert aug["crop"] and aug["flip"] and aug["cropped_accuracy"] >= 0.9 * aug["accuracy"]
    assert det.aux_recipe(0.1).augment and det.aux_recipe(0.1).pad is None and det.aux_recipe(0.1).hflip
    assert "crops and flips" in det.fit_summary()
    det.calibrate(splits[2], fpr=0.05)
    loaded = load_detector(det.save(tmp_path / "aug.safetensors"), crop_trained)
    assert loaded.augmentation_ == det.augmentation_  # the choice travels with the file (fit report)
    det.augmentation_ = None  # as loaded from a file written before the choice was recorded
    assert "finetuned" not in det.fit_summary()
    # fixed choices, and the paper preset, do not measure
    assert BaDExpert(augment=False, hflip=True, expert_lr=1e-2, aux_lr=0.1, aux_epochs=1, seed=0).fit(
        crop_trained.eval(), reserved).fit_report_["augmentation"] == {"crop": False, "flip": False, "rule": "fixed"}


def test_auxiliary_that_does_not_recover_is_replaced_by_a_gentler_one(splits):
    """An auxiliary run that stays below aux_recover x the model's held-out accuracy is replaced by
    the next smaller learning rate, down the ladder; the last run trained is the one kept."""
    from badexpert.detectors.badexpert import AUX_LR_LADDER

    model, reserved, _, _, _ = splits
    common = dict(hflip=False, augment=True, seed=0, expert_lr=1e-2, aux_epochs=1)  # crops: see above
    easy = BaDExpert(aux_recover=0.0, **common).fit(model, reserved).fit_report_["auxiliary"]
    assert len(easy["runs"]) == 1
    strict = BaDExpert(aux_recover=1.0, **common).fit(model, reserved)  # must match the model's own accuracy
    rep = strict.fit_report_["auxiliary"]
    runs, target = rep["runs"], rep["recover_target"]
    lrs = [r["lr"] for r in runs]
    assert len(runs) > 1 and lrs == sorted(lrs, reverse=True) and lrs[0] == easy["lr"]
    assert all(r["accuracy"] < target for r in runs[:-1])
    assert strict.aux_lr_ == lrs[-1] and (runs[-1]["accuracy"] >= target or lrs[-1] == AUX_LR_LADDER[0])


def test_paper_preset_runs_the_research_settings(splits):
    model, reserved, _, _, _ = splits
    det = BaDExpert(preset="paper", aux_epochs=2, hflip=False)
    assert det.rule == "triangle"
    det.fit(model, reserved)
    assert det.expert_lr_ == 1e-4 and det.aux_lr_ == 0.1 and det.fit_report_["fit_size"] == 800


def test_works_with_a_users_own_module(blobs):
    """Any nn.Module mapping float images to logits works, not only the project's architectures."""
    from badexpert.attacks import get_attack
    from badexpert.training import Recipe, train
    from badexpert.utils import derive_generator

    tr, te = blobs
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 64), nn.ReLU(), nn.Linear(64, 4))
    attack = get_attack("badnet", poison_rate=0.05)
    train(model, attack.poison(tr, derive_generator(0, "p")),
          Recipe(optimizer="adam", lr=3e-3, epochs=8, batch_size=64, weight_decay=0, augment=False))
    det = BaDExpert(expert_lr=3e-3, aux_lr=0.03, aux_epochs=4, hflip=False).fit(model, te.subset(range(800)))
    test = te.subset(range(1600, 2400))
    trig = attack.apply(test.images[attack.counts(test.labels)])
    assert auroc(det.score(test).numpy(), det.score(trig).numpy()) > 0.9


# --- scikit-learn conventions, cost, seeded randomness (every detector) --------------------------
def test_input_generators_depend_on_the_input_not_the_batch(splits):
    det = FACTORIES["badexpert"]()
    x = splits[3].images[:6]
    draw = lambda gens: torch.stack([torch.rand(4, generator=g) for g in gens])  # noqa: E731
    a = draw(det.input_generators(x))
    b = draw(det.input_generators(x.flip(0))).flip(0)  # another order
    c = torch.cat([draw(det.input_generators(x[:2])), draw(det.input_generators(to_float(x[2:])))])  # other batches
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, draw(det.set_params(seed=1).input_generators(x)))
    assert not torch.equal(a, draw(det.set_params(seed=0).input_generators(x, "other")))


def test_diagnostics_and_decision_space_come_from_the_detector(splits):
    """evaluate() records what the detector itself reports (BaDExpert: the AUROC every score rule
    would give on its models; its own rule's equals the evaluation's AUROC) and plots the decision
    space the detector declares; a detector declaring none gets no scatter."""
    from badexpert.attacks import get_attack
    from badexpert.detectors import SCORES
    from badexpert.evaluation.core import evaluate

    model, reserved, calib, test, _ = splits
    attack = get_attack("badnet", target=0)
    det = FACTORIES["badexpert"]().fit(model, reserved).calibrate(calib, 0.05)
    res = evaluate(model, det, test, attack, n_boot=20, throughput=False)
    rules = res.metrics["defense"]["diagnostics"]["auroc_by_score_rule"]
    assert set(rules) == set(SCORES) and rules[det.rule] == pytest.approx(res.metrics["defense"]["auroc"], abs=1e-9)
    assert res.arrays["clean_xy"].shape == (len(test), 2) and res.arrays["scatter_axes"]["x"] == "x"
    other = DETECTORS["scale_up"](seed=0).fit(model, reserved).calibrate(calib, 0.05)
    res = evaluate(model, other, test, attack, n_boot=20, throughput=False)
    assert "clean_xy" not in res.arrays and "diagnostics" not in res.metrics["defense"]
