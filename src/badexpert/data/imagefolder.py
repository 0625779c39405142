"""ImageFolder reader: ``train/<class>/<image>`` and ``test/<class>/<image>`` in a directory or zip.

A zip is read member by member with :mod:`zipfile` (nothing is extracted); its layout may sit
under one extra top-level folder (``cifar10/train/...``), and so may a directory's. Class names
are the sorted folder names under ``train/``; labels follow that order. Images are decoded with
Pillow in sorted file order, so loading is deterministic.

**Image size.** A declared size (the ``size`` argument; GTSRB declares 32x32) wins. Otherwise the
size is the most common one among the images, read from their headers before any pixel is
decoded (ties: the larger image, then the first in file order), so one odd image -- a huge one,
a 1x1 one -- never decides it. Images of another size are resized with bilinear filtering; how
many were resized is recorded in each split's ``meta["resized"]``, and when the size was chosen
(not declared) the user is told once with :func:`warnings.warn`.

**Untrusted files** (limits in :mod:`badexpert.limits`):

- only the raster formats in :data:`IMAGE_FORMATS` are opened, whatever a file's suffix says;
- one image file may hold at most :data:`MAX_IMAGE_FILE_BYTES`; a zip member's declared size,
  compression method and encryption flag are checked before anything is decoded, and a member
  is never decompressed past its declared size;
- every image's width x height is checked against :data:`~badexpert.limits.MAX_IMAGE_PIXELS`
  from its header, before its pixels are decoded; Pillow's decompression-bomb warning is an error;
- the output tensor is checked against the memory budget before it is allocated;
- every zip member's name and every file's path under a folder is checked by one rule
  (:func:`safe_parts`): no absolute path, ``..`` or ``.`` component, backslash, drive letter or
  control character, so no class is named ``..``;
- every pixel mode is read at the 0..255 scale, or refused, by the one rule of
  :func:`badexpert.imagefile.to_8bit` (16-bit images divided by 257, float ones read as [0, 1]);
- every failure (a corrupt zip member, a bad CRC, a truncated or unreadable image...) ends in
  one :class:`~badexpert.errors.BadExpertError` naming the file.

:func:`decode_images` / :func:`decode_sets` are shared with the other readers that decode image
files (GTSRB); :func:`open_image` decodes one untrusted image file (a trigger image, say).
"""

from __future__ import annotations

import operator
import os
import unicodedata
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import BadExpertError
# one untrusted image file is decoded by badexpert.imagefile (torch-free); re-exported here
from ..imagefile import IMAGE_FORMATS, open_image  # noqa: F401
from ..imagefile import (_BILINEAR, GREY_MODES, MAX_IMAGE_FILE_BYTES, Source, _bombs_are_errors, _decode_error,
                         _open_checked, _read_source, _too_big, _why, file_source, to_8bit)
from ..limits import MAX_IMAGE_PIXELS, check_allocation, memory_budget
from .core import Dataset

#: File suffixes treated as images; other files (``Thumbs.db``, ``README``) are ignored.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
LAYOUT = "expected train/<class>/<images> and test/<class>/<images>"
SIZE_HINT = "pass a smaller image size (--image-size, or image_size= in load_dataset)"


# zip compression methods read: zipfile decompresses bzip2 and LZMA members without an output
# bound (a few KB can expand to gigabytes in one call), so only these two are accepted.
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
# Encoded image bytes kept between the header pass and the decoding pass (re-read beyond this).
_CACHE_BYTES = 512 * 1024**2



@dataclass
class Decoded:
    """What :func:`decode_sets` gives: one uint8 tensor ``[N_i, C, H, W]`` per group of sources."""

    parts: list[torch.Tensor]
    size: tuple[int, int]  # (height, width)
    resized: list[int]  # per group: images of another size, resized to ``size``
    chosen: bool  # the size is the most common one among the images (not declared)

    @property
    def total(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def total_resized(self) -> int:
        return sum(self.resized)


def read_imagefolder(
    path: str | Path,
    *,
    name: str | None = None,
    hflip: bool = False,
    size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[Dataset, Dataset]:
    """Read an ImageFolder directory or ``.zip`` and return ``(train, test)``.

    ``size`` (an int or ``(height, width)``) is the image size; without it, the most common size
    among the images (see the module docstring). Images of another size are resized with
    bilinear filtering, counted in ``meta["resized"]``, and -- when the size was not given -- the
    count is reported with :func:`warnings.warn`. Images are RGB, or single-channel when every
    image is greyscale. ``mean``/``std`` default to the training split's statistics, used for
    both splits.
    """
    path = Path(path).expanduser()
    name = name or path.stem
    hw = parse_image_size(size)
    where = f"'{path}'"
    if path.is_dir():
        train_src, test_src, classes = _scan_directory(path)
        decoded = decode_sets([[s for s, _ in train_src], [s for s, _ in test_src]], hw, where=where)
    elif path.is_file() and zipfile.is_zipfile(path):
        with open_zip(path) as zf:
            train_src, test_src, classes = _scan_zip(zf, path)
            decoded = decode_sets([[s for s, _ in train_src], [s for s, _ in test_src]], hw, where=where)
    elif path.exists():
        raise BadExpertError(f"'{path}' is neither a directory nor a zip file; {LAYOUT}")
    else:
        raise BadExpertError(f"image folder '{path}' does not exist")
    warn_resized(decoded, where)
    train_images, test_images = decoded.parts
    train_labels = torch.tensor([label for _, label in train_src], dtype=torch.int64)
    test_labels = torch.tensor([label for _, label in test_src], dtype=torch.int64)
    meta = {"source": str(path)}
    train = Dataset(train_images, train_labels, classes, name=name, hflip=hflip, mean=mean, std=std,
                    meta={**meta, "split": "train", "resized": decoded.resized[0]})
    test = Dataset(test_images, test_labels, list(classes), name=name, hflip=hflip, mean=train.mean, std=train.std,
                   meta={**meta, "split": "test", "resized": decoded.resized[1]})
    return train, test


def is_imagefolder(path: str | Path) -> bool:
    """Whether ``path`` is a zip file or a directory with a ``train/`` folder (maybe one level down)."""
    path = Path(path)
    if path.is_file():
        return zipfile.is_zipfile(path)
    return path.is_dir() and _directory_root(path) is not None


def decode_images(sources: Sequence[Source], size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Decode image files into one uint8 tensor ``[N, C, H, W]``.

    ``size`` is ``(height, width)`` (or an int); ``None`` means the most common size among the
    images. Images of another size are resized with bilinear filtering. ``C`` is 1 when every
    image is greyscale, else 3. See :func:`decode_sets` for the checks.
    """
    return decode_sets([sources], size).parts[0]


def decode_sets(
    groups: Sequence[Sequence[Source]], size: int | tuple[int, int] | None = None, *, where: str = "the data set"
) -> Decoded:
    """Decode several lists of image files (train, test...) to the same size and channel count.

    Without ``size`` a first pass reads every image's header (size and mode) -- keeping the
    encoded bytes, up to a cap, for the second pass -- and picks the most common size; with it,
    one pass. Every image's pixel count is checked before it is decoded, and the output is
    checked against the memory budget (:func:`~badexpert.limits.check_allocation`) before it is
    allocated. ``where`` names the data in error messages.
    """
    groups = [list(g) for g in groups]
    sources = [s for g in groups for s in g]
    n = len(sources)
    if not n:
        raise BadExpertError(f"no images to decode in {where}")
    hw = parse_image_size(size)
    cache: list[bytes | None] | None = None
    with _bombs_are_errors():
        if hw is None:
            hw, channels, cache = _survey(sources)
        else:
            channels = 3  # known only after decoding; a greyscale set is narrowed at the end
        h, w = hw
        check_allocation(n * channels * h * w, f"the {n} images of {where} ({n} x {channels} x {h} x {w} bytes)",
                         SIZE_HINT)
        outs = [np.empty((len(g), channels, h, w), dtype=np.uint8) for g in groups]
        resized = [0] * len(groups)
        all_grey = True
        i = 0
        for k, group in enumerate(groups):
            out = outs[k]
            for j, (label, read) in enumerate(group):
                data = cache[i] if cache is not None and cache[i] is not None else _read_source(label, read)
                if cache is not None:
                    cache[i] = None  # let the encoded bytes go as soon as they are decoded
                i += 1
                arr, grey, moved = _decode(data, label, (h, w), grey_only=channels == 1)
                all_grey &= grey
                resized[k] += moved
                out[j] = arr if arr.ndim == 2 else arr.transpose(2, 0, 1)  # a grey image fills every channel
    if channels == 3 and all_grey:
        outs = [np.ascontiguousarray(o[:, :1]) for o in outs]
    return Decoded([torch.from_numpy(o) for o in outs], (h, w), resized, chosen=size is None)


def warn_resized(decoded: Decoded, where: str) -> None:
    """Tell the user once how many images were resized to a size that was chosen, not given."""
    if decoded.chosen and decoded.total_resized:
        h, w = decoded.size
        warnings.warn(
            f"{where}: {decoded.total_resized} of {decoded.total} images were resized to {h}x{w}, the most common "
            "size among them; pass an image size (--image-size) to choose another",
            stacklevel=3,
        )


def open_zip(path: str | Path) -> zipfile.ZipFile:
    """Open a zip file for reading; a damaged central directory raises one :class:`BadExpertError`."""
    try:
        return zipfile.ZipFile(path)
    except Exception as exc:  # BadZipFile, OSError, ValueError, EOFError...: all mean a damaged file
        raise BadExpertError(f"cannot read zip file '{path}' ({_why(exc)}); the file is damaged, re-create it") from exc


def parse_image_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``None``, an int or ``(height, width)`` -> ``(height, width)`` or ``None``, checked."""
    if size is None:
        return None
    bad = BadExpertError(f"image size must be a positive int or (height, width), got {size!r}")
    if isinstance(size, (bool, str, bytes)):
        raise bad
    try:
        hw = (operator.index(size),) * 2
    except TypeError:
        try:
            items = list(size)  # type: ignore[arg-type]
            if len(items) != 2 or any(isinstance(s, bool) for s in items):
                raise TypeError
            hw = (operator.index(items[0]), operator.index(items[1]))
        except TypeError:
            raise bad from None
    if min(hw) < 1:
        raise bad
    if hw[0] * hw[1] > MAX_IMAGE_PIXELS:
        raise BadExpertError(
            f"image size {hw[0]}x{hw[1]} is above the limit of {MAX_IMAGE_PIXELS} pixels (4096x4096); pass a smaller one"
        )
    return hw  # type: ignore[return-value]


# --- decoding -------------------------------------------------------------------------------------
def _survey(sources: Sequence[Source]) -> tuple[tuple[int, int], int, list[bytes | None]]:
    """Header pass: (most common (height, width), channels, encoded bytes kept for decoding)."""
    counts: dict[tuple[int, int], int] = {}  # in order of first appearance
    all_grey = True
    cache: list[bytes | None] = [None] * len(sources)
    cap, kept = min(_CACHE_BYTES, memory_budget() // 4), 0
    for i, (label, read) in enumerate(sources):
        data = _read_source(label, read)
        try:
            with _open_checked(data, label) as im:
                hw, grey = (im.height, im.width), im.mode in GREY_MODES
        except BadExpertError:
            raise
        except Exception as exc:
            raise _decode_error(label, exc) from exc
        counts[hw] = counts.get(hw, 0) + 1
        all_grey &= grey
        if kept + len(data) <= cap:
            cache[i] = data
            kept += len(data)
    # most images; on a tie the larger size, then the first seen (max keeps the first maximum)
    best = max(counts, key=lambda s: (counts[s], s[0] * s[1]))
    return best, (1 if all_grey else 3), cache


def _decode(data: bytes, label: str, hw: tuple[int, int], grey_only: bool) -> tuple[np.ndarray, bool, bool]:
    """One image as ``[H, W]`` (grey) or ``[H, W, 3]`` uint8, whether it was grey, whether it was resized."""
    h, w = hw
    try:
        with _open_checked(data, label) as im:
            grey = im.mode in GREY_MODES
            im = to_8bit(im, label, "L" if grey or grey_only else "RGB")  # the 0..255 scale of every mode
            moved = im.size != (w, h)
            if moved:
                im = im.resize((w, h), _BILINEAR)
            arr = np.asarray(im)
    except BadExpertError:
        raise
    except Exception as exc:  # OSError, SyntaxError, ValueError, EOFError...: whatever a damaged file raises
        raise _decode_error(label, exc) from exc
    return arr, grey, moved


# --- helpers --------------------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_SUFFIXES


def _assign_labels(
    where: str, train: dict[str, list[Source]], test: dict[str, list[Source]]
) -> tuple[list[tuple[Source, int]], list[tuple[Source, int]], list[str]]:
    """Check the per-class file lists and turn them into labelled, sorted source lists."""
    if not train:
        raise BadExpertError(f"'{where}' has no class folders under train/; {LAYOUT}")
    if not test:
        raise BadExpertError(f"'{where}' has no class folders under test/; {LAYOUT}")
    classes = sorted(train)
    extra = sorted(set(test) - set(train))
    if extra:
        raise BadExpertError(
            f"'{where}': test/ has classes missing from train/ ({', '.join(extra[:5])}); "
            "every test class needs a train/ folder of the same name"
        )
    index = {c: i for i, c in enumerate(classes)}
    labelled = []
    for split, groups in (("train", train), ("test", test)):
        rows = []
        for cls in sorted(groups):
            files = sorted(groups[cls], key=lambda s: s[0])
            if not files:
                raise BadExpertError(f"'{where}': class folder {split}/{cls} holds no images; add images or remove it")
            rows.extend((src, index[cls]) for src in files)
        labelled.append(rows)
    return labelled[0], labelled[1], classes


def _directory_root(path: Path) -> Path | None:
    """``path`` if it holds ``train/``, else its only subfolder if that does, else ``None``."""
    if (path / "train").is_dir():
        return path
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    return None


def _scan_directory(path: Path):
    root = _directory_root(path)
    if root is None:
        raise BadExpertError(f"'{path}' has no train/ folder; {LAYOUT}")
    if not (root / "test").is_dir():
        raise BadExpertError(f"'{root}' has no test/ folder; {LAYOUT}")
    groups: list[dict[str, list[Source]]] = []
    for split in ("train", "test"):
        classes: dict[str, list[Source]] = {}
        for cdir in sorted(p for p in (root / split).iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(f for f in cdir.rglob("*") if f.is_file() and _is_image(f.name))
            for f in (cdir, *files):  # the same names check as a zip's members
                safe_parts(f.relative_to(root).as_posix(), f"image folder '{root}'")
            classes[cdir.name] = [file_source(f) for f in files]
        groups.append(classes)
    return _assign_labels(str(root), *groups)


def _scan_zip(zf: zipfile.ZipFile, path: Path):
    where = f"zip '{path}'"
    checked = {info.filename: safe_parts(info.filename, where) for info in zf.infolist()}  # every name
    members = [
        i for i in zf.infolist()
        if not i.is_dir() and not i.filename.startswith("__MACOSX/") and _is_image(i.filename)
    ]
    parts = [checked[i.filename] for i in members]
    if any(p[0] in ("train", "test") and len(p) >= 3 for p in parts):
        depth = 0
    elif parts and len({p[0] for p in parts}) == 1 and any(len(p) >= 4 and p[1] == "train" for p in parts):
        depth = 1  # everything under one top-level folder
    else:
        raise BadExpertError(f"zip '{path}' has no train/ folder of images; {LAYOUT}")
    groups: dict[str, dict[str, list[Source]]] = {"train": {}, "test": {}}
    for info in zf.infolist():  # register empty class folders too, so they are reported
        p = checked[info.filename]
        if info.is_dir() and len(p) == depth + 2 and p[depth] in groups and (depth == 0 or p[0] == parts[0][0]):
            groups[p[depth]].setdefault(p[depth + 1], [])
    for info, p in zip(members, parts):
        if len(p) < depth + 3 or p[depth] not in groups:
            continue
        label = f"{path}:{info.filename}"
        _check_member(info, label)  # before anything is decompressed
        groups[p[depth]].setdefault(p[depth + 1], []).append((label, _zip_reader(zf, info, label)))
    if not groups["test"]:
        raise BadExpertError(f"zip '{path}' has no test/ folder of images; {LAYOUT}")
    return _assign_labels(str(path), groups["train"], groups["test"])


def safe_parts(name: str, where: str) -> tuple[str, ...]:
    """The components of a path inside a data set -- a zip member's name, or a file's path under
    an image folder (``/``-separated, relative to it) -- refused in one line when unsafe.

    Refused: an absolute path, a ``..`` component (it climbs out of its folder: ``train/../../x.png``
    would name a class ``..``) or a ``.`` one, a backslash (a Windows separator, which other tools
    read as one), a drive letter (``C:``), and control, format or line-separator characters (they
    would break one-line messages and reports, or disguise a name). ``where`` names the zip or
    folder in the message. Empty components (``a//b``) are dropped.
    """
    parts = tuple(p for p in name.split("/") if p)
    if not name.isprintable() and any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in name):
        why = "contains a control character"
    elif name.startswith("/"):
        why = "is absolute"
    elif "\\" in name:
        why = "contains a backslash (a Windows path separator)"
    elif parts and len(parts[0]) >= 2 and parts[0][1] == ":" and parts[0][0].isascii() and parts[0][0].isalpha():
        why = "starts with a drive letter"
    elif ".." in parts:
        why = "climbs out of its folder ('..')"
    elif "." in parts:
        why = "has a '.' component"
    else:
        return parts
    raise BadExpertError(
        f"{where}: the path {name!r} {why}; paths in a data set must be plain relative names like "
        "train/<class>/<image>: rename it, or re-create the archive without it"
    )


def _check_member(info: zipfile.ZipInfo, label: str) -> None:
    """Refuse a zip member by what it declares: encryption, compression method, uncompressed size."""
    if info.flag_bits & 0x1:
        raise BadExpertError(f"zip member '{label}' is encrypted; re-create the zip without a password")
    if info.compress_type not in _ZIP_METHODS:
        method = zipfile.compressor_names.get(info.compress_type, f"method {info.compress_type}")
        raise BadExpertError(
            f"zip member '{label}' uses {method} compression; only stored or deflate members are read, "
            "re-create the zip with plain zip (deflate)"
        )
    if info.file_size > MAX_IMAGE_FILE_BYTES:
        raise _too_big(label, info.file_size)


def _zip_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str) -> Callable[[], bytes]:
    """Read one member, never decompressing past its declared size; damage raises one error."""

    def read() -> bytes:
        _check_member(info, label)
        try:
            with zf.open(info) as fh:
                data = fh.read(info.file_size)  # reaching the declared size also checks the CRC
        except Exception as exc:  # BadZipFile (bad CRC), zlib.error, EOFError, NotImplementedError, RuntimeError...
            raise BadExpertError(f"zip member '{label}' is damaged ({_why(exc)}); re-create the zip") from exc
        if len(data) != info.file_size:
            raise BadExpertError(
                f"zip member '{label}' is truncated ({len(data)} of {info.file_size} bytes); re-create the zip"
            )
        return data

    return read
