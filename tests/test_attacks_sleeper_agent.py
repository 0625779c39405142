"""Sleeper Agent (hidden-trigger clean-label poisoning by gradient matching): the random patch and
its per-input placement, the budget presets, poison selection and crafting (the alignment loss
really falls, the perturbations stay in the eps ball), caching, and a real implant."""

import json

import pytest
import torch

from badexpert.attacks import ATTACKS, SleeperAgent, attack_from_dict, get_attack
from badexpert.attacks.components import Components
from badexpert.attacks.sleeper_agent import gradient_norms
from badexpert.errors import BadExpertError
from badexpert.evaluation.core import evaluate, trigger_dataset
from badexpert.models import build_model
from badexpert.training import Recipe, predict_logits, train
from badexpert.utils import derive_generator

from .conftest import FASHION_MNIST, make_blobs

RECIPE = Recipe(optimizer="adam", lr=3e-3, epochs=4, batch_size=64, weight_decay=0, augment=False)


def _cnn(data, width=4):
    return build_model("cnn", in_channels=data.channels, num_classes=data.num_classes, image_size=data.image_size,
                       mean=data.mean, std=data.std, width=width)


@pytest.fixture(scope="module")
def small():
    """400 blobs (12x12, 4 classes) and a surrogate trained on them."""
    data = make_blobs(400, seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _cnn(data)
    train(model, data, RECIPE, seed=0)
    return data, model.eval()


def _one_line(err):
    assert "\n" not in str(err.value)


# --- parameters ----------------------------------------------------------------------------------
def test_registry_reference_defaults_and_budgets():
    a = get_attack("sleeper_agent")
    assert ATTACKS["sleeper_agent"] is SleeperAgent and a.clean_label and not a.learned
    assert (a.target, a.source_classes, a.eps, a.patch_size, a.poison_rate, a.selection) == \
        (0, (1,), 16 / 255, 8, 0.01, "gradient_norm")
    assert (a.budget, a.steps, a.retrain_interval) == ("cpu", 40, 20)
    g = get_attack("sleeper_agent", budget="GPU")
    assert (g.budget, g.steps, g.retrain_interval) == ("gpu", 250, 50)  # the reference's crafting budget
    assert (get_attack("sleeper_agent", budget="gpu", craft_steps=7).steps, g.retrain_interval) == (7, 50)
    assert a.step_size == pytest.approx(0.1 * 16 / 255) == pytest.approx(0.025 * 0.25, rel=0.01)
    assert get_attack("sleeper_agent", craft_batch=256).step_size == pytest.approx(0.2 * 16 / 255)
    # the reference: 100 epochs of pretraining, 40 of retraining; step milestones scaled alike
    r = a.retrain_recipe(Recipe(epochs=100, schedule="step", milestones=(50, 75)))
    assert (r.epochs, r.milestones, r.schedule) == (40, (20, 30), "step")
    assert a.retrain_recipe(Recipe(epochs=2)).epochs == 1
    assert get_attack("sleeper_agent", retrain_epochs=3).retrain_recipe(Recipe(epochs=10)).epochs == 3
    b = attack_from_dict(json.loads(json.dumps(get_attack("sleeper_agent", source_classes=(2, 3)).to_dict())))
    assert b.source_classes == (2, 3) and b.to_dict()["source_classes"] == [2, 3]


@pytest.mark.parametrize("params, match", [
    ({"budget": "tpu"}, "'budget' must be one of: cpu, gpu"),
    ({"eps": 0}, "'eps' must be"),
    ({"eps": 2.0}, "'eps' must be"),
    ({"patch_size": 0}, "'patch_size' must be"),
    ({"selection": "loss"}, "'selection' must be one of: gradient_norm, random"),
    ({"source_classes": (0,)}, "contains the target class 0"),
    ({"source_classes": ()}, "at least one class"),
    ({"cover_rate": 0.1}, "'cover_rate' must be 0"),
    ({"craft_steps": 0}, "'craft_steps' must be"),
])
def test_parameter_errors_are_one_line(params, match):
    with pytest.raises(BadExpertError, match=match) as err:
        get_attack("sleeper_agent", **params)
    _one_line(err)


def test_poison_without_crafted_perturbations_is_a_one_line_error(small):
    data, _ = small
    with pytest.raises(BadExpertError, match=r"use implant\(\.\.\.\)") as err:
        get_attack("sleeper_agent").poison(data, derive_generator(0, "poison"))
    _one_line(err)
    with pytest.raises(BadExpertError, match="does not fit in a 12x12 image") as err:
        get_attack("sleeper_agent", patch_size=13).apply(data.images[:1])
    _one_line(err)


# --- trigger -------------------------------------------------------------------------------------
def _window(before, after):
    """Rows and columns where ``after`` differs from ``before`` (one image, [C, H, W])."""
    diff = (before != after).any(0)
    rows, cols = diff.any(1).nonzero().flatten(), diff.any(0).nonzero().flatten()
    return rows, cols


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_the_test_trigger_is_the_states_patch_at_a_random_place_per_input(shape):
    a = get_attack("sleeper_agent", trigger_seed=3)
    patch = a.trigger_state(shape)["patch"]
    assert patch.shape == (shape[0], 8, 8) and set(patch.unique().tolist()) == {0.0, 1.0}
    assert 0.3 < float(patch.mean()) < 0.7  # Bernoulli(1/2)
    assert torch.equal(get_attack("sleeper_agent", trigger_seed=3).trigger_state(shape)["patch"], patch)
    assert not torch.equal(get_attack("sleeper_agent", trigger_seed=4).trigger_state(shape)["patch"], patch)
    x = torch.full((40, *shape), 0.5)  # never 0 or 1: every patch pixel shows
    y = a.apply(x, torch.Generator().manual_seed(1))
    corners = set()
    for i in range(len(x)):
        changed = (y[i] != x[i]).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        r, c = int(rows.min()), int(cols.min())
        assert int(rows.max()) - r <= 7 and int(cols.max()) - c <= 7  # an 8x8 window
        # the window holding the changed pixels is exactly the patch, wherever it landed
        found = [(r0, c0) for r0 in range(max(0, int(rows.max()) - 7), r + 1)
                 for c0 in range(max(0, int(cols.max()) - 7), c + 1)
                 if r0 + 8 <= shape[1] and c0 + 8 <= shape[2] and torch.equal(y[i, :, r0:r0 + 8, c0:c0 + 8], patch)]
        assert found
        outside = torch.ones(shape[1:], dtype=torch.bool)
        outside[found[0][0]:found[0][0] + 8, found[0][1]:found[0][1] + 8] = False
        assert torch.equal(y[i][:, outside], x[i][:, outside])
        corners.add(found[0])
    assert len(corners) > 20  # random per input
    # reproducible from the caller's generator, different for another seed
    assert torch.equal(a.apply(x, torch.Generator().manual_seed(1)), y)
    assert not torch.equal(a.apply(x, torch.Generator().manual_seed(2)), y)
    assert torch.equal(a.apply(x), a.apply(x))  # no generator: a fixed one from trigger_seed


def test_a_restored_state_is_the_patch_applied():
    """The patch always comes from the state: another seed's patch restored under this record is
    what is stamped (at the placement the generator draws)."""
    shape = (1, 16, 16)
    a, b = get_attack("sleeper_agent", trigger_seed=1), get_attack("sleeper_agent", trigger_seed=2)
    a.restore_state(shape, b.trigger_state(shape))
    x = torch.full((5, *shape), 0.5)
    assert torch.equal(a.apply(x, torch.Generator().manual_seed(3)), b.apply(x, torch.Generator().manual_seed(3)))


def test_the_success_rate_counts_source_class_inputs_only(small):
    data, _ = small
    a = get_attack("sleeper_agent", patch_size=4)
    assert a.counts(torch.tensor([0, 1, 2, 3, 1])).tolist() == [False, True, False, False, True]
    trig, targets = trigger_dataset(a, data, seed=0)
    assert len(trig) == int((data.labels == 1).sum()) and (trig.labels == 1).all() and (targets == 0).all()

    class Always0(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 4).float()

    m = evaluate(Always0(), None, data, a).metrics
    assert m["attack_success_rate"] == 1.0
    assert m["clean_accuracy"] == pytest.approx(float((data.labels == 0).float().mean()))


# --- selection and crafting ----------------------------------------------------------------------
def test_poisons_are_the_target_images_with_the_largest_gradient_norm(small):
    data, model = small
    a = get_attack("sleeper_agent", target=2, source_classes=(1,), poison_rate=0.05)
    idx = a.select_poisons(data, model, derive_generator(0, "x"))
    target = (data.labels == 2).nonzero().flatten()
    assert len(idx) == 20 and (data.labels[idx] == 2).all() and torch.equal(idx, idx.sort().values)
    norms = gradient_norms(model, data.images[target], data.labels[target])
    chosen = torch.isin(target, idx)
    assert float(norms[chosen].min()) >= float(norms[~chosen].max())
    # the per-sample norms are the plain autograd ones
    i = int(target[0])
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(data.images[i:i + 1].float() / 255), data.labels[i:i + 1])
    loss.backward()
    ref = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    model.zero_grad()
    assert float(norms[0]) == pytest.approx(float(ref), rel=1e-4)
    rnd = get_attack("sleeper_agent", target=2, poison_rate=0.05, selection="random")
    r1 = rnd.select_poisons(data, model, derive_generator(0, "x"))
    assert (data.labels[r1] == 2).all() and len(r1) == 20 and not torch.equal(r1, idx)
    assert torch.equal(r1, rnd.select_poisons(data, model, derive_generator(0, "x")))
    # capped at the target class; a rate that poisons nothing is an error
    assert len(get_attack("sleeper_agent", poison_rate=0.9).select_poisons(data, model, derive_generator(0, "x"))) == \
        int((data.labels == 0).sum())
    with pytest.raises(BadExpertError, match="poisons no target-class sample"):
        get_attack("sleeper_agent", poison_rate=0.001).select_poisons(data, model, derive_generator(0, "x"))


def test_gradient_matching_lowers_the_alignment_loss_within_eps(small):
    data, model = small
    # three batches of poisons (16, 16, 8), at the step size of the default 128-poison batch
    a = get_attack("sleeper_agent", patch_size=4, poison_rate=0.1, craft_steps=20, retrain_every=100, craft_batch=16,
                   lr=0.1 * 16 / 255)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    crafted = a.craft(data, model, None, RECIPE, seed=0, log=lambda m: None)
    trace = crafted["alignment"]
    assert len(trace) == 20 and len(crafted["retrain_accuracy"]) == 0
    assert float(trace[-1]) < float(trace[0]) - 0.1, trace
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the surrogate is untouched
    # the final (rounded) poisons, scored afresh on the surrogate, align better than the clean images
    idx, delta = crafted["indices"], crafted["delta"]
    assert delta.dtype == torch.int16 and len(idx) == 40 and (data.labels[idx] == 0).all()
    sources = data.images[data.labels == 1]
    tg = a.source_gradient(model, sources, derive_generator(5, "s"))
    tn = torch.sqrt(sum(t.pow(2).sum() for t in tg))
    x = data.images[idx].float() / 255
    y = data.labels[idx]
    with torch.enable_grad():
        clean = float(a.alignment_loss(model.eval(), x, y, tg, tn).detach())
        poisoned = float(a.alignment_loss(model.eval(), x + delta.float() / 255, y, tg, tn).detach())
    assert poisoned < clean - 0.1
    # the poisoned set: labels kept, only the chosen target-class images changed, within eps and [0, 255]
    p = a.poison(data, None, crafted)
    assert torch.equal(p.labels, data.labels)
    assert p.meta["poison_indices"] == idx.tolist() and p.meta["cover_indices"] == []
    changed = (p.images != data.images).flatten(1).any(1)
    assert changed.any() and torch.isin(changed.nonzero().flatten(), idx).all()
    d = p.images.int() - data.images.int()
    assert int(d.abs().max()) == 16 and torch.equal(d[idx].to(torch.int16), delta)  # 16/255 exactly reached
    assert int(delta.abs().max()) <= 16


def test_rounding_never_leaves_the_eps_ball(small):
    data, model = small
    a = get_attack("sleeper_agent", patch_size=4, poison_rate=0.05, eps=0.05, craft_steps=3, retrain_every=100,
                   lr=1.0)  # steps far beyond eps: everything lands on the ball's surface
    delta = a.craft(data, model, None, RECIPE, seed=0, log=lambda m: None)["delta"]
    assert int(delta.abs().max()) == 12  # floor(0.05 * 255 = 12.75): never 13


def test_crafting_is_deterministic_and_retrains_the_surrogate(small):
    data, model = small
    a = get_attack("sleeper_agent", patch_size=4, poison_rate=0.05, craft_steps=4, retrain_every=2,
                   retrain_epochs=1, n_sources=30)
    torch.manual_seed(9)  # the attack seeds each retrained model itself ...
    c1 = a.craft(data, model, lambda: _cnn(data), RECIPE, seed=0, log=lambda m: None)
    torch.manual_seed(10)  # ... whatever the global random state
    c2 = a.craft(data, model, lambda: _cnn(data), RECIPE, seed=0, log=lambda m: None)
    c3 = a.craft(data, model, lambda: _cnn(data), RECIPE, seed=1, log=lambda m: None)
    assert all(torch.equal(c1[k], c2[k]) for k in c1)
    assert torch.equal(c1["indices"], c3["indices"]) and not torch.equal(c1["delta"], c3["delta"])
    assert len(c1["retrain_accuracy"]) == 1 and float(c1["retrain_accuracy"][0]) > 0.5  # chance: 0.25
    with pytest.raises(BadExpertError, match="pass build_model"):
        a.craft(data, model, None, RECIPE, seed=0, log=lambda m: None)


# --- implanting ----------------------------------------------------------------------------------
def test_implant_on_blobs_the_poisons_plant_the_hidden_trigger(tmp_path):
    """Blobs' class bars are 0.55 bright, far more than 16/255 can hide, so this tiny run uses a
    larger eps (48/255) and poisons every target-class image. Measured with this setting over
    seeds 0-3: ASR 0.50 / 0.50 / 0.48 / 0.23, the clean model 0.00 on each; at the reference
    16/255, ASR 0 on every seed (the mean target probability on triggered source images
    0.0001-0.004, the clean model's 0.0000-0.002)."""
    tr, te = make_blobs(2000, seed=1), make_blobs(600, seed=2)
    recipe = RECIPE.replace(epochs=6)
    a = get_attack("sleeper_agent", poison_rate=0.25, eps=48 / 255, patch_size=6, craft_steps=60, retrain_every=20)
    logs = []
    comps = Components(tmp_path, log=logs.append)
    build = lambda: _cnn(tr, width=8)  # noqa: E731 (implant seeds the weights itself)
    torch.manual_seed(123)
    model, info = a.implant(tr, build, recipe, 0, log=logs.append, components=comps)
    assert info["poisoned_samples"] == int((tr.labels == 0).sum()) and info["cover_samples"] == 0
    craft = info["crafting"]
    assert craft["retrainings"] == 2 and craft["iterations"] == 60 and craft["max_linf"] == pytest.approx(48 / 255)
    assert craft["alignment_last"] < craft["alignment_first"] - 0.3
    assert set(info["phase_seconds"]) == {"clean_model", "sleeper_agent_poisons", "surrogate_retraining",
                                          "suspect_model"}
    m = evaluate(model, None, te, a).metrics
    clean = comps.clean_model(build, tr, recipe, 0)  # the surrogate, from the cache
    assert comps.records["clean_model"]["cached"]
    m0 = evaluate(clean, None, te, a).metrics
    assert m["clean_accuracy"] > 0.95 and m0["attack_success_rate"] < 0.05
    assert m["attack_success_rate"] > 0.3 + m0["attack_success_rate"]
    # a second implant (a grid cell) loads the crafted poisons and makes the same model
    torch.manual_seed(321)
    again = Components(tmp_path, log=logs.append)
    model2, info2 = a.implant(tr, build, recipe, 0, log=logs.append, components=again)
    assert again.records["sleeper_agent_poisons"]["cached"] and info2["crafting"] == craft
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), model2.state_dict().values()))


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_sleeper_agent_on_fashion_mnist(tmp_path):
    """Through the pipeline, at the reference eps (16/255) and patch (8x8), 5% poisons (half the
    T-shirts), a 20-iteration craft with one retraining, 3,000 images, 3 epochs: the effect is
    small but real. Measured on seeds 0-3 (suspect vs the clean surrogate): ASR 0.033 / 0.068 /
    0.061 / 0.172 vs 0.000 / 0.058 / 0.061 / 0.060; mean target probability on triggered trousers
    0.044 / 0.072 / 0.051 / 0.197 vs 0.020 / 0.050 / 0.048 / 0.068; ~22 s on one thread."""
    from badexpert.pipeline.experiment import ExperimentConfig, make_splits, train_suspect

    cfg = ExperimentConfig(dataset="fashion-mnist", arch="cnn", width=8, attack="sleeper_agent",
                           attack_params={"poison_rate": 0.05, "craft_steps": 20, "retrain_every": 10},
                           train_size=3000, test_size=1000, reserved=100, calibration=100, seed=0,
                           recipe={"optimizer": "adam", "lr": 3e-3, "batch_size": 64, "weight_decay": 0, "epochs": 3})
    splits = make_splits(cfg)
    tr = splits.train
    model, meta = train_suspect(cfg, splits, cache_dir=tmp_path, log=lambda m: None)
    craft = meta["crafting"]
    assert meta["poisoned_samples"] == 150 and craft["retrainings"] == 1
    assert craft["source_images"] == int((tr.labels == 1).sum())
    assert craft["alignment_last"] < craft["alignment_first"] and craft["max_linf"] == pytest.approx(16 / 255)
    assert meta["attack_state"]["patch"].shape == (1, 8, 8)
    clean = Components(tmp_path, log=lambda m: None).clean_model(
        lambda: build_model("cnn", in_channels=1, num_classes=10, image_size=tr.image_size, mean=tr.mean, std=tr.std,
                            width=8), tr, cfg.make_recipe(), 0)
    attack = cfg.make_attack()
    trig, _ = trigger_dataset(attack, splits.test, seed=0)
    m, m0 = (evaluate(net, None, splits.test, attack).metrics for net in (model, clean))
    p, p0 = (float(predict_logits(net, trig.images).softmax(1)[:, 0].mean()) for net in (model, clean))
    assert m["clean_accuracy"] > 0.7 and m0["clean_accuracy"] > 0.7
    assert m["attack_success_rate"] > m0["attack_success_rate"] and p > 1.5 * p0
