"""CIFAR-10: the official python release (read with a restricted unpickler) or an ImageFolder.

The python release (``cifar-10-batches-py/``) holds Python 2 pickles: ``data_batch_1`` ..
``data_batch_5`` and ``test_batch`` are dicts with ``b'data'`` (uint8 ``[N, 3072]``, the red,
green and blue 32x32 planes of each image) and ``b'labels'``; ``batches.meta`` has
``b'label_names'``. Pickles can run arbitrary code when loaded, so they are read with an
unpickler that admits only the few numpy globals needed to rebuild an array.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BadExpertError
from .core import Dataset
from .imagefolder import LAYOUT, is_imagefolder, parse_image_size, read_imagefolder

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core.multiarray import _reconstruct

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"

# (module, name) pairs a CIFAR batch may reference: numpy's array reconstruction, nothing else.
# ``numpy.core`` is numpy 1's name (used by the official files), ``numpy._core`` numpy 2's.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except numpy's array reconstruction helpers."""

    def __init__(self, file, *, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise BadExpertError(
                f"refusing to unpickle {_one_line(f'{module}.{name}')} from {self.source}: a CIFAR-10 batch holds only "
                "plain data and numpy arrays; use the official cifar-10-python release"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """A persistent reference (PERSID/BINPERSID opcodes) points outside the file: refused."""
        raise BadExpertError(
            f"refusing to unpickle a persistent reference from {self.source}: a CIFAR-10 batch holds only plain data "
            "and numpy arrays; use the official cifar-10-python release"
        )


def _one_line(text: str) -> str:
    """``text`` on one line: whitespace runs (newlines included) become one space, other
    unprintable characters are escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in " ".join(text.split()))


def load_pickle(file: str | Path) -> Any:
    """Unpickle ``file`` with :class:`RestrictedUnpickler` (bytes stay bytes)."""
    file = Path(file)
    try:
        with open(file, "rb") as fh:
            return RestrictedUnpickler(fh, source=str(file)).load()
    except BadExpertError:
        raise
    except FileNotFoundError as exc:
        raise BadExpertError(f"'{file}' does not exist; the CIFAR-10 python release needs it") from exc
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, TypeError... all mean a damaged file
        raise BadExpertError(
            f"cannot read '{file}' as a CIFAR-10 pickle ({type(exc).__name__}: {_one_line(str(exc))}); "
            "the file is damaged, fetch it again"
        ) from exc


def read_cifar10(path: str | Path, image_size: int | tuple[int, int] | None = None) -> tuple[Dataset, Dataset]:
    """Read CIFAR-10 from the python release directory (or its parent) or an ImageFolder dir/zip.

    ``image_size`` resizes an ImageFolder copy's images (default: their most common size); the
    python release is 32x32 and is not resized: another ``image_size`` is refused.
    """
    path = Path(path)
    hw = parse_image_size(image_size)
    batch_dir = find_batch_dir(path)
    if batch_dir is not None:
        if hw is not None and hw != (32, 32):
            raise BadExpertError(
                f"the CIFAR-10 python release in '{batch_dir}' holds 32x32 images, which are not resized; "
                f"image size {hw[0]}x{hw[1]} applies to ImageFolder copies only (leave --image-size out)"
            )
        return read_cifar10_python(batch_dir)
    if is_imagefolder(path):
        return read_imagefolder(path, name="cifar10", hflip=True, size=hw, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise BadExpertError(f"'{path}' is an archive; extract it (tar xzf) and pass the {BATCH_DIR} folder")
    raise BadExpertError(
        f"'{path}' is not a CIFAR-10 copy: give the {BATCH_DIR} folder of the python release (or its parent), "
        f"or an ImageFolder directory or zip ({LAYOUT})"
    )


def find_batch_dir(path: Path) -> Path | None:
    """``path`` or ``path/cifar-10-batches-py`` if it holds the python release, else ``None``."""
    for candidate in (path, path / BATCH_DIR):
        if candidate.is_dir() and any((candidate / f).is_file() for f in (*TRAIN_BATCHES, TEST_BATCH, META_FILE)):
            return candidate
    return None


def read_cifar10_python(batch_dir: str | Path) -> tuple[Dataset, Dataset]:
    """Read the official python release: five training batches, the test batch and the class names."""
    batch_dir = Path(batch_dir)
    missing = [f for f in (*TRAIN_BATCHES, TEST_BATCH, META_FILE) if not (batch_dir / f).is_file()]
    if missing:
        raise BadExpertError(f"'{batch_dir}' lacks {', '.join(missing)}; extract the complete cifar-10-python release")
    meta = load_pickle(batch_dir / META_FILE)
    names = _get(meta, "label_names", batch_dir / META_FILE)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise BadExpertError(f"'{batch_dir / META_FILE}': label_names is not a list of names; the file is damaged")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    parts = [_read_batch(batch_dir / f, len(classes)) for f in TRAIN_BATCHES]
    train_x = torch.cat([x for x, _ in parts])
    train_y = torch.cat([y for _, y in parts])
    test_x, test_y = _read_batch(batch_dir / TEST_BATCH, len(classes))
    common = dict(name="cifar10", hflip=True, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    train = Dataset(train_x, train_y, classes, **common, meta={"source": str(batch_dir), "split": "train"})
    test = Dataset(test_x, test_y, list(classes), **common, meta={"source": str(batch_dir), "split": "test"})
    return train, test


def _get(d: Any, key: str, file: Path) -> Any:
    """``d[b'key']`` (Python 2 pickles) or ``d['key']`` (re-saved ones)."""
    if isinstance(d, dict):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
    raise BadExpertError(f"'{file}' has no '{key}' entry; it is not a CIFAR-10 python batch")


def _read_batch(file: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch as (uint8 images [N, 3, 32, 32], int64 labels [N]), validated."""
    batch = load_pickle(file)
    data = _get(batch, "data", file)
    labels = _get(batch, "labels", file)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise BadExpertError(
            f"'{file}': data is {getattr(data, 'dtype', type(data).__name__)} of shape "
            f"{list(getattr(data, 'shape', []))}, not uint8 [N, 3072]; the file is damaged"
        )
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise BadExpertError(f"'{file}': labels are not a list of integers; the file is damaged") from exc
    if y.shape != (len(data),):
        raise BadExpertError(f"'{file}' has {len(data)} images but {y.size} labels; the file is damaged, fetch it again")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise BadExpertError(f"'{file}' has labels outside 0..{num_classes - 1}; the file is damaged")
    x = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(y)
