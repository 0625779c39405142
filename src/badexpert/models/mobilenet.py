"""MobileNetV2 (Sandler et al. 2018), CIFAR-style: stride-1 stem and a stride-1 second stage."""

from __future__ import annotations

import torch
from torch import nn

from . import he_init, sequential_split

# (expansion t, output channels c, repeats n, first-block stride s) from the paper's Table 2,
# with the 24-channel stage at stride 1 instead of 2 for small images, as CIFAR ports do.
CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor``, never dropping more than 10% (as published)."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers = _conv_bn(cin, hidden, 1) if expansion != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, cout, 1, act=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """``width`` is the stem's channel count before rounding (32 = width multiplier 1.0, 2.2M params)."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        mult = width / 32
        cin = _divisible(32 * mult)
        layers = _conv_bn(in_channels, cin, 3)
        for t, c, n, s in CONFIG:
            cout = _divisible(c * mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = _divisible(1280 * max(1.0, mult))
        layers += _conv_bn(cin, last, 1)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def _cuts(self) -> dict[str, int]:
        """``stem``; ``stage1`` .. ``stage7`` (the seven inverted-residual stages of :data:`CONFIG`);
        ``last_conv`` (the final 1x1 convolution: only pooling and the classifier are left)."""
        cuts, end = {"stem": 3}, 3
        for i, (_, _, n, _) in enumerate(CONFIG):
            end += n
            cuts[f"stage{i + 1}"] = end
        cuts["last_conv"] = end + 3
        return cuts

    def cut_points(self) -> tuple[str, ...]:
        return tuple(self._cuts())

    def split(self, at: str) -> tuple[nn.Module, nn.Module]:
        return sequential_split(self.features, self._cuts(), at, self.classifier)
