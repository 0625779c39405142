"""Datasets: readers for the on-disk formats, the in-memory :class:`Dataset`, splits, augmentation.

``load_dataset(name, path)`` returns the official ``(train, test)`` pair for a dataset name:

- ``fashion-mnist``: the four IDX files (``.gz`` or not); default path
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
- ``cifar10``: the official python release (``cifar-10-batches-py/``, read with a restricted
  unpickler), or an ImageFolder directory or zip.
- ``gtsrb``: the official layout (PPM images with CSV annotations), resized to 32x32, or an
  ImageFolder directory or zip.
- ``imagefolder``: any ``train/<class>/*`` + ``test/<class>/*`` directory or zip.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BadExpertError, unknown_name
from .core import Dataset, Splits, as_tensors, augment, batches, default_pad, holdout, split, to_float, to_uint8

DEFAULT_PATHS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
DATASETS = ("fashion-mnist", "cifar10", "gtsrb", "imagefolder")


def load_dataset(name: str, path: str | Path | None = None) -> tuple[Dataset, Dataset]:
    """Read a dataset from local files and return ``(train, test)``.

    Nothing is downloaded. A missing path raises a one-line :class:`BadExpertError`.
    """
    key = name.lower().replace("_", "-")
    key = {"fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    if path is None:
        if key not in DEFAULT_PATHS:
            raise BadExpertError(f"dataset '{key}' needs a path to its local files (--data-path); nothing is downloaded")
        path = DEFAULT_PATHS[key]
    path = Path(path).expanduser()
    if not path.exists():
        hint = " (install the Debian package dataset-fashion-mnist, or pass --data-path)" if key == "fashion-mnist" else ""
        raise BadExpertError(f"dataset path '{path}' does not exist{hint}")
    if key == "fashion-mnist":
        from .idx import read_fashion_mnist

        return read_fashion_mnist(path)
    if key == "cifar10":
        from .cifar import read_cifar10

        return read_cifar10(path)
    if key == "gtsrb":
        from .gtsrb import read_gtsrb

        return read_gtsrb(path)
    from .imagefolder import read_imagefolder

    return read_imagefolder(path)


__all__ = [
    "DATASETS",
    "Dataset",
    "Splits",
    "as_tensors",
    "augment",
    "batches",
    "default_pad",
    "holdout",
    "load_dataset",
    "split",
    "to_float",
    "to_uint8",
]
