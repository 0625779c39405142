"""SCALE-UP (Guo et al., ICLR 2023): scaled prediction consistency.

Amplifying every pixel of a clean image soon changes the model's prediction, while a triggered
image keeps being classified as the target: the trigger survives the scaling and dominates it.
For an input x with the model's label ``y(x)``, and scale factors ``s_1 .. s_K``:

    SPC(x) = (1/K) * #{ k : y(clamp(s_k * x, 0, 1)) = y(x) }

(pixels in ``[0, 1]``). High SPC means backdoor. Two variants:

- ``data_free`` (the default, what the BaDExpert toolbox runs): score = SPC(x);
- ``data_limited``: at fit time the SPC of the clean images is measured **against their
  ground-truth labels** (the fraction of scaled copies still classified as the true class), and
  its mean ``mu`` and standard deviation ``sigma`` (sample std, float64) are stored; score =
  ``(SPC(x) - mu) / sigma``. If the clean SPC values are all equal (``sigma = 0``), ``sigma = 1``
  is used (score = ``SPC(x) - mu``).

Cost: ``1 + K`` forward passes per input (the input itself and its K scaled copies), no backward
pass. In front of a model (:class:`badexpert.deploy.guard.Guard`) the input's own pass is the model's.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
from torch import nn

from ..data.core import batches
from ..errors import BadExpertError
from ..training import forward, model_outputs
from ..utils import eval_mode
from ..validation import NonNegativeInt, OneOf, PositiveFloat, PositiveInt
from .base import Detector

VARIANTS = ("data_free", "data_limited")


class ScaleUp(Detector):
    """SCALE-UP (Guo et al., ICLR 2023): flag inputs whose prediction survives pixel-value amplification.

    See the module docstring for the method.

    Parameters
    ----------
    scales: the amplification factors (reference: ``(3, 5, 7, 9, 11)``); each must be > 0, and
        at least one is needed.
    variant: ``"data_free"`` (reference default, score = SPC) or ``"data_limited"`` (SPC
        standardised by the clean set's SPC mean and std, measured against the true labels).
    batch_size: inputs per model forward pass (each pass scales the whole batch by one factor).
    seed: recorded like every detector's; SCALE-UP draws nothing at random.
    device: where the model runs (``None``: CUDA when available).

    Ties and the calibrated false-positive rate
    -------------------------------------------
    SPC takes only ``K + 1`` values (0, 1/K, ..., 1), so many clean and triggered inputs share a
    score. :meth:`Detector.calibrate` still guarantees a false-positive rate of at most the
    target (it rejects ``score > threshold``, the conformal quantile), but with ties the realized
    rate can be well below it: when more than the target share of clean calibration inputs sit at
    the top value (SPC = 1), the threshold is that value and nothing scoring it, clean or
    triggered, is rejected. No random jitter is added to break ties: a decision must not depend
    on a coin flip. ``data_limited`` is an increasing affine map of SPC, so it ranks inputs, and
    after calibration rejects them, exactly as ``data_free`` does; it matters only for a
    threshold set by hand on the standardised scale.

    Departures from the paper
    -------------------------
    - The threshold comes from :meth:`Detector.calibrate` (conformal quantile of clean scores)
      rather than a fixed SPC cut-off.
    - ``data_limited`` uses one mean and one std over the whole clean set.
    - The clean SPC statistics are measured at fit time whatever the variant (``fit_report_``),
      so switching ``variant`` with :meth:`set_params` needs no refit.
    """

    name: ClassVar[str] = "scale_up"
    shares_model_pass: ClassVar[bool] = True

    def __init__(
        self,
        *,
        scales: tuple[PositiveFloat, ...] = (3.0, 5.0, 7.0, 9.0, 11.0),
        variant: Annotated[str, OneOf(*VARIANTS)] = "data_free",
        batch_size: PositiveInt = 256,
        seed: NonNegativeInt = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.scales = tuple(scales) if isinstance(scales, (list, tuple)) else scales
        self.variant = variant

    def check_params(self) -> "ScaleUp":
        super().check_params()
        if len(self.scales) == 0:
            raise BadExpertError(
                f"detector '{self.name}' parameter 'scales' must not be empty; give amplification factors such as "
                "[3, 5, 7, 9, 11]"
            )
        return self

    @property
    def cost(self) -> dict[str, int]:
        """``1 + len(scales)`` forward passes per scored input, no backward pass."""
        return {"forward": 1 + len(self.scales), "backward": 0}

    # --- fitting -------------------------------------------------------------------------
    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        model_outputs(model, images, labels)  # the model takes these images, labels within its classes
        parts = []
        with eval_mode(model):
            for xb, yb in batches(images, labels, batch_size=self.batch_size, device=self.device_):
                parts.append(self._spc(model, xb, yb).cpu())
        spc = torch.cat(parts).double()
        mean = float(spc.mean())
        std = float(spc.std()) if len(spc) > 1 else 0.0
        self.spc_mean_ = mean
        self.spc_std_ = std if std > 0 else 1.0
        self.fit_report_ = {"clean_size": int(len(spc)), "clean_spc_mean": mean, "clean_spc_std": std,
                            "std_was_zero": not std > 0}

    # --- scoring -------------------------------------------------------------------------
    def _spc(self, model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Fraction (float64) of the scaled copies of ``x`` that ``model`` assigns to ``reference``."""
        agree = torch.zeros(len(x), dtype=torch.int64, device=x.device)
        for s in self.scales:
            agree += forward(model, (x * float(s)).clamp_(0, 1)).argmax(1) == reference
        return agree.double() / len(self.scales)

    def spc(self, xb: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """SPC of a float batch on the detector's device against the model's own labels (CPU,
        float64); ``logits`` are the model's on ``xb`` when already computed."""
        with eval_mode(self.model_):
            if logits is None:
                logits = forward(self.model_, xb)
            return self._spc(self.model_, xb, logits.argmax(1)).cpu()

    def _standardise(self, spc: torch.Tensor) -> torch.Tensor:
        if self.variant == "data_limited":
            return (spc - self.spc_mean_) / self.spc_std_
        return spc

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        return self._standardise(self.spc(x))

    def score_given_logits(self, xb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self._standardise(self.spc(xb, logits))

    # --- persistence ---------------------------------------------------------------------
    def _state_meta(self) -> dict:
        return {"spc_mean": self.spc_mean_, "spc_std": self.spc_std_, "fit_report": self.fit_report_}

    def _load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        mean, std = meta.get("spc_mean"), meta.get("spc_std")
        if not (_finite_number(mean) and _finite_number(std) and std > 0):
            raise BadExpertError("the SCALE-UP detector file lacks valid clean SPC statistics; it is damaged")
        self.spc_mean_ = float(mean)
        self.spc_std_ = float(std)
        self.fit_report_ = meta.get("fit_report") or {}


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


__all__ = ["VARIANTS", "ScaleUp"]
