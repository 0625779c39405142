"""Adaptive backdoors (Qi et al., ICLR 2023, "Revisiting the assumption of latent separability
for backdoor defenses"): Adap-Blend and Adap-Patch.

Both weaken the link between the *training* trigger and the *test* trigger so that poisoned
samples do not form a separate cluster in the model's latent space:

- **diversification**: poisoned training samples carry only part of the trigger (a random half
  of the blend's grid cells, or one of several patches at a low opacity), different per sample;
- **conservatism**: "cover" samples carry the same partial triggers but keep their true labels;
- at test time the full trigger (all pieces, a higher opacity) is applied.

Every random choice made while poisoning comes from the ``generator`` handed to
:meth:`~badexpert.attacks.base.Attack.trigger_train` / ``trigger_cover`` (seeded by the
pipeline), never from the global random state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from ..errors import BadExpertError
from ..validation import OneOf, Range
from .base import Attack, Rate, place_bottom_right
from .blend import Blend
from .patch import Trojan


def _grid_cells(h: int, w: int, k: int) -> torch.Tensor:
    """``[h, w]`` int64 map: the index (row-major, ``0..k*k-1``) of the ``k x k`` grid cell of each pixel."""
    if k > h or k > w:
        raise BadExpertError(f"a {k}x{k} grid of trigger pieces does not fit in a {h}x{w} image; lower 'pieces'")
    rows = torch.arange(h) * k // h
    cols = torch.arange(w) * k // w
    return rows[:, None] * k + cols[None, :]


@dataclass
class AdaptiveBlend(Blend):
    """Adap-Blend: a full-image blend key cut into a ``k x k`` grid of pieces.

    Training (poisoned and cover samples alike): each sample gets its own random subset of the
    pieces, ``round(pieces * mask_rate)`` of them masked out, blended at ``train_alpha``:
    ``x' = (1 - a m) x + a m t`` with ``m`` the sample's piece mask. Poisoned samples are
    relabelled to ``target``, covers keep their labels. Test: the whole key at ``alpha``.

    Parameters (reference: the research code's settings, spec section D, "adaptive_blend" row):

    - key: the reference blends ``hellokitty_32.png``, not shipped; the default key is
      :class:`Blend`'s seeded uniform noise (``trigger_seed``), ``trigger_image`` uses a file.
    - ``alpha``: test-time opacity, **0.2** (reference).
    - ``train_alpha``: training opacity, **0.15** (reference README).
    - ``pieces``: **16** (reference: a 4x4 grid); a perfect square ``k * k``.
    - ``mask_rate``: fraction of the pieces masked out per training sample, **0.5** (reference:
      8 of 16 pieces masked out).
    - ``poison_rate``: **0.003**; ``cover_rate``: **0.003** (reference README, CIFAR-10).
    """

    poison_rate: Rate = 0.003
    cover_rate: Rate = 0.003
    alpha: Rate = 0.2
    train_alpha: Rate = 0.15
    pieces: Annotated[int, Range(ge=1)] = 16
    mask_rate: Rate = 0.5

    name: ClassVar[str] = "adaptive_blend"

    def __post_init__(self) -> None:
        super().__post_init__()
        if math.isqrt(self.pieces) ** 2 != self.pieces:
            raise BadExpertError(
                f"attack '{self.name}' parameter 'pieces' must be a perfect square (a k x k grid: 4, 9, 16, ...), "
                f"got {self.pieces}"
            )

    @property
    def masked_pieces(self) -> int:
        """How many pieces each training sample leaves out."""
        return int(round(self.pieces * self.mask_rate))

    def build_trigger(self, shape):
        c, h, w = shape
        parts = dict(super().build_trigger(shape))
        parts["cells"] = _grid_cells(h, w, math.isqrt(self.pieces))
        return parts

    def piece_masks(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, pieces]`` bool: which pieces each of ``n`` training samples keeps (random, from ``generator``)."""
        order = torch.rand(n, self.pieces, generator=generator).argsort(1)
        keep = torch.ones(n, self.pieces, dtype=torch.bool)
        keep.scatter_(1, order[:, : self.masked_pieces], False)
        return keep

    def trigger_train(self, x, parts, generator):
        keep = self.piece_masks(len(x), generator).to(x.device)
        m = keep[:, parts["cells"]].unsqueeze(1).to(x.dtype)  # [n, 1, h, w]
        a = self.train_alpha * m
        return (1 - a) * x + a * parts["key"]


def _scaled(n: int, h: int, w: int, minimum: int) -> int:
    """A length of ``n`` pixels on a 32x32 image, scaled to ``h x w`` (at least ``minimum``)."""
    return max(minimum, round(n * min(h, w) / 32))


def _paste(c: int, h: int, w: int, pattern: torch.Tensor, rows: slice, cols: slice,
           into: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A full-size (pattern ``[c, h, w]``, mask ``[1, h, w]``) with ``pattern`` at ``rows, cols``."""
    full_p, full_m = into if into is not None else (torch.zeros(c, h, w), torch.zeros(1, h, w))
    full_p[:, rows, cols] = pattern
    full_m[:, rows, cols] = 1.0
    return full_p, full_m


@dataclass
class AdaptivePatch(Attack):
    """Adap-Patch: several patch triggers; each training sample carries one of them at a low
    opacity, test inputs carry a combination of patches at full opacity.

    Training (poisoned and cover samples alike): the samples of each batch are split at random
    (from the pipeline's ``generator``) into four equal groups, one per training trigger, pasted
    at that trigger's opacity (``train_alphas``): ``x' = (1 - a m) x + a m p``. Poisoned samples
    are relabelled to ``target``, covers keep their labels.

    Test (``test_alpha``, 1 = pixels replaced), per ``test_triggers``: ``"cifar10"`` (reference,
    CIFAR-10) the phoenix patch at both bottom corners plus the four corner patches;
    ``"gtsrb"`` (reference, GTSRB) the firefox patch plus the Trojan square.

    The reference's trigger images are not shipped; seeded stand-ins (``trigger_seed``) with the
    geometry the reference records, on a 32x32 image and scaled with the image size:

    1. "phoenix corner": 5x5 random binary patch in the bottom-right corner (reference geometry
       of ``phoenix_corner_32.png``, as in SRA); train opacity **0.5**;
    2. "firefox corner": another 5x5 random binary patch in the bottom-right corner (the
       reference does not record this image's geometry: a stand-in); train opacity **0.2**;
    3. "badnet patch4": four 3x3 checkerboard patches at the four corners (reference geometry
       of ``badnet_patch4_32.png``); train opacity **0.5**;
    4. "trojan square": :class:`Trojan`'s 8x8 square at rows/cols 21-28; train opacity **0.3**.

    No ``trigger_image`` (the attack uses several images).

    Parameters (reference: spec section D, "adaptive_patch" row):

    - ``train_alphas``: **(0.5, 0.2, 0.5, 0.3)**, one per training trigger, in the order above.
    - ``test_alpha``: **1.0** (reference).
    - ``test_triggers``: **"cifar10"** (reference's CIFAR-10 combination) or ``"gtsrb"``.
    - ``poison_rate``: **0.003**; ``cover_rate``: **0.006** (reference README, CIFAR-10;
      GTSRB 0.005 and 0.01).
    """

    poison_rate: Rate = 0.003
    cover_rate: Rate = 0.006
    train_alphas: tuple[Rate, Rate, Rate, Rate] = (0.5, 0.2, 0.5, 0.3)
    test_alpha: Rate = 1.0
    test_triggers: Annotated[str, OneOf("cifar10", "gtsrb")] = "cifar10"

    name: ClassVar[str] = "adaptive_patch"

    def _binary_patch(self, c: int, s: int, salt: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.trigger_seed * 7919 + salt)
        p = (torch.rand(c, s, s, generator=g) > 0.5).float()
        # never a flat patch: a fixed checker bit on the first channel keeps contrast in grayscale
        p[0, 0, 0], p[0, -1, -1], p[0, 0, -1] = 1.0, 1.0, 0.0
        return p

    def build_trigger(self, shape):
        c, h, w = shape
        s5, s3 = _scaled(5, h, w, 3), _scaled(3, h, w, 2)
        if 2 * s5 > w or 2 * s3 > h or 2 * s3 > w:
            raise BadExpertError(f"the Adap-Patch triggers do not fit in a {h}x{w} image")
        phoenix = self._binary_patch(c, s5, 101)
        firefox = self._binary_patch(c, s5, 202)
        ii = torch.arange(s3)
        checker = ((ii[:, None] + ii[None, :]) % 2 == 0).float().expand(c, s3, s3)
        br5 = place_bottom_right(h, w, (s5, s5), 0)
        bl5 = (br5[0], slice(0, s5))
        corners3 = [(slice(r, r + s3), slice(q, q + s3)) for r in (0, h - s3) for q in (0, w - s3)]

        p_phoenix = _paste(c, h, w, phoenix, *br5)
        p_firefox = _paste(c, h, w, firefox, *br5)
        p_patch4 = None
        for rows, cols in corners3:
            p_patch4 = _paste(c, h, w, checker, rows, cols, into=p_patch4)
        t_pattern, t_mask, (t_rows, t_cols) = Trojan(trigger_seed=self.trigger_seed).pattern(c, h, w)
        p_trojan = (torch.zeros(c, h, w), torch.zeros(1, h, w))
        p_trojan[0][:, t_rows, t_cols] = t_pattern
        p_trojan[1][:, t_rows, t_cols] = t_mask
        train = [p_phoenix, p_firefox, p_patch4, p_trojan]

        if self.test_triggers == "cifar10":
            p_phoenix2 = _paste(c, h, w, phoenix, *br5)
            p_phoenix2 = _paste(c, h, w, phoenix, *bl5, into=p_phoenix2)
            test = [p_phoenix2, p_patch4]
        else:
            test = [p_firefox, p_trojan]
        return {
            "train_pattern": torch.stack([p for p, _ in train]),  # [4, c, h, w]
            "train_mask": torch.stack([m for _, m in train]),  # [4, 1, h, w]
            "test_pattern": torch.stack([p for p, _ in test]),  # [k, c, h, w], pasted in order
            "test_mask": torch.stack([m for _, m in test]),
        }

    def trigger(self, x, parts):
        for p, m in zip(parts["test_pattern"], parts["test_mask"]):
            a = self.test_alpha * m
            x = (1 - a) * x + a * p
        return x

    def assign(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Which training trigger (0..3) each of ``n`` samples gets: a random split into four
        groups of equal size (within one), drawn from ``generator``."""
        return torch.randperm(n, generator=generator) % len(self.train_alphas)

    def trigger_train(self, x, parts, generator):
        which = self.assign(len(x), generator).to(x.device)
        out = x.clone()
        for t, alpha in enumerate(self.train_alphas):  # one trigger at a time: no per-sample pattern copies
            sel = which == t
            a = alpha * parts["train_mask"][t]
            out[sel] = (1 - a) * x[sel] + a * parts["train_pattern"][t]
        return out

    def params(self) -> dict:
        d = super().params()
        d["train_alphas"] = list(d["train_alphas"])
        return d
