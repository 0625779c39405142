"""Datasets: readers for the on-disk formats, the in-memory :class:`Dataset`, splits, augmentation.

``load_dataset(name, path, image_size=None)`` returns the official ``(train, test)`` pair for a dataset name:

- ``fashion-mnist``: the four IDX files (``.gz`` or not); default path
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
- ``cifar10``: the official python release (``cifar-10-batches-py/``, read with a restricted
  unpickler), or an ImageFolder directory or zip.
- ``gtsrb``: the official layout (PPM images with CSV annotations), resized to 32x32, or an
  ImageFolder directory or zip.
- ``imagefolder``: any ``train/<class>/*`` + ``test/<class>/*`` directory or zip.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BadExpertError
from ..registry import Registry
from .core import (Dataset, Splits, as_tensors, augment, batches, check_images, default_pad, holdout, image_hashes,
                   nonfinite_rows, split, to_float, to_uint8)

DEFAULT_PATHS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
def _fashion_mnist(path, hw):
    from .idx import read_fashion_mnist

    return read_fashion_mnist(path, image_size=hw)


def _cifar10(path, hw):
    from .cifar import read_cifar10

    return read_cifar10(path, image_size=hw)


def _gtsrb(path, hw):
    from .gtsrb import read_gtsrb

    return read_gtsrb(path, image_size=hw)


def _imagefolder(path, hw):
    from .imagefolder import read_imagefolder

    return read_imagefolder(path, size=hw)


#: Datasets by name: ``reader(path, image_size) -> (train, test)``.
DATASETS = Registry(
    "dataset",
    [("fashion-mnist", _fashion_mnist), ("cifar10", _cifar10), ("gtsrb", _gtsrb), ("imagefolder", _imagefolder)],
    aliases={"fmnist": "fashion-mnist"},
)


#: Number of classes of the datasets whose class list is fixed (an ImageFolder's is read from its
#: folders): configs are checked against it before any data is read.
NUM_CLASSES = {"fashion-mnist": 10, "cifar10": 10, "gtsrb": 43}


def canonical_dataset(name: str) -> str:
    """The registry name for a dataset name (aliases such as ``fmnist`` accepted), or a one-line error."""
    return DATASETS.canonical(name)


def load_dataset(
    name: str, path: str | Path | None = None, image_size: int | tuple[int, int] | None = None
) -> tuple[Dataset, Dataset]:
    """Read a dataset from local files and return ``(train, test)``.

    Nothing is downloaded. A missing path raises a one-line :class:`BadExpertError`, and so does
    every damaged or hostile file (see :mod:`badexpert.limits`).

    ``image_size`` (an int or ``(height, width)``) sets the size images are resized to (bilinear)
    for data read from image files: ImageFolder directories or zips (``imagefolder``, and
    ``cifar10`` / ``gtsrb`` in that form) and the official GTSRB layout. Without it, GTSRB is
    32x32 and an ImageFolder takes the most common size among its images (a warning says how many
    others were resized). Fashion-MNIST and the CIFAR-10 python release have a fixed size: an
    ``image_size`` other than theirs (28x28, 32x32) is refused with a one-line error, not resized.
    """
    key = canonical_dataset(name)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise BadExpertError(f"the dataset path must be a str or Path, got {type(path).__name__}")
    from .imagefolder import parse_image_size

    hw = parse_image_size(image_size)
    if path is None:
        if key not in DEFAULT_PATHS:
            raise BadExpertError(f"dataset '{key}' needs a path to its local files (--data-path); nothing is downloaded")
        path = DEFAULT_PATHS[key]
    path = Path(path).expanduser()
    if not path.exists():
        hint = " (install the Debian package dataset-fashion-mnist, or pass --data-path)" if key == "fashion-mnist" else ""
        raise BadExpertError(f"dataset path '{path}' does not exist{hint}")
    return DATASETS[key](path, hw)


__all__ = [
    "DATASETS",
    "Dataset",
    "Splits",
    "as_tensors",
    "augment",
    "batches",
    "canonical_dataset",
    "check_images",
    "default_pad",
    "holdout",
    "image_hashes",
    "load_dataset",
    "nonfinite_rows",
    "split",
    "to_float",
    "to_uint8",
]
