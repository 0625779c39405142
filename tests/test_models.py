"""Model architectures: shapes, width, seeding, normalisation, errors, and that they can learn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from badexpert.errors import BadExpertError
from badexpert.models import ARCHITECTURES, Classifier, build_model

# Small widths per architecture, to keep the tests fast where the default size does not matter.
SMALL = {"cnn": 8, "resnet18": 8, "vgg16bn": 8, "mobilenetv2": 8, "vit": 32}
INPUTS = [(1, 28), (3, 32)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small(arch: str, channels: int = 3, size=32, classes: int = 10, **kw) -> Classifier:
    return build_model(arch, in_channels=channels, num_classes=classes, image_size=size, width=SMALL[arch], **kw)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("channels,size", INPUTS)
def test_output_shape_at_default_width(arch, channels, size):
    for classes in (10, 43):
        model = build_model(arch, in_channels=channels, num_classes=classes, image_size=size).eval()
        with torch.no_grad():
            out = model(torch.rand(3, channels, size, size))
        assert out.shape == (3, classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["cnn", "resnet18", "vgg16bn", "mobilenetv2"])
def test_convnets_accept_other_sizes(arch):
    for h, w in [(20, 24), (64, 48), (9, 9)]:
        model = small(arch, size=(h, w)).eval()
        with torch.no_grad():
            assert model(torch.rand(2, 3, h, w)).shape == (2, 10)


def test_vit_patch_size_and_size_check():
    model = small("vit", size=(20, 24)).eval()  # 4 divides both
    assert model.net.patch_embed.stride == (4, 4)
    assert small("vit", size=(35, 35)).net.patch_embed.stride == (7, 7)
    with pytest.raises(BadExpertError, match="built for 20x24"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(BadExpertError, match="divisible"):
        small("vit", size=(29, 31))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_width_changes_parameter_count(arch):
    counts = [n_params(build_model(arch, in_channels=3, num_classes=10, image_size=32, width=w)) for w in (16, 32)]
    assert counts[0] < counts[1]


def test_default_widths_match_published_sizes():
    """ResNet-18, VGG-16-BN and MobileNetV2 for CIFAR-10 have these well-known sizes."""
    sizes = {a: n_params(build_model(a, in_channels=3, num_classes=10, image_size=32)) for a in ARCHITECTURES}
    assert sizes["resnet18"] == 11_173_962
    assert 14.7e6 < sizes["vgg16bn"] < 14.8e6
    assert 2.2e6 < sizes["mobilenetv2"] < 2.3e6
    assert sizes["cnn"] < 200_000 and sizes["vit"] < 1_000_000


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_seed_gives_identical_weights(arch):
    def weights(seed):
        torch.manual_seed(seed)
        return small(arch).state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_normalisation_is_the_first_layer(arch):
    mean, std = (0.2, 0.4, 0.6), (0.1, 0.25, 0.5)
    model = small(arch, mean=mean, std=std).eval()
    x = torch.rand(4, 3, 32, 32)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, model.net((x - m) / s))
        assert not torch.allclose(out, model.net(x), atol=1e-4)


def test_default_normalisation_maps_unit_range_to_symmetric():
    model = small("cnn", channels=1, size=28)
    assert torch.equal(model.normalize(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)).flatten(), torch.tensor([-1.0, 1.0]))


def test_unknown_architecture_lists_valid_names():
    with pytest.raises(BadExpertError) as info:
        build_model("alexnet", in_channels=3, num_classes=10, image_size=32)
    message = str(info.value)
    assert "alexnet" in message
    assert all(name in message for name in ARCHITECTURES)


def test_aliases():
    for alias, cls in [("ResNet-18", "ResNet18"), ("vgg16", "VGG16BN"), ("MobileNet_V2", "MobileNetV2")]:
        model = build_model(alias, in_channels=3, num_classes=10, image_size=32, width=8)
        assert type(model.net).__name__ == cls


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_parameter_gets_a_gradient(arch):
    torch.manual_seed(0)
    model = small(arch)
    nn.functional.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.arange(8)).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("arch,width,channels,size", [("cnn", 16, 1, 28), ("resnet18", 4, 3, 32), ("vit", 32, 3, 32)])
def test_can_memorise_random_labels(arch, width, channels, size):
    """64 noise images with random labels: only a network that trains end to end fits them."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, channels, size, size, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    model = build_model(arch, in_channels=channels, num_classes=10, image_size=size, width=width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(100):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            with torch.no_grad():
                acc = (model.eval()(x).argmax(1) == y).float().mean().item()
            model.train()
            if acc >= 0.95:
                break
    assert acc >= 0.95, f"{arch} reached only {acc:.0%} train accuracy after {step + 1} steps"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_runs_channels_last_on_a_cpu_with_the_same_outputs_and_gradients(arch):
    """On a CPU a Classifier's convolutions get their input in the channels-last layout (faster),
    whatever layout the caller's images are in, and the caller's images are left as they were (the
    ViT, one convolution then linear layers, gains nothing from it and keeps the usual layout). The
    logits and the input gradient are those of the usual layout (``channels_last(False)``) up to
    rounding: no further from a float64 computation than the usual layout's own float32 result."""
    from badexpert.models import channels_last

    torch.manual_seed(0)
    m = build_model(arch, in_channels=3, num_classes=10, image_size=32, width=64 if arch == "vit" else 4).eval()
    # a conv with several input channels (one channel is contiguous in either layout)
    conv = next(mod for mod in m.net.modules() if isinstance(mod, nn.Conv2d) and mod.in_channels > 1)
    seen = []
    conv.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.rand(4, 3, 32, 32)

    def run(dtype=torch.float32):
        xr = x.to(dtype).requires_grad_(True)
        out = m.to(dtype)(xr)
        (grad,) = torch.autograd.grad(out.logsumexp(1).sum(), xr)
        return out.detach().double(), grad.double()

    fast = run()
    with channels_last(False):
        usual = run()
        exact = run(torch.float64)
    assert seen[:2] == [arch != "vit", False] and m.channels_last_safe == (arch != "vit")
    assert x.is_contiguous() and fast[1].shape == x.shape
    for f, u, e in zip(fast, usual, exact):
        scale = e.norm()
        assert (f - e).norm() <= 2 * (u - e).norm() + 1e-6 * scale, (arch, (f - e).norm() / scale, (u - e).norm() / scale)
