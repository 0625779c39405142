"""Patch triggers that replace pixels: BadNet and Trojan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from ..validation import Range

from .base import Attack, Rate, load_trigger_image, place_bottom_right


def paste(x: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """``x (1 - m) + p m``: the trigger state's ``pattern`` p pasted through its ``mask`` m (the
    patch attacks, clean-label's corner patches, TrojanNN's optimised square)."""
    m = parts["mask"]
    return x * (1 - m) + parts["pattern"] * m


@dataclass
class PatchAttack(Attack):
    """Paste a pattern through a mask at a fixed place: ``x' = (1 - a m) x + a m p``.

    ``opacity`` is ``a`` (1 replaces the pixels). ``trigger_image``: a user's image file to use as
    the pattern instead of the built-in one (with a full mask).
    """

    opacity: Rate = 1.0
    trigger_image: str | None = None

    def pattern(self, channels: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, tuple[slice, slice]]:
        raise NotImplementedError

    def build_trigger(self, shape):
        c, h, w = shape
        pattern, mask, (rows, cols) = self.pattern(c, h, w)
        if self.trigger_image:
            ph, pw = pattern.shape[1:]
            pattern = load_trigger_image(self.trigger_image, c, (ph, pw))
            mask = torch.ones(1, ph, pw)
        full_p = torch.zeros(c, h, w)
        full_m = torch.zeros(1, h, w)
        full_p[:, rows, cols] = pattern
        full_m[:, rows, cols] = mask * self.opacity
        return {"pattern": full_p, "mask": full_m}

    def trigger(self, x, parts):
        return paste(x, parts)


@dataclass
class BadNet(PatchAttack):
    """BadNet (Gu et al., 2017): a 3x3 black-and-white patch in the bottom-right corner.

    The pattern is the research code's: white at the anti-diagonal corners and the centre
    (rows/cols 29-31 of a 32x32 image: white at (29,31), (30,30), (31,29), (31,31)), black
    elsewhere, the whole 3x3 square replaced.
    """

    poison_rate: Rate = 0.003
    size: Annotated[int, Range(ge=1)] = 3

    name: ClassVar[str] = "badnet"

    def pattern(self, channels, h, w):
        s = self.size
        p = torch.zeros(s, s)
        for i in range(s):
            p[i, s - 1 - i] = 1.0  # anti-diagonal
        p[s - 1, s - 1] = 1.0  # bottom-right corner
        rows, cols = place_bottom_right(h, w, (s, s), 0)
        return p.expand(channels, s, s).clone(), torch.ones(1, s, s), (rows, cols)


@dataclass
class Trojan(PatchAttack):
    """Trojan square (Liu et al., 2018 trigger shape, as the research code uses it): an 8x8
    square at rows/cols 21-28 of a 32x32 image (3 px from the bottom-right corner), scaled with
    the image size.

    The research code's trigger image is not shipped; this stand-in has the same geometry and a
    fixed, seeded multi-colour pattern (concentric rings). ``trigger_image`` replaces it.
    """

    poison_rate: Rate = 0.003

    name: ClassVar[str] = "trojan"

    def pattern(self, channels, h, w):
        s = max(3, round(8 * min(h, w) / 32))
        margin = round(3 * min(h, w) / 32)
        rows, cols = place_bottom_right(h, w, (s, s), margin)
        g = torch.Generator().manual_seed(self.trigger_seed + 1009)
        palette = torch.rand(4, 3, generator=g)
        palette[0] = torch.tensor([1.0, 0.0, 1.0])  # strong outer ring, visible in grayscale too
        palette[1] = torch.tensor([0.0, 1.0, 0.2])
        ii = torch.arange(s)
        ring = torch.minimum(torch.minimum(ii[:, None], ii[None, :]), torch.minimum(s - 1 - ii[:, None], s - 1 - ii[None, :]))
        rgb = palette[ring % 4].permute(2, 0, 1)  # [3, s, s]
        p = rgb if channels == 3 else rgb.mean(0, keepdim=True).expand(channels, s, s).clone()
        if channels == 1:
            # keep contrast between rings in grayscale
            p = torch.where((ring % 2 == 0)[None], torch.ones_like(p), torch.zeros_like(p)) * 0.8 + 0.1 * p
        return p, torch.ones(1, s, s), (rows, cols)
