"""ISSBA (Li, Li, Wu, Li, He and Lyu, ICCV 2021, "Invisible backdoor attack with sample-specific
triggers"): a steganographic encoder hides a fixed bit string in each image as a small additive
residual that depends on the image; the model learns to map "carries the string" to the target."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.core import Dataset, to_float
from ..errors import BadExpertError
from ..validation import PositiveInt, Range
from .base import Attack, Rate
from .components import Components, prefixed, tensor_digest, unprefixed

#: Channels of the spatial map the secret is spread into before it joins the image (StegaStamp: 3).
SECRET_CHANNELS = 4
#: Images encoded per forward pass when triggering (bounds the activations' memory).
ENCODE_BATCH = 512
#: Images of the training set the codec's statistics (PSNR, bit accuracy) are measured on.
STATS_IMAGES = 512
#: Local standard deviation (3x3) from which a pixel may change by the whole ``max_residual``.
TEXTURE_FULL = 0.1
#: The image and specificity losses are off for this share of the codec's training steps, then rise
#: linearly over the next share.
LATE_START, LATE_RAMP = 0.4, 0.3
#: The parameters that shape the trained encoder (its cache key has them; poison_rate and target do not).
CODEC_FIELDS = ("bits", "max_residual", "image_weight", "masking", "noise", "specificity", "codec_width", "codec_steps",
                "codec_batch_size", "codec_lr")


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def local_std(x: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]``: the standard deviation of each pixel's 3x3 neighbourhood, averaged over channels."""
    mean = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    var = (F.avg_pool2d(x * x, 3, 1, 1, count_include_pad=False) - mean * mean).clamp_min(0)
    return var.sqrt().mean(1, keepdim=True)


class StegaEncoder(nn.Module):
    """A small StegaStamp-like U-Net: ``(image, bits) -> residual`` of the image's shape.

    The bits (as +-1) go through a dense layer to a ``SECRET_CHANNELS``-channel map on a grid a
    quarter of the image's size, upsampled (nearest) to the image and concatenated with it
    (StegaStamp: dense to 3x50x50, upsampled to 400x400). One full-resolution level and one at
    half resolution joined by a skip connection, plus a direct 3x3 convolution from the secret
    map to the output. The output goes through ``tanh``, times the per-pixel bound :meth:`bound`.
    """

    def __init__(self, channels: int, height: int, width: int, bits: int, hidden: int, max_residual: float,
                 masking: float) -> None:
        super().__init__()
        self.masking = masking
        self.grid = (max(1, math.ceil(height / 4)), max(1, math.ceil(width / 4)))
        self.max_residual = max_residual
        self.secret = nn.Linear(bits, SECRET_CHANNELS * self.grid[0] * self.grid[1])
        self.inc = nn.Conv2d(channels + SECRET_CHANNELS, hidden, 3, padding=1)
        self.down = nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1)
        self.up = nn.Conv2d(3 * hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, channels, 1)
        self.direct = nn.Conv2d(SECRET_CHANNELS, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        s = self.secret(bits * 2 - 1).view(n, SECRET_CHANNELS, *self.grid)
        s = F.interpolate(s, size=(h, w), mode="nearest")
        top = _act(self.inc(torch.cat([x * 2 - 1, s], 1)))
        low = _act(self.mid(_act(self.down(top))))
        low = F.interpolate(low, size=(h, w), mode="nearest")
        raw = self.out(_act(self.up(torch.cat([top, low], 1)))) + self.direct(s)
        return self.bound(x) * torch.tanh(raw)

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]``: the largest change allowed at each pixel of ``x``."""
        return self.max_residual * ((local_std(x) + self.masking) / TEXTURE_FULL).clamp(max=1)


class StegaDecoder(nn.Module):
    """``image -> bit logits``, read from the image's high-pass part ``x - mean3x3(x)`` (where
    the image itself has little energy, so the code stands out): three 3x3 convolutions (two
    of stride 2) average-pooled to a 4x4 grid (any image size) and a linear read-out, plus a
    linear read-out of the high-pass image itself (a learned matched filter, which makes the
    code learnable in a few hundred steps). StegaStamp: a spatial transformer, five strided
    convolutions and two dense layers on the image itself."""

    def __init__(self, channels: int, height: int, width: int, bits: int, hidden: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(channels, hidden, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1)
        self.head = nn.Linear(2 * hidden * 16, bits)
        self.matched = nn.Linear(channels * height * width, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hp = 2 * (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        h = _act(self.c3(_act(self.c2(_act(self.c1(hp))))))
        return self.head(F.adaptive_avg_pool2d(h, 4).flatten(1)) + self.matched(2 * hp.flatten(1))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of ``y`` against ``x`` (float images in [0, 1]); identical images give inf."""
    mse = (x - y).flatten(1).pow(2).mean(1)
    return 10 * torch.log10(1 / mse)


def residual_correlation(residuals: torch.Tensor) -> float:
    """Mean Pearson correlation between the residuals of different images (1: one fixed additive
    pattern; near 0: unrelated per-image patterns)."""
    r = residuals.flatten(1).double()
    r = r - r.mean(1, keepdim=True)
    r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    c = r @ r.t()
    n = len(r)
    return float((c.sum() - c.diagonal().sum()) / max(1, n * (n - 1)))


@dataclass
class ISSBA(Attack):
    """ISSBA: each poisoned image carries a fixed secret bit string, hidden by a learned encoder
    as a small additive residual that differs from image to image; dirty-label poisoning.

    **Trigger.** ``x' = clamp(x + r(x, s), 0, 1)``: ``r`` is the encoder's residual for image
    ``x`` and the attack's secret ``s`` (``bits`` random bits drawn from ``trigger_seed``).
    Each pixel's change is bounded by ``max_residual * min(1, (local_std + masking) / 0.1)``
    (``local_std``: the 3x3 neighbourhood's standard deviation, averaged over channels): the
    whole ``max_residual`` where the image has texture, less on flat areas where the eye would
    see it (the texture masking of image watermarking). The trigger state, saved with the
    model, is the secret (``"secret"``) and the encoder's weights (``"encoder.*"``);
    :meth:`trigger` rebuilds the encoder from them (once per device).

    **Encoder training** (:meth:`train_codec`, run by :meth:`implant` through
    ``components.fetch("encoder", ...)``: a grid trains it once for every cell with the same
    training images, codec parameters, seeds and image shape; the classifier's architecture,
    the recipe, the target and the poison rate play no part). A StegaStamp-like pair,
    :class:`StegaEncoder` (a small U-Net) and :class:`StegaDecoder`, initial weights drawn from
    ``trigger_seed``, is trained on the training images with Adam (``codec_lr``) for
    ``codec_steps`` steps of ``codec_batch_size`` images (batches, secrets and noise drawn from
    the run's seed). Every image gets a random secret, as in StegaStamp (an encoder trained on
    the one fixed secret could stamp one fixed pattern, which is no code); the second half of
    each batch repeats the first half's secrets on other images. Per step::

        x_enc = clamp(x + r(x, s), 0, 1)
        loss  = BCE(D(x_enc + noise), s)
                + ramp * image_weight * mean(masking / (masking + local_std(x)) * (x_enc - x)^2)
                + ramp * specificity * mean(max(0, cos(r_i, r_j)))

    - the bit loss: the decoder reads the secret from the encoded image plus Gaussian noise of
      std ``noise`` (StegaStamp's noise level; its other distortions are left out);
    - the image loss: l2 weighted by texture (the perceptual-ish term, standing in for
      StegaStamp's LPIPS and critic): a change costs less where the image has local contrast;
    - the specificity loss: the cosine similarity (each residual centred) of the residuals of
      two different images carrying the same secret, when positive. Triggers that differ from
      image to image are the property ISSBA is named for; without this term the small codec
      settles on residuals that are largely one pattern per secret, which decode just as well
      (mean correlation between residuals about 0.65 on the tests' blobs, 0.86 on CIFAR-10
      airplanes in development, against 0.03 to 0.2 with it);
    - ``ramp``: the two last terms are off for the first 40% of the steps and rise linearly
      over the next 30% (StegaStamp: no image loss for 1,500 steps, then a 15,000-step ramp),
      so the code is learned first, then made quiet and sample-specific.

    :meth:`implant` records in ``info["codec"]`` (:meth:`measure`, on the first 512 training
    images): the PSNR of the encoded images (mean and lowest), the largest pixel change, the
    decoder's bit accuracy on encoded images (the attack's secret) and on clean images (about
    0.5), and the mean correlation between the residuals of different images (1 for one fixed
    additive pattern).

    **Poisoning.** Then :meth:`Attack.implant` as for any dirty-label attack: ``round(poison_rate
    * N)`` non-target training images are encoded with the secret and relabelled to the target,
    and the suspect model is trained with the recipe.

    Parameters (reference: the BaDExpert research code's ISSBA; StegaStamp's training script):

    - ``poison_rate``: **0.02** (reference).
    - ``bits``: secret length, **20** (reference: a random 20-bit secret; StegaStamp: 100).
    - ``max_residual``: **0.1**, the largest change of a pixel in [0, 1] units (StegaStamp:
      unbounded, clamped to [0, 1] after).
    - ``masking``: **0.02**; ``image_weight``: **50**; ``specificity``: **1** (no reference
      values: the terms are this implementation's); ``noise``: **0.02** (StegaStamp's).
    - ``codec_width``: **16** channels; ``codec_steps``: **1000**; ``codec_batch_size``: **32**;
      ``codec_lr``: **3e-3** (StegaStamp: 140,000 steps, batch 4, lr 1e-4 on 400x400 images).
      About 75 seconds of one CPU core for 28x28 or 32x32 images. Measured on 5,000 training
      images of Fashion-MNIST / CIFAR-10: bit accuracy 0.99 / 1.00 (clean images 0.51 / 0.47),
      PSNR 25.2 / 26.8 dB, residual correlation 0.07 / 0.03. ``image_weight`` trades
      invisibility for how easily the backdoor is learned: on CIFAR-10 (small CNN, 6 epochs,
      10% poisoned) 30, 50 and 100 gave PSNR 23.3, 26.8 and 29.0 dB and attack success rates
      1.00, 0.96 and 0.45.

    Departures: the reference loads an encoder the ISSBA authors trained on CIFAR-10 (StegaStamp:
    a five-level U-Net, an l2 loss in YUV space, LPIPS and a critic, a decoder with a spatial
    transformer, perspective, blur, colour and JPEG distortions between encoder and decoder).
    Here a small codec is trained on the training set at hand (any dataset, any image size),
    with the texture-weighted l2 loss, the texture-masked bound and the specificity loss above
    instead of LPIPS and the critic, and only Gaussian noise between encoder and decoder.
    """

    poison_rate: Rate = 0.02
    bits: Annotated[int, Range(ge=1, le=1024)] = 20
    max_residual: Annotated[float, Range(gt=0, le=1)] = 0.1
    image_weight: Annotated[float, Range(ge=0)] = 50.0
    masking: Annotated[float, Range(gt=0)] = 0.02
    noise: Annotated[float, Range(ge=0, le=1)] = 0.02
    specificity: Annotated[float, Range(ge=0)] = 1.0
    codec_width: PositiveInt = 16
    codec_steps: PositiveInt = 1000
    codec_batch_size: PositiveInt = 32
    codec_lr: Annotated[float, Range(gt=0)] = 3e-3

    name: ClassVar[str] = "issba"
    trigger_extent: ClassVar[str] = "image"  # an encoder's residual over the whole image
    learned: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._encoders: dict[str, tuple[dict, StegaEncoder]] = {}

    # --- the networks --------------------------------------------------------------------
    def secret(self) -> torch.Tensor:
        """The attack's secret: ``bits`` values in {0, 1} (float), drawn from ``trigger_seed``."""
        from ..utils import derive_generator

        g = derive_generator(self.trigger_seed, "issba:secret")
        return torch.randint(0, 2, (self.bits,), generator=g).float()

    def networks(self, shape: tuple[int, int, int], tensors: dict[str, torch.Tensor] | None = None,
                 device: torch.device | str = "cpu") -> tuple[StegaEncoder, StegaDecoder]:
        """The encoder and decoder for images of ``shape``: initial weights drawn from
        ``trigger_seed`` (not the global random state), or ``tensors`` (``"encoder.*"`` and,
        where present, ``"decoder.*"``) loaded into them."""
        from ..utils import seeded_rng

        c, h, w = (int(v) for v in shape)
        with seeded_rng(self.trigger_seed, "issba:init"):
            enc = StegaEncoder(c, h, w, self.bits, self.codec_width, self.max_residual, self.masking)
            dec = StegaDecoder(c, h, w, self.bits, self.codec_width)
        if tensors is not None:
            enc.load_state_dict(unprefixed("encoder", tensors))
            decoder = unprefixed("decoder", tensors)
            if decoder:
                dec.load_state_dict(decoder)
        return enc.to(device).eval(), dec.to(device).eval()

    def initial_state(self, shape):
        enc, _ = self.networks(shape)
        return {"secret": self.secret(), **prefixed("encoder", enc.state_dict())}

    def _encoder(self, parts: dict[str, torch.Tensor], shape: tuple[int, int, int], device: torch.device) -> StegaEncoder:
        """The encoder built from ``parts`` (cached per device while ``parts`` is the state in use)."""
        cached = self._encoders.get(str(device))
        if cached is not None and cached[0] is parts:
            return cached[1]
        secret = parts["secret"]
        if secret.dim() != 1 or secret.numel() != self.bits:
            raise ValueError(f"the secret has shape {tuple(secret.shape)}, not ({self.bits},)")
        enc, _ = self.networks(shape, parts, device)
        self._encoders[str(device)] = (parts, enc)
        return enc

    def encode(self, encoder: StegaEncoder, x: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        """``clamp(x + r(x, secret), 0, 1)`` for a float batch, in chunks, without gradients."""
        secret = secret.to(x.device, torch.float32)
        out = torch.empty_like(x)
        with torch.no_grad():
            for start in range(0, len(x), ENCODE_BATCH):
                xb = x[start:start + ENCODE_BATCH].float()
                out[start:start + ENCODE_BATCH] = (xb + encoder(xb, secret.expand(len(xb), -1))).clamp(0, 1).to(x.dtype)
        return out

    def trigger(self, x, parts):
        return self.encode(self._encoder(parts, tuple(x.shape[1:]), x.device), x, parts["secret"])

    # --- training the encoder ------------------------------------------------------------
    def codec_spec(self, shape: tuple[int, int, int], seed: int) -> dict:
        """What the trained encoder depends on besides the training images (its cache key)."""
        enc, dec = self.networks(shape)
        init = tensor_digest({**prefixed("encoder", enc.state_dict()), **prefixed("decoder", dec.state_dict())})
        return {"shape": [int(v) for v in shape], "seed": seed, "trigger_seed": self.trigger_seed, "init": init,
                **{k: getattr(self, k) for k in CODEC_FIELDS}}

    def train_codec(self, data, seed: int, *, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Train the encoder and decoder on the images of ``data`` (a Dataset or an ``(images,
        labels)`` pair; labels unused) as the class docstring says; batches, secrets and noise
        come from ``seed``. Returns their weights (``"encoder.*"``, ``"decoder.*"``, CPU)."""
        from ..data.core import as_tensors
        from ..utils import derive_generator, progress

        images, _ = as_tensors(data)
        if len(images) == 0:
            raise BadExpertError("attack 'issba' trains its encoder on the training images, but there are none")
        shape = tuple(images.shape[1:])
        enc, dec = self.networks(shape, device=device)
        enc.train()
        dec.train()
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=self.codec_lr)
        g = derive_generator(seed, "issba:codec")
        bs = min(self.codec_batch_size, len(images))
        start, ramp = LATE_START * self.codec_steps, max(1.0, LATE_RAMP * self.codec_steps)
        bar = progress(total=self.codec_steps, desc="ISSBA encoder")
        try:
            with torch.enable_grad():
                for step in range(self.codec_steps):
                    x = to_float(images[torch.randint(0, len(images), (bs,), generator=g)]).to(device)
                    s = torch.randint(0, 2, (bs - bs // 2, self.bits), generator=g).float().to(device)
                    s = torch.cat([s, s[: bs // 2]])  # images i and i + bs - bs // 2 share a secret
                    encoded = (x + enc(x, s)).clamp(0, 1)
                    seen = encoded + self.noise * torch.randn(encoded.shape, generator=g).to(device)
                    bit_loss = F.binary_cross_entropy_with_logits(dec(seen), s)
                    image_loss = (self.masking / (self.masking + local_std(x)) * (encoded - x).pow(2)).mean()
                    later = min(1.0, max(0.0, step - start) / ramp)
                    loss = bit_loss + later * self.image_weight * image_loss
                    if self.specificity and bs >= 2:
                        r = (encoded - x).flatten(1)
                        r = r - r.mean(1, keepdim=True)
                        a, b = r[: bs // 2], r[bs - bs // 2:]
                        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)
                        loss = loss + later * self.specificity * cos.clamp_min(0).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.update(1)
        finally:
            bar.close()
        return {**prefixed("encoder", enc.state_dict()), **prefixed("decoder", dec.state_dict())}

    def measure(self, codec: dict[str, torch.Tensor], images: torch.Tensor, *,
                device: torch.device | str = "cpu") -> dict[str, float]:
        """How invisible and how readable the code of ``codec`` (from :meth:`train_codec`) is on
        ``images``, with the attack's secret: mean and lowest PSNR (dB) of the encoded images,
        the largest pixel change, the decoder's bit accuracy on encoded and on clean images,
        and the mean correlation between different images' residuals."""
        x = to_float(images).to(device)
        enc, dec = self.networks(tuple(x.shape[1:]), codec, device)
        secret = self.secret().to(device)
        encoded = self.encode(enc, x, secret)
        with torch.no_grad():
            acc = [float(((dec(v) > 0).float() == secret).float().mean()) for v in (encoded, x)]
        p = psnr(x, encoded)
        return {"psnr_mean": float(p.mean()), "psnr_min": float(p.min()), "linf": float((encoded - x).abs().max()),
                "bit_accuracy": acc[0], "bit_accuracy_clean": acc[1],
                "residual_correlation": residual_correlation((encoded - x).cpu())}

    # --- implanting ----------------------------------------------------------------------
    def implant(self, train_set: Dataset, build_model: Callable[[], nn.Module], recipe, seed: int, *,
                log: Callable[[str], Any] = print, components: Components | None = None) -> tuple[nn.Module, dict]:
        """Train the encoder on the training images (a cached component), make it and the secret
        the trigger, then poison and train as :meth:`Attack.implant` does. ``info["codec"]``:
        :meth:`measure` on the first training images."""
        from ..utils import model_device

        components = components if components is not None else Components(log=log)
        self.poison_count(train_set)  # a rate that poisons nothing fails before the encoder trains
        shape = (train_set.channels, *train_set.image_size)
        model = build_model()
        device = model_device(model)
        log(f"ISSBA: a {self.bits}-bit encoder and decoder, {self.codec_steps} steps on {len(train_set)} training images")
        codec = components.fetch("encoder", self.codec_spec(shape, seed),
                                 lambda: self.train_codec(train_set, seed, device=device), data=train_set)
        self.use_state(shape, {"secret": self.secret(), **{k: v for k, v in codec.items() if k.startswith("encoder.")}})
        stats = self.measure(codec, train_set.images[:STATS_IMAGES], device=device)
        log(f"ISSBA encoder: PSNR {stats['psnr_mean']:.1f} dB (lowest {stats['psnr_min']:.1f}), largest change "
            f"{stats['linf'] * 255:.1f}/255, bit accuracy {stats['bit_accuracy']:.2f} encoded / "
            f"{stats['bit_accuracy_clean']:.2f} clean, residual correlation {stats['residual_correlation']:.2f}")
        model, info = super().implant(train_set, lambda: model, recipe, seed, log=log, components=components)
        return model, {"codec": stats, **info}
