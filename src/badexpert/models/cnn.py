"""A small three-convolution CNN: the default model for demos and tests (fast on a CPU)."""

from __future__ import annotations

import torch
from torch import nn

from . import he_init, sequential_split


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv(w)-pool, conv(2w)-pool, conv(4w), adaptive average pool to 3x3, linear.

    Each conv is 3x3 with batch norm and ReLU. Pooling to a 3x3 grid rather than 1x1 keeps coarse
    layout, which a net this shallow needs: on Fashion-MNIST (Adam, lr 1e-3, batch 128, no
    augmentation) at width 32 it reached ~89.7% test accuracy after 3 epochs against ~85% with global pooling.
    Works for any input at least 4x4; ``width=16`` (the default, chosen for 2-core CPUs) has about 29k parameters and reaches
    ~90% on Fashion-MNIST in four SGD epochs (bench/RESULTS.md).
    """

    def __init__(self, *, in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, w), nn.MaxPool2d(2),
            *conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
            *conv_bn_relu(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(3), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w * 9, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    #: cut points: after each conv block (its pooling included); after ``block3`` only the
    #: classifier (pooling and the linear layer) is left
    CUTS = {"block1": 4, "block2": 8, "block3": 11}

    def cut_points(self) -> tuple[str, ...]:
        return tuple(self.CUTS)

    def split(self, at: str) -> tuple[nn.Module, nn.Module]:
        return sequential_split(self.features, self.CUTS, at, self.fc)
