"""TeCo (Liu et al., CVPR 2023): test-time trigger detection by corruption robustness consistency.

A backdoored model is about equally robust to every kind of image corruption on a clean input:
its prediction gives way at similar severities whatever the corruption. On a triggered input it
is not: corruptions that destroy the trigger (noise, blur, JPEG on a small patch) flip the
prediction early, corruptions that keep it (brightness, contrast) never do. TeCo measures that
inconsistency. For an input x with the model's label ``y = argmax M(x)``:

1. for each of the 15 ImageNet-C corruptions (:mod:`badexpert.detectors.corruptions`), corrupt x
   at severities 1..5 and record the first severity whose prediction differs from ``y`` (6 if
   none does). With the default ``procedure="cumulative"`` (the authors' code) severity ``s`` is
   applied to the output of severity ``s - 1`` (severity 1 to x itself), each output rounded to 8
   bits as the saved images of the reference are, so the corruption **accumulates**: severity 5
   has been through all five. ``procedure="independent"`` applies every severity to x itself
   (this package's first version);
2. score = the (population) standard deviation of these 15 severities: **higher = more likely a
   backdoor input**, as in the paper.

Reference: the paper's method (the corruption robustness consistency, the deviation of the
flip severities) and the behaviour of the authors' public code (``CGCL-codes/TeCo``,
``defense/teco.py`` of its BackdoorBench fork): it calls the ``imagecorruptions`` package (the
**ImageNet-C strengths**, applied as they are to 32x32 images) for the 15 corruptions in the order
above at severities 1..5, each severity on the previous one's 8-bit output, records the first
flipping severity (6 when none) and scores by ``numpy.std``.

Defaults: the 15 corruptions, severities 1..5, ``strength="imagenet-c"``, ``procedure="cumulative"``.

Cost: ``1 + corruptions x severities`` model forward passes per input (76 by default), no backward.

Departures from the paper and the reference
-------------------------------------------
- The corruptions are this package's torch implementations of the ImageNet-C (or, with
  ``strength="cifar10-c"``, the milder CIFAR-10-C) constants, not the ``imagecorruptions``
  package (which needs scikit-image, OpenCV, numba and its frost photographs); where they
  approximate the reference (frost's photographs, glass blur's sequential pixel swaps, the
  motion blur's taps, the plasma fractal's random numbers) :mod:`badexpert.detectors.corruptions`
  says so.
- Each corruption starts from the input itself. The reference corrupts one list of images in
  place, so its second corruption type starts from the images the first one left after severity
  5, and so on down the list; that makes a corruption's flip severity depend on the order of the
  list and on every corruption before it, which the paper does not describe. Here only the
  severities of one corruption accumulate.
- Randomness: each corruption's random numbers come from a generator seeded from the detector's
  seed, the corruption and the input's content (:meth:`Detector.input_generators`): a score
  depends only on the input, never on its batch. Cumulatively each severity draws new numbers
  (as the reference's global generator does); independently the generator is reset for every
  severity, so severity s of a corruption is the same random pattern as severity s - 1, stronger.
- The threshold comes from :meth:`Detector.calibrate` (the conformal quantile of clean scores),
  like every detector of this package; the paper reports threshold-free AUROC.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from torch import nn

from ..errors import BadExpertError
from ..training import forward, model_outputs
from ..utils import eval_mode
from ..validation import NonNegativeInt, PositiveInt, Range
from .base import Detector
from .corruptions import CORRUPTIONS, MIN_SIZE, RANDOM, SEVERITIES, STRENGTHS, corrupt

#: prefix of the purpose strings of the per-input generators (one purpose per corruption)
PURPOSE = "teco"
#: how severities are applied: each on the previous one's output (the authors' code), or each on the input
PROCEDURES = ("cumulative", "independent")


class TeCo(Detector):
    """TeCo (Liu et al., CVPR 2023): flag inputs whose robustness to 15 image corruptions is uneven.

    See the module docstring for the method.

    Parameters
    ----------
    corruptions: names of the corruptions to apply (default: all 15 of
        :data:`~badexpert.detectors.corruptions.CORRUPTIONS`); at least two, no repeats.
    severities: severity levels tried for each corruption, increasing, from 1..5 (default all
        five). An input whose prediction never changes records ``max(severities) + 1``.
        Cumulatively, the listed severities are applied in turn, each to the previous output.
    strength: the severity constants, ``"imagenet-c"`` (default, the strengths of the library
        the authors call) or ``"cifar10-c"`` (milder, the 32x32 settings of CIFAR-10-C).
    procedure: ``"cumulative"`` (default, the authors' code: each severity corrupts the previous
        severity's 8-bit output) or ``"independent"`` (each severity corrupts the input itself).
        ``strength="cifar10-c", procedure="independent"`` is this package's first TeCo.
    batch_size: images per model forward pass (each corrupted copy of a batch is one pass).
    seed: seeds the random corruptions (with each input's content).
    device: where the model and the corruptions run (``None``: CUDA when available).
    """

    name: ClassVar[str] = "teco"
    forward_passes_per_input: ClassVar[int] = 1 + len(CORRUPTIONS) * len(SEVERITIES)
    shares_model_pass: ClassVar[bool] = True

    def __init__(
        self,
        *,
        corruptions: tuple[str, ...] = CORRUPTIONS,
        severities: tuple[Annotated[int, Range(ge=1, le=5)], ...] = SEVERITIES,
        strength: Literal[tuple(STRENGTHS)] = "imagenet-c",
        procedure: Literal[PROCEDURES] = "cumulative",
        batch_size: PositiveInt = 256,
        seed: NonNegativeInt = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.corruptions = tuple(corruptions) if isinstance(corruptions, list) else corruptions
        self.severities = tuple(severities) if isinstance(severities, list) else severities
        self.strength = strength
        self.procedure = procedure
        self.check_params()

    @property
    def cost(self) -> dict[str, int]:
        """One clean pass plus one per corruption and severity; no backward pass."""
        return {"forward": 1 + len(self.corruptions) * len(self.severities), "backward": 0}

    def check_params(self) -> "TeCo":
        super().check_params()
        where = f"detector '{self.name}' parameter"
        unknown = [c for c in self.corruptions if c not in CORRUPTIONS]
        if unknown:
            raise BadExpertError(
                f"{where} 'corruptions': unknown corruption(s) {', '.join(map(repr, unknown))}; choose from: "
                f"{', '.join(CORRUPTIONS)}"
            )
        if len(self.corruptions) < 2 or len(set(self.corruptions)) != len(self.corruptions):
            raise BadExpertError(
                f"{where} 'corruptions' must name at least two different corruptions (the score is the spread of their "
                f"flip severities), got {list(self.corruptions)}"
            )
        if not self.severities or any(b <= a for a, b in zip(self.severities, self.severities[1:])):
            raise BadExpertError(
                f"{where} 'severities' must be increasing levels from 1 to 5, e.g. [1, 2, 3, 4, 5], got "
                f"{list(self.severities)}"
            )
        return self

    # --- fitting -------------------------------------------------------------------------
    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Nothing to learn: checks that the model takes these images and that they can be corrupted."""
        model_outputs(model, images, labels)
        c, h, w = images.shape[1:]
        if c not in (1, 3) or h < MIN_SIZE or w < MIN_SIZE:
            raise BadExpertError(
                f"TeCo corrupts 1-channel (gray) or 3-channel (RGB) images of at least {MIN_SIZE}x{MIN_SIZE} pixels, "
                f"got {c} channels of {h}x{w}"
            )

    # --- scoring -------------------------------------------------------------------------
    @property
    def never(self) -> int:
        """The value recorded for a corruption that never changes the prediction."""
        return max(self.severities) + 1

    @torch.no_grad()
    def flip_severities(self, x) -> torch.Tensor:
        """``[N, len(corruptions)]`` float64: for each input and corruption, the first severity
        whose prediction differs from the clean prediction (:attr:`never` if none does); NaN rows
        for inputs that cannot be scored (a NaN or inf pixel)."""
        self._check_fitted("flip_severities")
        images, bad = self._scorable(x)
        parts = [self._flips(xb) for xb in self._batches(images)]
        out = torch.cat(parts) if parts else torch.empty(0, len(self.corruptions), dtype=torch.float64)
        out[bad] = float("nan")
        return out

    @torch.no_grad()
    def _flips(self, xb: torch.Tensor, pred: torch.Tensor | None = None) -> torch.Tensor:
        """Flip severities of a checked, finite float batch on the detector's device (float64, CPU)."""
        n = len(xb)
        levels = torch.tensor(self.severities, dtype=torch.float64)
        out = torch.full((n, len(self.corruptions)), float(self.never), dtype=torch.float64)
        if n == 0:
            return out
        with eval_mode(self.model_):
            if pred is None:
                pred = forward(self.model_, xb).argmax(1)
            pred = pred.to(xb.device)
            cumulative = self.procedure == "cumulative"
            for k, name in enumerate(self.corruptions):
                gens = self.input_generators(xb, f"{PURPOSE}/{name}") if name in RANDOM else None
                start = [g.get_state() for g in gens] if gens is not None else None
                changed = []
                current = xb
                for s in self.severities:
                    if gens is not None and not cumulative:  # every severity starts from the same random state
                        for g, state in zip(gens, start):
                            g.set_state(state)
                    corrupted = corrupt(current if cumulative else xb, name, s, gens, strength=self.strength)
                    if cumulative:  # the next severity corrupts this one's 8-bit image, as the reference does
                        corrupted = corrupted.mul(255).round_().div_(255)
                        current = corrupted
                    changed.append((forward(self.model_, corrupted).argmax(1) != pred).cpu())
                changed = torch.stack(changed, dim=1)  # [n, severities]
                first = changed.int().argmax(dim=1)  # first True (0 when none)
                out[:, k] = torch.where(changed.any(dim=1), levels[first], out[:, k])
        return out

    @staticmethod
    def spread(flips: torch.Tensor) -> torch.Tensor:
        """TeCo's score from flip severities ``[N, K]``: their population standard deviation."""
        return flips.std(dim=1, unbiased=False)

    def _score_batch(self, xb: torch.Tensor) -> torch.Tensor:
        return self.spread(self._flips(xb)).float()

    def score_given_logits(self, xb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.spread(self._flips(xb, logits.argmax(1))).float()

    def score_details(self, x) -> dict:
        """``score`` and the per-corruption ``flip_severities`` ``[N, K]`` behind it (numpy)."""
        flips = self.flip_severities(x)
        return {"score": self.spread(flips).float().numpy(), "flip_severities": flips.numpy()}

    # --- persistence ---------------------------------------------------------------------
    def _state_meta(self) -> dict:
        return {"procedure": self.procedure, "strength": self.strength}

    def _load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        # files saved before the two parameters existed hold the first TeCo's threshold, but the
        # parameters' new defaults would be filled in: refuse them rather than mix the two
        if meta.get("procedure") != self.procedure or meta.get("strength") != self.strength:
            raise BadExpertError(
                "this TeCo detector file was saved before TeCo's procedure and strength were recorded (its threshold "
                "is for CIFAR-10-C corruptions applied one at a time, not the authors' cumulative ImageNet-C ones); "
                "fit and calibrate it again"
            )


__all__ = ["TeCo"]
