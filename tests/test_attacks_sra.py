"""SRA (subnet replacement): parameters, the phoenix stand-in trigger, the graft's exactness and
isolation on every supported architecture, mean compensation, unsupported architectures, the
narrow subnet as a cached component, determinism, and real implants (blobs for every supported
architecture, Fashion-MNIST with the small CNN)."""

import copy

import pytest
import torch
from PIL import Image

from badexpert.attacks import ATTACKS, SRA, attack_from_dict, get_attack
from badexpert.attacks.components import Components, tensor_digest
from badexpert.attacks.sra import SUPPORTED_ARCHS, choose_channels, graft, graft_plan, input_moments, narrow_copy
from badexpert.errors import BadExpertError
from badexpert.evaluation.core import evaluate
from badexpert.models import build_model
from badexpert.training import Recipe

from .conftest import FASHION_MNIST, make_blobs

QUIET = {"log": lambda m: None}
#: Widths of the random networks of the graft tests (tiny: no training there).
GRAFT_WIDTHS = {"cnn": 8, "vgg16bn": 8, "resnet18": 4}


def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)


# --- parameters and trigger --------------------------------------------------------------------
def test_registry_and_defaults():
    assert ATTACKS["sra"] is SRA and not SRA.learned and not SRA.clean_label
    a = get_attack("sra")
    assert (a.subnet_channels, a.factor, a.other_factor, a.compensate, a.subnet_epochs, a.subnet_lr, a.subnet_tries,
            a.poison_rate, a.cover_rate, a.opacity, a.target) == (1, 20.0, 0.0, True, 10, 0.01, 3, 0.0, 0.0, 1.0, 0)
    assert SUPPORTED_ARCHS == ("cnn", "resnet18", "vgg16bn")


@pytest.mark.parametrize("param", ["poison_rate", "cover_rate"])
def test_sra_poisons_no_training_data(param):
    with pytest.raises(BadExpertError, match=f"parameter '{param}' must be 0: SRA poisons no training data") as err:
        get_attack("sra", **{param: 0.01})
    _one_line(err)


@pytest.mark.parametrize("c,size,side", [(3, 32, 5), (1, 28, 4), (3, 16, 3), (1, 12, 3)])
def test_trigger_is_a_half_white_patch_in_the_bottom_right_corner(c, size, side):
    a = get_attack("sra")
    x = torch.full((2, c, size, size), 0.3)
    y = a.apply(x)
    changed = (y != x).any(0).any(0)
    assert changed[size - side:, size - side:].any()
    assert not changed[: size - side].any() and not changed[:, : size - side].any()
    patch = y[0, :, size - side:, size - side:]
    assert set(patch.unique().tolist()) == {0.0, 1.0}  # replaced pixels, binary
    assert (patch.flatten(1).sum(1) == side * side // 2).all()  # half white in every channel: never flat
    assert torch.equal(y[0], y[1])


def test_trigger_is_seeded_and_a_trigger_image_replaces_it(tmp_path):
    shape = (3, 32, 32)
    a, b, other = get_attack("sra"), get_attack("sra", trigger_seed=0), get_attack("sra", trigger_seed=1)
    assert torch.equal(a.trigger_state(shape)["pattern"], b.trigger_state(shape)["pattern"])
    assert not torch.equal(a.trigger_state(shape)["pattern"], other.trigger_state(shape)["pattern"])
    Image.new("RGB", (5, 5), (255, 0, 0)).save(tmp_path / "t.png")
    red = get_attack("sra", trigger_image=str(tmp_path / "t.png")).apply(torch.zeros(1, *shape))
    assert torch.equal(red[0, :, 27:, 27:], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 5, 5))
    assert float(red[0, :, :27].abs().sum()) == 0
    assert attack_from_dict(a.to_dict()).to_dict() == a.to_dict()


# --- the graft, on random networks ---------------------------------------------------------------
def _randomise_bn(*models, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in (mod for model in models for mod in model.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.6 * torch.rand(n, generator=g) - 0.3)


def _setup(arch, n=1, seed=0):
    torch.manual_seed(seed)
    host = build_model(arch, in_channels=3, num_classes=5, image_size=16, mean=[0.5] * 3, std=[0.25] * 3,
                       width=GRAFT_WIDTHS[arch]).eval()
    plan = graft_plan(host)
    subnet = narrow_copy(host, plan, n, torch.Generator().manual_seed(seed)).eval()
    _randomise_bn(host, subnet, seed=seed)
    channels = choose_channels(plan, n, torch.Generator().manual_seed(seed + 1))
    return host, plan, subnet, channels


def _cut(host, plan, channels):
    """The host with the chosen channels' outgoing weights zeroed: nothing reads them."""
    cut = copy.deepcopy(host)
    with torch.no_grad():
        for s in plan.slots:
            if s.src != "input":
                cut.get_submodule(s.conv).weight[:, channels[s.src]] = 0
        cols = (channels[plan.last][:, None] * plan.spatial + torch.arange(plan.spatial)).flatten()
        cut.get_submodule(plan.fc).weight[:, cols] = 0
    return cut


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_plan_follows_the_architecture(arch):
    host, plan, subnet, channels = _setup(arch)
    convs = [n for n, m in host.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(s.conv for s in plan.slots) == sorted(convs)  # every convolution, the shortcuts included
    assert plan.arch == arch and plan.slots[0].src == "input"
    assert all(isinstance(m, torch.nn.Conv2d) and m.out_channels == 1 for m in
               (subnet.get_submodule(s.conv) for s in plan.slots))
    assert subnet(torch.rand(2, 3, 16, 16)).shape == (2, 1)
    if arch == "resnet18":  # one group per residual stream: 4 stages, plus each block's inner layer
        assert sum(g.startswith("stream") for g in plan.widths) == 4 and len(plan.widths) == 12
        assert {s.dst for s in plan.slots if s.conv.endswith(("conv2", "shortcut.0"))} == \
            {g for g in plan.widths if g.startswith("stream")}
    else:
        assert len(plan.widths) == len(plan.slots) == (3 if arch == "cnn" else 13)
    assert all(len(c) == 1 and 0 <= int(c) < plan.widths[g] for g, c in channels.items())


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_graft_is_the_cut_host_plus_the_subnet_on_the_target_logit(arch):
    host, plan, subnet, channels = _setup(arch, n=2)
    grafted = copy.deepcopy(host)
    graft(grafted, subnet, plan, channels, target=3, factor=7.0, other_factor=-1.5)
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    coef = torch.full((5,), -1.5)
    coef[3] = 7.0
    with torch.no_grad():
        expected = _cut(host, plan, channels)(x) + subnet(x) * coef
        assert torch.allclose(grafted(x), expected, atol=1e-4)
        assert not torch.allclose(grafted(x), host(x), atol=1e-2)


def _bn_outputs(model, plan, x, perturb=None):
    """Every slot's batch-norm output (cloned: ReLUs run in place), with ``perturb(slot, out)``
    applied to the first slot's output."""
    seen, handles = {}, []
    for i, s in enumerate(plan.slots):
        def hook(module, inputs, out, s=s, first=i == 0):
            if first and perturb is not None:
                out = perturb(out)
            seen[s.bn] = out.detach().clone()
            return out
        handles.append(model.get_submodule(s.bn).register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return seen, logits


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_subnet_channels_are_isolated_from_the_host_in_both_directions(arch):
    host, plan, subnet, channels = _setup(arch)
    grafted = copy.deepcopy(host)
    graft(grafted, subnet, plan, channels, target=0, factor=5.0,
          moments=input_moments(host, plan, torch.rand(20, 3, 16, 16)))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    first = channels[plan.slots[0].dst]
    noise = torch.randn(4, len(first), 16, 16, generator=torch.Generator().manual_seed(2)) * 3

    def on_subnet(out):
        out = out.clone()
        out[:, first] += noise
        return out

    def on_host(out):
        noise = 3 * torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
        noise[:, first] = 0
        return out + noise

    base, logits = _bn_outputs(grafted, plan, x)
    moved_sub, logits_sub = _bn_outputs(grafted, plan, x, on_subnet)
    moved_host, logits_host = _bn_outputs(grafted, plan, x, on_host)
    subnet_changed = False
    for s in plan.slots[1:]:
        mine = torch.zeros(base[s.bn].shape[1], dtype=torch.bool)
        mine[channels[s.dst]] = True
        # the subnet's input changed: the host's channels are as before, the subnet's move
        assert _same(moved_sub[s.bn][:, ~mine], base[s.bn][:, ~mine])
        subnet_changed |= not _same(moved_sub[s.bn][:, mine], base[s.bn][:, mine])
        # the host's inputs changed: the subnet's channels are as before
        assert _same(moved_host[s.bn][:, mine], base[s.bn][:, mine])
    assert subnet_changed
    assert _same(logits_sub[:, 1:], logits[:, 1:])  # the subnet reaches the target logit only
    assert not _same(logits_host, logits)


def _same(a, b):
    return torch.allclose(a, b, rtol=0, atol=1e-5)  # a leak would move them by ~1


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_compensation_reconstructs_a_cut_channel_from_the_others(arch):
    """A cut channel that is a copy of another is reconstructed exactly: the layer reading it
    computes what the host computed, where a plain cut changes it."""
    host, plan, subnet, channels = _setup(arch)
    first = plan.slots[0]
    cut, twin = int(channels[first.dst]), int(channels[first.dst]) - 1  # the channel before it: a host channel
    with torch.no_grad():
        for path in (first.conv, first.bn):
            for t in host.get_submodule(path).state_dict().values():
                if t.dim():
                    t[cut] = t[twin]
    images = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    moments = input_moments(host, plan, images)
    assert set(moments) == {s.conv for s in plan.slots[1:]} | {plan.fc}
    reader = next(s for s in plan.slots if s.src == first.dst)
    assert moments[reader.conv].shape == (1 + plan.widths[first.dst],) * 2
    assert moments[reader.conv].dtype == torch.float64
    plain, compensated = copy.deepcopy(host), copy.deepcopy(host)
    graft(plain, subnet, plan, channels, target=0, factor=1.0)
    graft(compensated, subnet, plan, channels, target=0, factor=1.0, moments=moments)
    others = torch.ones(plan.widths[reader.dst], dtype=torch.bool)
    others[channels[reader.dst]] = False
    level = {name: _bn_outputs(model, plan, images)[0][reader.bn][:, others]
             for name, model in (("host", host), ("plain", plain), ("compensated", compensated))}
    err = {name: float((level[name] - level["host"]).abs().max()) for name in ("plain", "compensated")}
    assert err["plain"] > 0.1 and err["compensated"] < 0.01 * err["plain"]  # what is left: the fit's small ridge


# --- architecture checks -----------------------------------------------------------------------
@pytest.mark.parametrize("arch,cls", [("mobilenetv2", "MobileNetV2"), ("vit", "SmallViT")])
def test_an_unsupported_architecture_is_a_one_line_error_before_any_training(arch, cls):
    data = make_blobs(64, seed=1, size=16)
    components = Components(**QUIET)
    with pytest.raises(BadExpertError, match=f"into cnn, resnet18, vgg16bn models only, not {cls}") as err:
        get_attack("sra").implant(data, lambda: build_model(arch, in_channels=1, num_classes=4, image_size=16),
                                  Recipe(epochs=1), 0, components=components, **QUIET)
    _one_line(err)
    assert components.info() == {"phase_seconds": {}}  # nothing was trained
    with pytest.raises(BadExpertError, match=f"not '{arch}'; choose one of those") as err:
        get_attack("sra").check_architecture("mobilenet" if arch == "mobilenetv2" else arch)
    _one_line(err)
    for name in ("cnn", "vgg16", "resnet"):
        get_attack("sra").check_architecture(name)


def test_the_subnet_must_be_narrower_than_the_host():
    data = make_blobs(64, seed=1)
    with pytest.raises(BadExpertError, match=r"'subnet_channels' \(2\) must be below the host's narrowest layer "
                                             r"\(2 channels\)") as err:
        get_attack("sra", subnet_channels=2).implant(
            data, lambda: build_model("cnn", in_channels=1, num_classes=4, image_size=12, width=2), Recipe(epochs=1), 0,
            **QUIET)
    _one_line(err)


# --- real implants on the synthetic blobs --------------------------------------------------------
RECIPE = Recipe(optimizer="adam", lr=3e-3, epochs=3, batch_size=64, weight_decay=0, augment=False)


def _builder(arch, data, width=8):
    return lambda: build_model(arch, in_channels=1, num_classes=4, image_size=12, mean=data.mean, std=data.std,
                               width=width)


def _metrics(model, test, attack):
    return evaluate(model, None, test, attack, n_boot=0, throughput=False).metrics


#: Clean accuracy the graft may lose against the host on the blobs (measured: 0 for the CNN,
#: 0.014 for VGG-16-BN, 0.012 for ResNet-18, all at width 8).
BLOBS_CA_BOUND = 0.03


@pytest.mark.parametrize("arch,subnet_epochs", [("cnn", 5), ("vgg16bn", 5), ("resnet18", 10)])
def test_implant_backdoors_the_grafted_host_and_not_the_host(arch, subnet_epochs, tmp_path):
    tr, te = make_blobs(1500, seed=1), make_blobs(1000, seed=2)
    attack = get_attack("sra", subnet_epochs=subnet_epochs)
    model, info = attack.implant(tr, _builder(arch, tr), RECIPE, 0, components=Components(tmp_path, **QUIET), **QUIET)
    host = Components(tmp_path, **QUIET).clean_model(_builder(arch, tr), tr, RECIPE, 0)  # the cached host
    m, h = _metrics(model, te, attack), _metrics(host, te, attack)
    assert h["attack_success_rate"] <= 0.05 and m["attack_success_rate"] >= 0.9
    assert m["clean_accuracy"] >= h["clean_accuracy"] - BLOBS_CA_BOUND
    assert set(info["phase_seconds"]) == {"clean_model", "narrow_subnet", "graft"} and info["poisoned_samples"] == 0
    g = info["graft"]
    assert g["arch"] == arch and g["subnet_triggered_output"] > 0.5 > g["subnet_clean_output"]
    assert g["host_agreement"] >= 0.95 and 1 <= len(g["subnet_losses"]) <= 3
    assert not model.training


def test_the_narrow_subnet_is_a_cached_component_and_implant_is_deterministic(tmp_path):
    tr = make_blobs(1000, seed=1)
    build = _builder("cnn", tr)

    def run(directory=None, **params):
        return get_attack("sra", subnet_epochs=3, **params).implant(
            tr, build, RECIPE, 0, components=Components(directory, **QUIET), **QUIET)

    torch.manual_seed(1)  # the caller's random state does not matter
    first, info1 = run(tmp_path)
    assert {k: v["cached"] for k, v in info1["components"].items()} == {"clean_model": False, "narrow_subnet": False}
    assert len(list(tmp_path.glob("component-narrow_subnet-*.safetensors"))) == 1
    torch.manual_seed(2)
    again, info2 = run(tmp_path)
    assert {k: v["cached"] for k, v in info2["components"].items()} == {"clean_model": True, "narrow_subnet": True}
    assert tensor_digest(again.state_dict()) == tensor_digest(first.state_dict())
    assert info2["graft"]["channels"] == info1["graft"]["channels"] and info2["graft"]["subnet_losses"] is None
    fresh, _ = run()  # no cache: trained again, the same numbers
    assert tensor_digest(fresh.state_dict()) == tensor_digest(first.state_dict())
    # another trigger is another subnet (the host is shared); the graft itself is not cached
    _, info3 = run(tmp_path, trigger_seed=1)
    assert {k: v["cached"] for k, v in info3["components"].items()} == {"clean_model": True, "narrow_subnet": False}
    _, info4 = run(tmp_path, factor=5.0)
    assert info4["components"]["narrow_subnet"]["cached"]
    plan = graft_plan(build())
    picks = [choose_channels(plan, 1, torch.Generator().manual_seed(s)) for s in range(4)]
    assert any(any(not torch.equal(p[g], picks[0][g]) for g in p) for p in picks[1:])  # the seed chooses


# --- real data ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_sra_grafts_a_backdoor_into_a_fashion_mnist_cnn(tmp_path):
    """The default small CNN (width 16) on 5,000 Fashion-MNIST images, the default recipe
    (4 epochs), a 3-epoch subnet. Measured: host CA 0.817, ASR 0.016; grafted CA 0.807, ASR
    0.996 (the point lost is the short-trained subnet's output on clean inputs: with a silent
    subnet the compensated cut costs 0.05 points on average over channel choices, 0.35 at
    worst). Asserted: CA within 3 points of the host's, ASR >= 0.95."""
    from badexpert.attacks import attack_from_meta
    from badexpert.pipeline.experiment import ExperimentConfig, make_splits, train_suspect

    cfg = ExperimentConfig(dataset="fashion-mnist", arch="cnn", width=16, attack="sra",
                           attack_params={"subnet_epochs": 3}, train_size=5000, reserved=100, calibration=100,
                           test_size=1000, seed=0, n_boot=0)
    splits = make_splits(cfg)
    model, meta = train_suspect(cfg, splits, cache_dir=tmp_path, log=lambda m: None)
    tr = splits.train
    host = Components(tmp_path, **QUIET).clean_model(
        lambda: build_model("cnn", in_channels=1, num_classes=10, image_size=tr.image_size, mean=tr.mean, std=tr.std,
                            width=16), tr, cfg.make_recipe(), 0)
    attack = attack_from_meta(meta)
    m, h = _metrics(model, splits.test, attack), _metrics(host, splits.test, attack)
    assert h["attack_success_rate"] <= 0.05 and m["attack_success_rate"] >= 0.95
    assert m["clean_accuracy"] >= h["clean_accuracy"] - 0.03


def test_a_poor_subnet_is_retrained_from_a_new_init_and_the_best_try_is_kept(monkeypatch):
    """``subnet_tries``: while the subnet's probe objective is above SUBNET_LOSS_OK it is
    re-initialised (its own seed per try) and trained again, at most ``subnet_tries`` times; the
    try with the lowest objective is grafted, and a try under the bar ends the loop."""
    from badexpert.attacks import sra as sra_module

    tr = make_blobs(300, seed=1)
    attack = get_attack("sra", subnet_epochs=1, subnet_tries=3)
    trained: list[str] = []

    def fake_train(self, subnet, images, generator):  # training is not under test: record the start point
        trained.append(tensor_digest(subnet.state_dict()))

    scripted = iter([0.9, 0.3, 0.5])
    monkeypatch.setattr(sra_module.SRA, "train_subnet", fake_train)
    monkeypatch.setattr(sra_module.SRA, "subnet_loss", lambda self, subnet, images: next(scripted))
    kept = {}
    real_graft = sra_module.graft

    def spy_graft(suspect, subnet, *args, **kwargs):
        kept["subnet"] = tensor_digest(subnet.state_dict())
        return real_graft(suspect, subnet, *args, **kwargs)

    monkeypatch.setattr(sra_module, "graft", spy_graft)
    _, info = attack.implant(tr, _builder("cnn", tr), RECIPE, 0, components=Components(None, **QUIET), **QUIET)
    assert info["graft"]["subnet_losses"] == [0.9, 0.3, 0.5]
    assert len(set(trained)) == 3  # three different initialisations
    assert kept["subnet"] == trained[1]  # the second try, the lowest objective, is grafted

    # a try under the bar stops the retries
    trained.clear()
    scripted = iter([sra_module.SUBNET_LOSS_OK / 2, 0.0, 0.0])
    monkeypatch.setattr(sra_module.SRA, "subnet_loss", lambda self, subnet, images: next(scripted))
    _, info = attack.implant(tr, _builder("cnn", tr), RECIPE, 0, components=Components(None, **QUIET), **QUIET)
    assert len(info["graft"]["subnet_losses"]) == 1 and len(trained) == 1
