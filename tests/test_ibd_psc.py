"""IBD-PSC: the start index k, the amplified models, PSC by hand, and the detector contract's details."""

import copy
import warnings

import pytest
import torch
from torch import nn

from badexpert.data import to_float
from badexpert.detectors import DETECTORS, IBDPSC, get_detector, load_detector
from badexpert.detectors.base import detector_from_state
from badexpert.detectors.ibd_psc import batchnorm_layers
from badexpert.errors import BadExpertError
from badexpert.deploy.guard import Guard
from badexpert.io import model_fingerprint


# --- a chain whose logits are known by hand ------------------------------------------------------
# image (1, 2, 2) -> flatten -> Linear(4, 3) -> BN1d -> BN1d -> BN1d -> Linear(3, 3). With running mean
# 0, running variance 1 and eps 0, a BatchNorm layer in eval mode is z -> w * z + b, so amplifying the
# last c layers gives logits computed below without any torch module. (The final linear layer's bias
# makes even the last layer's amplification change predictions.)
W = torch.tensor([[-1.6, 0.2, 2.2, 0.8], [1.2, -0.4, -1.4, 0.9], [0.9, 0.7, 0.9, 1.8]])
A = torch.tensor([-0.1, 0.1, -0.9])
BN_W = [torch.tensor([0.9, 0.6, 1.3]), torch.tensor([0.8, 1.1, 1.1]), torch.tensor([1.4, 0.9, 1.2])]
BN_B = [torch.tensor([-0.4, -0.4, 0.0]), torch.tensor([0.0, 0.6, -0.2]), torch.tensor([0.2, 0.2, -0.6])]
V = torch.tensor([[0.5, 1.3, 0.3], [1.9, -0.2, -0.1], [1.8, 1.0, -1.4]])
C = torch.tensor([-0.8, -1.0, 0.3])
OMEGA = 2.0


def chain() -> nn.Module:
    lin, head = nn.Linear(4, 3), nn.Linear(3, 3)
    bns = [nn.BatchNorm1d(3, eps=0.0) for _ in range(3)]
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(A)
        head.weight.copy_(V)
        head.bias.copy_(C)
        for bn, w, b in zip(bns, BN_W, BN_B):
            bn.weight.copy_(w)
            bn.bias.copy_(b)
    return nn.Sequential(nn.Flatten(), lin, *bns, head).eval()


def logits_by_hand(x: torch.Tensor, amplified: int, omega: float = OMEGA) -> torch.Tensor:
    z = x.double().flatten(1) @ W.double().T + A.double()
    for i, (w, b) in enumerate(zip(BN_W, BN_B)):
        s = omega if i >= 3 - amplified else 1.0  # the last `amplified` layers
        z = s * (w.double() * z + b.double())
    return z @ V.double().T + C.double()


def chain_data(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))


def chain_errors(x, y, omega):
    return [(logits_by_hand(x, c, omega).argmax(1) != y).double().mean().item() for c in (1, 2, 3)]


def test_start_index_k_by_hand():
    """k = the smallest number of last BN layers whose amplification pushes the clean error above xi."""
    omega = OMEGA
    x = chain_data(400, 0)
    y = logits_by_hand(x, 0, omega).argmax(1)  # labels = the original predictions: no error unamplified
    e1, e2, e3 = chain_errors(x, y, omega)
    assert 0 < e1 < e2 < e3 < 1  # the chain is built so that each amplified layer costs accuracy
    for xi, k in [((e1 + e2) / 2, 2), ((e2 + e3) / 2, 3), (e1 / 2, 1), (e1, 2)]:  # error must *exceed* xi
        det = IBDPSC(omega=omega, xi=xi).fit(chain(), (x, y))
        assert det.k_ == k and det.bn_layers_ == 3 and det.fit_report_["reached_xi"], (xi, k)
        assert [t["error"] for t in det.fit_report_["errors"]] == pytest.approx([e1, e2, e3][:k], abs=1e-12)
        assert det.fit_report_["clean_error"] == 0.0
    # never above xi: a warning, and every model amplifies all layers
    with pytest.warns(UserWarning, match=r"never above xi=0.9; every model amplifies all layers"):
        det = IBDPSC(omega=omega, xi=0.9).fit(chain(), (x, y))
    assert det.k_ == 3 and not det.fit_report_["reached_xi"] and det.amplified_counts_ == [3] * 5


def test_psc_by_hand():
    """PSC(x) = mean over the n models amplifying the last k+1 .. k+n layers (capped at L = 3) of the
    softmax probability of the original model's label."""
    omega = OMEGA
    x = chain_data(400, 0)
    y = logits_by_hand(x, 0, omega).argmax(1)
    e1, e2, _ = chain_errors(x, y, omega)
    det = IBDPSC(omega=omega, xi=e1 / 2, n_models=3).fit(chain(), (x, y))
    assert det.k_ == 1 and det.amplified_counts_ == [2, 3, 3]  # 1+1, 1+2, then capped at 3
    assert det.cost == {"forward": 1 + 2, "backward": 0}  # the all-layers model runs once
    test = chain_data(20, 1)
    label = logits_by_hand(test, 0, omega).argmax(1)
    prob = lambda c: torch.softmax(logits_by_hand(test, c, omega), 1).gather(1, label[:, None])[:, 0]  # noqa: E731
    expected = (prob(2) + prob(3) + prob(3)) / 3  # the capped model counts as often as it occurs
    assert torch.allclose(det.psc(test), expected, atol=1e-6)
    scores = det.score(test)  # -ln(1 - PSC): the same order as PSC
    assert scores.dtype == torch.float32
    assert torch.allclose(scores.double(), -torch.log1p(-expected), rtol=1e-5)
    assert torch.equal(scores.argsort(), expected.argsort())
    probs = det.model_probabilities(test)
    assert probs.shape == (20, 3) and torch.allclose(probs, torch.stack([prob(2), prob(3), prob(3)], 1), atol=1e-6)
    details = det.score_details(test)
    assert details["score"].tolist() == pytest.approx(scores.tolist())
    assert details["psc"].tolist() == pytest.approx(expected.tolist(), abs=1e-6) and details["model_probabilities"].shape == (20, 3)
    # n = 1: the single model amplifies the last k + 1 layers; n_models needs no refit
    det.set_params(n_models=1)
    assert det.amplified_counts_ == [2] and torch.allclose(det.psc(test), prob(2), atol=1e-6)
    assert torch.allclose(det.score(test).double(), -torch.log1p(-prob(2)), rtol=1e-5)
    # an input that cannot be scored gets NaN
    bad = test[:3].clone()
    bad[1, 0, 0, 0] = float("nan")
    s = det.score(bad)
    assert torch.isnan(s[1]) and torch.isfinite(s[[0, 2]]).all() and torch.isnan(det.model_probabilities(bad)[1]).all()


# --- the backdoored fixture ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(backdoored):
    model, attack, _, te = backdoored
    with pytest.warns(UserWarning, match="never above xi=0.6"):  # omega = 1.5 barely moves this small CNN
        det = IBDPSC().fit(model, te.subset(range(0, 400)))
    return det


def test_k_on_the_backdoored_model_matches_a_hand_loop_over_deep_copies(backdoored, fitted):
    model, _, _, te = backdoored
    images, labels = to_float(te.images[:400]), te.labels[:400]
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(layers) == 3 == fitted.bn_layers_
    errors = []
    for c in range(1, len(layers) + 1):
        amp = copy.deepcopy(model)
        bns = [m for m in amp.modules() if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad():
            for m in bns[len(bns) - c:]:
                m.weight.mul_(1.5)
                m.bias.mul_(1.5)
            errors.append((amp.eval()(images).argmax(1) != labels).double().mean().item())
    k = next((c for c, e in enumerate(errors, 1) if e > 0.6), len(layers))
    assert fitted.k_ == k == 3
    assert [t["error"] for t in fitted.fit_report_["errors"]] == pytest.approx(errors, abs=1e-12)
    assert fitted.amplified_counts_ == [3] * 5 and fitted.cost == {"forward": 2, "backward": 0}


def test_amplification_scales_exactly_the_chosen_layers(backdoored, fitted):
    model = backdoored[0]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    params = dict(model.named_parameters())
    x = to_float(backdoored[3].images[:32])
    for c in range(0, 4):
        over = fitted.amplified_parameters(c)
        chosen = names[len(names) - c:] if c else []
        assert sorted(over) == sorted([f"{n}.weight" for n in chosen] + [f"{n}.bias" for n in chosen])
        for key, t in over.items():
            assert torch.equal(t, params[key].detach() * 1.5) and t.data_ptr() != params[key].data_ptr()
        # the functional call equals a deep copy whose chosen layers were scaled in place
        amp = copy.deepcopy(model)
        with torch.no_grad():
            for n, m in amp.named_modules():
                if n in chosen:
                    m.weight.mul_(1.5)
                    m.bias.mul_(1.5)
            untouched = [k for k in dict(amp.named_parameters()) if k not in over]
            assert all(torch.equal(dict(amp.named_parameters())[k], params[k]) for k in untouched)
            assert torch.allclose(fitted._amplified_logits(model, c, x), amp.eval()(x), atol=1e-6)
    with pytest.raises(BadExpertError, match="cannot amplify the last 4 of 3 BatchNorm layers"):
        fitted.amplified_parameters(4)


def test_the_users_model_is_left_bit_identical(backdoored, tmp_path):
    model, attack, _, te = backdoored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [id(p) for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    fp = model_fingerprint(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = IBDPSC(n_models=2).fit(model, te.subset(range(0, 200)))
    det.calibrate(te.subset(range(200, 300)), fpr=0.1)
    x = torch.cat([te.images[300:310], (attack.apply(te.images[310:320]) * 255).round().to(torch.uint8)])
    det.score(x)
    det.score_given_logits(to_float(x), model(to_float(x)))
    load_detector(det.save(tmp_path / "d.safetensors"), model).score(x)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert [id(p) for p in model.parameters()] == ids and [m.training for m in model.modules()] == modes
    assert model_fingerprint(model) == fp


def test_scores_do_not_depend_on_batch_size_order_or_dtype(backdoored, fitted):
    model, attack, _, te = backdoored
    x = torch.cat([te.images[500:520], (attack.apply(te.images[520:540]) * 255).round().to(torch.uint8)])
    # (scores independent of batch size, order and dtype: the contract kit, tests/test_detectors.py)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = IBDPSC(batch_size=7).fit(model, te.subset(range(0, 400)))
    assert small.k_ == fitted.k_  # the batch size of the fit does not change the start index
    assert torch.equal(small.psc(x), fitted.psc(x))


def test_score_keeps_the_order_psc_loses_to_float32(backdoored, fitted):
    """On this confident model most PSC values round to 1.0 in float32 (the dtype of scores); the
    score -ln(1 - PSC), computed in log space, keeps them apart in the order of the exact PSC."""
    model, attack, _, te = backdoored
    x = torch.cat([te.images[1000:1100], (attack.apply(te.images[1100:1200]) * 255).round().to(torch.uint8)])
    psc, score = fitted.psc(x), fitted.score(x)
    assert (psc.float() == 1).float().mean() > 0.5
    assert len(score.unique()) > 0.9 * len(x) and torch.isfinite(score).all() and (score >= 0).all()
    one_minus = 1 - psc  # in float64, still resolved where it is at least ~1e-15
    ok = one_minus > 1e-13
    assert ok.sum() > 20
    assert torch.allclose(score.double()[ok], -torch.log(one_minus[ok]), rtol=1e-3)


def test_score_given_logits_equals_score(backdoored, fitted):
    model, attack, _, te = backdoored
    x = to_float(torch.cat([te.images[600:616], (attack.apply(te.images[616:632]) * 255).round().to(torch.uint8)]))
    with torch.no_grad():
        logits = model(x)
    assert IBDPSC.shares_model_pass
    assert torch.allclose(fitted.score_given_logits(x, logits).float(), fitted.score(x), atol=1e-6)
    det = copy.copy(fitted).calibrate(te.subset(range(700, 800)), fpr=0.1)
    guard = Guard(model, det)
    assert guard.forward_passes_per_input == det.cost["forward"] == 2
    assert torch.allclose(guard(x).score, det.score(x), atol=1e-6)


def test_save_load_round_trip(backdoored, fitted, tmp_path):
    model, _, _, te = backdoored
    det = copy.copy(fitted).calibrate(te.subset(range(800, 900)), fpr=0.1)
    path = det.save(tmp_path / "ibd.safetensors")
    loaded = load_detector(path, model)
    assert (loaded.k_, loaded.bn_layers_) == (det.k_, det.bn_layers_)  # (scores etc.: the contract kit)
    # a damaged or mismatched state is a one-line error
    tensors, meta = det.to_state()
    for state, message in [({"k": 0, "bn_layers": 3}, "lacks a valid start index k"),
                           ({"k": 4, "bn_layers": 3}, "lacks a valid start index k"),
                           ({"bn_layers": 3}, "lacks a valid start index k"),
                           ({"k": 2, "bn_layers": 5}, "fitted on a model with 5 BatchNorm layers but this model has 3")]:
        with pytest.raises(BadExpertError, match=message) as info:
            detector_from_state(dict(tensors), {**meta, "state": state}, model)
        assert "\n" not in str(info.value)


# --- refusals ------------------------------------------------------------------------------------
def test_a_model_without_batchnorm_is_refused():
    x, y = chain_data(8, 2), torch.tensor([0, 1] * 4)
    with pytest.raises(BadExpertError, match=r"ibd_psc needs a model with BatchNorm layers \(found none in Sequential\); ") as info:
        IBDPSC().fit(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), (x, y))
    assert "\n" not in str(info.value)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2, affine=False))
    with pytest.raises(BadExpertError, match=r"found 1 without affine weight and bias in Sequential"):
        IBDPSC().fit(plain, (x, y))
    assert batchnorm_layers(chain())[0][0] == "2" and len(batchnorm_layers(plain)) == 0


@pytest.mark.parametrize("params,message", [
    (dict(omega=1.0), "'omega' must be a number > 1"),
    (dict(omega=0.5), "'omega' must be a number > 1"),
    (dict(omega=float("nan")), "'omega' must be a number > 1"),
    (dict(xi=0.0), r"'xi' must be a number in \(0, 1\)"),
    (dict(xi=1.0), r"'xi' must be a number in \(0, 1\)"),
    (dict(xi=1.5), r"'xi' must be a number in \(0, 1\)"),
    (dict(n_models=0), "'n_models' must be an integer >= 1"),
    (dict(n_models=2.5), "'n_models' must be an integer"),
    (dict(batch_size=0), "'batch_size'"),
])
def test_bad_parameters_are_one_line_errors(params, message):
    with pytest.raises(BadExpertError, match=message) as info:
        IBDPSC(**params)
    assert "\n" not in str(info.value)
    with pytest.raises(BadExpertError, match=message):
        get_detector("ibd-psc", **params)
    det = IBDPSC()
    with pytest.raises(BadExpertError):
        det.set_params(**params)
    assert (det.omega, det.xi, det.n_models, det.batch_size) == (1.5, 0.6, 5, 256)  # a refused change is undone


def test_defaults_cost_and_registry():
    det = IBDPSC()
    assert (det.omega, det.xi, det.n_models) == (1.5, 0.6, 5)
    assert det.cost == {"forward": 6, "backward": 0} and not det.needs_gradients
    assert IBDPSC(n_models=2).cost == {"forward": 3, "backward": 0}
    assert DETECTORS["ibd_psc"] is IBDPSC and isinstance(get_detector("IBD-PSC", omega=2), IBDPSC)


# --- degeneration: said at fit, recorded, shown ----------------------------------------------------
def test_degeneration_flag_on_the_hand_chain():
    """Clear when the clean error exceeds xi early enough for distinct amplified models; set, with
    its reason, when xi is never exceeded or when all n models are one model."""
    x = chain_data(400, 0)
    y = logits_by_hand(x, 0, OMEGA).argmax(1)
    e1, e2, e3 = chain_errors(x, y, OMEGA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy fit warns of nothing
        ok = IBDPSC(omega=OMEGA, xi=e1 / 2, n_models=3).fit(chain(), (x, y))
    rep = ok.fit_report_
    assert not ok.degenerate_ and ok.degenerate_reasons_ == [] and rep["degenerate"] is False
    assert rep["distinct_models"] == 2 and [m["layers"] for m in rep["models"]] == [2, 3]
    assert [m["error"] for m in rep["models"]] == pytest.approx([e2, e3], abs=1e-12)
    assert "DEGENERATE" not in ok.fit_summary() and ok.fit_summary().startswith("k=1 of 3 BatchNorm layers, 2 distinct")
    # xi first exceeded with all 3 layers: k = L, the five models are one
    with pytest.warns(UserWarning, match=r"degenerate: the clean error first exceeds xi=.* at k=3 of 3 BatchNorm layers, so all 5 amplified models"):
        same = IBDPSC(omega=OMEGA, xi=(e2 + e3) / 2).fit(chain(), (x, y))
    assert same.fit_report_["reached_xi"] and same.degenerate_reasons_ == ["models_coincide"]
    assert same.fit_report_["degenerate"] and "DEGENERATE: the amplified models are all the same model" in same.fit_summary()
    assert not same.set_params(n_models=1).degenerate_  # one model asked for, one used: nothing degenerate
    # never exceeded
    with pytest.warns(UserWarning, match="never above xi=0.9"):
        never = IBDPSC(omega=OMEGA, xi=0.9).fit(chain(), (x, y))
    assert never.degenerate_reasons_ == ["xi_not_reached", "models_coincide"]
    assert "no amplification lifts the clean error above xi=0.9" in never.fit_summary()
    d = never.diagnostics({}, {})
    assert d["degenerate"] and d["k"] == 3 == d["bn_layers"] and d["distinct_models"] == 1


def test_degeneration_survives_save_load_and_shows_in_the_evaluation(backdoored, fitted, tmp_path):
    from badexpert.evaluation.core import evaluate

    model, attack, _, te = backdoored
    assert fitted.degenerate_reasons_ == ["xi_not_reached", "models_coincide"]  # the 3-BN CNN: 0% error at all 3
    det = copy.copy(fitted).calibrate(te.subset(range(800, 900)), fpr=0.1)
    loaded = load_detector(det.save(tmp_path / "ibd.safetensors"), model)
    assert loaded.degenerate_reasons_ == det.degenerate_reasons_ and loaded.fit_summary() == det.fit_summary()
    res = evaluate(model, loaded, te.subset(range(1600, 1800)), attack, n_boot=10, throughput=False)
    d = res.metrics["defense"]
    assert d["diagnostics"]["degenerate"] and d["fit_report"]["degenerate_reasons"] == ["xi_not_reached", "models_coincide"]


def test_fidelity_narrow_resnet_degenerates_and_says_so(blobs):
    """The CIFAR-10 failure in small: on a narrow ResNet-18 (width 4, 20 BatchNorm layers) that
    carries a Blend backdoor, amplifying every layer by 1.5 lifts the clean error only to ~25%
    (never above xi = 0.6), so all five models are the all-layers model and PSC separates the
    triggered inputs *worse* than chance (measured AUROC 0.13). The detector must say so."""
    from badexpert.attacks import get_attack
    from badexpert.metrics import auroc
    from badexpert.models import build_model
    from badexpert.training import Recipe, train
    from badexpert.utils import derive_generator, seed_everything

    tr, te = blobs
    seed_everything(0)
    attack = get_attack("blend", target=0, poison_rate=0.05)
    model = build_model("resnet18", in_channels=1, num_classes=4, image_size=12, mean=tr.mean, std=tr.std, width=4)
    train(model, attack.poison(tr, derive_generator(0, "poison")),
          Recipe(optimizer="adam", lr=3e-3, epochs=4, batch_size=64, weight_decay=0, schedule="cosine", augment=False), seed=0)
    model.eval()
    test = te.subset(range(1600, 2000))
    trig = attack.apply(test.images[attack.counts(test.labels)], torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(trig).argmax(1) == 0).float().mean() > 0.8  # the backdoor is there
    with pytest.warns(UserWarning, match="never above xi=0.6"):
        det = IBDPSC().fit(model, te.subset(range(400)))
    assert det.bn_layers_ == 20 and det.k_ == 20 and det.degenerate_
    assert det.fit_report_["degenerate_reasons"] == ["xi_not_reached", "models_coincide"]
    assert max(t["error"] for t in det.fit_report_["errors"]) < 0.6
    assert "DEGENERATE" in det.fit_summary()
    assert auroc(det.score(test).numpy(), det.score(trig).numpy()) < 0.5  # worse than chance, as on CIFAR-10
