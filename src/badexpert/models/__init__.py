"""Model architectures by name.

Every model built here takes float images in ``[0, 1]`` of shape ``[N, C, H, W]`` and returns
logits; per-channel normalisation is the model's first layer, so triggers, detectors and users
never handle normalised tensors. Any other ``nn.Module`` with that contract works with the rest
of badexpert too.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

import torch
from torch import nn

from ..errors import BadExpertError
from ..registry import Registry


# --- memory layout: channels-last on a CPU -----------------------------------------------------------
_CHANNELS_LAST: ContextVar[bool | None] = ContextVar("badexpert_channels_last", default=None)


@contextlib.contextmanager
def channels_last(enabled: bool | None = True) -> Iterator[None]:
    """Whether convolutional models run in the channels-last memory layout on a CPU within this
    block: the forward pass of a :class:`Classifier` with a convolutional network takes its images
    in that layout, and :func:`badexpert.training.train` keeps the model's weights and batches so
    while it trains (back to the usual layout when it ends, stops or fails). The same computation,
    faster on a CPU (``bench/train_layout.py``: 1.3-1.7x a training step of the ResNet, VGG,
    MobileNetV2 and CNN architectures, 1.2-1.7x a forward pass and 1.4-1.6x a forward and backward
    pass of the first three), equal up to floating-point rounding.

    By default (outside this block, or ``enabled=None``) a model that declares
    ``channels_last_safe = True`` runs so on a CPU: badexpert's own architectures
    (:class:`Classifier`), never a model from elsewhere, which may reshape its activations with
    ``view`` (the layout breaks that). ``True`` or ``False`` decides for every model in the block."""
    token = _CHANNELS_LAST.set(enabled)
    try:
        yield
    finally:
        _CHANNELS_LAST.reset(token)


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model`` runs in the channels-last layout on ``device`` (see :func:`channels_last`)."""
    wanted = _CHANNELS_LAST.get()
    if wanted is None:
        wanted = device.type == "cpu" and bool(getattr(model, "channels_last_safe", False))
    return bool(wanted)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with the statistics stored as buffers.

    A :class:`Classifier`'s (``channels_last_safe=True``: the first layer of its network and of every
    trunk split from it) also hands its output on in the channels-last layout wherever
    :func:`use_channels_last` says so (on a CPU, by default), so that every convolution after it
    runs in the faster layout whatever layout the caller's images and the weights are in. An
    exported (traced) graph carries no layout: not while tracing."""

    def __init__(self, mean, std, *, channels_last_safe: bool = False) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.channels_last_safe = channels_last_safe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one channel (grey images) is contiguous in either layout: nothing to hand on
        if (self.channels_last_safe and x.dim() == 4 and x.shape[1] > 1 and not torch.jit.is_tracing()
                and use_channels_last(self, x.device)):
            x = x.contiguous(memory_format=torch.channels_last)
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``Normalize`` followed by a network; what :func:`build_model` returns.

    It declares the cut points of its network (:func:`cut_points`, :func:`split_model`): the
    normalisation belongs to the trunk. Its convolutional networks run in the channels-last memory
    layout (they ``view`` no 4-D activation; a network class says otherwise with
    ``channels_last_safe = False``, as the ViT does): on a CPU its forward pass takes images in that
    layout and :func:`badexpert.training.train` keeps its weights so while it trains."""

    def __init__(self, net: nn.Module, mean, std) -> None:
        super().__init__()
        #: whether it runs in the channels-last layout (see :func:`channels_last`): faster on a CPU
        self.channels_last_safe = bool(getattr(net, "channels_last_safe", True))
        self.normalize = Normalize(mean, std, channels_last_safe=self.channels_last_safe)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def cut_points(self) -> tuple[str, ...]:
        return cut_points(self.net)

    def split(self, at: str) -> tuple[nn.Module, nn.Module]:
        trunk, head = self.net.split(at)
        return nn.Sequential(self.normalize, trunk), head


# --- cut points: where a network may be split into a trunk and a head ---------------------------------
# An architecture declares them with two methods: ``cut_points()`` (the names, shallow to deep) and
# ``split(at) -> (trunk, head)``, two modules made of the network's own submodules (no copies) with
# ``head(trunk(x))`` computing exactly ``forward(x)``, operation for operation.


def cut_points(model: nn.Module) -> tuple[str, ...]:
    """The cut points ``model`` declares (shallow to deep), or ``()`` for a model that declares none
    (every model from another source: Hugging Face, ONNX, a user's factory)."""
    fn = getattr(model, "cut_points", None)
    return tuple(fn()) if callable(fn) and callable(getattr(model, "split", None)) else ()


def split_model(model: nn.Module, at: str) -> tuple[nn.Module, nn.Module]:
    """``(trunk, head)`` of ``model`` cut after ``at`` (one of :func:`cut_points`): modules sharing
    the model's own layers, with ``head(trunk(x)) == model(x)``. A model without cut points, or a
    name that is not one of its cut points, is a one-line error."""
    points = cut_points(model)
    if not points:
        raise BadExpertError(
            f"this model ({type(model).__name__}) declares no cut points, so it cannot be split into a shared trunk "
            f"and a head; only badexpert's own architectures ({ARCHITECTURES.choices()}) declare them"
        )
    if at not in points:
        raise BadExpertError(f"'{at}' is not a cut point of this model; choose one of: {', '.join(points)}")
    return model.split(at)


def sequential_split(layers: nn.Sequential, ends: dict[str, int], at: str, *tail: nn.Module
                     ) -> tuple[nn.Module, nn.Module]:
    """The split of a network that is ``layers`` then ``tail``: the trunk is ``layers[:ends[at]]``,
    the head the rest of ``layers`` followed by ``tail`` (a name not in ``ends``: a one-line error)."""
    if at not in ends:
        raise BadExpertError(f"'{at}' is not a cut point of this model; choose one of: {', '.join(ends)}")
    k = ends[at]
    return layers[:k], nn.Sequential(*layers[k:], *tail)


def he_init(model: nn.Module) -> nn.Module:
    """He (Kaiming) normal init, fan-in mode, for every convolution; BN and linear layers keep torch's.

    Keeps the signal's scale through deep plain stacks, so even an untrained network in eval mode
    answers differently to different inputs (torch's default conv init shrinks it ~3x per layer).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _cnn(**kw):
    from .cnn import SmallCNN

    return SmallCNN(**kw)


def _resnet18(**kw):
    from .resnet import ResNet18

    return ResNet18(**kw)


def _vgg16bn(**kw):
    from .vgg import VGG16BN

    return VGG16BN(**kw)


def _mobilenetv2(**kw):
    from .mobilenet import MobileNetV2

    return MobileNetV2(**kw)


def _vit(**kw):
    from .vit import SmallViT

    return SmallViT(**kw)


#: Architectures by name (the networks are imported when first built).
ARCHITECTURES = Registry(
    "architecture",
    [("cnn", _cnn), ("resnet18", _resnet18), ("vgg16bn", _vgg16bn), ("mobilenetv2", _mobilenetv2), ("vit", _vit)],
    aliases={"vgg16": "vgg16bn", "mobilenet": "mobilenetv2", "resnet": "resnet18"},
)


def canonical_arch(arch: str) -> str:
    """The registry name for ``arch`` (aliases such as ``vgg16`` accepted), or a one-line error."""
    return ARCHITECTURES.canonical(arch)


def build_model(
    arch: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int] | int,
    mean=None,
    std=None,
    width: int | None = None,
) -> Classifier:
    """Build an architecture by name for a dataset's channels, classes and image size.

    ``width`` scales the network where the architecture has a width parameter (ResNet-18's
    first-stage channels, 64 in the paper; the CNN's first layer channels; the ViT's embedding
    dimension). ``None`` gives the architecture's default.
    """
    key = canonical_arch(arch)
    factory = ARCHITECTURES[key]
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    kwargs = {"in_channels": in_channels, "num_classes": num_classes, "image_size": tuple(image_size)}
    if width is not None:
        kwargs["width"] = int(width)
    mean = mean if mean is not None else (0.5,) * in_channels
    std = std if std is not None else (0.5,) * in_channels
    # a dry run on the meta device (no memory, no compute): an image too small for the
    # architecture, or a width it cannot have, is one line now rather than a traceback mid-training
    try:
        with torch.device("meta"):
            Classifier(factory(**kwargs), mean, std)(torch.empty(2, in_channels, *image_size))
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise BadExpertError(
            f"architecture '{key}' cannot be built for {in_channels}x{image_size[0]}x{image_size[1]} images"
            f"{f' at width {width}' if width is not None else ''} ({first}); choose a larger --image-size or "
            "another --arch"
        ) from exc
    return Classifier(factory(**kwargs), mean, std)


__all__ = ["ARCHITECTURES", "canonical_arch", "channels_last", "Classifier", "Normalize", "build_model", "cut_points",
           "he_init", "split_model", "use_channels_last"]
