"""The fusion detector (issue 20's pairing of BaDExpert with a detector of another kind): each
member's score ranked against its own held-out clean references (a conformal p-value with an
exponential tail), the largest surprise over the members, one calibrated threshold. The rank
transform's arithmetic, the union's behaviour (it catches what either member catches), the model's
pass shared, files and guards, and one-line mistakes."""

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from badexpert import Guard
from badexpert.detectors import DETECTORS, Fusion, get_detector, load_detector
from badexpert.detectors.fusion import surprise, tail_scale
from badexpert.errors import BadExpertError
from badexpert.metrics import auroc

FAST = {"badexpert": {"expert_lr": 1e-2, "aux_lr": 0.1, "aux_epochs": 4, "hflip": False},
        "frequency": {"width": 8, "epochs": 20}}


@pytest.fixture(scope="module")
def splits(backdoored):
    model, attack, _, te = backdoored
    reserved, calib, test = te.subset(range(0, 800)), te.subset(range(800, 1600)), te.subset(range(1600, 2400))
    triggered = attack.apply(test.images[attack.counts(test.labels)])
    return model, reserved, calib, test, triggered


@pytest.fixture(scope="module")
def fused(splits):
    model, reserved, calib, _, _ = splits
    return Fusion(member_params=FAST).fit(model, reserved).calibrate(calib, fpr=0.05)


# --- the rank transform ----------------------------------------------------------------------------
def test_at_each_reference_the_surprise_is_the_conformal_p_value_of_the_references_above_it():
    ref = torch.tensor([0.0, 1.0, 2.0, 4.0, 8.0])
    s = surprise(ref, ref, tail_scale=1.0)
    above = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])  # references strictly above each one
    assert torch.allclose(s, -torch.log((1 + above) / 6).double())
    # below every reference: as at the smallest (flat); halfway between two: interpolated
    assert surprise(torch.tensor([-5.0]), ref, 1.0).item() == pytest.approx(math.log(6 / 5))
    assert surprise(torch.tensor([3.0]), ref, 1.0).item() == pytest.approx(math.log(6) - math.log1p(1.5))


def test_past_the_largest_reference_the_surprise_grows_by_one_per_tail_scale():
    ref = torch.arange(10.0)
    s = surprise(torch.tensor([9.0, 10.0, 13.0]), ref, tail_scale=2.0)
    assert s.tolist() == pytest.approx([math.log(11), math.log(11) + 0.5, math.log(11) + 2.0])


def test_the_surprise_is_continuous_and_non_decreasing_and_keeps_nan():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(200, generator=g).sort().values
    grid = torch.linspace(-5, 8, 20001)
    s = surprise(grid, ref, tail_scale(ref))
    assert bool((s[1:] >= s[:-1] - 1e-12).all())
    # no jump at any reference: approached from either side, the same value
    eps = 1e-9
    at = surprise(ref, ref, 1.0)
    assert torch.allclose(surprise(ref - eps, ref, 1.0), at, atol=1e-5)
    assert torch.allclose(surprise(ref + eps, ref, 1.0), at, atol=1e-5)
    assert math.isnan(surprise(torch.tensor([float("nan")]), ref, 1.0).item())


def test_the_tail_scale_is_the_mean_excess_over_the_top_tenth_with_fallbacks():
    ref = torch.arange(100.0)  # 90% quantile 90: the excesses 1..9
    assert tail_scale(ref) == pytest.approx(5.0)
    assert tail_scale(torch.full((20,), 3.0)) == 1.0  # no spread at all
    ties_at_top = torch.cat([torch.arange(10.0), torch.full((10,), 20.0)])
    assert tail_scale(ties_at_top) == pytest.approx(float(ties_at_top.std()))


# --- on the backdoored model -----------------------------------------------------------------------
def test_members_fit_on_one_share_and_are_ranked_on_the_rest(fused, splits):
    _, reserved, _, _, _ = splits
    report = fused.fit_report()
    assert report["held_out"] == 160 and report["fitting_images"] == 640
    assert [m.name for m in fused.members_] == ["badexpert", "frequency"]
    for m, ref in zip(fused.members_, fused.references_):
        assert len(m.fit_hashes_) == 640 and len(ref) == report["references"]
        # the references are held out from the member's fitting, but are reserved images
        assert not bool(torch.isin(fused.fit_hashes_, m.fit_hashes_).all())
        assert bool(torch.isin(m.fit_hashes_, fused.fit_hashes_).all())
    assert len(fused.fit_hashes_) == len(reserved)


def test_references_are_the_held_out_images_the_model_gets_right_unless_told_otherwise(splits):
    """A clean image the model misclassifies looks suspicious to a member that reads the model: with
    the calibration's default population, only the held-out images the model gets right rank the
    members' scores; reference_population="all" keeps every one."""
    model, reserved, _, _, _ = splits
    labels = reserved.labels.clone()
    labels[::5] = (labels[::5] + 1) % 4  # a fifth of the labels wrong: the model "misclassifies" them
    data = (reserved.images, labels)
    order = torch.randperm(800, generator=torch.Generator().manual_seed(0))
    held = order[:160].sort().values
    with torch.no_grad():
        right = model(reserved.images[held].float() / 255).argmax(1) == labels[held]
    assert 100 < int(right.sum()) < 150
    params = {"members": ("strip", "ted"), "member_params": {"strip": {"n": 16}}}
    correct = Fusion(**params).fit(model, data)
    every = Fusion(reference_population="all", **params).fit(model, data)
    assert correct.fit_report()["references"] == int(right.sum()) == len(correct.references_[0])
    assert every.fit_report()["references"] == 160 == len(every.references_[0])
    strip_scores = correct.members_[0].score(reserved.images[held]).double().sort().values
    assert torch.equal(every.references_[0], strip_scores)
    with pytest.raises(BadExpertError, match="classifies 0 of its 160 held-out reference images correctly") as err:
        wrong = (model(reserved.images.float() / 255).argmax(1) + 1) % 4  # every label wrong
        Fusion(members=("strip", "scale_up"), member_params={"strip": {"n": 16}}).fit(model, (reserved.images, wrong))
    assert "\n" not in str(err.value)


def test_a_model_left_in_train_mode_scores_as_in_eval_mode(fused, splits):
    _, _, _, test, _ = splits
    x = test.images[:64]
    expected = fused.score(x)
    fused.model_.train()
    try:
        assert torch.equal(fused.score(x), expected) and fused.model_.training
    finally:
        fused.model_.eval()


def test_the_score_is_the_largest_member_surprise(fused, splits):
    _, _, _, test, triggered = splits
    x = torch.cat([test.images[:50], (triggered[:50] * 255).round().to(torch.uint8)])
    d = fused.score_details(x)
    for m, ref, t in zip(fused.members_, fused.references_, fused.tail_scales_):
        raw = m.score(x).double()
        assert torch.allclose(torch.from_numpy(d[f"{m.name}_score"]), raw, atol=1e-5)
        assert torch.allclose(torch.from_numpy(d[f"{m.name}_surprise"]), surprise(raw, ref, t), atol=1e-4)
    expected = torch.maximum(torch.from_numpy(d["badexpert_surprise"]), torch.from_numpy(d["frequency_surprise"]))
    assert torch.allclose(torch.from_numpy(d["score"]).double(), expected, atol=1e-4)
    assert torch.allclose(fused.score(x).double(), expected, atol=1e-4)


def test_it_separates_the_backdoor_and_keeps_the_target_fpr(fused, splits):
    _, _, _, test, triggered = splits
    clean, trig = fused.score(test), fused.score(triggered)
    assert auroc(clean.numpy(), trig.numpy()) > 0.97
    assert fused.predict(test).float().mean().item() <= 0.05 + 0.03  # 800 fresh clean inputs
    assert fused.predict(triggered).float().mean().item() > 0.9


def test_a_useless_member_costs_little_of_a_strong_ones_detection(splits):
    """The union rule's price: a member that cannot see the trigger spends part of the FPR budget,
    but an input the strong member finds very surprising is still rejected."""
    model, reserved, calib, test, triggered = splits
    strong = get_detector("badexpert", **FAST["badexpert"]).fit(model, reserved.subset(range(640)))
    strong.calibrate(calib, fpr=0.05)
    # scale_up on this model: the white-patch target class keeps its label under scaling on clean
    # inputs too (tests/test_detectors.py), a weak member here
    pair = Fusion(members=("badexpert", "scale_up"), member_params={"badexpert": FAST["badexpert"]})
    pair.fit(model, reserved).calibrate(calib, fpr=0.05)
    tpr_strong = strong.predict(triggered).float().mean().item()
    tpr_pair = pair.predict(triggered).float().mean().item()
    assert tpr_pair >= tpr_strong - 0.05
    assert auroc(pair.score(test).numpy(), pair.score(triggered).numpy()) > 0.95
    # the members' own view of the triggered inputs: badexpert is the one surprised
    d = pair.diagnostics(pair.score_details(test), pair.score_details(triggered))
    assert d["most_surprised_member"]["triggered"]["badexpert"] > 0.9


def test_the_model_runs_once_for_the_members_that_read_its_logits(fused, splits):
    model, _, _, test, _ = splits
    # badexpert reads the logits (3 passes, one of them the model's), frequency runs its own CNN (1)
    assert fused.cost == {"forward": 4, "backward": 0} and fused.shares_model_pass
    calls = []
    hook = fused.model_.register_forward_hook(lambda *a: calls.append(1))
    try:
        fused.score(test.images[:10])
    finally:
        hook.remove()
    assert len(calls) == 1
    guard = Guard(model, fused)
    assert guard.forward_passes_per_input == 4
    out = guard(test.images[:64])
    assert torch.allclose(out.score, fused.score(test.images[:64]), atol=1e-5)
    assert torch.equal(out.reject, fused.predict(test.images[:64]))


def test_the_file_holds_every_member_and_round_trips(fused, splits, tmp_path):
    model, _, _, test, triggered = splits
    path = fused.save(tmp_path / "fusion.safetensors")
    back = load_detector(path, model)
    assert isinstance(back, Fusion) and back.threshold_ == fused.threshold_
    assert [type(m) for m in back.members_] == [type(m) for m in fused.members_]
    assert torch.equal(back.score(triggered), fused.score(triggered))
    # a damaged reference record is refused in one line, never used
    tensors = load_file(str(path))
    tensors["reference1"] = tensors["reference1"].flip(0)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(BadExpertError, match="reference scores are missing or malformed") as err:
        load_detector(tmp_path / "bad.safetensors", model)
    assert "\n" not in str(err.value)


# --- mistakes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, message", [
    ({"members": ["badexpert"]}, "at least two detectors"),
    ({"members": ["badexpert", "BaDExpert"]}, "names a detector twice"),
    ({"members": ["badexpert", "fusion"]}, "cannot be a member of a fusion"),
    ({"members": ["badexpert", "nope"]}, "unknown detector 'nope'"),
    ({"member_params": {"strip": {"n": 10}}}, "names 'strip', which is not among the members"),
    ({"member_params": {"frequency": 3}}, "must be an object of that detector's parameters"),
    ({"member_params": {"frequency": {"width": -1}}}, "detector 'frequency' parameter 'width'"),
    ({"member_params": {"frequency": {"colour": 1}}}, "detector 'frequency' has no parameter"),
    ({"reference_share": 1.0}, "parameter 'reference_share'"),
    ({"members": "badexpert"}, "parameter 'members' must be a list"),
])
def test_parameter_mistakes_are_one_line(params, message):
    with pytest.raises(BadExpertError, match=message) as err:
        get_detector("fusion", **params)
    assert "\n" not in str(err.value)
    det = Fusion()
    with pytest.raises(BadExpertError, match=message):
        det.set_params(**params)
    assert det.members == ("badexpert", "frequency") and det.member_params is None


def test_too_few_clean_images_for_the_references_is_one_line(splits):
    model, reserved, _, _, _ = splits
    with pytest.raises(BadExpertError, match="leave 6 to rank the members' scores") as err:
        Fusion(members=("strip", "ted")).fit(model, reserved.subset(range(30)))
    assert "\n" not in str(err.value)


def test_a_members_own_refusal_says_which_member_and_how_many_images_it_had(splits):
    model, reserved, _, _, _ = splits
    with pytest.raises(BadExpertError, match=r"fusion member 'ted', fitted on 80 of the 100 reserved images "
                                             r"\(the rest rank its scores\): TED: 80 clean fitting images") as err:
        Fusion(members=("ted", "strip"), member_params={"ted": {"references_per_class": 30}}).fit(
            model, reserved.subset(range(100)))
    assert "\n" not in str(err.value)


def test_members_take_the_fusions_seed_unless_told_otherwise():
    det = get_detector("fusion", seed=7, member_params={"frequency": {"seed": 3}})
    seeds = {m.name: m.seed for m in det._build_members()}
    assert seeds == {"badexpert": 7, "frequency": 3}
    assert "fusion" in DETECTORS and DETECTORS.canonical("Fusion") == "fusion"


def test_defend_builds_a_fusion_from_the_command_line(tmp_path, capsys):
    from badexpert.cli import main
    from badexpert.io import load_model

    from .conftest import train_blobs_model

    data, model_path = train_blobs_model(tmp_path)
    out = tmp_path / "det.safetensors"
    argv = ["defend", "--model", str(model_path), "--clean", str(data / "test"), "--holdout", "60", "--fpr", "0.05",
            "--device", "cpu", "--method", "fusion", "--out", str(out)]
    assert main([*argv, "--detector-param", 'members=["strip"]']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "at least two detectors" in err[-1] and not out.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*argv, "--detector-param", 'members=["ted", "strip"]',
                     "--detector-param", 'member_params={"strip": {"n": 16}}']) == 0
    model, _ = load_model(model_path)
    det = load_detector(out, model)
    assert det.members == ("ted", "strip") and det.members_[1].n == 16 and hasattr(det, "threshold_")


def test_a_model_free_member_is_fitted_once_per_split_and_moved_to_the_next_model(splits):
    """Frequency never reads the model: a second fusion on another model and the same split reuses
    its fit (bit for bit the same scores) instead of training its network again."""
    import copy

    from badexpert.detectors import fusion as fusion_module

    model, reserved, _, test, _ = splits
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)  # another suspect model: another fingerprint
    params = {"members": ("ted", "frequency"), "member_params": {"frequency": FAST["frequency"]}}
    first = Fusion(**params).fit(model, reserved)
    fits = []
    original = fusion_module.Detector.fit

    def counting(self, *a, **k):
        fits.append(self.name)
        return original(self, *a, **k)

    fusion_module.Detector.fit = counting
    try:
        second = Fusion(**params).fit(other, reserved)
    finally:
        fusion_module.Detector.fit = original
    assert fits == ["fusion", "ted"]  # the fusion and its model-reading member; not frequency
    f1, f2 = first.members_[1], second.members_[1]
    assert f2.model_fingerprint_ == second.model_fingerprint_ != first.model_fingerprint_
    assert torch.equal(f1.score(test.images[:64]), f2.score(test.images[:64]))
    # another split (another seed): fitted afresh
    third = Fusion(seed=1, **params).fit(other, reserved)
    assert not torch.equal(third.members_[1].score(test.images[:64]), f1.score(test.images[:64]))


def test_a_grid_runs_a_labelled_fusion_and_resumes_it_from_the_cache(tmp_path):
    """A grid detector entry: the fusion under its label beside its members, fitted once, saved in
    the grid's cache and loaded from it when the row is computed again."""
    from badexpert.pipeline.grid import run_grid

    from .conftest import write_blobs
    from .test_grid import make_grid

    grid = make_grid(write_blobs(tmp_path / "data"))
    grid.update(attacks=[{"name": "badnet", "params": {"poison_rate": 0.1}}], seeds=[0],
                detectors=["ted", "scale_up", {"name": "fusion", "label": "ted+scale_up",
                                               "params": {"members": ["ted", "scale_up"],
                                                          # 80 fitting images: fewer references per class
                                                          "member_params": {"ted": {"references_per_class": 10}}}}])
    rows = run_grid(grid, tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None)
    by = {r["detector"]: r for r in rows}
    assert set(by) == {"ted", "scale_up", "ted+scale_up"}
    fused = by["ted+scale_up"]
    assert fused["detector_params"]["members"] == ["ted", "scale_up"] and not fused["detector_cached"]
    assert fused["auroc_filtered"] > 0.95 and fused["asr_after"] < 0.2
    assert fused["forward_passes"] == 1 + 6  # ted's pass is the model's own; scale_up's six
    (tmp_path / "out" / "results.jsonl").write_text("")  # the rows lost: computed again from the cache
    import shutil

    shutil.rmtree(tmp_path / "cache" / "rows")  # (not taken from the grid's row cache)
    again = {r["detector"]: r for r in run_grid(grid, tmp_path / "out", cache_dir=tmp_path / "cache",
                                                log=lambda m: None)}
    assert again["ted+scale_up"]["detector_cached"]
    for k in ("auroc", "auroc_filtered", "asr_after", "fpr"):
        assert again["ted+scale_up"][k] == fused[k]
