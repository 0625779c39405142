"""VGG-16 with batch norm (Simonyan & Zisserman 2015), CIFAR-style: conv stack, global pool, linear."""

from __future__ import annotations

import torch
from torch import nn

from . import he_init, sequential_split

# Output channels at the paper's width 64; "M" is a 2x2 max-pool.
CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(nn.Module):
    """Thirteen 3x3 conv-BN-ReLU layers in five pooled stages; channels scaled by ``width / 64``.

    The pools use ``ceil_mode=True`` so small inputs never shrink to nothing (28x28 goes
    28-14-7-4-2-1; 32x32 is halved exactly as usual), and an adaptive average pool to 1x1 feeds
    a single linear layer, so any input size at least 1x1 works.
    """

    def __init__(self, *, in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            cout = max(1, round(v * width / 64))
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def _cuts(self) -> dict[str, int]:
        """``stage1`` .. ``stage5``: after each pooled stage (its max-pool included)."""
        pools = [i + 1 for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        return {f"stage{k + 1}": end for k, end in enumerate(pools)}

    def cut_points(self) -> tuple[str, ...]:
        return tuple(self._cuts())

    def split(self, at: str) -> tuple[nn.Module, nn.Module]:
        return sequential_split(self.features, self._cuts(), at, self.fc)
