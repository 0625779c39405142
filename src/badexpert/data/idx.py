"""IDX reader (the MNIST file format) and the Fashion-MNIST dataset.

An IDX file is a 4-byte magic number -- two zero bytes, a type code, the number of dimensions --
followed by one big-endian 32-bit size per dimension and the data, big-endian, row-major. Files
may be gzip-compressed (detected by content, not by name).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import BadExpertError
from .core import Dataset

# IDX type code -> big-endian numpy dtype
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(file: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzip) into a native-endian numpy array of its shape and type."""
    file = Path(file)
    try:
        raw = file.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError as exc:
        raise BadExpertError(f"IDX file '{file}' does not exist") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise BadExpertError(f"cannot read IDX file '{file}' ({exc}); the file is damaged, fetch it again") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise BadExpertError(
            f"'{file}' is not an IDX file (magic number {raw[:4].hex() or 'missing'}); "
            "give the original train-/t10k- images and labels files"
        )
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise BadExpertError(f"IDX file '{file}' is truncated inside its header; the file is damaged, fetch it again")
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    count = math.prod(shape)
    have = len(raw) - start
    need = count * dtype.itemsize
    if have < need:
        raise BadExpertError(
            f"IDX file '{file}' is truncated: its header promises {need} data bytes {list(shape)} but it holds {have}; "
            "the file is damaged, fetch it again"
        )
    if have > need:
        raise BadExpertError(
            f"IDX file '{file}' has {have - need} bytes after the {need} its header promises; "
            "the file is damaged, fetch it again"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=start).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a native-endian, writable copy


def find_idx(directory: str | Path, base: str) -> Path:
    """The IDX file ``base`` in ``directory``, plain or ``.gz`` (the plain one wins)."""
    directory = Path(directory)
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    raise BadExpertError(
        f"'{directory}' has no {base} (or {base}.gz); it needs the four Fashion-MNIST IDX files "
        "(Debian package dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist)"
    )


def read_fashion_mnist(path: str | Path) -> tuple[Dataset, Dataset]:
    """Read Fashion-MNIST's four IDX files from directory ``path``: ``(train, test)``, [N, 1, 28, 28]."""
    path = Path(path)
    if not path.is_dir():
        raise BadExpertError(f"Fashion-MNIST path '{path}' is not a directory; give the folder holding the IDX files")
    out = []
    for split, (image_base, label_base) in FASHION_MNIST_FILES.items():
        image_file, label_file = find_idx(path, image_base), find_idx(path, label_base)
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise BadExpertError(
                f"'{image_file}' holds {images.dtype} data of shape {list(images.shape)}, not uint8 images [N, H, W]; "
                "check that the images and labels files are not swapped"
            )
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise BadExpertError(
                f"'{label_file}' holds {labels.dtype} data of shape {list(labels.shape)}, not uint8 labels [N]; "
                "check that the images and labels files are not swapped"
            )
        if len(images) != len(labels):
            raise BadExpertError(
                f"'{image_file}' has {len(images)} images but '{label_file}' has {len(labels)} labels; "
                "the two files belong to different releases, fetch them again"
            )
        if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise BadExpertError(
                f"'{label_file}' has label {int(labels.max())}, but Fashion-MNIST has 10 classes (0-9); "
                "the file is not a Fashion-MNIST labels file"
            )
        out.append(
            Dataset(
                torch.from_numpy(images).unsqueeze(1),
                torch.from_numpy(labels.astype(np.int64)),
                list(FASHION_MNIST_CLASSES),
                name="fashion-mnist",
                hflip=True,
                mean=FASHION_MNIST_MEAN,
                std=FASHION_MNIST_STD,
                meta={"source": str(path), "split": split},
            )
        )
    return out[0], out[1]
