"""WaNet (Nguyen and Tran, ICLR 2021, "WaNet -- Imperceptible warping-based backdoor attack"):
a small, smooth, fixed geometric warp of the whole image is the trigger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F

from ..errors import BadExpertError
from ..validation import Range
from .base import Attack, Rate


def identity_grid(h: int, w: int) -> torch.Tensor:
    """``[1, h, w, 2]``: the sampling grid of :func:`torch.nn.functional.grid_sample` that leaves an
    ``h x w`` image unchanged (``align_corners=True``); last axis ``(x, y)`` = (column, row) in ``[-1, 1]``."""
    rows = torch.linspace(-1, 1, h)
    cols = torch.linspace(-1, 1, w)
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack((xx, yy), dim=-1)[None]


@dataclass
class WaNet(Attack):
    """WaNet: warp the whole image with one fixed, smooth, random displacement field (a small
    geometric distortion); noise-mode cover samples, warped with extra random jitter, keep their labels.

    The field (the paper's formulas): ``P`` of shape ``[2, k, k]`` uniform in ``[-1, 1]`` (drawn
    from ``trigger_seed``), divided by its mean absolute value, upsampled bicubically
    (``align_corners=True``) to ``[2, H, W]``. The warp grid is
    ``clamp((identity + strength * P_up / H) * grid_rescale, -1, 1)`` (``H`` the image height, for
    both coordinates, as in the paper), applied with
    :func:`torch.nn.functional.grid_sample` (bilinear, ``align_corners=True``). The grid is the
    attack's saved trigger state (``"grid"``, ``[1, H, W, 2]``).

    Poisoned samples (any non-target class) get the warp and the target label. Cover samples (the
    paper's "noise mode") get the warp plus their own random per-pixel perturbation, uniform in
    ``[-1, 1] / H`` per grid coordinate (clamped to ``[-1, 1]``), and keep their labels, so the
    model learns that only this exact warp is the trigger. Test inputs get the fixed warp.

    Parameters (reference: the BaDExpert research toolbox's WaNet settings):

    - ``k``: control-grid size of the random field, **4** (reference); at least 2 and at most
      the image height and width (checked when the trigger is built).
    - ``strength``: ``s``, **0.5** (reference); 0 gives the identity warp.
    - ``grid_rescale``: **1.0** (reference).
    - ``poison_rate``: **0.05** (reference), a fraction of the whole training set.
    - ``cover_rate``: **0.1** (reference: cross ratio 2 x the poison rate), noise-mode samples.

    Departure: the research code draws the field from the global random state; here it comes
    from ``trigger_seed`` (same seed, same warp), and the cover perturbations from the seeded
    poisoning generator.
    """

    poison_rate: Rate = 0.05
    cover_rate: Rate = 0.1
    k: Annotated[int, Range(ge=2)] = 4
    strength: Annotated[float, Range(ge=0)] = 0.5
    grid_rescale: Annotated[float, Range(gt=0)] = 1.0

    name: ClassVar[str] = "wanet"
    trigger_extent: ClassVar[str] = "image"  # a warp of the whole image

    def noise_field(self, h: int, w: int) -> torch.Tensor:
        """``[1, 2, h, w]``: the seeded ``k x k`` random field, normalised and upsampled bicubically."""
        if self.k > h or self.k > w:
            raise BadExpertError(
                f"WaNet control grid k={self.k} is larger than the {h}x{w} images; choose k <= {min(h, w)}"
            )
        g = torch.Generator().manual_seed(self.trigger_seed * 1000003 + 2021)
        p = torch.rand(1, 2, self.k, self.k, generator=g, dtype=torch.float64) * 2 - 1
        p = p / p.abs().mean()
        return F.interpolate(p, size=(h, w), mode="bicubic", align_corners=True).float()

    def build_trigger(self, shape):
        _, h, w = shape
        up = self.noise_field(h, w).permute(0, 2, 3, 1)  # [1, h, w, 2]: (x, y) displacement per pixel
        grid = (identity_grid(h, w) + self.strength * up / h) * self.grid_rescale
        return {"grid": grid.clamp(-1, 1).contiguous()}

    @staticmethod
    def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Resample ``x`` ``[N, C, H, W]`` at ``grid`` (``[1 or N, H, W, 2]``)."""
        if grid.shape[0] != len(x):
            grid = grid.expand(len(x), *grid.shape[1:])
        return F.grid_sample(x, grid.to(dtype=x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)

    def trigger(self, x, parts):
        return self.warp(x, parts["grid"])

    def trigger_cover(self, x, parts, generator):
        grid = parts["grid"]
        n, h, w = len(x), grid.shape[1], grid.shape[2]
        noise = (torch.rand(n, h, w, 2, generator=generator) * 2 - 1).to(grid.device)
        return self.warp(x, (grid + noise / h).clamp(-1, 1))
