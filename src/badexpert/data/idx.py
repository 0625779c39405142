"""IDX reader (the MNIST file format) and the Fashion-MNIST dataset.

An IDX file is a 4-byte magic number -- two zero bytes, a type code, the number of dimensions --
followed by one big-endian 32-bit size per dimension and the data, big-endian, row-major. Files
may be gzip-compressed (detected by content, not by name).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BadExpertError
from ..limits import check_allocation
from .core import Dataset
from .imagefolder import parse_image_size

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


@dataclass(frozen=True)
class IdxHeader:
    """What an IDX file declares: its element type and shape."""

    dtype: np.dtype  # big-endian, as stored
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        return f"{' x '.join(map(str, self.shape))} {self.dtype.newbyteorder('=').name}"


class _IdxStream:
    """An IDX file opened for streaming (gzip decompressed as it is read), positioned after its header."""

    CHUNK = 4 * 1024**2

    def __init__(self, file: str | Path) -> None:
        self.file = Path(file)
        try:
            self._fh = open(self.file, "rb")
        except FileNotFoundError:
            raise BadExpertError(f"IDX file '{self.file}' does not exist") from None
        except OSError as exc:
            raise self._damaged(exc) from exc
        try:
            self.gzip = self._read_raw(self._fh, 2) == b"\x1f\x8b"
            self._fh.seek(0)
            self._stream = gzip.GzipFile(fileobj=self._fh, mode="rb") if self.gzip else self._fh
            self.header = self._read_header()
        except BadExpertError:
            self.close()
            raise
        except Exception as exc:  # a file that cannot seek (a FIFO), ...
            self.close()
            raise self._damaged(exc) from exc

    def __enter__(self) -> "_IdxStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        stream = getattr(self, "_stream", None)
        if stream is not None and stream is not self._fh:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a damaged gzip stream may complain; the file is closed below
                pass
        self._fh.close()

    def _damaged(self, exc: BaseException) -> BadExpertError:
        why = " ".join(str(exc).split()) or type(exc).__name__
        return BadExpertError(f"cannot read IDX file '{self.file}' ({why}); the file is damaged, fetch it again")

    def _read_raw(self, stream, n: int) -> bytes:
        try:
            return stream.read(n)
        except Exception as exc:  # BadGzipFile/OSError, EOFError (cut-off gzip), zlib.error...
            raise self._damaged(exc) from exc

    def _read_header(self) -> IdxHeader:
        head = self._read_raw(self._stream, 4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES or head[3] == 0:
            raise BadExpertError(
                f"'{self.file}' is not an IDX file (magic number {head.hex() or 'missing'}); "
                "give the original train-/t10k- images and labels files"
            )
        dtype, ndim = IDX_DTYPES[head[2]], head[3]
        dims = self._read_raw(self._stream, 4 * ndim)
        if len(dims) < 4 * ndim:
            raise BadExpertError(
                f"IDX file '{self.file}' is truncated inside its header; the file is damaged, fetch it again"
            )
        return IdxHeader(dtype, struct.unpack(f">{ndim}I", dims))

    def read_data(self) -> np.ndarray:
        """The data, after checking its declared size against the file and the memory budget."""
        h = self.header
        need = h.nbytes
        if not self.gzip:  # a plain file's data size is known without reading it
            try:
                have = os.fstat(self._fh.fileno()).st_size - self._fh.tell()
            except OSError as exc:
                raise self._damaged(exc) from exc
            self._check_size(have, need, exact=True)
        check_allocation(need, f"IDX file '{self.file}' ({h.describe()} values)",
                         "its header is damaged or it is not an IDX file; fetch it again")
        buf = np.empty(need, dtype=np.uint8)
        view = memoryview(buf)
        got = 0
        while got < need:  # at most CHUNK bytes are decompressed beyond what has been stored
            chunk = self._read_raw(self._stream, min(self.CHUNK, need - got))
            if not chunk:
                break
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        self._check_size(got, need, exact=False)
        if self._read_raw(self._stream, 1):  # (for gzip, reaching the end also checks the CRC)
            raise BadExpertError(
                f"IDX file '{self.file}' has more data after the {need} bytes its header promises; "
                "the file is damaged, fetch it again"
            )
        data = buf.view(h.dtype)
        if not h.dtype.isnative:
            data = data.byteswap(inplace=True).view(h.dtype.newbyteorder("="))
        return data.reshape(h.shape)

    def _check_size(self, have: int, need: int, exact: bool) -> None:
        if have < need:
            raise BadExpertError(
                f"IDX file '{self.file}' is truncated: its header promises {need} data bytes {list(self.header.shape)} "
                f"but it holds {have}; the file is damaged, fetch it again"
            )
        if exact and have > need:
            raise BadExpertError(
                f"IDX file '{self.file}' has {have - need} bytes after the {need} its header promises; "
                "the file is damaged, fetch it again"
            )


def read_idx_header(file: str | Path) -> IdxHeader:
    """Read only the header of an IDX file (plain or gzip): its type and shape."""
    with _IdxStream(file) as stream:
        return stream.header


def read_idx(file: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzip) into a native-endian numpy array of its shape and type.

    The header is read first; the data size it declares is checked against the memory budget
    before anything is allocated, and a gzip file is decompressed as a stream, never much more
    than the declared size (so a gzip bomb is refused, not expanded). Missing, short
    or extra data raise one-line errors.
    """
    with _IdxStream(file) as stream:
        return stream.read_data()


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


def read_fashion_mnist(path: str | Path, image_size: int | tuple[int, int] | None = None) -> tuple[Dataset, Dataset]:
    """Read Fashion-MNIST's four IDX files from directory ``path``: ``(train, test)``, [N, 1, 28, 28].

    All four headers are checked (types, shapes, counts, train and test image sizes, the memory
    budget) before any data is read. Images are not resized: an ``image_size`` other than the
    files' own is refused with a one-line error.
    """
    path = Path(path)
    if not path.is_dir():
        raise BadExpertError(f"Fashion-MNIST path '{path}' is not a directory; give the folder holding the IDX files")
    hw = parse_image_size(image_size)
    files, headers = {}, {}
    for split, (image_base, label_base) in FASHION_MNIST_FILES.items():
        image_file, label_file = find_idx(path, image_base), find_idx(path, label_base)
        images, labels = read_idx_header(image_file), read_idx_header(label_file)
        if images.dtype != np.uint8 or len(images.shape) != 3:
            raise BadExpertError(
                f"'{image_file}' holds {images.dtype.newbyteorder('=')} data of shape {list(images.shape)}, "
                "not uint8 images [N, H, W]; check that the images and labels files are not swapped"
            )
        if labels.dtype != np.uint8 or len(labels.shape) != 1:
            raise BadExpertError(
                f"'{label_file}' holds {labels.dtype.newbyteorder('=')} data of shape {list(labels.shape)}, "
                "not uint8 labels [N]; check that the images and labels files are not swapped"
            )
        if images.shape[0] != labels.shape[0]:
            raise BadExpertError(
                f"'{image_file}' has {images.shape[0]} images but '{label_file}' has {labels.shape[0]} labels; "
                "the two files belong to different releases, fetch them again"
            )
        files[split], headers[split] = (image_file, label_file), (images, labels)
    train_hw, test_hw = headers["train"][0].shape[1:], headers["test"][0].shape[1:]
    if train_hw != test_hw:
        raise BadExpertError(
            f"'{files['train'][0]}' holds {train_hw[0]}x{train_hw[1]} images but '{files['test'][0]}' holds "
            f"{test_hw[0]}x{test_hw[1]} images; train and test must have the same size, use the files of one release"
        )
    if hw is not None and hw != train_hw:
        raise BadExpertError(
            f"the Fashion-MNIST files in '{path}' hold {train_hw[0]}x{train_hw[1]} images, which are not resized; "
            f"image size {hw[0]}x{hw[1]} applies to image-file datasets only (leave --image-size out)"
        )
    n = sum(h.shape[0] for h, _ in headers.values())
    check_allocation(
        sum(h.nbytes + lab.nbytes * 9 for h, lab in headers.values()),  # images, labels (uint8 read, int64 kept)
        f"Fashion-MNIST in '{path}' ({n} images of {train_hw[0]}x{train_hw[1]})",
        "the IDX headers are damaged; fetch the files again",
    )
    out = []
    for split, (image_file, label_file) in files.items():
        images, labels = read_idx(image_file), read_idx(label_file)
        want_images, want_labels = headers[split]
        if images.shape != want_images.shape or labels.shape != want_labels.shape:  # replaced while being read
            raise BadExpertError(f"the IDX files in '{path}' changed while they were read; read them again")
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
