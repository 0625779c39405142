"""BppAttack (Wang, Zhai and Ma, CVPR 2022, "BppAttack: stealthy and efficient trojan attacks
against deep neural networks via image quantization and contrastive adversarial learning"):
colour-depth reduction with Floyd-Steinberg dithering is the trigger."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar

import torch
from torch import nn

from ..data.core import Dataset
from ..validation import Range
from .base import Attack, Rate
from .components import Components

#: Floyd-Steinberg weights: right, down-left, down, down-right.
FS_RIGHT, FS_DOWN_LEFT, FS_DOWN, FS_DOWN_RIGHT = 7 / 16, 3 / 16, 5 / 16, 1 / 16


def palette(levels: int) -> torch.Tensor:
    """``levels`` evenly spaced values ``k / (levels - 1)``, ``k = 0 .. levels - 1`` (float32)."""
    return torch.arange(levels, dtype=torch.float32) / (levels - 1)


def quantize(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Each value of ``x`` (in ``[0, 1]``) replaced by ``values[round(x (L - 1))]``, ``L = len(values)``:
    the nearest of ``L`` evenly spaced levels, written with the palette ``values``
    (:func:`palette` gives the plain levels; ties round to even)."""
    n = values.numel()
    idx = (x * (n - 1)).round().clamp(0, n - 1).long()
    return values.to(x.device)[idx]


@functools.lru_cache(maxsize=16)
def _wavefronts(h: int, w: int, device: str = "cpu") -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Rows and columns of the pixels processed at each step of the wavefront schedule.

    Pixel ``(i, j)`` is final once its four Floyd-Steinberg sources ``(i, j-1)``, ``(i-1, j-1)``,
    ``(i-1, j)`` and ``(i-1, j+1)`` have spread their errors; all of them lie on earlier
    anti-diagonals ``t = j + 2 i``, so every pixel with the same ``t`` can be processed at once.
    """
    fronts = []
    for t in range(w + 2 * (h - 1)):
        rows = torch.arange(max(0, (t - w + 2) // 2), min(h - 1, t // 2) + 1)
        cols = t - 2 * rows
        keep = (cols >= 0) & (cols < w)
        fronts.append((rows[keep].to(device), cols[keep].to(device)))
    return tuple(fronts)


def floyd_steinberg(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Quantise every channel of ``x`` (``[N, C, H, W]`` in ``[0, 1]``) to the ``L`` levels of
    :func:`quantize` (palette ``values``) with Floyd-Steinberg error diffusion: each pixel, in
    raster order, is rounded to the nearest level and its error spread to the unprocessed
    neighbours (7/16 right, 3/16 down-left, 5/16 down, 1/16 down-right; errors leaving the image
    are dropped; the rounded level is clipped to the palette).

    Vectorised over the batch and channels, and over the pixels of one anti-diagonal
    ``j + 2 i = t`` (``W + 2 (H - 1)`` steps instead of ``H W``). Every pixel receives its
    neighbours' errors in the same order as in the raster scan (up-left, up, up-right, left), so
    the result is the raster-order result exactly.
    """
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    # work buffer with a one-pixel margin left, right and below: errors spread there are dropped
    v = torch.zeros(n * c, h + 1, w + 2, dtype=torch.float32, device=x.device)
    v[:, :h, 1 : w + 1] = x.reshape(n * c, h, w).float()
    out = torch.empty(n * c, h, w, dtype=torch.float32, device=x.device)
    values = values.to(device=x.device, dtype=torch.float32)
    for rows, cols in _wavefronts(h, w, str(x.device)):
        c1 = cols + 1  # column in the buffer
        old = v[:, rows, c1]
        new = quantize(old, values)
        out[:, rows, cols] = new
        err = old - new
        # down-left before right: the two meet on the same pixel (right of the row below's pixel)
        v[:, rows + 1, c1 - 1] += err * FS_DOWN_LEFT
        v[:, rows, c1 + 1] += err * FS_RIGHT
        v[:, rows + 1, c1] += err * FS_DOWN
        v[:, rows + 1, c1 + 1] += err * FS_DOWN_RIGHT
    return out.reshape(n, c, h, w).to(x.dtype)


@dataclass
class BPP(Attack):
    """BppAttack: reduce each channel to squeeze_num colour levels with Floyd-Steinberg dithering;
    trained with online poisoning and negative samples in every batch.

    The quantised, dithered image (:func:`floyd_steinberg`) is the trigger, the label the target.
    The attack's saved trigger state is the palette (``"levels"``, the ``squeeze_num`` values
    ``k / (squeeze_num - 1)``); nothing in it is random, so ``trigger_seed`` has no effect.

    Training (:meth:`implant`, the reference's own loop): the model trains from scratch with the
    recipe, and in every batch (after augmentation)

    - ``round(poison_rate * B)`` samples, drawn among the batch's non-target samples, are
      replaced by their quantised version and relabelled to ``target``;
    - ``round(negative_rate * B)`` other samples become *negative* samples: the clean image plus
      the quantisation residual ``bpp(x_j) - x_j`` of another random image ``j`` of the batch,
      clipped to ``[0, 1]``, with their true labels (quantisation noise that is not the image's
      own is not the trigger).

    Every choice is drawn from the training loop's seeded generator. :meth:`poison` still works
    (static poisoning of ``round(poison_rate * N)`` samples of the set; ``cover_rate`` samples
    become negative samples whose residual comes from another cover sample), but the pipeline
    uses :meth:`implant`.

    Parameters (reference: the BaDExpert research toolbox's BPP settings):

    - ``squeeze_num``: levels per channel, **8** (reference); 2 to 256.
    - ``dither``: Floyd-Steinberg dithering, **True** (reference); False is plain rounding.
    - ``poison_rate``: **0.2**, a fraction **per batch** (reference: 20% of every batch).
    - ``negative_rate``: **0.2** per batch (reference); ``poison_rate + negative_rate <= 1``.
    - ``cover_rate``: 0; used by the static :meth:`poison` only.

    Departures: the reference poisons the first samples of each batch whatever their class, so
    some target-class samples count as poisoned; here only non-target samples are poisoned (a
    batch with fewer of them poisons all it has). The reference takes negative residuals from a
    precomputed pool of training images; here they come from another image of the same batch.
    The paper's contrastive adversarial training (adversarially perturbed negative samples) is not
    implemented: negative samples carry a plain residual.
    """

    poison_rate: Rate = 0.2
    negative_rate: Rate = 0.2
    squeeze_num: Annotated[int, Range(ge=2, le=256)] = 8
    dither: bool = True

    name: ClassVar[str] = "bpp"
    trigger_extent: ClassVar[str] = "image"  # colour-depth reduction with dithering of every pixel
    second_batch_rate: ClassVar[str] = "negative_rate"

    def build_trigger(self, shape):
        return {"levels": palette(self.squeeze_num)}

    def squeeze(self, x: torch.Tensor, parts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The BPP image of a float batch ``x``: quantised to the palette (dithered unless ``dither=False``)."""
        if parts is None:
            parts = self._parts(tuple(x.shape[1:]), x.device)
        levels = parts["levels"]
        return floyd_steinberg(x, levels) if self.dither else quantize(x, levels)

    def trigger(self, x, parts):
        return self.squeeze(x, parts)

    def trigger_cover(self, x, parts, generator):
        """A negative sample: ``x`` plus the residual of another sample of ``x`` (of a uniform
        random image drawn from ``generator`` when ``x`` holds a single image)."""
        if len(x) == 0:
            return x.clone()
        if len(x) == 1:
            other = torch.rand(x.shape, generator=generator).to(x.device, x.dtype)
        else:
            other = x[self.partners(torch.arange(len(x)), len(x), generator).to(x.device)]
        return (x + self.squeeze(other, parts) - other).clamp(0, 1)

    def batch_transform(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Online poisoning of one training batch (float images in ``[0, 1]``, labels): see the
        class docstring. Random choices come from ``generator`` (CPU), the work runs on ``x``'s device."""
        n = len(x)
        poison_idx, neg_idx = self.batch_roles(y, generator, partnered=True)
        partner_idx = self.partners(neg_idx, n, generator)
        x, y = x.clone(), y.clone()
        dev = x.device
        src = torch.cat([poison_idx, partner_idx]).to(dev)
        if len(src):
            orig = x[src]
            squeezed = self.squeeze(orig)
            k = len(poison_idx)
            if len(neg_idx):
                nd = neg_idx.to(dev)
                x[nd] = (x[nd] + squeezed[k:] - orig[k:]).clamp(0, 1)
            if k:
                pd = poison_idx.to(dev)
                x[pd] = squeezed[:k]
                y[pd] = self.target
        return x, y

    def implant(self, train_set: Dataset, build_model: Callable[[], nn.Module], recipe, seed: int, *,
                log: Callable[[str], Any] = print, components: Components | None = None) -> tuple[nn.Module, dict]:
        """Train ``build_model()`` from scratch with ``recipe``, poisoning every batch online
        (:meth:`batch_transform`). ``info``: samples poisoned and negative per batch, and the
        phase times."""
        from ..training import train

        bs, n_poison, n_neg = self.online_counts(train_set, recipe)
        info = {"poisoned_per_batch": n_poison, "negative_per_batch": n_neg, "batch_size": bs}
        log(f"poisoning {n_poison} and adding {n_neg} negative samples in every batch of {bs} with {self.describe()}")
        components = components if components is not None else Components(log=log)
        model = build_model()
        with components.phase("suspect_model"):
            train(model, train_set, recipe, seed=seed, desc="suspect model", batch_transform=self.batch_transform)
        return model, {**info, **components.info()}
