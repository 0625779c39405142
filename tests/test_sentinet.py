"""SentiNet: the Grad-CAM region, the clean decision boundary, the model left untouched, seeded
per-input draws, parameters and persistence."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from badexpert.data import to_float
from badexpert.detectors import SentiNet, get_detector, load_detector
from badexpert.detectors.base import clone
from badexpert.detectors.sentinet import BIN_WIDTH, fit_boundary
from badexpert.errors import BadExpertError

LAYER = "net.features.4"  # the 6x6 middle conv of the tiny CNN (see the CONTRACT entry in test_detectors.py)


@pytest.fixture(scope="module")
def parts(backdoored):
    model, attack, _, te = backdoored
    reserved, calib, test = te.subset(range(0, 300)), te.subset(range(800, 1000)), te.subset(range(1600, 1700))
    trig = attack.apply(test.images[attack.counts(test.labels)])
    corner = (to_float(attack.apply(test.images[:50])) != to_float(test.images[:50])).any(0).any(0)  # the 3x3 patch
    return model, reserved, calib, test, trig, corner


@pytest.fixture(scope="module")
def det(parts):
    model, reserved, calib, _, _, _ = parts
    return SentiNet(n=12, layer=LAYER, device="cpu").fit(model, reserved).calibrate(calib, 0.1)


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_gradcam_region_finds_the_trigger_corner(parts):
    model, reserved, _, test, trig, corner = parts
    assert int(corner.sum()) == 9 and bool(corner[9:, 9:].all())
    for layer in (None, LAYER):  # the default (last conv) and the middle one
        d = SentiNet(n=4, layer=layer, device="cpu").fit(model, reserved)
        assert d.layer_name_ == (layer or "net.features.10")  # default: the last conv-BN-ReLU's output
        overlap = {}
        for name, x in (("trig", to_float(trig[:60])), ("clean", to_float(test.images[:60]))):
            heat, label = d.gradcam(x)
            mask = d.region(heat)
            assert heat.shape == (60, 12, 12) and mask.shape == (60, 1, 12, 12)
            assert torch.equal(mask.sum((1, 2, 3)), torch.full((60,), float(round(0.15 * 144))))  # 22 pixels each
            overlap[name] = (mask[:, 0] * corner).sum((1, 2)).mean().item()
        assert overlap["trig"] > overlap["clean"] + 0.5, (layer, overlap)


def test_region_is_the_top_share_with_ties_to_earlier_pixels():
    d = SentiNet(top=0.25)
    heat = torch.zeros(2, 4, 4)
    heat[0, 3, 3], heat[0, 2, 2], heat[0, 0, 1], heat[0, 1, 0] = 4, 3, 2, 1
    mask = d.region(heat)
    assert mask[0, 0].nonzero().tolist() == [[0, 1], [1, 0], [2, 2], [3, 3]]
    assert mask[1, 0].flatten().nonzero().flatten().tolist() == [0, 1, 2, 3]  # all tied: row-major order


def test_model_unchanged_no_hooks_and_frozen_models_work(parts, det):
    model, _, _, test, trig, _ = parts
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]  # left over from training
    assert hooks(model) == 0
    det.score(trig[:10])
    assert hooks(model) == 0
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # a model in train mode stays in train mode (scoring runs in eval mode); a frozen one still gives Grad-CAM
    frozen = copy.deepcopy(model).train()
    for p in frozen.parameters():
        p.requires_grad_(False)
    d = SentiNet(n=12, layer=LAYER, device="cpu").fit(frozen, parts[1])
    assert frozen.training and all(m.training for m in frozen.modules())
    assert torch.equal(d.score(test.images[:10]), det.score(test.images[:10]))
    assert not any(p.requires_grad for p in frozen.parameters()) and hooks(frozen) == 0
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        p.grad = None
    SentiNet(n=2, layer=LAYER, device="cpu").fit(fresh, parts[1]).score(test.images[:5])
    assert all(p.grad is None for p in fresh.parameters())  # gradients reach the activations only
    # a failing call removes its hook too
    bad = SentiNet(n=2, layer="net.fc", device="cpu")
    with pytest.raises(BadExpertError, match=r"layer 'net.fc' outputs .*not \[N, C, h, w\]"):
        bad.fit(model, parts[1])
    assert hooks(model) == 0 and not bad.is_fitted


def test_scores_do_not_depend_on_batch_size_order_or_dtype(parts, det):
    model, reserved, _, test, _, _ = parts
    # (scores independent of batch size, order and dtype: the contract kit, tests/test_detectors.py)
    x = test.images[:30]
    s = det.score(x)
    small = SentiNet(n=12, layer=LAYER, batch_size=7, device="cpu").fit(model, reserved)
    assert torch.equal(det.pool_indices(to_float(x)), small.pool_indices(to_float(x)))
    with torch.no_grad():  # the Grad-CAM pass enables gradients itself
        assert torch.equal(det.score(x), s)
    other = SentiNet(n=12, layer=LAYER, seed=1, device="cpu").fit(model, reserved)
    assert not torch.equal(other.pool_indices(to_float(x)), det.pool_indices(to_float(x)))


def test_score_is_fooled_minus_the_boundary(det, parts):
    x = parts[4][:20]
    d = det.score_details(x)
    fooled, conf = torch.from_numpy(d["fooled"]), torch.from_numpy(d["avg_conf"])
    assert ((fooled * det.n).round() == fooled * det.n).all() and ((conf > 0) & (conf <= 1)).all()
    assert np.allclose(d["score"], (fooled - det.boundary(conf)).numpy(), atol=1e-6)
    assert np.allclose(d["score"], det.score(x).numpy(), atol=1e-6)
    lo, hi = det.conf_range_
    c2, c1, c0 = det.curve_
    assert det.boundary(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([c2 * lo**2 + c1 * lo + c0, c2 * hi**2 + c1 * hi + c0])


def test_boundary_is_fitted_on_held_out_clean_images(det, parts):
    _, reserved, _, _, _, _ = parts
    hold = det.holdout_index_
    assert len(hold) == 60 and len(det.pool_) == 240  # holdout=0.2 of 300
    # the pool is the rest of the fit set: no held-out image is pasted onto
    pool_rest = torch.ones(300, dtype=torch.bool)
    pool_rest[hold] = False
    assert torch.equal(det.pool_, reserved.images[pool_rest])
    fooled, conf = det.statistics(to_float(reserved.images[hold]))
    assert np.array_equal(det.fit_points_["fooled"], fooled.numpy()) and np.array_equal(det.fit_points_["avg_conf"], conf.numpy())
    # by hand: bin maxima at bin centres, quadratic polyfit
    bins = np.floor(conf.numpy() / BIN_WIDTH).astype(int)
    xs = np.array([(b + 0.5) * BIN_WIDTH for b in np.unique(bins)])
    ys = np.array([fooled.numpy()[bins == b].max() for b in np.unique(bins)])
    assert np.allclose(det.curve_, np.polyfit(xs, ys, 2)) and det.conf_range_ == pytest.approx((xs.min(), xs.max()))
    # clean fit images lie on or below the boundary's maxima (up to the fit's residual)
    assert np.median(det.fit_points_["fooled"] - det.boundary(conf).numpy()) < 0


def test_fit_boundary_by_hand():
    conf = np.array([0.505, 0.51, 0.61, 0.615, 0.71, 0.93, 0.935])  # bins 25, 25, 30, 30, 35, 46, 46
    fooled = np.array([0.1, 0.3, 0.2, 0.5, 0.4, 0.9, 0.8])
    coef, rng = fit_boundary(conf, fooled)
    assert np.allclose(coef, np.polyfit([0.51, 0.61, 0.71, 0.93], [0.3, 0.5, 0.4, 0.9], 2)) and rng == pytest.approx((0.51, 0.93))
    coef, rng = fit_boundary(np.array([0.5, 0.505]), np.array([0.2, 0.7]))  # one bin: a constant
    assert coef.tolist() == [0.0, 0.0, 0.7] and rng == pytest.approx((0.51, 0.51))
    coef, _ = fit_boundary(np.array([1.0, 0.3]), np.array([1.0, 0.0]))  # confidence 1 falls in the last bin
    assert np.allclose(np.polyval(coef, [0.31, 0.99]), [0.0, 1.0])


def test_cost_and_params():
    d = SentiNet(n=37)
    assert d.cost == {"forward": 75, "backward": 1} and d.needs_gradients
    assert SentiNet().cost == {"forward": 201, "backward": 1}
    assert d.get_params() == {"n": 37, "top": 0.15, "layer": None, "holdout": 0.2, "batch_size": 256, "seed": 0, "device": None}
    assert repr(SentiNet(n=5)) == "SentiNet(n=5)" and clone(d).get_params() == d.get_params()
    assert d.set_params(n=3).cost["forward"] == 7


@pytest.mark.parametrize("params, match", [
    ({"n": 0}, "'n' must be an integer >= 1, got 0"),
    ({"top": 0}, "'top' must be a number in \\(0, 1\\), got 0"),
    ({"top": 1.0}, "'top' must be a number in \\(0, 1\\)"),
    ({"top": -0.1}, "'top'"),
    ({"holdout": 1}, "'holdout'"),
    ({"layer": 3}, "'layer'"),
    ({"k": 3}, "no parameter"),
])
def test_bad_parameters_are_one_line_errors(params, match):
    with pytest.raises(BadExpertError, match=match) as err:
        get_detector("sentinet", **params)
    assert "\n" not in str(err.value)
    d = SentiNet(n=4)
    with pytest.raises(BadExpertError, match=match):
        d.set_params(**params)
    assert d.n == 4 and d.top == 0.15


def test_unknown_or_missing_layer(parts):
    model, reserved = parts[0], parts[1]
    with pytest.raises(BadExpertError, match="no module named 'layer4'; its convolutions: net.features.0") as err:
        SentiNet(n=2, layer="layer4").fit(model, reserved)
    assert "\n" not in str(err.value)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    with pytest.raises(BadExpertError, match="no module of the model outputs a spatial feature map .* name one with layer="):
        SentiNet(n=2).fit(mlp, reserved)
    assert hooks(mlp) == 0


def test_save_load_round_trip(det, parts, tmp_path):
    model, _, _, test, trig, _ = parts
    path = det.save(tmp_path / "sentinet.safetensors")
    loaded = load_detector(path, model)
    # (same params, threshold, scores and decisions: the contract kit) its own state comes back
    assert isinstance(loaded, SentiNet) and loaded.layer_name_ == det.layer_name_
    assert torch.equal(loaded.pool_, det.pool_) and np.array_equal(loaded.curve_, det.curve_)
    assert loaded.conf_range_ == det.conf_range_
    # a damaged file (no pool) is refused in one line
    from safetensors.torch import load_file, save_file
    import json
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    del tensors["pool"]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(BadExpertError, match="lacks its clean pool or boundary curve"):
        load_detector(tmp_path / "bad.safetensors", model)
    assert json.loads(meta["badexpert"])["state"]["layer"] == LAYER


# --- the Grad-CAM layer: the last stage's output, found for any architecture ---------------------
@pytest.mark.parametrize("arch, size, expected, kind", [
    ("cnn", 28, "net.features.10", nn.ReLU),  # last conv-BN-ReLU, before the 3x3 adaptive pool
    ("resnet18", 32, "net.layers", nn.Sequential),  # the last residual block's output, after skip + ReLU
    ("vgg16", 32, "net.features.42", nn.ReLU),  # last conv-BN-ReLU at 2x2, before the 1x1 max-pool
    ("mobilenetv2", 32, "net.features.22", nn.ReLU6),  # the final 1x1 conv-BN-ReLU6
    ("vit", 32, "net.patch_embed", nn.Conv2d),  # its only spatial map
])
def test_feature_layer_is_the_last_stage_output(arch, size, expected, kind):
    from badexpert.detectors.sentinet import feature_layer
    from badexpert.models import build_model

    model = build_model(arch, in_channels=3, num_classes=10, image_size=size, mean=(0.5,) * 3, std=(0.5,) * 3, width=8)
    x = torch.rand(2, 3, size, size)
    name = feature_layer(model, x)
    assert name == expected and isinstance(dict(model.named_modules())[name], kind)
    assert hooks(model) == 0
    if arch == "resnet18":  # the same tensor the last BasicBlock returns, not its last Conv2d's output
        seen = {}
        handles = [dict(model.named_modules())[k].register_forward_hook(lambda m, i, o, k=k: seen.update({k: o}))
                   for k in ("net.layers", "net.layers.7", "net.layers.7.conv2")]
        model.eval()(x)
        for h in handles:
            h.remove()
        assert torch.equal(seen["net.layers"], seen["net.layers.7"]) and bool((seen["net.layers"] >= 0).all())
        assert not torch.equal(seen["net.layers"], seen["net.layers.7.conv2"])


def test_feature_layer_of_a_users_module_skips_pooling_and_functional_tails():
    from badexpert.detectors.sentinet import feature_layer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
            self.act = nn.ReLU(inplace=True)
            self.pool = nn.AvgPool2d(2)  # a 2x2 map remains, but it is a pooling layer's output
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(torch.flatten(self.pool(self.act(self.body(x))), 1))

    assert feature_layer(Net(), torch.rand(2, 1, 4, 4)) == "act"  # the in-place ReLU: the final values


def test_a_file_saved_with_the_old_default_layer_is_refused(backdoored, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, _, _, te = backdoored
    d = SentiNet(n=2, device="cpu").fit(model, te.subset(range(0, 40)))
    path = d.save(tmp_path / "s.safetensors")
    assert load_detector(path, model).layer_name_ == "net.features.10"
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    doc = json.loads(meta["badexpert"])
    doc["state"]["layer"] = "net.features.8"  # what the first version's default (the last nn.Conv2d) saved
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata={**meta, "badexpert": json.dumps(doc)})
    with pytest.raises(BadExpertError, match="reads layer 'net.features.8' .*last nn.Conv2d.*fit and calibrate it again"):
        load_detector(tmp_path / "old.safetensors", model)


def test_image_wide_triggers_are_out_of_scope():
    from badexpert.attacks import get_attack
    from badexpert.evaluation.compare import out_of_scope
    from badexpert.reporting.compare import format_comparison
    from badexpert.detectors import STRIP

    assert SentiNet.trigger_scope == "local"
    from badexpert.attacks import ATTACKS

    for name in ("sig", "blend", "bpp", "refool", "wanet", "issba", "adaptive_blend"):
        assert out_of_scope(SentiNet(), ATTACKS[name]) == (
            f"sentinet targets local triggers; {name}'s trigger is image-wide"), name
    for name in ("badnet", "trojan", "tact", "all_to_all", "trojannn", "sra", "cl", "adaptive_patch", "sleeper_agent",
                 "dynamic"):
        assert out_of_scope(SentiNet(), ATTACKS[name]) is None, name
    assert out_of_scope(SentiNet(), get_attack("sig")) is not None  # instances as well as classes
    assert out_of_scope(SentiNet(), get_attack("ft", base="blend")) is not None  # FT's trigger is its base's
    assert out_of_scope(SentiNet(), None) is None and out_of_scope(STRIP(), get_attack("sig")) is None
    from badexpert.evaluation.records import DefenseRecord

    row = {**dict.fromkeys(DefenseRecord.required()), "name": "sentinet", "params": {}, "auroc": 0.2,
           "fpr_target": 0.01, "cost": {"forward_passes_per_input": 201, "backward_passes_per_input": 1},
           "out_of_scope": out_of_scope(SentiNet(), get_attack("sig"))}
    table = format_comparison({"model": {"clean_accuracy": 0.9, "attack_success_rate": 0.95, "attack_failed": False},
                               "fpr_target": 0.01, "detectors": [row]})
    assert "| sentinet (out of scope) | 20.00% |" in table and "Out of scope: sentinet targets local" in table


def test_fidelity_sentinet_separates_a_patch_trigger_at_the_default_layer(parts):
    """The paper's claim (Chou et al., 2020): a localised trigger's region hijacks clean images,
    so triggered inputs lie above the clean boundary. BadNet's 3x3 patch on the tiny CNN, default
    layer (the last feature map), n=20: measured AUROC 1.00 (the first version's default, the last
    Conv2d before BatchNorm, scored 0.38-0.56 here)."""
    from badexpert.metrics import auroc

    model, reserved, _, test, trig, _ = parts
    d = SentiNet(n=20, device="cpu").fit(model, reserved.subset(range(0, 200)))
    assert d.layer_name_ == "net.features.10"
    clean, bad = d.score(test.images[:60]), d.score(trig[:60])
    assert auroc(clean.numpy(), bad.numpy()) >= 0.9
