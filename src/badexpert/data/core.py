"""The in-memory image dataset, seeded splits and device-side augmentation.

Images are held as ``uint8`` tensors of shape ``[N, C, H, W]`` with ``int64`` labels. Models take
float images in ``[0, 1]`` (normalisation lives inside the model), so ``x = images.float() / 255``
is the only conversion. Augmentation runs on whole batches on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import BadExpertError


@dataclass
class Dataset:
    """Images (uint8, ``[N, C, H, W]``), labels (int64, ``[N]``) and class names.

    ``hflip`` says whether horizontal flips are a label-preserving augmentation for this data
    (true for CIFAR-10 and Fashion-MNIST, false for traffic signs). ``mean``/``std`` are the
    per-channel statistics models built for this dataset normalise with.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = "dataset"
    hflip: bool = True
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
            x = self.images[: min(len(self.images), 10000)].float() / 255
            if len(x):
                self.mean = tuple(float(v) for v in x.mean(dim=(0, 2, 3)))
                self.std = tuple(max(float(v), 1e-3) for v in x.std(dim=(0, 2, 3)))
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


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` images to float ``[0, 1]``; float input is returned unchanged."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float ``[0, 1]`` images to uint8, rounding to the nearest level; uint8 input is returned unchanged."""
    if images.dtype == torch.uint8:
        return images
    return images.clamp(0, 1).mul(255).round_().to(torch.uint8)


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


def split(
    train: Dataset,
    test: Dataset,
    *,
    seed: int,
    reserved: int = 2000,
    calibration: int = 2000,
    train_size: int | None = None,
    test_size: int | None = None,
) -> Splits:
    """Seeded, disjoint splits: the official training split (optionally subsampled) for training,
    and the official test split shuffled into reserved clean set, calibration set and test set.

    ``train_size`` / ``test_size`` cap the training and evaluation sets (for quick runs).
    """
    from ..utils import derive_generator

    if reserved < 1 or calibration < 1:
        raise BadExpertError("the reserved clean set and the calibration set need at least one sample each")
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


def as_tensors(data) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Accept a :class:`Dataset`, an ``(images, labels)`` pair or a bare image tensor.

    Images may be uint8 ``[0, 255]`` or float ``[0, 1]``, shape ``[N, C, H, W]``.
    """
    if isinstance(data, Dataset):
        return data.images, data.labels
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        x = torch.as_tensor(x)
        y = torch.as_tensor(y, dtype=torch.int64) if y is not None else None
    elif isinstance(data, torch.Tensor):
        x, y = data, None
    else:
        raise BadExpertError(
            f"expected a badexpert Dataset, an (images, labels) pair or an image tensor, got {type(data).__name__}"
        )
    if x.dim() != 4:
        raise BadExpertError(f"images must have shape [N, C, H, W], got {tuple(x.shape)}")
    if y is not None and y.shape != (x.shape[0],):
        raise BadExpertError(f"{x.shape[0]} images but labels of shape {tuple(y.shape)}")
    return x, y
