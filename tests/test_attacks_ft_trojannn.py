"""FT (finetuning a clean model with online poisoning by a base attack's trigger) and TrojanNN
(a trigger optimised to excite a clean model's penultimate neurons, then retraining): parameters,
delegation to the base attack, online poisoning, the trigger optimisation, cached components,
seeds, and real implants on the synthetic blobs (TrojanNN also on Fashion-MNIST)."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from badexpert.attacks import ATTACKS, FineTune, TrojanNN, attack_from_dict, attack_from_meta, get_attack
from badexpert.attacks.components import Components, tensor_digest
from badexpert.attacks.finetune import valid_bases
from badexpert.attacks.trojannn import final_linear, penultimate
from badexpert.errors import BadExpertError
from badexpert.evaluation.core import evaluate
from badexpert.pipeline.experiment import ExperimentConfig
from badexpert.io import load_model, save_model
from badexpert.models import build_model
from badexpert.training import Recipe
from badexpert.utils import derive_generator

from .conftest import FASHION_MNIST, make_blobs, random_dataset


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Blobs (12x12, 4 classes), a width-8 CNN builder, a short recipe, and a component cache that
    already holds the clean model (trained once for the whole module)."""
    tr, te = make_blobs(2000, seed=1), make_blobs(1000, seed=2)
    recipe = Recipe(optimizer="adam", lr=3e-3, epochs=3, batch_size=64, weight_decay=0, augment=False)

    def builder():
        return build_model("cnn", in_channels=1, num_classes=4, image_size=12, mean=tr.mean, std=tr.std, width=8)

    cache = tmp_path_factory.mktemp("components")
    clean = Components(cache, log=quiet).clean_model(builder, tr, recipe, 0)
    return SimpleNamespace(tr=tr, te=te, recipe=recipe, build=builder, cache=cache, clean=clean)


def _implant(task, attack, seed=0, cache=True):
    comp = Components(task.cache if cache else None, log=quiet)
    return attack.implant(task.tr, task.build, task.recipe, seed, log=quiet, components=comp)


def _metrics(model, task, attack):
    return evaluate(model, None, task.te, attack).metrics


def _one_line(err):
    assert "\n" not in str(err.value)


# --- registry and parameters -------------------------------------------------------------------
def test_registry_and_reference_defaults():
    assert ATTACKS["ft"] is FineTune and ATTACKS["trojannn"] is TrojanNN
    f = get_attack("ft")
    assert (f.base, f.base_params, f.poison_rate, f.cover_rate, f.finetune_epochs, f.finetune_lr, f.target) == \
        ("badnet", {}, 0.2, 0.0, 1, 0.01, 0)
    assert not f.learned and not f.clean_label and type(f.base_attack).name == "badnet"
    t = get_attack("trojannn")
    assert (t.poison_rate, t.neurons, t.target_activation, t.trigger_steps, t.trigger_lr, t.retrain_epochs,
            t.retrain_lr) == (0.1, None, 100.0, 1000, 0.1, 1, 0.01)
    assert t.learned and not t.clean_label
    # the reference's 100 of ResNet-18's 512 features, kept as a share for narrower layers
    assert [t.neuron_count(d) for d in (512, 576, 288, 144, 3)] == [100, 100, 56, 28, 1]
    assert get_attack("trojannn", neurons=7).neuron_count(288) == 7


@pytest.mark.parametrize("base, why", [
    ("ft", "FT finetunes with another attack's trigger"), ("trojannn", "learns its trigger"),
    ("sig", "a clean-label attack"), ("cl", "a clean-label attack"), ("nope", "not an attack"), ("", "not an attack"),
])
def test_a_bad_base_is_a_one_line_error_listing_the_valid_ones(base, why):
    with pytest.raises(BadExpertError, match=f"attack 'ft' parameter 'base' is '{base}'.*{why}") as err:
        get_attack("ft", base=base)
    _one_line(err)
    assert "choose one of: " + ", ".join(valid_bases()) in str(err.value)
    assert {"badnet", "blend", "trojan", "wanet", "all_to_all"} <= set(valid_bases())
    assert not {"ft", "trojannn", "sig", "cl"} & set(valid_bases())


@pytest.mark.parametrize("params, match", [
    ({"base_params": {"bogus": 1}}, r"attack 'ft' with base 'badnet': attack 'badnet' has no parameter"),
    ({"base": "blend", "base_params": {"alpha": 2}}, r"base 'blend': .*'alpha' must be a number in \[0, 1\]"),
    ({"base_params": {"target": 3}}, r"'base_params' sets \['target'\].*to the FT attack itself"),
    ({"base_params": {"poison_rate": 0.1}}, r"'base_params' sets \['poison_rate'\].*per batch"),
    ({"base_params": "{alpha: 0.1}"}, r"'base_params' must be an object \(JSON dict\).*write it as JSON"),
    ({"base_params": [1]}, r"'base_params' must be an object \(JSON dict\)"),
    ({"base": 3}, r"'base' must be a string"),
    ({"finetune_lr": 0}, r"'finetune_lr' must be"), ({"finetune_epochs": 0}, r"'finetune_epochs' must be"),
    ({"poison_rate": 1.5}, r"'poison_rate' must be"),
])
def test_ft_parameter_errors_name_the_parameter(params, match):
    with pytest.raises(BadExpertError, match=match) as err:
        get_attack("ft", **params)
    _one_line(err)


@pytest.mark.parametrize("params, match", [
    ({"neurons": 0}, "'neurons' must be"), ({"target_activation": 0}, "'target_activation' must be"),
    ({"trigger_steps": 0}, "'trigger_steps' must be"), ({"trigger_lr": -1}, "'trigger_lr' must be"),
    ({"retrain_epochs": 0}, "'retrain_epochs' must be"), ({"retrain_lr": 0}, "'retrain_lr' must be"),
])
def test_trojannn_parameter_errors_name_the_parameter(params, match):
    with pytest.raises(BadExpertError, match=f"attack 'trojannn' parameter {match}") as err:
        get_attack("trojannn", **params)
    _one_line(err)


def test_base_params_from_the_cli_and_json_configs(tmp_path, capsys):
    """``--attack-param base_params=<JSON>`` and a config's attack_params give the same attack;
    the record is canonical (registry name, lists), so it survives JSON unchanged."""
    from badexpert.cli import main

    cfg = ExperimentConfig.from_dict(json.loads(
        '{"attack": "ft", "attack_params": {"base": "TaCT", "base_params": {"cover_classes": [2, 3]}}}'))
    a = cfg.validate().make_attack()
    assert a.base == "tact" and a.base_params == {"cover_classes": [2, 3]} and a.base_attack.cover_classes == (2, 3)
    b = get_attack("ft", base="tact", base_params={"cover_classes": (2, 3)})
    assert b.to_dict() == a.to_dict() == attack_from_dict(json.loads(json.dumps(a.to_dict()))).to_dict()
    # the CLI reads the value as JSON: valid parameters reach the data path, invalid ones do not
    argv = ["train", "--data-path", str(tmp_path / "nodata"), "--attack", "ft", "--attack-param", "base=blend",
            "--out", str(tmp_path / "m.safetensors"), "--attack-param"]
    assert main(argv + ['base_params={"alpha": 0.1}']) != 0
    assert "nodata" in capsys.readouterr().err
    assert main(argv + ['base_params={"alpha": 1.5}']) != 0
    assert "'alpha' must be" in capsys.readouterr().err


# --- FT: the trigger and the labels are the base attack's ---------------------------------------
def test_ft_uses_the_base_attacks_trigger_and_label_map():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ft = get_attack("ft", base="blend", base_params={"alpha": 0.3}, trigger_seed=3, target=2)
    blend = get_attack("blend", alpha=0.3, trigger_seed=3, target=2)
    assert torch.equal(ft.apply(x), blend.apply(x))
    assert tensor_digest(ft.trigger_state((3, 16, 16))) == tensor_digest(blend.trigger_state((3, 16, 16)))
    other_seed = get_attack("ft", base="blend", base_params={"alpha": 0.3}, trigger_seed=4, target=2)
    assert not torch.equal(ft.apply(x), other_seed.apply(x))  # the seed is passed on (all else equal)
    labels = torch.tensor([0, 1, 2, 3])
    a2a = get_attack("ft", base="all_to_all")
    assert a2a.target_of(labels, 4).tolist() == [1, 2, 3, 0] and a2a.counts(labels, 4).all()
    assert "(y + 1) mod C" in a2a.describe_target()
    tact = get_attack("ft", base="tact", base_params={"cover_classes": [2]})  # TaCT's source class 1
    assert tact.counts(labels, 4).tolist() == [False, True, False, False]
    assert tact.cover_candidates(labels, 4).tolist() == [2]
    with pytest.raises(BadExpertError, match="cover class 5 is outside 0..3"):
        get_attack("ft", base="tact").check(4)
    assert get_attack("ft", source_classes=[3]).counts(labels, 4).tolist() == [False, False, False, True]


def test_ft_trigger_state_restores_the_base_trigger(tmp_path):
    """A model saved with FT restores the base's trigger from its state, even when the trigger
    image it was built from is gone."""
    from PIL import Image

    img = tmp_path / "t.png"
    Image.fromarray((torch.rand(4, 4, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(img)
    a = get_attack("ft", base="trojan", base_params={"trigger_image": str(img)})
    assert a.source_files() == [str(img)]
    shape = (3, 32, 32)
    model = build_model("cnn", in_channels=3, num_classes=10, image_size=32, width=4)
    meta = {"arch": "cnn", "width": 4, "in_channels": 3, "num_classes": 10, "image_size": [32, 32],
            "mean": [0.5] * 3, "std": [0.5] * 3, "attack": a.to_dict(), "attack_state": a.trigger_state(shape)}
    path = save_model(tmp_path / "m.safetensors", model, meta)
    img.unlink()
    with pytest.raises(BadExpertError, match="does not exist"):
        attack_from_dict(a.to_dict())  # the base checks its files
    restored = attack_from_meta(load_model(path)[1])
    x = torch.rand(2, *shape)
    assert torch.equal(restored.apply(x), a.apply(x))


def test_ft_online_poisoning_of_one_batch():
    data = random_dataset(n=64, c=3, size=8, classes=4)
    x, y = data.images.float() / 255, data.labels.clone()
    a = get_attack("ft", base="tact", target=0, poison_rate=0.25, cover_rate=0.25,
                   base_params={"cover_classes": [2, 3]})
    xo, yo = a.batch_transform(x, y, torch.Generator().manual_seed(0), num_classes=4)
    changed = (xo != x).flatten(1).any(1)
    poisoned, covers = changed & (yo != y), changed & (yo == y)
    # 16 poisons wanted, but only the 16 source-class (1) samples qualify; covers from classes 2 and 3
    assert int(poisoned.sum()) == 16 and (y[poisoned] == 1).all() and (yo[poisoned] == 0).all()
    assert int(covers.sum()) == 16 and torch.isin(y[covers], torch.tensor([2, 3])).all()
    assert torch.allclose(xo[changed], a.apply(x[changed]))  # the Trojan square (no random part)
    assert torch.equal(xo[~changed], x[~changed]) and torch.equal(yo[~changed], y[~changed])
    again = a.batch_transform(x, y, torch.Generator().manual_seed(0), num_classes=4)
    assert torch.equal(again[0], xo) and torch.equal(again[1], yo)
    other = a.batch_transform(x, y, torch.Generator().manual_seed(1), num_classes=4)
    assert not torch.equal(other[0], xo)
    # the static poison(): a poison_rate share of the set, relabelled, with the base trigger
    p = get_attack("ft", poison_rate=0.1).poison(random_dataset(n=200), derive_generator(0, "poison"))
    assert len(p.meta["poison_indices"]) == 20 and (p.labels[p.meta["poison_indices"]] == 0).all()


def test_ft_refuses_a_batch_too_small_to_poison(task):
    with pytest.raises(BadExpertError, match="poisons no sample of a 64-sample batch") as err:
        _implant(task, get_attack("ft", poison_rate=0.005))
    _one_line(err)


# --- FT: implants -------------------------------------------------------------------------------
def _weights(model):
    return torch.cat([v.flatten().float() for k, v in model.state_dict().items() if v.is_floating_point()])


def test_ft_finetunes_the_clean_model_and_implants_in_one_epoch(task):
    a = get_attack("ft")
    model, info = _implant(task, a)
    assert info["components"]["clean_model"]["cached"]  # the module's clean model, not a new one
    assert set(info["phase_seconds"]) == {"finetune"} and info["poisoned_per_batch"] == 13
    assert info["finetune_recipe"]["lr"] == 0.01 and info["finetune_recipe"]["epochs"] == 1
    clean = _metrics(task.clean, task, a)
    m = _metrics(model, task, a)
    assert clean["clean_accuracy"] > 0.95 and clean["attack_success_rate"] < 0.05  # no backdoor before
    assert m["clean_accuracy"] > 0.95 and m["attack_success_rate"] > 0.9  # measured: 1.0 / 1.0
    # the finetuned weights stay near the clean model's (a fresh network is far away)
    w_clean = _weights(task.clean)
    moved = float((_weights(model) - w_clean).norm() / w_clean.norm())
    fresh = float((_weights(task.build()) - w_clean).norm() / w_clean.norm())
    assert moved < 0.3 and fresh > 3 * moved  # measured over seeds 0-2: 0.11-0.14 against 0.88-0.91
    again, _ = _implant(task, get_attack("ft"))  # seeded: the same model again
    assert tensor_digest(again.state_dict()) == tensor_digest(model.state_dict())


def test_ft_with_blend_learns_the_blend_trigger(task):
    blend_ft = get_attack("ft", base="blend", base_params={"alpha": 0.3})
    model, _ = _implant(task, blend_ft)
    assert _metrics(model, task, blend_ft)["attack_success_rate"] > 0.8
    assert _metrics(model, task, get_attack("badnet"))["attack_success_rate"] < 0.1  # not a patch backdoor
    assert _metrics(task.clean, task, blend_ft)["attack_success_rate"] < 0.1


# --- TrojanNN -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, size, width, where", [
    ("cnn", 12, 4, "net.fc"), ("resnet18", 16, 4, "net.fc"), ("vgg16bn", 16, 4, "net.fc"),
    ("mobilenetv2", 16, 4, "net.classifier.1"), ("vit", 16, 16, "net.head"),
])
def test_the_penultimate_layer_of_every_architecture(arch, size, width, where):
    model = build_model(arch, in_channels=3, num_classes=5, image_size=size, width=width)
    x = torch.rand(3, 3, size, size)
    layer = final_linear(model, x)
    assert layer is model.get_submodule(where)
    feats = penultimate(model.eval(), layer, x)
    assert feats.shape == (3, layer.in_features)
    assert torch.allclose(layer(feats), model(x), atol=1e-5)  # they are what the head classifies


def test_a_model_without_a_final_linear_layer_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU())
    with pytest.raises(BadExpertError, match="final torch.nn.Linear layer") as err:
        final_linear(model, torch.rand(2, 1, 4, 4))
    _one_line(err)
    with pytest.raises(BadExpertError, match="'neurons' is 300 but the model's last layer has only 288"):
        get_attack("trojannn", neurons=300).neuron_count(288)


def test_trojannn_selects_the_neurons_with_the_largest_outgoing_weights():
    layer = nn.Linear(6, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -5, 0, 2, 0, 0], [1, 0, 0, -2, 0, 3], [1, 0, 0.5, 0, 0, -3]]))
    assert get_attack("trojannn", neurons=3).select_neurons(layer).tolist() == [5, 1, 3]  # 6, 5, 4
    assert get_attack("trojannn", neurons=4).select_neurons(layer).tolist() == [5, 1, 3, 0]  # 0 (3) before 2 (0.5)


def test_trojannn_has_no_trigger_before_implanting():
    with pytest.raises(BadExpertError, match="learns its trigger") as err:
        get_attack("trojannn").poison(random_dataset(n=50), derive_generator(0, "p"))
    _one_line(err)


@pytest.mark.parametrize("shape", [(1, 12, 12), (3, 32, 32)])
def test_trojannn_trigger_lies_inside_the_trojan_square(shape):
    a = get_attack("trojannn")
    state = a.initial_state(shape)
    trojan_mask = get_attack("trojan").trigger_state(shape)["mask"]
    assert torch.equal(state["mask"], trojan_mask)  # the same square as the trojan attack
    assert float(state["pattern"][(state["mask"] == 0).expand_as(state["pattern"])].abs().max()) == 0
    assert 0 <= float(state["pattern"].min()) and float(state["pattern"].max()) <= 1
    a.restore_state(shape, state)
    x = torch.rand(2, *shape)
    out = a.apply(x)
    outside = (trojan_mask == 0).expand_as(x)
    assert torch.equal(out[outside], x[outside]) and not torch.equal(out, x)
    # the starting pattern is seeded by trigger_seed
    assert torch.equal(get_attack("trojannn").initial_state(shape)["pattern"], state["pattern"])
    assert not torch.equal(get_attack("trojannn", trigger_seed=1).initial_state(shape)["pattern"], state["pattern"])


def test_trojannn_optimisation_raises_the_selected_neurons_activation(task):
    a = get_attack("trojannn", trigger_steps=100)
    shape = (1, 12, 12)
    state = a.optimise_trigger(task.clean, task.tr.images, derive_generator(0, "t"))
    assert torch.equal(state["mask"], a.initial_state(shape)["mask"])  # still inside the square
    layer = final_linear(task.clean, task.tr.images[:2].float() / 255)
    neurons = a.select_neurons(layer)
    assert len(neurons) == 56  # 288 features at width 8
    probe = task.tr.images[:256]

    def act(parts):
        return a.neuron_activation(task.clean, layer, neurons, probe, parts)

    g = torch.Generator().manual_seed(0)
    randoms = [act(a.state_of(2 * torch.randn(a.initial_weights(shape).shape, generator=g), shape)) for _ in range(8)]
    before, after = act(a.initial_state(shape)), act(state)
    # measured: clean 0.60, start 0.62, random patterns <= 0.67, optimised 0.72
    assert after > before + 0.05 and after > max(randoms) + 0.02 and after > act(None) + 0.05
    # seeded: the same batches and start give the same pattern, another start another one
    again = a.optimise_trigger(task.clean, task.tr.images, derive_generator(0, "t"))
    assert tensor_digest(again) == tensor_digest(state)
    other = get_attack("trojannn", trigger_steps=100, trigger_seed=1)
    assert not torch.equal(other.optimise_trigger(task.clean, task.tr.images, derive_generator(0, "t"))["pattern"],
                           state["pattern"])


def test_trojannn_implants_on_blobs_and_its_trigger_is_a_cached_component(task, tmp_path):
    a = get_attack("trojannn", trigger_steps=100)
    model, info = _implant(task, a)
    comps = info["components"]
    assert comps["clean_model"]["cached"] and not comps["trojannn_trigger"]["cached"]
    assert set(info["phase_seconds"]) == {"trojannn_trigger", "poison", "retrain"}
    assert info["poisoned_samples"] == 200 and len(info["neurons"]) == 56 and info["penultimate_features"] == 288
    act = info["neuron_activation"]
    assert act["optimised"] > act["initial"] + 0.05
    m = _metrics(model, task, a)
    assert m["clean_accuracy"] > 0.95 and m["attack_success_rate"] > 0.9  # measured: 1.0 / 1.0
    assert _metrics(task.clean, task, a)["attack_success_rate"] < 0.05  # the trigger alone does not flip the clean model
    # a second implant loads the clean model and the trigger, and gives the same model
    b = get_attack("trojannn", trigger_steps=100)
    model2, info2 = _implant(task, b)
    assert info2["components"]["trojannn_trigger"]["cached"] and "trojannn_trigger" not in info2["phase_seconds"]
    assert info2["components"]["trojannn_trigger"]["key"] == comps["trojannn_trigger"]["key"]
    assert tensor_digest(b.trigger_state((1, 12, 12))) == tensor_digest(a.trigger_state((1, 12, 12)))
    assert tensor_digest(model2.state_dict()) == tensor_digest(model.state_dict())
    # other parameters are another component
    _, info3 = _implant(task, get_attack("trojannn", trigger_steps=100, target_activation=50.0))
    assert info3["components"]["trojannn_trigger"]["key"] != comps["trojannn_trigger"]["key"]
    # the learned trigger is saved with the model and restored from it
    meta = {"arch": "cnn", "width": 8, "in_channels": 1, "num_classes": 4, "image_size": [12, 12],
            "mean": list(task.tr.mean), "std": list(task.tr.std), "attack": a.to_dict(),
            "attack_state": a.trigger_state((1, 12, 12))}
    loaded, meta = load_model(save_model(tmp_path / "m.safetensors", model, meta))
    assert _metrics(loaded, task, attack_from_meta(meta))["attack_success_rate"] == m["attack_success_rate"]


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_trojannn_implants_on_fashion_mnist():
    from badexpert.data import load_dataset

    train_all, test_all = load_dataset("fashion-mnist")
    tr = train_all.subset(torch.randperm(len(train_all), generator=torch.Generator().manual_seed(0))[:3000])
    te = test_all.subset(torch.arange(1000))
    recipe = Recipe(optimizer="adam", lr=3e-3, epochs=3, batch_size=64, weight_decay=0, augment=False)
    a = get_attack("trojannn", trigger_steps=200)
    model, info = a.implant(tr, lambda: build_model("cnn", in_channels=1, num_classes=10, image_size=28, mean=tr.mean,
                                                    std=tr.std, width=16), recipe, 0, log=quiet)
    # measured on one thread: CA 0.78 (clean model 0.78), ASR 0.996, activation 0.48 -> 0.58, ~20 s
    assert info["neuron_activation"]["optimised"] > info["neuron_activation"]["initial"] + 0.05
    m = evaluate(model, None, te, a).metrics
    assert m["clean_accuracy"] > 0.7 and m["attack_success_rate"] > 0.9
