"""Cognitive Distillation (Huang et al., ICLR 2023): "Distilling Cognitive Backdoor Patterns within an Image".

A backdoored model answers a triggered input because of the trigger alone: a few pixels suffice
to keep its output. Cognitive distillation looks for the smallest part of an input that keeps the
model's output unchanged, the input's *cognitive pattern*, and flags inputs whose pattern is
unusually small. For an input x (float in ``[0, 1]``, ``C x H x W``), learn a mask
``m`` in ``[0, 1]^{1 x H x W}`` (one value per pixel, shared by the channels) by minimising
(the paper's Section 3, Eq. 2, with the reference code's reductions)

    ``mean_k |M(x ⊙ m + (1 - m) ⊙ δ_t)_k - M(x)_k|``  (logits, mean over the classes k)
    ``+ alpha * sum(|m|)``                             (the mask's L1 norm, **summed** over pixels)
    ``+ beta * TV(m)``                                 (total variation: a compact mask)

where ``δ_t`` is a **random solid colour** (one uniform ``[0, 1]`` value per channel, the same
for every pixel) **drawn again at every step t**, so the mask cannot lean on any one fill. The
mask is parametrised as ``m = (tanh(w) + 1) / 2`` with ``w = 1`` at the start (``m = 0.881``
everywhere, as the reference's all-ones parameter gives), and ``w`` is optimised with Adam
(lr 0.1, betas (0.1, 0.1)) for ``steps`` iterations. The score is the negative L1 norm of the
final mask per pixel, ``-mean(m)``: a small mask (the trigger alone keeps the output) means
backdoor, so higher = more suspicious. (The paper ranks by ``||m||_1 = H * W * mean(m)``; on
images of one size the order is the same.)

``TV(m)`` is the anisotropic squared total variation, normalised by the number of pixels:
``(sum (m[i+1, j] - m[i, j])^2 + sum (m[i, j+1] - m[i, j])^2) / (H * W)``.

Why the reductions matter: the L1 term summed over ``H * W`` pixels weighs ``H * W`` times more
than its mean, so on 32x32 images ``alpha = 0.01`` is a real pull towards a small mask against
the logit term; with the mean (this package's first version) the masks barely moved from their
start and the detector sat near chance on several attacks (see the issue "The baselines as their
authors run them").

All inputs of a batch are optimised together; the loss is a sum of per-input terms and Adam
updates each mask element from its own gradient, so every mask is the one the input would get
alone (up to float rounding of batched model passes). Each input's colours come from its own
generator (:meth:`Detector.input_generators`): a score depends only on the seed and the input.

The suspect model is never changed: only the mask logits ``w`` are optimised, gradients are taken
with :func:`torch.autograd.grad` with respect to ``w`` alone (nothing accumulates in the model's
``.grad``), and neither the parameters nor their ``requires_grad`` flags are touched. The model
runs in eval mode (restored afterwards).

Cost: ``steps + 1`` model forward passes (the target ``M(x)`` and one per step) and ``steps``
backward passes per input. In front of a model (:class:`badexpert.deploy.guard.Guard`) the target is the
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

#: purpose string of the per-input generators that draw the fill colours ``δ_t``
NOISE_PURPOSE = "cd-colours"
#: the mask logits' starting value: ``m = (tanh(1) + 1) / 2 = 0.881`` (the reference's all-ones parameter)
MASK_INIT_LOGIT = 1.0
#: the procedure's version, saved with the detector: files of the first version (fixed noise image,
#: L1 averaged over pixels, mask starting at 0.5) hold a threshold the current masks do not match
PROCEDURE = 2


class CognitiveDistillation(Detector):
    """Cognitive Distillation (Huang et al., ICLR 2023): flag inputs whose output a small mask of pixels keeps.

    See the module docstring for the method.

    Reference: the paper's objective (Eq. 2) and its detection by the masks' L1 norm;
    the behaviour follows the authors' public code (``HanxunH/CognitiveDistillation``, its
    ``CognitiveDistillation`` module with its defaults, logits variant): the logit distance
    averaged over classes, the mask's L1 norm summed over pixels, the squared TV divided by the
    number of mask elements, a random solid fill colour per input redrawn at every step, the mask
    parameter starting at 1 (``m = 0.881``), Adam with lr 0.1 and betas (0.1, 0.1), 100 steps.

    Parameters
    ----------
    steps: Adam iterations per mask (reference: 100).
    lr: Adam's learning rate on the mask logits (reference: 0.1).
    alpha: weight of the mask's L1 norm, summed over pixels (reference: 0.01, the code's ``gamma``).
    beta: weight of the mask's total variation (reference: 1.0; 0 switches it off).
    batch_size: inputs whose masks are optimised together (each step is one forward and one
        backward pass of the batch).
    seed: seeds the fill colours; an input's colours depend only on the seed and its content.
    device: where the model runs (``None``: CUDA when available).

    Nothing is learned at fit time: :meth:`fit` only records the model (and checks it takes the
    images); the detector saves nothing beyond the base class's record and the procedure's
    version (a file of the first version, whose threshold the current masks do not match, is
    refused with a message to refit).

    Departures from the paper and the reference code
    ------------------------------------------------
    - The fill colours come from one generator per input seeded from the detector's seed and the
      input's content (the reference draws them from the global generator for the whole batch),
      so a score never depends on the batch, its order or size.
    - The per-input losses are summed over the batch, not averaged (Adam's update does not depend
      on that scale, up to its epsilon), so an input's mask does not depend on its batch's size.
    - Only the logits variant (the paper's CD-L) is offered; the deep-feature variant (CD-F,
      distilling a hidden layer's output) is not.
    - The score is ``-mean(m)`` over pixels, the paper's L1 norm divided by ``H * W`` (same order).
    - The threshold comes from :meth:`Detector.calibrate` (the conformal quantile of clean
      scores), like every detector of this package; the paper thresholds by the clean masks'
      mean and standard deviation.
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
    def colours(self, x: torch.Tensor) -> torch.Tensor:
        """``[steps, N, C, 1, 1]`` fill colours ``δ_t`` of each input of ``x`` (uniform in
        ``[0, 1]``, one per channel and step, float32 on ``x``'s device), drawn from the input's
        own generator."""
        c = x.shape[1]
        rows = [torch.rand((int(self.steps), c), generator=g) for g in self.input_generators(x, NOISE_PURPOSE)]
        out = torch.stack(rows, dim=1) if rows else torch.empty((int(self.steps), 0, c))
        return out[..., None, None].to(x.device)

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
            colours = self.colours(x)
            with torch.no_grad():
                target = (forward(model, x) if logits is None else logits).detach().float().clone()
            param = torch.full((n, 1, h, w), MASK_INIT_LOGIT, device=x.device, requires_grad=True)
            opt = torch.optim.Adam([param], lr=self.lr, betas=(0.1, 0.1))
            for t in range(int(self.steps)):
                mask = (torch.tanh(param) + 1) / 2
                out = forward(model, x * mask + (1 - mask) * colours[t])
                loss = (out - target).abs().mean(dim=1) + self.alpha * mask.abs().flatten(1).sum(dim=1)
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
        """``score`` (``-mean(m)``) and ``mask_l1`` (``mean(m)``, the paper's statistic per pixel) as numpy arrays."""
        masks = self.masks(x)
        l1 = masks.flatten(1).mean(dim=1)
        return {"score": (-l1).numpy(), "mask_l1": l1.numpy()}

    # --- persistence ---------------------------------------------------------------------
    def _state_meta(self) -> dict:
        return {"procedure": PROCEDURE}

    def _load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("procedure") != PROCEDURE:
            raise BadExpertError(
                "this CD detector file was saved by an earlier version of CD (fixed noise fill, L1 averaged over "
                "pixels, mask starting at 0.5) whose threshold does not fit the current masks; fit and calibrate it again"
            )


def total_variation(mask: torch.Tensor) -> torch.Tensor:
    """Per-input anisotropic squared total variation of ``[N, 1, H, W]`` masks, divided by ``H * W``."""
    h, w = mask.shape[-2:]
    dh = (mask[..., 1:, :] - mask[..., :-1, :]).pow(2).flatten(1).sum(dim=1)
    dw = (mask[..., :, 1:] - mask[..., :, :-1]).pow(2).flatten(1).sum(dim=1)
    return (dh + dw) / (h * w)


__all__ = ["CognitiveDistillation", "total_variation"]
