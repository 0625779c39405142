"""Frequency (Zeng et al., ICCV 2021): a model-agnostic detector of triggers' high-frequency artifacts.

"Rethinking the backdoor attacks' triggers: a frequency perspective" observes that most backdoor
triggers (patches, blended noise, warps) leave artifacts in the high frequencies of an image's
discrete cosine transform that natural images lack, so a small classifier on the DCT tells
triggered images from clean ones without looking at the suspect model at all. For an image x:

1. ``X`` = the orthonormal type-II 2-D DCT of each channel of x (:func:`dct2`, a matrix product
   ``C_H x C_W^T`` with the orthonormal DCT-II matrices :func:`dct_matrix`);
2. a 6-layer CNN (:class:`FrequencyCNN`) classifies ``X`` as clean (0) or triggered (1);
3. score = the logit difference ``z_1 - z_0`` = ``log(p_1 / p_0)``: **higher = more likely a
   backdoor input**. It is a strictly increasing function of the paper's ``p(poison) - p(clean)``
   (``= tanh((z_1 - z_0) / 2)``), so it ranks inputs identically, but it does not saturate where
   the softmax rounds to 0 or 1, so the calibrated threshold never sits on a block of ties.

Fit (on the reserved clean set only, never on the attack under test): the CNN is trained here to
separate the clean images (label 0) from copies of the same images carrying synthetic triggers
(label 1, :func:`synthetic_triggers`) drawn afresh for every batch, uniformly from the families
of :data:`DEFAULT_TRIGGERS`. They follow the five of the authors' detector training (Sec. 4 of
the paper; the ``patching_train`` procedure of their public code, read, not copied), family by
family:

- ``patch``: reference, a white block 2-7 px a side near a corner; here one colour (random, or
  0/1 for half the images), ``lo``-``hi`` px a side (2-8 on 32x32), anywhere in the image;
- ``pattern``: reference, a uniform-noise block, sized and placed alike; here the same rectangle
  as ``patch`` filled with per-pixel noise;
- ``gaussian_noise``: reference, additive Gaussian noise of mean 25/255 and variance 10-70 on the
  0-255 scale; here zero-mean, standard deviation 0.02-0.1;
- ``shadow``: reference, a random polygon shadow; here a rectangle darkened to 30-70%;
- ``image_blend``: reference, ``min(1, x + 0.3 x')`` with ``x'`` another clean image; here
  ``(1 - a) x + a x'`` with ``a`` in 0.1-0.3.

``noise_blend`` (``(1 - a) x + a u`` with ``u`` uniform noise, ``a`` in 0.05-0.25) is **not** a
default: it is this package's own Blend trigger (a uniform-noise key blended at alpha 0.2), which
the authors' detector never sees, so a detector trained on it would be evaluated on its own
training trigger. It stays available as an opt-in (``triggers=TRIGGERS`` or a tuple naming it);
:data:`TRIGGERS` lists every family. Dropping it, measured: on Fashion-MNIST (width 8, 10
epochs, 1,000 fitting images) Blend's AUROC went 0.987 -> 0.979 and BadNet's 0.810 -> 0.803; on
the test suite's 12x12 blobs (width 8, 20 epochs, 800 images) Blend went 0.995 -> 0.782 and
BadNet stayed at 1.00: there the family that *was* the test trigger had done the work.

Cost: the suspect model is never run (0 of its passes); :attr:`Frequency.cost` reports the one
forward pass of the detector's own CNN per input, so a guard (which also runs the suspect model)
makes two passes per input, one of them through the small CNN; the measured throughput gives the
actual price.

Departures from the paper and its reference code
------------------------------------------------
- The CNN is trained here, at fit time, on the reserved clean set (the reference loads weights
  the authors pretrained on the whole CIFAR-10 training set); its synthetic triggers are drawn
  afresh at every step (a small clean set then still sees many triggers), from the families
  above as this module defines them: wider sizes, positions and colours than the reference's
  (the patch sizes scale with the image, so 12x12 and 224x224 inputs get sensible patches), a
  zero-mean Gaussian, rectangular rather than polygon shadows, and a convex rather than additive
  image blend (no dependency on an augmentation library; the same kinds of artifact).
- Inputs are ``[0, 1]`` floats, not ``[0, 255]`` (the orthonormal DCT is linear: a scale of 1/255
  on every coefficient), and each DCT coefficient is then standardised by the mean and standard
  deviation it has over the clean fitting images (stored with the detector): without it the DC
  and low-frequency coefficients, orders of magnitude larger, swamp the high-frequency ones the
  method relies on.
- The CNN's widths scale with ``width`` (reference 32: 32-32-64-64-128-128 channels) and its
  max-pools round up (``ceil_mode``), so any image size works (12x12 inputs: 12, 6, 3, 2).
- Score = the logit difference (see above), and the threshold comes from
  :meth:`Detector.calibrate` (the conformal quantile of clean calibration scores) like every
  detector of this package, not the argmax's implicit ``p(poison) > 0.5``; the BaDExpert toolbox
  also replaced the poisoned inputs' scores by hard 0/1 predictions before its AUROC, which is not
  done here.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
from torch import nn

from ..data.core import batches, to_float
from ..errors import BadExpertError
from ..training import Recipe, predict_logits, train
from ..utils import derive_generator, seeded_rng
from ..validation import NonNegativeInt, PositiveInt, Range
from .base import Detector

#: every synthetic trigger family :func:`synthetic_triggers` can draw
TRIGGERS = ("patch", "pattern", "noise_blend", "image_blend", "gaussian_noise", "shadow")
#: the families the detector trains against by default: the reference's five kinds; not
#: ``noise_blend``, which is this package's own Blend trigger (see the module docstring)
DEFAULT_TRIGGERS = ("patch", "pattern", "image_blend", "gaussian_noise", "shadow")


# --- the orthonormal 2-D DCT -----------------------------------------------------------------------
def dct_matrix(n: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ``[n, n]`` orthonormal DCT-II matrix ``C[k, i] = s_k cos(pi (2i + 1) k / (2n))`` with
    ``s_0 = sqrt(1/n)`` and ``s_k = sqrt(2/n)``: ``C @ v`` is the DCT-II of ``v`` (scipy's
    ``dct(v, norm="ortho")``) and ``C.T`` its inverse."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal type-II 2-D DCT of every channel of ``x`` ``[..., H, W]``: ``C_H x C_W^T``."""
    ch = dct_matrix(x.shape[-2], dtype=x.dtype).to(x.device)
    cw = dct_matrix(x.shape[-1], dtype=x.dtype).to(x.device)
    return ch @ x @ cw.T


def idct2(coeffs: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`dct2`: ``C_H^T X C_W``."""
    ch = dct_matrix(coeffs.shape[-2], dtype=coeffs.dtype).to(coeffs.device)
    cw = dct_matrix(coeffs.shape[-1], dtype=coeffs.dtype).to(coeffs.device)
    return ch.T @ coeffs @ cw


# --- the classifier -------------------------------------------------------------------------------
class FrequencyCNN(nn.Module):
    """The paper's 6-layer CNN on standardised DCT coefficients, for images of ``shape`` ``(C, H, W)``.

    ``DCT -> standardise -> [conv3x3(w) ELU BN, conv3x3(w) ELU BN, maxpool2, dropout 0.2]
    -> the same with 2w channels and dropout 0.3 -> with 4w and 0.4 -> linear to 2 logits``
    (clean, triggered). The DCT matrices are rebuilt from the shape (not saved); the per-coefficient
    mean and standard deviation are buffers set by :meth:`standardise_on`.
    """

    def __init__(self, shape: tuple[int, int, int], width: int = 32) -> None:
        super().__init__()
        c, h, w = shape
        self.register_buffer("dct_h", dct_matrix(h, dtype=torch.float32), persistent=False)
        self.register_buffer("dct_w", dct_matrix(w, dtype=torch.float32), persistent=False)
        self.register_buffer("coef_mean", torch.zeros(c, h, w))
        self.register_buffer("coef_std", torch.ones(c, h, w))
        layers: list[nn.Module] = []
        cin = c
        for mult, drop in ((1, 0.2), (2, 0.3), (4, 0.4)):
            cout = width * mult
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ELU(), nn.BatchNorm2d(cout),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.ELU(), nn.BatchNorm2d(cout),
                       nn.MaxPool2d(2, ceil_mode=True), nn.Dropout(drop)]
            cin = cout
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin * h * w, 2)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised DCT coefficients of float images ``x`` in ``[0, 1]``."""
        return (self.dct_h @ x @ self.dct_w.T - self.coef_mean) / self.coef_std

    @torch.no_grad()
    def standardise_on(self, images: torch.Tensor, batch_size: int = 512) -> None:
        """Set the per-coefficient mean and standard deviation from clean float images (a zero
        deviation, e.g. a constant border, becomes 1)."""
        total = torch.zeros_like(self.coef_mean, dtype=torch.float64)
        square = torch.zeros_like(total)
        for xb, _ in batches(images, None, batch_size=batch_size, device=self.coef_mean.device):
            coef = (self.dct_h @ xb @ self.dct_w.T).double()
            total += coef.sum(0)
            square += (coef**2).sum(0)
        n = len(images)
        mean = total / n
        std = (square / n - mean**2).clamp_min(0).sqrt()
        self.coef_mean.copy_(mean.float())
        self.coef_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.coefficients(x)).flatten(1))


# --- synthetic triggers ---------------------------------------------------------------------------
def synthetic_triggers(x: torch.Tensor, generator: torch.Generator,
                       families: tuple[str, ...] = TRIGGERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of float images ``x`` ``[N, C, H, W]`` in ``[0, 1]``, each with one random synthetic
    trigger, and the index into ``families`` each got. Every random number is drawn on the CPU from
    ``generator`` (the same numbers whatever the device). For an image of ``H x W`` pixels, with
    ``lo = max(1, round(min(H, W) / 16))`` and ``hi = max(lo, round(min(H, W) / 4))`` (2 and 8 on
    32x32 images, 1 and 3 on 12x12):

    - ``patch``: a rectangle of height and width in ``[lo, hi]`` at a uniform position, filled
      with one colour (per channel uniform in ``[0, 1]``, rounded to 0/1 for half the images);
    - ``pattern``: the same rectangle filled with per-pixel noise (uniform, or 0/1 for half);
    - ``noise_blend``: ``(1 - a) x + a u``, ``u`` a uniform noise image, ``a`` in ``[0.05, 0.25]``;
    - ``image_blend``: ``(1 - a) x + a x'``, ``x'`` another image of the batch (itself for a batch
      of one), ``a`` in ``[0.1, 0.3]``;
    - ``gaussian_noise``: ``clamp(x + s n)``, ``n`` standard normal, ``s`` in ``[0.02, 0.1]``;
    - ``shadow``: a rectangle of a quarter to three quarters of each side at a uniform position,
      multiplied by ``f`` in ``[0.3, 0.7]``.
    """
    unknown = [f for f in families if f not in TRIGGERS]
    if unknown or not families:
        raise BadExpertError(f"unknown synthetic trigger family {unknown or families}; choose from: {', '.join(TRIGGERS)}")
    n, c, h, w = x.shape
    g = generator
    pick = torch.randint(len(families), (n,), generator=g)
    lo = max(1, round(min(h, w) / 16))
    hi = max(lo, round(min(h, w) / 4))

    def rectangles(min_h: int, max_h: int, min_w: int, max_w: int) -> torch.Tensor:
        rh = torch.randint(min_h, max_h + 1, (n,), generator=g)
        rw = torch.randint(min_w, max_w + 1, (n,), generator=g)
        top = (torch.rand(n, generator=g) * (h - rh + 1)).floor().long()
        left = (torch.rand(n, generator=g) * (w - rw + 1)).floor().long()
        rows, cols = torch.arange(h), torch.arange(w)
        inside_r = (rows[None] >= top[:, None]) & (rows[None] < (top + rh)[:, None])
        inside_c = (cols[None] >= left[:, None]) & (cols[None] < (left + rw)[:, None])
        return (inside_r[:, :, None] & inside_c[:, None, :])[:, None].float()  # [n, 1, h, w]

    def binarise_half(v: torch.Tensor) -> torch.Tensor:
        flip = (torch.rand(n, generator=g) < 0.5).view(n, *([1] * (v.dim() - 1)))
        return torch.where(flip, v.round(), v)

    patch_mask = rectangles(lo, hi, lo, hi)
    colour = binarise_half(torch.rand(n, c, 1, 1, generator=g)).expand(n, c, h, w)
    pattern = binarise_half(torch.rand(n, c, h, w, generator=g))
    noise = torch.rand(n, c, h, w, generator=g)
    a_noise = (0.05 + 0.2 * torch.rand(n, generator=g)).view(n, 1, 1, 1)
    other = (torch.arange(n) + torch.randint(1, max(2, n), (1,), generator=g)) % n
    a_image = (0.1 + 0.2 * torch.rand(n, generator=g)).view(n, 1, 1, 1)
    gauss = torch.randn(n, c, h, w, generator=g) * (0.02 + 0.08 * torch.rand(n, generator=g)).view(n, 1, 1, 1)
    shadow_mask = rectangles(max(1, h // 4), max(1, 3 * h // 4), max(1, w // 4), max(1, 3 * w // 4))
    shade = (0.3 + 0.4 * torch.rand(n, generator=g)).view(n, 1, 1, 1)

    dev = x.device
    to = lambda t: t.to(dev, x.dtype)  # noqa: E731
    out = x.clone()
    for k, name in enumerate(families):
        i = (pick == k).nonzero().flatten()
        if len(i) == 0:
            continue
        xi, di = x[i.to(dev)], i.to(dev)
        if name in ("patch", "pattern"):
            m, fill = to(patch_mask[i]), to((colour if name == "patch" else pattern)[i])
            out[di] = xi * (1 - m) + fill * m
        elif name == "noise_blend":
            out[di] = (1 - to(a_noise[i])) * xi + to(a_noise[i]) * to(noise[i])
        elif name == "image_blend":
            out[di] = (1 - to(a_image[i])) * xi + to(a_image[i]) * x[other[i].to(dev)]
        elif name == "gaussian_noise":
            out[di] = (xi + to(gauss[i])).clamp(0, 1)
        else:  # shadow
            m = to(shadow_mask[i])
            out[di] = xi * (1 - m) + xi * to(shade[i]) * m
    return out, pick


# --- the detector ---------------------------------------------------------------------------------
class Frequency(Detector):
    """Frequency (Zeng et al., ICCV 2021): a CNN on the image's DCT, trained on clean vs synthetic triggers.

    See the module docstring for the method and the departures from the paper.

    Parameters
    ----------
    width: channels of the first conv pair (reference 32: 32, 64, 128 channels in the three
        pairs); smaller for tiny images and quick runs.
    epochs: passes over the clean set while training the CNN (each step trains on a batch of
        clean images and the same images with fresh synthetic triggers).
    lr: Adam's learning rate (cosine decay to 0; weight decay 1e-4).
    train_batch_size: clean images per training step (the step sees twice as many: each one
        clean and triggered).
    triggers: the synthetic trigger families to train against (default: :data:`DEFAULT_TRIGGERS`,
        the reference's five kinds; :data:`TRIGGERS` adds ``noise_blend``, this package's own Blend
        trigger, as an opt-in).
    batch_size: images per CNN forward pass when scoring.
    seed: drives the CNN's initialisation, dropout, batch order and every synthetic trigger.
    device: where the CNN trains and runs (``None``: CUDA when available). The suspect model is
        only fingerprinted, never run.
    """

    name: ClassVar[str] = "frequency"
    uses_model: ClassVar[bool] = False

    def __init__(
        self,
        *,
        width: PositiveInt = 32,
        epochs: PositiveInt = 30,
        lr: Annotated[float, Range(gt=0)] = 1e-3,
        train_batch_size: PositiveInt = 64,
        triggers: tuple[str, ...] = DEFAULT_TRIGGERS,
        batch_size: PositiveInt = 256,
        seed: NonNegativeInt = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.width = width
        self.epochs = epochs
        self.lr = lr
        self.train_batch_size = train_batch_size
        self.triggers = triggers  # check_params makes a list a tuple
        self.check_params()

    def check_params(self) -> "Frequency":
        super().check_params()
        unknown = [t for t in self.triggers if t not in TRIGGERS]
        if unknown or not self.triggers or len(set(self.triggers)) != len(self.triggers):
            raise BadExpertError(
                f"detector '{self.name}' parameter 'triggers' must name distinct trigger families from: "
                f"{', '.join(TRIGGERS)}; got {list(self.triggers)}"
            )
        return self

    def recipe(self) -> Recipe:
        """Adam (weight decay 1e-4), cosine decay over ``epochs``, no augmentation."""
        return Recipe(optimizer="adam", lr=self.lr, epochs=self.epochs, batch_size=self.train_batch_size,
                      weight_decay=1e-4, schedule="cosine", augment=False)

    # --- fitting -------------------------------------------------------------------------
    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Train the CNN on the clean images against synthetic triggers; the suspect model is not used."""
        shape = tuple(images.shape[1:])
        with seeded_rng(self.seed, "frequency-init"):
            cnn = FrequencyCNN(shape, self.width)
        cnn = cnn.to(self.device_)
        cnn.standardise_on(images)

        def with_triggers(xb, yb, g):
            trig, _ = synthetic_triggers(xb, g, self.triggers)
            return torch.cat([xb, trig]), torch.cat([yb, torch.ones_like(yb)])

        log = train(cnn, (images, torch.zeros(len(images), dtype=torch.long)), self.recipe(), seed=self.seed,
                    batch_transform=with_triggers, desc="frequency CNN")
        cnn.eval()
        self.cnn_ = cnn
        # how well the CNN learned its own task: the fitting images against fresh synthetic triggers,
        # a batch at a time (a large fitting set is never converted or triggered whole)
        g = derive_generator(self.seed, "frequency-report")
        k = len(self.triggers)
        accepted, hits, counts = 0, torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
        for start in range(0, len(images), self.batch_size):
            xb = images[start:start + self.batch_size]
            trig, fam = synthetic_triggers(to_float(xb), g, self.triggers)
            accepted += int((_logit_gap(predict_logits(cnn, xb, batch_size=self.batch_size)) <= 0).sum())
            flagged = _logit_gap(predict_logits(cnn, trig, batch_size=self.batch_size)) > 0
            hits += torch.bincount(fam[flagged], minlength=k)
            counts += torch.bincount(fam, minlength=k)
        self.fit_report_ = {
            "clean_size": int(len(images)), "steps": log.steps,
            "final_loss": float(sum(log.losses[-10:]) / max(1, len(log.losses[-10:]))),
            "clean_accepted_at_argmax": accepted / max(1, len(images)),
            "triggered_detected_at_argmax": {
                name: float(hits[i]) / int(counts[i]) for i, name in enumerate(self.triggers) if counts[i]
            },
        }

    # --- scoring -------------------------------------------------------------------------
    def _score_batch(self, xb: torch.Tensor) -> torch.Tensor:
        return _logit_gap(self.cnn_(xb.float())).cpu()

    # --- persistence ---------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"cnn.{k}": v for k, v in self.cnn_.state_dict().items()}

    def _state_meta(self) -> dict:
        return {"fit_report": self.fit_report_}

    def _load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        cnn = FrequencyCNN(tuple(self.input_shape_), self.width)
        state = {k[len("cnn."):]: v for k, v in tensors.items() if k.startswith("cnn.")}
        try:
            cnn.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BadExpertError(
                "the Frequency detector file's CNN weights are missing or do not match its parameters; it is damaged"
            ) from exc
        self.cnn_ = cnn.to(self.device_).eval()
        self.fit_report_ = meta.get("fit_report", {})


def _logit_gap(logits: torch.Tensor) -> torch.Tensor:
    """The score from the CNN's logits ``[N, 2]`` (clean, triggered): ``z_1 - z_0``, float32."""
    return (logits[:, 1] - logits[:, 0]).float()


__all__ = ["DEFAULT_TRIGGERS", "Frequency", "FrequencyCNN", "TRIGGERS", "dct2", "dct_matrix", "idct2", "synthetic_triggers"]
