"""SIG (Barni, Kallas and Tondi, 2019): a clean-label backdoor with an additive sinusoid signal."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from ..errors import BadExpertError
from ..validation import Range
from .base import Attack, Rate

#: A signal amplitude in pixel units of [0, 1] (30/255 in the reference).
Amplitude = Annotated[float, Range(gt=0, le=1)]


@dataclass
class SIG(Attack):
    """Add a horizontal sinusoid to the whole image: ``x' = clip(x + v)`` with
    ``v(i, j) = delta * sin(2 pi j f / W)`` (``j`` the column, ``W`` the image width, the same
    signal on every row and every channel).

    Clean-label: only images of the target class are poisoned and they keep their labels; the
    model learns to associate the signal with the target, and at test time the signal on an
    image of another class sends it there.

    Parameters (reference: the research code's settings, spec section D, "SIG" row):

    - ``delta``: amplitude at test time, **30/255** (reference).
    - ``train_delta``: amplitude on the poisoned training images; ``None`` (default) uses
      ``delta``, as the reference does (one amplitude at training and test time). Barni et al.
      also studied weaker training signals than test signals; set it for that variant.
    - ``frequency``: ``f``, cycles across the image width, **6** (reference, for 32-pixel-wide
      images; the period scales with the width). A frequency whose samples all fall on zeros of
      the sine (``2 f / W`` an integer, e.g. ``f = 6`` on 12-pixel-wide images) gives no signal
      and is refused when the trigger is built.
    - ``poison_rate``: **0.02** (reference README example), a fraction of the whole training
      set, all drawn from the target class; capped at the number of target-class images.
    """

    poison_rate: Rate = 0.02
    delta: Amplitude = 30 / 255
    train_delta: Amplitude | None = None
    frequency: Annotated[float, Range(gt=0)] = 6.0

    name: ClassVar[str] = "sig"
    trigger_extent: ClassVar[str] = "image"  # a sinusoid on every row
    clean_label: ClassVar[bool] = True

    def build_trigger(self, shape):
        c, h, w = shape
        j = torch.arange(w, dtype=torch.float64)
        wave = torch.sin(2 * math.pi * j * self.frequency / w)
        if float(wave.abs().max()) < 1e-6:
            raise BadExpertError(
                f"SIG frequency {self.frequency:g} gives no signal on {w}-pixel-wide images "
                f"(every column falls on a zero of the sine); choose a frequency that is not a multiple of {w / 2:g}"
            )
        return {"wave": wave.float().expand(1, h, w).clone()}  # unit amplitude, one row repeated

    def trigger(self, x, parts):
        return (x + self.delta * parts["wave"]).clamp(0, 1)

    def trigger_train(self, x, parts, generator):
        d = self.delta if self.train_delta is None else self.train_delta
        return (x + d * parts["wave"]).clamp(0, 1)
