"""The in-memory image dataset, the one image-conversion rule, seeded splits and augmentation.

Images are held as ``uint8`` tensors of shape ``[N, C, H, W]`` with ``int64`` labels. Models take
float images in ``[0, 1]`` (normalisation lives inside the model). Every image that enters
badexpert, through any function, passes :func:`check_images` and :func:`to_float`, which apply
one rule:

- ``uint8`` means ``[0, 255]``;
- a floating dtype means ``[0, 1]``; values outside ``[-IMAGE_TOLERANCE, 1 + IMAGE_TOLERANCE]``
  are an error that says how to convert (values within the tolerance are clipped);
- every other dtype (``int64``, ``bool``, ``int16``...) is an error: its scale is ambiguous;
- non-finite values (NaN, inf) are an error, except where a caller explicitly scores them
  (a detector rejects such inputs instead of scoring them).

Augmentation runs on whole batches on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..runtime.arrays import IMAGE_TOLERANCE  # the one tolerance, shared with the numpy rule
from ..errors import BadExpertError
from ..validation import NonNegativeInt, PositiveInt, checked, expect


@dataclass
class Dataset:
    """Images (uint8, ``[N, C, H, W]``), labels (int64, ``[N]``) and class names.

    ``hflip`` says whether horizontal flips are a label-preserving augmentation for this data
    (true for CIFAR-10 and Fashion-MNIST, false for traffic signs, digits and text; false unless
    declared). ``mean``/``std`` are the
    per-channel statistics models built for this dataset normalise with.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = "dataset"
    hflip: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise BadExpertError(
                f"dataset '{self.name}': images must be a uint8 tensor [N, C, H, W], got "
                f"{getattr(self.images, 'dtype', type(self.images))} of shape {tuple(getattr(self.images, 'shape', ()))}"
            )
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise BadExpertError(
                f"dataset '{self.name}': {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}"
            )
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise BadExpertError(
                f"dataset '{self.name}': labels must lie in 0..{len(self.classes) - 1} for {len(self.classes)} classes"
            )
        if self.mean is None or self.std is None:
            x = self.images[: min(len(self.images), 10000)]
            if len(x):  # per-channel sums in chunks: no float copy of the whole sample
                total = torch.zeros(x.shape[1], dtype=torch.float64)
                squares = torch.zeros(x.shape[1], dtype=torch.float64)
                for chunk in x.split(512):
                    c = chunk.double().div_(255)
                    total += c.sum(dim=(0, 2, 3))
                    squares += c.pow_(2).sum(dim=(0, 2, 3))
                n = x.shape[0] * x.shape[2] * x.shape[3]
                mean = total / n
                var = (squares - n * mean**2) / max(1, n - 1)
                self.mean = tuple(float(v) for v in mean)
                self.std = tuple(max(float(v), 1e-3) for v in var.clamp_min(0).sqrt())
            else:
                self.mean = (0.5,) * self.images.shape[1]
                self.std = (0.5,) * self.images.shape[1]
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)

    # --- basic properties -------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, indices: torch.Tensor | Sequence[int], name: str | None = None) -> "Dataset":
        """A new dataset holding the given rows (statistics and flags kept)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return replace(self, images=self.images[idx], labels=self.labels[idx], name=name or self.name, meta=dict(self.meta))

    def with_data(self, images: torch.Tensor, labels: torch.Tensor, name: str | None = None, **meta) -> "Dataset":
        """A new dataset with other rows but this one's classes, statistics and flags."""
        return replace(self, images=images, labels=labels, name=name or self.name, meta={**self.meta, **meta})

    def floats(self, device: torch.device | str | None = None) -> torch.Tensor:
        """All images as float in [0, 1] (mind the memory for large sets; prefer :func:`batches`)."""
        return to_float(self.images.to(device) if device is not None else self.images)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "size": len(self),
            "shape": [self.channels, *self.image_size],
            "classes": list(self.classes),
            "hflip": self.hflip,
        }


def check_images(images, *, what: str = "images", nonfinite: str = "error") -> torch.Tensor:
    """Apply the conversion rule's checks to an image batch ``[N, C, H, W]`` and return it.

    ``nonfinite="error"`` refuses NaN/inf values; ``"allow"`` leaves them for the caller (a
    detector marks such inputs as rejected). Raises a one-line :class:`BadExpertError`.
    """
    if not isinstance(images, torch.Tensor):
        try:
            import numpy as np

            images = torch.from_numpy(np.asarray(images)) if not isinstance(images, (list, tuple)) else torch.as_tensor(images)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BadExpertError(f"{what} must be a tensor or array of images [N, C, H, W], got {type(images).__name__}") from exc
    if images.is_nested or images.layout != torch.strided or images.device.type == "meta" or images.is_quantized:
        kind = ("nested" if images.is_nested else "meta-device" if images.device.type == "meta"
                else "quantized" if images.is_quantized else str(images.layout).removeprefix("torch.").replace("_", " ").strip())
        raise BadExpertError(f"{what} must be an ordinary dense tensor holding values, got a {kind} tensor; "
                             "convert it first (x.to_dense(), x.dequantize(), or load the values onto a real device)")
    if images.dim() != 4:
        raise BadExpertError(f"{what} must have shape [N, C, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise BadExpertError(
            f"{what} of dtype {str(images.dtype).removeprefix('torch.')} are not accepted (their scale is ambiguous): "
            "pass uint8 in [0, 255] (x.to(torch.uint8)) or float in [0, 1] (x.float() / 255)"
        )
    if images.numel() == 0:
        return images
    finite = torch.isfinite(images)
    all_finite = bool(finite.all())
    if not all_finite:
        if nonfinite != "allow":
            bad = int((~finite).flatten(1).any(1).sum())
            raise BadExpertError(
                f"{what} contain non-finite values (NaN or inf) in {bad} of {len(images)} image(s); "
                "remove or repair those images"
            )
        if not bool(finite.any()):
            return images
        lo, hi = (float(v) for v in torch.aminmax(torch.where(finite, images, 0.5).float()))
    else:
        lo, hi = (float(v) for v in torch.aminmax(images.float()))
    if lo < -IMAGE_TOLERANCE or hi > 1 + IMAGE_TOLERANCE:
        hint = "divide by 255 (x / 255) or pass uint8" if hi > 1 + IMAGE_TOLERANCE and lo >= -IMAGE_TOLERANCE and hi <= 255 \
            else "undo any normalisation (badexpert models normalise inside) and scale to [0, 1]"
        raise BadExpertError(f"float {what} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; {hint}")
    return images


def nonfinite_rows(images: torch.Tensor) -> torch.Tensor:
    """Boolean ``[N]``: which images hold a NaN or inf value (never true for uint8)."""
    if not images.is_floating_point():
        return torch.zeros(len(images), dtype=torch.bool)
    return ~torch.isfinite(images).flatten(1).all(1)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Images to float ``[0, 1]`` by the conversion rule (uint8 / 255; float checked, clipped
    within the tolerance); anything else is a one-line error."""
    images = check_images(images)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    images = images.float()
    if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
        images = images.clamp(0, 1)
    return images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images to uint8 by the conversion rule (float ``[0, 1]`` rounded to the nearest level)."""
    images = check_images(images)
    if images.dtype == torch.uint8:
        return images
    return images.float().clamp(0, 1).mul(255).round_().to(torch.uint8)


def image_hashes(images: torch.Tensor) -> torch.Tensor:
    """One 63-bit content hash per image (``int64 [N]``), of the image as uint8.

    Used to record which images a detector was fitted and calibrated on, so that evaluation can
    refuse a test set that overlaps them, whatever split settings or file paths were used.
    """
    from ..digests import row_hashes

    x = to_uint8(images).contiguous()
    if len(x) == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.from_numpy(row_hashes(x.reshape(len(x), -1).numpy()))


# --- splits -----------------------------------------------------------------------------------
@dataclass
class Splits:
    """The four disjoint sets of one experiment.

    ``train``: what the (possibly poisoned) suspect model is trained on. ``reserved``: the
    defender's clean set D_c that detectors are fitted on. ``calibration``: clean data that sets
    the threshold only. ``test``: evaluation only. The last three are drawn from the official test
    split, as in the paper (its D_c is 2,000 test images).
    """

    train: Dataset
    reserved: Dataset
    calibration: Dataset
    test: Dataset

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "reserved", "calibration", "test")}


@checked()
def split(
    train: Dataset,
    test: Dataset,
    *,
    seed: NonNegativeInt,
    reserved: PositiveInt = 2000,
    calibration: PositiveInt = 2000,
    train_size: PositiveInt | None = None,
    test_size: PositiveInt | None = None,
) -> Splits:
    """Seeded, disjoint splits: the official training split (optionally subsampled) for training,
    and the official test split shuffled into reserved clean set, calibration set and test set.

    ``train_size`` / ``test_size`` cap the training and evaluation sets (for quick runs).
    """
    from ..utils import derive_generator

    expect(train, Dataset, "the training set")
    expect(test, Dataset, "the test set")
    need = reserved + calibration + 1
    if len(test) < need:
        raise BadExpertError(
            f"the test split of '{test.name}' has {len(test)} images, fewer than reserved ({reserved}) + "
            f"calibration ({calibration}) + 1; lower --reserved/--calibration"
        )
    g = derive_generator(seed, "split")
    perm = torch.randperm(len(test), generator=g)
    r_idx = perm[:reserved]
    c_idx = perm[reserved : reserved + calibration]
    t_idx = perm[reserved + calibration :]
    if test_size is not None:
        t_idx = t_idx[:test_size]
    tr = train
    if train_size is not None and train_size < len(train):
        tr_perm = torch.randperm(len(train), generator=derive_generator(seed, "train-subset"))
        tr = train.subset(tr_perm[:train_size].sort().values)
    return Splits(
        train=tr,
        reserved=test.subset(r_idx, name=f"{test.name}/reserved"),
        calibration=test.subset(c_idx, name=f"{test.name}/calibration"),
        test=test.subset(t_idx, name=f"{test.name}/test"),
    )


def holdout(dataset: Dataset, fraction: float, generator: torch.Generator) -> tuple[Dataset, Dataset]:
    """Split one dataset in two at random: (``1 - fraction``, ``fraction``)."""
    n = len(dataset)
    k = max(1, int(round(n * fraction)))
    perm = torch.randperm(n, generator=generator)
    return dataset.subset(perm[k:]), dataset.subset(perm[:k])


# --- augmentation -----------------------------------------------------------------------------
def augment(x: torch.Tensor, *, pad: int = 0, hflip: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole float batch.

    Random numbers come from ``generator`` (a CPU generator) so augmentation is seeded; the work
    itself runs on ``x``'s device.
    """
    n, _, h, w = x.shape
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        if flip.any():
            flip = flip.to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # [n, h]
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # [n, w]
        bidx = torch.arange(n, device=x.device)[:, None, None]
        # gather rows then columns: result [n, h, w, c] -> [n, c, h, w]
        p = padded.permute(0, 2, 3, 1)
        x = p[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    return x


def default_pad(image_size: tuple[int, int]) -> int:
    """Crop padding used for training augmentation: 4 px for 32x32, scaled for other sizes."""
    return max(1, round(min(image_size) / 8))


def batches(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(float images on device, labels on device)`` batches from uint8 or float tensors."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        xb = to_float(images[idx].to(device, non_blocking=True))
        yb = labels[idx].to(device, non_blocking=True) if labels is not None else None
        yield xb, yb


def as_tensors(data, *, nonfinite: str = "error") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Accept a :class:`Dataset`, an ``(images, labels)`` pair or a bare image tensor/array,
    checked by the conversion rule (:func:`check_images`).

    Images may be uint8 ``[0, 255]`` or float ``[0, 1]``, shape ``[N, C, H, W]``.
    """
    if isinstance(data, Dataset):
        return data.images, data.labels
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        if y is not None:
            try:
                y = torch.as_tensor(y)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise BadExpertError(f"labels must be a tensor or array of integers, got {type(y).__name__}") from exc
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise BadExpertError(f"labels must be integers (class indices), got dtype {str(y.dtype).removeprefix('torch.')}")
            y = y.to(torch.int64)
    elif isinstance(data, torch.Tensor) or hasattr(data, "__array__"):
        x, y = data, None
    else:
        raise BadExpertError(
            f"expected a badexpert Dataset, an (images, labels) pair or an image tensor, got {type(data).__name__}"
        )
    x = check_images(x, nonfinite=nonfinite)
    if y is not None:
        if y.shape != (x.shape[0],):
            raise BadExpertError(f"{x.shape[0]} images but labels of shape {tuple(y.shape)}")
        if len(y) and int(y.min()) < 0:
            raise BadExpertError(f"labels must be class indices >= 0, got {int(y.min())}")
    return x, y
