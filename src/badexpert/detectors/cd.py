"""Cognitive Distillation (Huang et al., ICLR 2023): "Distilling Cognitive Backdoor Patterns within an Image".

A backdoored model answers a triggered input because of the trigger alone: a few pixels suffice
to keep its output. Cognitive distillation looks for the smallest part of an input that keeps the
model's output unchanged, the input's *cognitive pattern*, and flags inputs whose pattern is
unusually small. For an input x (float in ``[0, 1]``, ``C x H x W``), learn a mask
``m`` in ``[0, 1]^{1 x H x W}`` (one value per pixel, shared by the channels) by minimising

    ``mean_k |M(x ⊙ m + (1 - m) ⊙ δ)_k - M(x)_k|``  (logits, mean over the classes k)
    ``+ alpha * mean(|m|)``                          (the mask's L1 norm, mean over pixels)
    ``+ beta * TV(m)``                               (total variation: a compact mask)

where ``δ`` is a fixed noise image for this input (uniform in ``[0, 1]``, drawn from the input's
own generator, :meth:`Detector.input_generators`). The mask is parametrised as
``m = (tanh(w) + 1) / 2``, with ``w = 0`` at the start (``m = 0.5`` everywhere), and ``w`` is
optimised with Adam (lr 0.1, betas (0.1, 0.1)) for ``steps`` iterations. The score is the
negative L1 norm of the final mask, ``-mean(m)`` over pixels: a small mask (the trigger alone
keeps the output) means backdoor, so higher = more suspicious.

``TV(m)`` is the anisotropic squared total variation, normalised by the number of pixels:
``(sum (m[i+1, j] - m[i, j])^2 + sum (m[i, j+1] - m[i, j])^2) / (H * W)``.

All inputs of a batch are optimised together; the loss is a sum of per-input terms and Adam
updates each mask element from its own gradient, so every mask is the one the input would get
alone (up to float rounding of batched model passes).

The suspect model is never changed: only the mask logits ``w`` are optimised, gradients are taken
with :func:`torch.autograd.grad` with respect to ``w`` alone (nothing accumulates in the model's
``.grad``), and neither the parameters nor their ``requires_grad`` flags are touched. The model
runs in eval mode (restored afterwards).

Cost: ``steps + 1`` model forward passes (the target ``M(x)`` and one per step) and ``steps``
backward passes per input. In front of a model (:class:`badexpert.guard.Guard`) the target is the
model's own pass.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from torch import nn

from ..errors import BadExpertError
from ..training import forward, model_outputs
from ..utils import eval_mode
from ..validation import NonNegativeInt, PositiveInt, Range
from .base import Detector

#: purpose string of the per-input generators that draw the noise images ``δ``
NOISE_PURPOSE = "cd-noise"


class CognitiveDistillation(Detector):
    """Cognitive Distillation (Huang et al., ICLR 2023): flag inputs whose output a small mask of pixels keeps.

    See the module docstring for the method.

    Parameters
    ----------
    steps: Adam iterations per mask (reference: 100).
    lr: Adam's learning rate on the mask logits (reference: 0.1).
    alpha: weight of the mask's L1 norm (reference: 0.01).
    beta: weight of the mask's total variation (reference: 1.0; 0 switches it off).
    batch_size: inputs whose masks are optimised together (each step is one forward and one
        backward pass of the batch).
    seed: seeds the noise images; an input's noise depends only on the seed and its content.
    device: where the model runs (``None``: CUDA when available).

    Nothing is learned at fit time: :meth:`fit` only records the model (and checks it takes the
    images); the detector saves nothing beyond the base class's record.

    Departures from the paper and the reference code
    ------------------------------------------------
    - The masked-out pixels are filled with one fixed uniform ``[0, 1]`` noise image per input,
      drawn from the input's own generator (so a score never depends on the batch), rather than
      noise redrawn at every step.
    - The mask starts at ``m = 0.5`` (``w = 0``, where tanh is steepest) for every pixel.
    - The threshold comes from :meth:`Detector.calibrate` (the conformal quantile of clean
      scores), like every detector of this package; the paper thresholds by the clean masks'
      statistics.
    """

    name: ClassVar[str] = "cd"
    shares_model_pass: ClassVar[bool] = True

    def __init__(
        self,
        *,
        steps: PositiveInt = 100,
        lr: Annotated[float, Range(gt=0)] = 0.1,
        alpha: Annotated[float, Range(ge=0)] = 0.01,
        beta: Annotated[float, Range(ge=0)] = 1.0,
        batch_size: PositiveInt = 256,
        seed: NonNegativeInt = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.steps = steps
        self.lr = lr
        self.alpha = alpha
        self.beta = beta
        self.check_params()

    @property
    def cost(self) -> dict[str, int]:
        """``steps + 1`` forward passes (the target and one per step) and ``steps`` backward passes per input."""
        return {"forward": int(self.steps) + 1, "backward": int(self.steps)}

    # --- fitting -------------------------------------------------------------------------
    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        classes = model_outputs(model, images, labels)  # the model takes these images (one-line error otherwise)
        if classes < 2:
            raise BadExpertError(f"cd needs a classifier with at least 2 classes, got {classes} output(s)")

    # --- scoring -------------------------------------------------------------------------
    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed noise image ``δ`` of each input of ``x`` (uniform in ``[0, 1]``, shape of ``x``,
        float32 on ``x``'s device), drawn from the input's own generator."""
        shape = tuple(x.shape[1:])
        rows = [torch.rand(shape, generator=g) for g in self.input_generators(x, NOISE_PURPOSE)]
        out = torch.stack(rows) if rows else torch.empty((0, *shape))
        return out.to(x.device)

    def _masks(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """``[len(x), 1, H, W]`` learned masks (float32, detached) for a checked, finite float batch
        on the detector's device; ``logits`` are the model's own on ``x`` when known."""
        model = self.model_
        n, _, h, w = x.shape
        if n == 0:
            return torch.empty(0, 1, h, w, device=x.device)
        # inference_mode(False) + a plain copy: the optimisation works even when the caller scores
        # under torch.inference_mode(); enable_grad: the base score() runs under no_grad
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
            x = x.detach().float().clone()
            delta = self.noise(x)
            with torch.no_grad():
                target = (forward(model, x) if logits is None else logits).detach().float().clone()
            param = torch.zeros(n, 1, h, w, device=x.device, requires_grad=True)
            opt = torch.optim.Adam([param], lr=self.lr, betas=(0.1, 0.1))
            for _ in range(int(self.steps)):
                mask = (torch.tanh(param) + 1) / 2
                out = forward(model, x * mask + (1 - mask) * delta)
                loss = (out - target).abs().mean(dim=1) + self.alpha * mask.abs().flatten(1).mean(dim=1)
                if self.beta:
                    loss = loss + self.beta * total_variation(mask)
                (grad,) = torch.autograd.grad(loss.sum(), [param])
                param.grad = grad
                opt.step()
            with torch.no_grad():
                return ((torch.tanh(param) + 1) / 2).detach()

    @torch.no_grad()
    def masks(self, x) -> torch.Tensor:
        """``[N, 1, H, W]`` learned masks (float32, CPU) for images or a Dataset; NaN masks for
        inputs that cannot be scored."""
        self._check_fitted("masks")
        images, bad = self._scorable(x)
        parts = [self._masks(xb).cpu() for xb in self._batches(images)]
        out = torch.cat(parts) if parts else torch.empty(0, 1, *self.input_shape_[1:])
        out[bad] = float("nan")
        return out

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        return -self._masks(x).flatten(1).mean(dim=1)

    def score_given_logits(self, xb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return -self._masks(xb, logits).flatten(1).mean(dim=1)

    @torch.no_grad()
    def score_details(self, x) -> dict:
        """``score`` (``-mean(m)``) and ``mask_l1`` (``mean(m)``, the paper's statistic) as numpy arrays."""
        masks = self.masks(x)
        l1 = masks.flatten(1).mean(dim=1)
        return {"score": (-l1).numpy(), "mask_l1": l1.numpy()}


def total_variation(mask: torch.Tensor) -> torch.Tensor:
    """Per-input anisotropic squared total variation of ``[N, 1, H, W]`` masks, divided by ``H * W``."""
    h, w = mask.shape[-2:]
    dh = (mask[..., 1:, :] - mask[..., :-1, :]).pow(2).flatten(1).sum(dim=1)
    dw = (mask[..., :, 1:] - mask[..., :, :-1]).pow(2).flatten(1).sum(dim=1)
    return (dh + dw) / (h * w)


__all__ = ["CognitiveDistillation", "total_variation"]
