"""STRIP (Gao et al., ACSAC 2019): STRong Intentional Perturbation of the input.

A backdoor trigger dominates the prediction: superimpose a triggered input on many clean images
and the model keeps answering the target class with confidence, while a clean input blended with
other clean images gives varied, uncertain predictions. For an input x:

1. draw ``n`` clean images ``c_1 .. c_n`` from the clean set the detector was fitted on;
2. blend ``b_j = clamp(x + alpha * c_j, 0, 1)`` (superimposition, saturated to the valid range);
3. ``H_j`` = Shannon entropy (in bits) of the model's softmax on ``b_j``;
4. score = ``-(1/n) * sum_j H_j``: low entropy means backdoor, so the score is its negative
   (higher = more suspicious, the detector contract).

Cost: ``n`` model forward passes per input, no backward pass.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
from torch import nn

from ..errors import BadExpertError
from ..training import forward, model_outputs
from ..utils import eval_mode
from ..validation import NonNegativeInt, PositiveFloat, PositiveInt
from .base import Detector

#: purpose string of the per-input generators that draw the overlays
OVERLAY_PURPOSE = "strip-overlays"


class STRIP(Detector):
    """STRIP (Gao et al., 2019): flag inputs whose prediction stays confident when blended with clean images.

    See the module docstring for the method.

    Parameters
    ----------
    n: clean overlays per input (reference: 100, the paper's N).
    alpha: weight of the clean overlay in ``clamp(x + alpha * clean, 0, 1)`` (reference: 1.0,
        the BaDExpert toolbox's ``strip_alpha`` for its experiments; its class default is 0.5).
        The paper adds the two images at full weight, i.e. alpha = 1.
    batch_size: blended images per model forward pass (inputs are scored in chunks of
        ``batch_size`` input-overlay pairs, so memory does not grow with ``n``).
    seed: drives every random choice; which overlays an input gets depends only on the seed and
        the input's content (:meth:`Detector.input_generators`), not on its batch or position.
    device: where the model runs (``None``: CUDA when available).

    Departures from the paper
    -------------------------
    - The overlays of each input are drawn from the clean set given to :meth:`fit` (all of it is
      kept, and saved with the detector), without replacement when the set holds at least ``n``
      images (with replacement otherwise, with a warning at fit time), by a generator seeded per
      input: the same input always gets the same overlays.
    - The paper sets its threshold from a normal fit to clean entropies and a chosen false
      rejection rate; here :meth:`Detector.calibrate` sets it by the conformal quantile of clean
      calibration scores, like every detector of this package.
    - Entropy is computed from the logits (log-softmax in float64), in bits as in the paper (the
      base of the logarithm only scales the score: no ranking or decision depends on it).
    """

    name: ClassVar[str] = "strip"

    def __init__(
        self,
        *,
        n: PositiveInt = 100,
        alpha: PositiveFloat = 1.0,
        batch_size: PositiveInt = 256,
        seed: NonNegativeInt = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.n = n
        self.alpha = alpha

    @property
    def cost(self) -> dict[str, int]:
        """``n`` forward passes per scored input (one per blend), no backward pass."""
        return {"forward": int(self.n), "backward": 0}

    # --- fitting -------------------------------------------------------------------------
    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        model_outputs(model, images, labels)  # the model takes these images (one-line error otherwise)
        if len(images) < self.n:
            warnings.warn(
                f"STRIP: the clean set has {len(images)} images, fewer than n={self.n}; each input's overlays are "
                "drawn with replacement. A larger clean set (or a smaller n) gives distinct overlays.",
                stacklevel=3,
            )
        # the overlay pool: the clean images themselves, in their own dtype (uint8 stays uint8)
        self.overlays_ = images.detach().clone().to(self.device_)

    # --- scoring -------------------------------------------------------------------------
    def overlay_indices(self, x: torch.Tensor) -> torch.Tensor:
        """``[len(x), n]`` indices into :attr:`overlays_`: the clean images each input of ``x`` is
        blended with, drawn from that input's own generator."""
        return self.draw_indices(x, len(self.overlays_), self.n, OVERLAY_PURPOSE)

    def entropies(self, x: torch.Tensor) -> torch.Tensor:
        """``[len(x), n]`` softmax entropies (bits, float64, CPU) of the model on each input's
        ``n`` blends; ``x`` is a float batch on the detector's device."""
        idx = self.overlay_indices(x)
        count, n = idx.shape
        total = count * n
        out = torch.empty(total, dtype=torch.float64)
        which = torch.arange(count).repeat_interleave(n)  # blend k belongs to input k // n
        over = idx.flatten()
        step = max(1, int(self.batch_size))
        device = x.device
        with eval_mode(self.model_):
            for start in range(0, total, step):
                stop = min(start + step, total)
                clean = _as_float(self.overlays_[over[start:stop].to(self.overlays_.device)].to(device))
                blend = (x[which[start:stop].to(device)] + self.alpha * clean).clamp_(0, 1)
                out[start:stop] = _entropy_bits(forward(self.model_, blend)).cpu()
        return out.view(count, n)

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        return -self.entropies(x).mean(dim=1)

    # --- persistence ---------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"overlays": self.overlays_}

    def _state_meta(self) -> dict:
        return {"pool_size": int(len(self.overlays_))}

    def _load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        overlays = tensors.get("overlays")
        ok = (
            overlays is not None and overlays.dim() == 4 and len(overlays) > 0
            and tuple(overlays.shape[1:]) == tuple(self.input_shape_)
            and (overlays.dtype == torch.uint8
                 or (overlays.is_floating_point() and bool(((overlays >= 0) & (overlays <= 1)).all())))
        )
        if not ok:
            raise BadExpertError(
                "the STRIP detector file lacks its overlay images, or they have the wrong shape or values; it is damaged"
            )
        self.overlays_ = overlays.to(self.device_)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float ``[0, 1]``; float images as they are (checked at fit time)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def _entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of ``softmax(logits)`` per row, in bits, computed in float64 from the
    log-softmax (exact where a probability underflows: ``0 * log 0`` counts as 0)."""
    logp = torch.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    terms = torch.where(p == 0, torch.zeros((), dtype=p.dtype, device=p.device), p * logp)  # NaN stays NaN
    return -terms.sum(dim=1) / math.log(2.0)


__all__ = ["STRIP"]
