"""The attacks that know the defense (issue 20): low-opacity Blend, the BaDExpert-aware attack
(``expert_aware``) and the source-specific dynamic trigger (``ssdt``). Their mechanics (seeded,
the trigger state through a saved model, which samples are poisoned or covered), the contract
kit, and a real implant of each on the synthetic blobs (tiny CNN, seconds): the backdoor
implants on the source inputs, clean accuracy is kept, and the BaDExpert-aware evasion term
measurably weakens the backdoor in a simulated expert."""

import pytest
import torch

from badexpert.attacks import ATTACKS, ExpertAware, LowOpacity, SSDT, attack_from_meta, get_attack
from badexpert.errors import BadExpertError
from badexpert.evaluation.core import evaluate
from badexpert.io import load_model, save_model
from badexpert.models import build_model
from badexpert.testing import check_attack
from badexpert.training import Recipe, accuracy, predict_logits, train
from badexpert.utils import derive_generator

from .conftest import make_blobs, prepared, random_dataset

RECIPE = Recipe(optimizer="adam", lr=3e-3, epochs=6, batch_size=64, weight_decay=0, augment=False)
SHAPE = (1, 12, 12)


def _cnn(data, width=8):
    c, (h, w) = data.channels, data.image_size
    return lambda: build_model("cnn", in_channels=c, num_classes=data.num_classes, image_size=(h, w),
                               mean=data.mean, std=data.std, width=width)


def _meta(model, attack, data):
    return {"arch": "cnn", "width": 8, "in_channels": 1, "num_classes": data.num_classes, "image_size": [12, 12],
            "mean": list(data.mean), "std": list(data.std), "attack": attack.to_dict(),
            "attack_state": attack.trigger_state(SHAPE)}


def _same(s1, s2):
    return set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.fixture(scope="module")
def blobs():
    return make_blobs(1500, seed=1), make_blobs(600, seed=2)


@pytest.fixture(scope="module")
def clean_asr(blobs):
    """A clean model (same recipe): how often each attack's triggered inputs go to the target anyway."""
    tr, te = blobs
    model = _cnn(tr)()
    train(model, tr, RECIPE, seed=0)
    model.eval()
    return lambda attack: evaluate(model, None, te, attack, n_boot=0, throughput=False).metrics["attack_success_rate"]


@pytest.mark.parametrize("name", ["low_opacity", "expert_aware", "ssdt"])
def test_registered_with_the_contract(name):
    cls = {"low_opacity": LowOpacity, "expert_aware": ExpertAware, "ssdt": SSDT}[name]
    assert ATTACKS[name] is cls
    report = check_attack(cls, shape=SHAPE, classes=4, params={"generator_channels": 4} if name == "ssdt" else None)
    assert set(report.values()) == {"ok"}, report


# --- low-opacity ---------------------------------------------------------------------------------
def test_low_opacity_triggers_test_inputs_more_weakly_than_it_trains():
    a = get_attack("low_opacity", trigger_seed=3)
    assert (a.train_alpha, a.alpha, a.poison_rate) == (0.2, 0.15, 0.003)
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    key = a.build_trigger(SHAPE)["key"]
    assert torch.equal(key, get_attack("blend", trigger_seed=3).build_trigger(SHAPE)["key"])  # Blend's seeded key
    test = a.apply(x)
    assert torch.allclose(test, 0.85 * x + 0.15 * key, atol=1e-6)
    data = random_dataset(100, c=1, size=12, classes=4)
    poisoned = get_attack("low_opacity", trigger_seed=3, poison_rate=0.1).poison(data, derive_generator(0, "poison"))
    idx = torch.tensor(poisoned.meta["poison_indices"])
    trained = poisoned.images[idx].float() / 255
    assert torch.allclose(trained, 0.8 * data.images[idx].float() / 255 + 0.2 * key, atol=0.5 / 255 + 1e-6)
    # the test trigger moves an image three quarters as far as the training trigger
    assert torch.allclose((test - x).abs(), 0.75 * ((0.8 * x + 0.2 * key) - x).abs(), atol=1e-6)
    with pytest.raises(BadExpertError, match="'alpha' .the test opacity, 0.2. must be below 'train_alpha'") as err:
        get_attack("low_opacity", alpha=0.2, train_alpha=0.2)
    assert "\n" not in str(err.value)


def test_low_opacity_implants_at_its_weaker_test_trigger(blobs, clean_asr):
    """Trained at 0.2, triggered at 0.15: the backdoor generalises to the weaker blend (on these
    blobs it stops firing near 0.1, half the training opacity)."""
    tr, te = blobs
    a = get_attack("low_opacity", poison_rate=0.1, train_alpha=0.2, alpha=0.15)
    model, _ = a.implant(tr, _cnn(tr), RECIPE, 0, log=lambda m: None)
    m = evaluate(model, None, te, a, n_boot=0, throughput=False).metrics
    full = evaluate(model, None, te, get_attack("blend", alpha=0.2), n_boot=0, throughput=False).metrics
    print(f"low-opacity on blobs: ASR {m['attack_success_rate']:.3f} at 0.15 ({full['attack_success_rate']:.3f} at "
          f"0.2), CA {m['clean_accuracy']:.3f}; clean model ASR {clean_asr(a):.3f}")
    assert m["attack_success_rate"] >= 0.8 and clean_asr(a) <= 0.15 and m["clean_accuracy"] >= 0.97
    assert full["attack_success_rate"] >= m["attack_success_rate"]


# --- BaDExpert-aware -----------------------------------------------------------------------------
EA = dict(poison_rate=0.1, reserve=300, simulate_every=10, expert_steps=12, expert_lr=1e-3, expert_batch_size=64)


def test_expert_aware_parameters():
    a = get_attack("expert_aware")
    assert (a.alpha, a.train_alpha, a.strength, a.simulate_every, a.expert_steps, a.expert_lr, a.reserve) == (
        0.2, 0.15, 1.0, 100, 48, 1e-4, 2000)
    with pytest.raises(BadExpertError, match="'train_alpha' .the training opacity, 0.3. must not exceed 'alpha'") as err:
        get_attack("expert_aware", train_alpha=0.3)
    assert "\n" not in str(err.value)
    tr = make_blobs(200, seed=0)
    with pytest.raises(BadExpertError, match="'reserve' .200. must leave training samples"):
        get_attack("expert_aware", reserve=200).implant(tr, _cnn(tr), RECIPE, 0, log=lambda m: None)
    with pytest.raises(BadExpertError, match="'reserve' .2. is too small to simulate the defense"):
        get_attack("expert_aware", reserve=2).implant(tr, _cnn(tr), RECIPE, 0, log=lambda m: None)


def test_the_simulated_expert_is_the_detectors_and_the_evasion_loss_reads_it():
    """The simulated expert is the detector's own finetuning (wrong labels, Adam); the evasion
    loss at ``model + displacement`` equals ``softplus(log-odds of the target)`` of that expert
    in eval mode, and its gradient reaches the model's weights."""
    from badexpert.detectors.badexpert import expert_recipe, finetune_expert

    tr = make_blobs(300, seed=4)
    model = _cnn(tr)()
    train(model, tr, RECIPE.replace(epochs=2), seed=0)
    model.eval()
    a = get_attack("expert_aware", target=2, expert_steps=5, expert_lr=1e-3, expert_batch_size=32)
    expert = a.simulate(model, tr, 4, seed=7)
    same = finetune_expert(model, tr, expert_recipe(1e-3, epochs=1, batch_size=32, max_steps=5), num_classes=4,
                           seed=7, desc="simulated expert").eval()
    assert _same(expert.state_dict(), same.state_dict())
    assert not _same(expert.state_dict(), model.state_dict())
    x = a.apply(tr.images[:16])
    delta = a.displacement(model, expert)
    loss = a.evasion_loss(model, delta, x)
    with torch.no_grad():
        z = expert(x)
        others = torch.cat([z[:, :2], z[:, 3:]], 1)
        ref = torch.nn.functional.softplus(z[:, 2] - torch.logsumexp(others, 1)).mean()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-4)
    assert model.training is False  # the mode is restored
    loss.backward()
    assert all(p.grad is not None for p in model.parameters()) and float(model.net.fc.weight.grad.abs().sum()) > 0


@pytest.fixture(scope="module")
def expert_aware_runs(blobs):
    tr, _ = blobs
    out = {}
    for strength in (0.0, 1.0):
        a = get_attack("expert_aware", strength=strength, **EA)
        logs = []
        model, info = a.implant(tr, _cnn(tr), RECIPE, 0, log=logs.append)
        out[strength] = (a, model, info, logs)
    return out


def test_expert_aware_implants_and_keeps_clean_accuracy(blobs, clean_asr, expert_aware_runs):
    _, te = blobs
    a, model, info, logs = expert_aware_runs[1.0]
    m = evaluate(model, None, te, a, n_boot=0, throughput=False).metrics
    print(f"expert_aware (strength 1) on blobs: ASR {m['attack_success_rate']:.3f}, CA {m['clean_accuracy']:.3f}; "
          f"clean model ASR {clean_asr(a):.3f}; {info['simulated_expert']}")
    assert m["attack_success_rate"] >= 0.5 and clean_asr(a) <= 0.15 and m["clean_accuracy"] >= 0.97
    assert (info["poisoned_per_batch"], info["batch_size"], info["reserve"]) == (6, 64, 300)
    assert info["simulations"] >= 6 and "simulated_expert" in info["phase_seconds"]
    assert any("a simulated backdoor expert every 10 steps" in line for line in logs)


def test_the_evasion_term_weakens_the_backdoor_in_the_simulated_expert(expert_aware_runs):
    """Same seed, same trigger and poisoning: with the evasion term a fresh simulated expert of the
    final model gives the target to triggered inputs with much less confidence than without."""
    base = expert_aware_runs[0.0][2]
    evading = expert_aware_runs[1.0][2]
    assert base["simulations"] == 0 and evading["simulations"] > 0
    b, e = base["simulated_expert"], evading["simulated_expert"]
    print(f"simulated expert, strength 0: {b}; strength 1: {e}")
    assert b["target_rate"] >= 0.9
    assert e["target_confidence"] <= b["target_confidence"] - 0.2


def test_expert_aware_is_seeded():
    """The same seed gives the same model (initial weights, reserve, batches, simulated experts)
    whatever the global random state; another seed another one."""
    tr = make_blobs(400, seed=5)
    params = {**EA, "reserve": 100, "simulate_every": 4, "expert_steps": 4}

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        return get_attack("expert_aware", **params).implant(tr, _cnn(tr, width=4), RECIPE.replace(epochs=2), seed,
                                                            log=lambda m: None)

    (m1, i1), (m2, i2), (m3, _) = run(0, 0), run(0, 123), run(1, 0)
    assert i1["simulations"] > 0 and i1["simulated_expert"] == i2["simulated_expert"]
    assert _same(m1.state_dict(), m2.state_dict()) and not _same(m1.state_dict(), m3.state_dict())


def test_an_interrupted_expert_aware_training_resumes_to_the_same_model(tmp_path):
    """The attack's training runs simulated experts beside it; under a time budget it stops at an
    epoch's end with the last simulation kept, and the rerun ends with the weights, simulation
    count and final expert of an uninterrupted run."""
    from badexpert.errors import TimeBudgetReached
    from badexpert.training import time_budget

    tr = make_blobs(400, seed=5)
    params = {**EA, "reserve": 100, "simulate_every": 4, "expert_steps": 4}

    def run():
        return get_attack("expert_aware", **params).implant(tr, _cnn(tr, width=4), RECIPE.replace(epochs=3), 0,
                                                            log=lambda m: None)

    straight, info = run()
    with pytest.raises(TimeBudgetReached, match="after epoch 1 of 3"):
        with time_budget(0, checkpoint_dir=tmp_path):
            run()
    assert len(list(tmp_path.glob("train-*.safetensors"))) == 1
    with time_budget(None, checkpoint_dir=tmp_path):
        resumed, again = run()
    assert _same(resumed.state_dict(), straight.state_dict())
    assert again["simulations"] == info["simulations"] > 0
    assert again["simulated_expert"] == info["simulated_expert"]
    assert not list(tmp_path.glob("train-*.safetensors"))


def test_expert_aware_trigger_survives_a_saved_model(blobs, expert_aware_runs, tmp_path):
    tr, te = blobs
    a, model, info, _ = expert_aware_runs[1.0]
    _, loaded = load_model(save_model(tmp_path / "m.safetensors", model, _meta(model, a, tr)))
    restored = attack_from_meta(loaded)
    assert type(restored) is ExpertAware and restored.to_dict() == a.to_dict()
    x = te.images[:8]
    assert torch.equal(restored.apply(x), a.apply(x))


# --- SSDT ----------------------------------------------------------------------------------------
SMALL = dict(generator_channels=4, generator_blocks=2, mask_epochs=4, mask_density=0.1)


def test_ssdt_parameters_and_population():
    a = get_attack("ssdt")
    assert (a.source_classes, a.poison_rate, a.cover_rate, a.cross_rate, a.target) == ((1,), 0.02, 0.05, 0.05, 0)
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    assert a.counts(labels).tolist() == [False, True, False, False, True, False]  # source class only
    assert a.target_of(labels).tolist() == [0] * 6
    assert a.cover_candidates(labels, 4).tolist() == [2, 3, 5]  # neither a source nor the target
    for params, message in [({"source_classes": (0,)}, "contains the target class 0"),
                            ({"source_classes": ()}, "must name at least one class"),
                            ({"poison_rate": 0.5, "cover_rate": 0.3, "cross_rate": 0.3}, "add up to more than 1")]:
        with pytest.raises(BadExpertError, match=message) as err:
            get_attack("ssdt", **params)
        assert "\n" not in str(err.value)


def test_ssdt_batch_roles_flip_only_sources_and_covers_keep_their_labels():
    a = get_attack("ssdt", source_classes=(1,), poison_rate=0.125, cover_rate=0.25, cross_rate=0.25, **SMALL)
    pattern, mask = a.networks(1)
    mask.eval()
    y = torch.arange(32) % 4
    x = torch.rand(32, *SHAPE, generator=torch.Generator().manual_seed(0))
    changed, source, relabelled = a.batch_samples(y, torch.Generator().manual_seed(3))
    n_bd, n_cov, n_cross = 4, 8, 8
    assert len(changed) == n_bd + n_cov + n_cross and len(set(changed.tolist())) == len(changed)
    assert torch.equal(relabelled, changed[:n_bd]) and (y[relabelled] == 1).all()
    cover, cross = changed[n_bd:n_bd + n_cov], changed[n_bd + n_cov:]
    assert torch.isin(y[cover], torch.tensor([2, 3])).all()
    assert torch.equal(source[:n_bd + n_cov], changed[:n_bd + n_cov])  # backdoor and cover: their own trigger
    assert (source[n_bd + n_cov:] != cross).all()  # cross-trigger: another image's
    xt, yt = a.joint_batch(pattern, mask, x, y, torch.Generator().manual_seed(3))
    assert (yt[relabelled] == 0).all()
    kept = torch.ones(32, dtype=torch.bool)
    kept[relabelled] = False
    assert torch.equal(yt[kept], y[kept])  # covers and cross-trigger samples keep their labels
    moved = (xt != x).flatten(1).any(1)
    assert moved[changed].all() and not moved[~torch.isin(torch.arange(32), changed)].any()
    again = a.joint_batch(pattern, mask, x, y, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], xt) and torch.equal(again[1], yt)


def test_ssdt_static_poisoning_covers_other_classes_with_their_own_trigger():
    data = random_dataset(n=120, c=1, size=12, classes=4)
    a = prepared(get_attack("ssdt", poison_rate=0.05, cover_rate=0.1, **SMALL), SHAPE)
    p = a.poison(data, derive_generator(0, "poison"))
    idx, cov = torch.tensor(p.meta["poison_indices"]), torch.tensor(p.meta["cover_indices"])
    assert len(idx) == 6 and len(cov) == 12
    assert (data.labels[idx] == 1).all() and (p.labels[idx] == 0).all()
    assert torch.isin(data.labels[cov], torch.tensor([2, 3])).all() and torch.equal(p.labels[cov], data.labels[cov])
    own = (a.apply(data.images[cov]) * 255).round().to(torch.uint8)
    assert torch.equal(p.images[cov], own)


@pytest.fixture(scope="module")
def ssdt_implanted(blobs):
    tr, _ = blobs
    a = get_attack("ssdt", source_classes=(1,), poison_rate=0.1, cover_rate=0.2, cross_rate=0.1, **SMALL)
    logs = []
    model, info = a.implant(tr, _cnn(tr), RECIPE.replace(epochs=4), 0, log=logs.append)
    return a, model, info, logs


def test_ssdt_implants_on_the_source_class_only(blobs, clean_asr, ssdt_implanted):
    tr, te = blobs
    a, model, info, logs = ssdt_implanted
    assert (info["poisoned_per_batch"], info["cover_per_batch"], info["cross_per_batch"]) == (6, 13, 6)
    assert any("6 backdoor and 13 cover and 6 cross-trigger samples in every batch of 64" in line for line in logs)
    m = evaluate(model, None, te, a, n_boot=0, throughput=False).metrics
    pred = predict_logits(model, a.apply(te.images)).argmax(1)
    others = ~torch.isin(te.labels, torch.tensor([0, 1]))
    kept = float((pred[others] == te.labels[others]).float().mean())
    print(f"ssdt on blobs: source ASR {m['attack_success_rate']:.3f}, other classes keep their label under their "
          f"own trigger {kept:.3f}, CA {m['clean_accuracy']:.3f}; clean model ASR {clean_asr(a):.3f}")
    assert m["attack_success_rate"] >= 0.85 and clean_asr(a) <= 0.15 and m["clean_accuracy"] >= 0.97
    assert kept >= 0.9  # source-specific: the trigger does not flip the other classes
    assert accuracy(model, te) == pytest.approx(m["clean_accuracy"])


def test_ssdt_state_round_trip_and_seed(blobs, ssdt_implanted, tmp_path):
    tr, te = blobs
    a, model, _, _ = ssdt_implanted
    _, loaded = load_model(save_model(tmp_path / "m.safetensors", model, _meta(model, a, tr)))
    restored = attack_from_meta(loaded)
    assert type(restored) is SSDT and restored.to_dict() == a.to_dict()
    x = te.images[:32]
    assert torch.equal(restored.apply(x), a.apply(x))
    assert not torch.equal(prepared(get_attack("ssdt", **SMALL), SHAPE).apply(x), a.apply(x))  # trained
