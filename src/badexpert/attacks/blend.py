"""Blend (Chen et al., 2017): ``x' = (1 - alpha) x + alpha t`` with a full-image key pattern."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Attack, Rate, load_trigger_image


@dataclass
class Blend(Attack):
    """Blend a key pattern over the whole image at opacity ``alpha`` (0.2 in the research code).

    The research code blends a Hello-Kitty picture, which is not shipped; the default key here is
    the other pattern of the Blend paper, uniform random noise, seeded by ``trigger_seed``.
    ``trigger_image`` uses an image file instead.
    """

    poison_rate: Rate = 0.003
    alpha: Rate = 0.2
    train_alpha: Rate | None = None
    trigger_image: str | None = None

    name: ClassVar[str] = "blend"
    trigger_extent: ClassVar[str] = "image"  # blended over every pixel

    def build_trigger(self, shape):
        c, h, w = shape
        if self.trigger_image:
            key = load_trigger_image(self.trigger_image, c, (h, w))
        else:
            g = torch.Generator().manual_seed(self.trigger_seed + 2003)
            key = torch.rand(c, h, w, generator=g)
        return {"key": key}

    def trigger(self, x, parts):
        return (1 - self.alpha) * x + self.alpha * parts["key"]

    def trigger_train(self, x, parts, generator):
        a = self.alpha if self.train_alpha is None else self.train_alpha
        return (1 - a) * x + a * parts["key"]
