"""Input-aware dynamic backdoor: the generators (any image size, seeded, input-dependent triggers,
the mask density), the joint training step, a real implant on the synthetic blobs (the backdoor
implants, a trigger made for another image does not flip the label), seeds, the component cache,
the saved trigger state, and a real implant on Fashion-MNIST."""

import pytest
import torch

from badexpert.attacks import ATTACKS, Components, Dynamic, attack_from_meta, get_attack
from badexpert.attacks.dynamic import EncoderDecoder, diversity_loss, stamp, threshold
from badexpert.errors import BadExpertError
from badexpert.evaluation.core import evaluate
from badexpert.io import load_model, save_model
from badexpert.models import build_model
from badexpert.training import Recipe, train
from badexpert.utils import derive_generator

from .conftest import FASHION_MNIST, make_blobs, prepared, random_dataset

#: Tiny generators for 12x12 blobs (two blocks: 12 is a multiple of 4, so no padding); a mask
#: density of 0.1 (14 pixels) instead of 0.032 (5 pixels), a poison rate of 0.3 and a cross rate of 0.2,
#: and a pattern generator learning rate of 0.003 (the trigger settles before the sixth epoch ends), so
#: six epochs implant it whatever the thread count (93.9-98.7% ASR over seeds 0-2 at one and two threads).
SMALL = dict(generator_channels=4, generator_blocks=2, poison_rate=0.3, cross_rate=0.2, mask_epochs=4,
             mask_density=0.1, generator_lr=0.003)
RECIPE = Recipe(optimizer="adam", lr=3e-3, epochs=6, batch_size=64, weight_decay=0, augment=False)


def _cnn(data, width=8):
    c, (h, w) = data.channels, data.image_size
    return lambda: build_model("cnn", in_channels=c, num_classes=data.num_classes, image_size=(h, w),
                               mean=data.mean, std=data.std, width=width)


def _floats(data):
    return data.images.float() / 255


@pytest.fixture(scope="module")
def implanted():
    """The dynamic backdoor implanted on the blobs: (model, info, attack, train, test, log lines)."""
    tr, te = make_blobs(1500, seed=1), make_blobs(1000, seed=2)
    attack = get_attack("dynamic", target=0, **SMALL)
    logs = []
    model, info = attack.implant(tr, _cnn(tr), RECIPE, 0, log=logs.append)
    return model, info, attack, tr, te, logs


# --- parameters --------------------------------------------------------------------------------
def test_registry_and_reference_defaults():
    a = get_attack("dynamic")
    assert ATTACKS["dynamic"] is Dynamic and a.learned and not a.clean_label
    assert (a.poison_rate, a.cross_rate, a.mask_density, a.lambda_div, a.lambda_norm) == (0.1, 0.1, 0.032, 1.0, 100.0)
    assert (a.generator_channels, a.generator_blocks, a.mask_epochs, a.mask_lr, a.generator_lr) == (8, 3, 2, 0.01, 0.01)


def test_the_rates_must_fit_in_a_batch():
    with pytest.raises(BadExpertError, match="'poison_rate' .0.6. and 'cross_rate' .0.5. add up to more than 1"):
        get_attack("dynamic", poison_rate=0.6, cross_rate=0.5)
    get_attack("dynamic", poison_rate=0.6, cross_rate=0.4)


def test_implant_refuses_a_batch_with_no_backdoor_sample():
    tr = make_blobs(40, seed=1)
    with pytest.raises(BadExpertError, match="poisons no sample of a 4-sample batch"):
        get_attack("dynamic", poison_rate=0.1).implant(tr, _cnn(tr), RECIPE.replace(batch_size=4), 0,
                                                       log=lambda m: None)


# --- the generators ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 12, 12), (1, 28, 28), (3, 32, 32), (3, 13, 17), (1, 5, 6)])
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_the_generators_take_any_image_size(shape, blocks):
    c, h, w = shape
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    for out in (c, 1):
        torch.manual_seed(out)  # the generator's initial weights, whatever ran before
        with torch.no_grad():
            y = EncoderDecoder(c, out, 4, blocks).eval()(x)
        assert y.shape == (3, out, h, w) and float(y.min()) > 0 and float(y.max()) < 1
    a = prepared(get_attack("dynamic", generator_channels=4, generator_blocks=blocks), shape)
    t = a.apply(x)
    assert t.shape == x.shape and not torch.equal(t, x)


def test_threshold_and_stamp():
    m = torch.tensor([0.0, 0.4, 0.5, 0.6, 1.0])
    assert torch.allclose(threshold(m), torch.tensor([0.0, 0.018, 0.5, 0.982, 1.0]), atol=1e-3)
    x, p = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.25, 0.0]]]])
    assert torch.equal(stamp(x, p, mask), mask)


def test_diversity_loss_rewards_different_outputs_and_skips_identical_pairs():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(4, 1, 6, 6, generator=g), torch.rand(4, 1, 6, 6, generator=g)
    same = diversity_loss(x1, x2, torch.full_like(x1, 0.5), torch.full_like(x1, 0.5) + 1e-3)
    apart = diversity_loss(x1, x2, x1, x2)
    assert float(apart) == pytest.approx(1.0, rel=1e-4) and float(same) > 100
    assert float(diversity_loss(x1, x1.clone(), x1, x2)) == 0.0  # identical images: no pair to score


def test_the_initial_generators_are_seeded_and_leave_the_global_random_state_alone():
    shape = (3, 16, 16)
    before = torch.random.get_rng_state()
    a, b, c = (get_attack("dynamic", trigger_seed=s).initial_state(shape) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["pattern.net.0.weight"], c["pattern.net.0.weight"])
    assert {k.split(".")[0] for k in a} == {"pattern", "mask"}


def test_there_is_no_trigger_before_implanting():
    with pytest.raises(BadExpertError, match="learns its trigger.*implant it first") as err:
        get_attack("dynamic").apply(torch.zeros(2, 1, 12, 12))
    assert "\n" not in str(err.value)


def test_the_joint_step_makes_backdoor_and_cross_samples_and_adds_the_diversity_loss():
    a = get_attack("dynamic", target=1, generator_channels=4, generator_blocks=2, poison_rate=0.25, cross_rate=0.25)
    pattern, mask = a.networks(1)
    mask.eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 12, 12, generator=g), torch.arange(16) % 4
    xt, yt = a.joint_batch(pattern, mask, x, y, torch.Generator().manual_seed(3))
    changed = (xt != x).flatten(1).any(1)
    relabelled = yt != y
    assert int(relabelled.sum()) == 4 and (yt[relabelled] == 1).all() and (y[relabelled] != 1).all()
    assert int(changed.sum()) == 8 and changed[relabelled].all()  # 4 backdoor + 4 cross samples
    assert torch.equal(xt[~changed], x[~changed]) and torch.equal(yt[~relabelled], y[~relabelled])
    # one backward pass of the returned batch gives the pattern generator the gradient of the
    # classifier's loss (through the stamped images) plus lambda_div times the diversity loss's
    def grads(lambda_div):
        a.lambda_div = lambda_div
        pattern.zero_grad()
        xb, _ = a.joint_batch(pattern, mask, x, y, torch.Generator().manual_seed(3))
        assert torch.equal(xb, xt)  # the same samples, whatever the weight
        xb.sum().backward()
        return torch.cat([p.grad.flatten() for p in pattern.parameters()])

    g0, g1, g2 = grads(0.0), grads(1.0), grads(2.0)
    assert float(g0.abs().sum()) > 0 and float((g1 - g0).abs().sum()) > 0
    assert float(((g2 - g0) - 2 * (g1 - g0)).norm()) < 1e-2 * float((g1 - g0).norm())  # linear in the weight
    assert all(p.grad is None for p in mask.parameters())  # the mask generator is frozen


def test_static_poisoning_after_implanting_uses_cross_triggers_for_covers():
    """After implanting (here: the initial state), :meth:`poison` works like any attack's; its cover
    samples carry another image's trigger with their true labels."""
    data = random_dataset(n=100, c=1, size=12, classes=4)
    a = prepared(get_attack("dynamic", target=0, poison_rate=0.1, cover_rate=0.1, generator_channels=4), (1, 12, 12))
    p = a.poison(data, derive_generator(0, "poison"))
    idx, cov = torch.tensor(p.meta["poison_indices"]), torch.tensor(p.meta["cover_indices"])
    assert len(idx) == 10 and len(cov) == 10 and (p.labels[idx] == 0).all()
    own = (a.apply(data.images[cov]) * 255).round().to(torch.uint8)
    assert torch.equal(p.images[idx], (a.apply(data.images[idx]) * 255).round().to(torch.uint8))
    assert torch.equal(p.labels[cov], data.labels[cov])
    assert ((p.images[cov].int() - own.int()).abs().amax((1, 2, 3)) > 2).all()  # not their own trigger
    assert ((p.images[cov].int() - data.images[cov].int()).abs().amax((1, 2, 3)) > 2).all()  # but a trigger


# --- a real implant on the blobs ---------------------------------------------------------------
def test_the_backdoor_implants_and_clean_accuracy_is_kept(implanted):
    model, info, attack, tr, te, logs = implanted
    assert set(info["phase_seconds"]) == {"mask_generator", "dynamic_suspect"}
    assert {k: info["components"][k]["cached"] for k in info["components"]} == {"mask_generator": False,
                                                                                 "dynamic_suspect": False}
    assert (info["poisoned_per_batch"], info["cross_per_batch"], info["batch_size"]) == (19, 13, 64)
    assert any("19 backdoor and 13 cross-trigger samples in every batch of 64" in line for line in logs)
    m = evaluate(model, None, te, attack, n_boot=0, throughput=False).metrics
    # the no-attack baseline: a clean model (same recipe) sends few triggered inputs to the target
    clean = _cnn(tr)()
    train(clean, tr, RECIPE, seed=0)
    base = evaluate(clean.eval(), None, te, attack, n_boot=0, throughput=False).metrics
    print(f"dynamic on blobs: ASR {m['attack_success_rate']:.3f} CA {m['clean_accuracy']:.3f}; "
          f"clean model: ASR {base['attack_success_rate']:.3f} CA {base['clean_accuracy']:.3f}")
    assert m["attack_success_rate"] >= 0.85 and base["attack_success_rate"] <= 0.15
    assert m["clean_accuracy"] >= base["clean_accuracy"] - 0.03


def test_the_triggers_are_input_dependent(implanted):
    """Different inputs get clearly different residuals (patterns and masks), unlike a fixed trigger."""
    _, _, attack, _, te, _ = implanted
    x = _floats(te)[:200]
    other = x.roll(1, 0)
    r1, r2 = attack.apply(x) - x, attack.apply(other) - other
    rel = (r1 - r2).flatten(1).norm(dim=1) / torch.maximum(r1.flatten(1).norm(dim=1), r2.flatten(1).norm(dim=1))
    with torch.no_grad():
        (p1, m1), (p2, m2) = attack.patterns_and_masks(x), attack.patterns_and_masks(other)
    on1, on2 = m1 > 0.5, m2 > 0.5
    iou = (on1 & on2).flatten(1).sum(1) / (on1 | on2).flatten(1).sum(1).clamp_min(1)
    print(f"residual difference / residual: median {float(rel.median()):.2f}; "
          f"mask IoU median {float(iou.median()):.2f}; pattern difference {float((p1 - p2).abs().mean()):.3f}")
    assert float(rel.median()) > 0.5 and float(iou.median()) < 0.5 and float((p1 - p2).abs().mean()) > 0.05
    fixed = get_attack("badnet")  # for scale: a fixed trigger's residuals differ only where the images do
    f1, f2 = fixed.apply(x) - x, fixed.apply(other) - other
    assert float(((f1 - f2).flatten(1).norm(dim=1) / f1.flatten(1).norm(dim=1)).median()) < float(rel.median())


def test_the_mask_density_is_near_its_target(implanted):
    _, info, attack, _, te, _ = implanted
    with torch.no_grad():
        _, masks = attack.patterns_and_masks(_floats(te))
    density = masks.flatten(1).mean(1)
    print(f"mask density: mean {float(density.mean()):.3f} (train {info['mask_density']:.3f}), "
          f"5-95% {float(density.quantile(0.05)):.3f}-{float(density.quantile(0.95)):.3f}; "
          f"soft values {float(((masks > 0.05) & (masks < 0.95)).float().mean()):.3f}")
    target = attack.mask_density
    assert 0.6 * target <= float(density.mean()) <= 1.3 * target
    assert 0.6 * target <= info["mask_density"] <= 1.3 * target
    assert float(density.quantile(0.95)) <= 2 * target  # no image gets a large mask
    assert float(((masks > 0.05) & (masks < 0.95)).float().mean()) < 0.1  # nearly binary


def test_a_trigger_made_for_another_image_does_not_flip_the_label(implanted):
    """Cross-trigger samples: an image stamped with the pattern and mask made for an image of
    another class keeps its prediction; with its own trigger it goes to the target. (On the blobs,
    images of one class differ only by noise, so their triggers are alike and act as their own.)"""
    model, _, attack, _, te, _ = implanted
    x, y = _floats(te), te.labels
    partner = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    keep = (y != 0) & (y[partner] != y)
    with torch.no_grad():
        own = model(attack.apply(x[keep])).argmax(1)
        cross = model(attack.cross_trigger(x[keep], x[partner][keep])).argmax(1)
    to_target, kept = float((cross == 0).float().mean()), float((cross == y[keep]).float().mean())
    print(f"own trigger -> target {float((own == 0).float().mean()):.3f}; another class's trigger -> target "
          f"{to_target:.3f}, true label kept {kept:.3f}")
    assert float((own == 0).float().mean()) >= 0.85 and to_target <= 0.15 and kept >= 0.8


def test_a_saved_model_restores_exactly_the_trained_generators(implanted, tmp_path):
    model, _, attack, tr, te, _ = implanted
    shape = (1, 12, 12)
    state = attack.trigger_state(shape)
    assert {k.split(".")[0] for k in state} == {"pattern", "mask"}
    meta = {"arch": "cnn", "width": 8, "in_channels": 1, "num_classes": 4, "image_size": [12, 12],
            "mean": list(tr.mean), "std": list(tr.std), "attack": attack.to_dict(), "attack_state": state}
    _, loaded = load_model(save_model(tmp_path / "m.safetensors", model, meta))
    restored = attack_from_meta(loaded)
    x = _floats(te)[:64]
    assert torch.equal(restored.apply(x), attack.apply(x))
    assert not torch.equal(prepared(get_attack("dynamic", **SMALL), shape).apply(x), attack.apply(x))  # trained
    loaded["attack_state"] = {k: v for k, v in state.items() if not k.startswith("mask.")}
    with pytest.raises(BadExpertError, match="does not fit attack 'dynamic'.*damaged") as err:
        attack_from_meta(loaded, source="'m.safetensors'")
    assert "\n" not in str(err.value)
    wider = get_attack("dynamic", **{**SMALL, "generator_channels": 8})
    loaded["attack"] = wider.to_dict()
    loaded["attack_state"] = state  # weights of 4-channel generators under an 8-channel record
    with pytest.raises(BadExpertError, match="does not fit attack 'dynamic'"):
        attack_from_meta(loaded, source="'m.safetensors'")


def test_implant_is_seeded_and_its_components_are_cached(tmp_path):
    """The same seed gives the same classifier and generators whatever the global random state; a
    second implant with a cache directory loads both stages; another seed trains other ones."""
    tr = make_blobs(256, seed=3)
    recipe = RECIPE.replace(epochs=1, batch_size=32)
    params = {**SMALL, "mask_epochs": 1}

    def run(seed, directory=None, global_seed=0):
        torch.manual_seed(global_seed)
        a = get_attack("dynamic", **params)
        comps = Components(directory, log=lambda m: None)
        model, info = a.implant(tr, _cnn(tr, width=4), recipe, seed, log=lambda m: None, components=comps)
        return model.state_dict(), a.trigger_state((1, 12, 12)), info

    def same(s1, s2):
        return set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)

    m1, t1, i1 = run(0, tmp_path)
    m2, t2, _ = run(0, global_seed=123)
    assert same(m1, m2) and same(t1, t2)
    m3, t3, i3 = run(0, tmp_path)
    assert same(m1, m3) and same(t1, t3)
    assert {k: v["cached"] for k, v in i1["components"].items()} == {"mask_generator": False, "dynamic_suspect": False}
    assert {k: v["cached"] for k, v in i3["components"].items()} == {"mask_generator": True, "dynamic_suspect": True}
    assert sorted(p.name.split("-")[1] for p in tmp_path.glob("component-*")) == ["dynamic_suspect", "mask_generator"]
    m4, t4, _ = run(1)
    assert not torch.equal(t1["pattern.net.0.weight"], t4["pattern.net.0.weight"])
    assert not torch.equal(t1["mask.net.0.weight"], t4["mask.net.0.weight"])
    # a change of the second stage only trains the second stage again
    params["poison_rate"] = 0.25
    _, _, i5 = run(0, tmp_path)
    assert {k: v["cached"] for k, v in i5["components"].items()} == {"mask_generator": True, "dynamic_suspect": False}


# --- a real implant on Fashion-MNIST -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_dynamic_implants_on_fashion_mnist():
    """Both generators trained here on 2,000 Fashion-MNIST images, jointly with a width-16 CNN (4
    Adam epochs). CPU-sized: 4-channel, 2-block generators (the reference's MNIST depth), 2 mask
    epochs, and 30% backdoor samples per batch instead of 10% so that so short a run implants it."""
    from badexpert.pipeline.experiment import ExperimentConfig, make_splits, train_suspect

    cfg = ExperimentConfig(dataset="fashion-mnist", arch="cnn", width=16, attack="dynamic",
                           attack_params={"generator_channels": 4, "generator_blocks": 2, "poison_rate": 0.3},
                           train_size=2000, reserved=100, calibration=100, test_size=1000, seed=0, n_boot=0,
                           recipe={"optimizer": "adam", "lr": 2e-3, "batch_size": 64, "weight_decay": 0, "epochs": 4})
    splits = make_splits(cfg)
    model, meta = train_suspect(cfg, splits, log=lambda m: None)
    assert set(meta["phase_seconds"]) == {"mask_generator", "dynamic_suspect"}
    assert set(meta["attack_state"]) == set(get_attack("dynamic", **cfg.attack_params).initial_state((1, 28, 28)))
    assert 0.5 * 0.032 <= meta["mask_density"] <= 1.5 * 0.032
    attack = attack_from_meta(meta)
    m = evaluate(model, None, splits.test, attack, n_boot=0, throughput=False).metrics
    print(f"dynamic on Fashion-MNIST: ASR {m['attack_success_rate']:.3f} CA {m['clean_accuracy']:.3f} "
          f"mask density {meta['mask_density']:.3f} phases {meta['phase_seconds']}")
    assert m["attack_success_rate"] >= 0.7 and m["clean_accuracy"] >= 0.65
