"""ImageFolder reader: ``train/<class>/<image>`` and ``test/<class>/<image>`` in a directory or zip.

A zip is read member by member with :mod:`zipfile` (nothing is extracted); its layout may sit
under one extra top-level folder (``cifar10/train/...``), and so may a directory's. Class names
are the sorted folder names under ``train/``; labels follow that order. Images are decoded with
Pillow in sorted file order, so loading is deterministic.

:func:`decode_images` is shared with the other readers that decode image files (GTSRB).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import BadExpertError
from .core import Dataset

#: File suffixes treated as images; other files (``Thumbs.db``, ``README``) are ignored.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
LAYOUT = "expected train/<class>/<images> and test/<class>/<images>"

# Pillow modes that hold grey levels only; everything else is converted to RGB.
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})

_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR  # Pillow < 9.1 has no Image.Resampling

Source = tuple[str, Callable[[], bytes]]  # (name shown in errors, function returning the file's bytes)


def read_imagefolder(
    path: str | Path,
    *,
    name: str | None = None,
    hflip: bool = True,
    size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[Dataset, Dataset]:
    """Read an ImageFolder directory or ``.zip`` and return ``(train, test)``.

    ``size`` (an int or ``(height, width)``) resizes every image with bilinear filtering; without
    it, images of another size than the first are resized to the first one's. Images are RGB,
    or single-channel when every image is greyscale. ``mean``/``std`` default to the training
    split's statistics, used for both splits.
    """
    path = Path(path).expanduser()
    name = name or path.stem
    hw = _as_hw(size)
    if path.is_dir():
        train_src, test_src, classes = _scan_directory(path)
        images = decode_images([s for s, _ in train_src + test_src], hw)
    elif path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            train_src, test_src, classes = _scan_zip(zf, path)
            images = decode_images([s for s, _ in train_src + test_src], hw)
    elif path.exists():
        raise BadExpertError(f"'{path}' is neither a directory nor a zip file; {LAYOUT}")
    else:
        raise BadExpertError(f"image folder '{path}' does not exist")
    n = len(train_src)  # clone the two parts so neither keeps the other's memory alive
    train_images, test_images = images[:n].clone(), images[n:].clone()
    del images
    train_labels = torch.tensor([label for _, label in train_src], dtype=torch.int64)
    test_labels = torch.tensor([label for _, label in test_src], dtype=torch.int64)
    meta = {"source": str(path)}
    train = Dataset(train_images, train_labels, classes, name=name, hflip=hflip, mean=mean, std=std,
                    meta={**meta, "split": "train"})
    test = Dataset(test_images, test_labels, list(classes), name=name, hflip=hflip, mean=train.mean, std=train.std,
                   meta={**meta, "split": "test"})
    return train, test


def is_imagefolder(path: str | Path) -> bool:
    """Whether ``path`` is a zip file or a directory with a ``train/`` folder (maybe one level down)."""
    path = Path(path)
    if path.is_file():
        return zipfile.is_zipfile(path)
    return path.is_dir() and _directory_root(path) is not None


def decode_images(sources: Sequence[Source], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode image files into one uint8 tensor ``[N, C, H, W]``.

    ``size`` is ``(height, width)``; ``None`` means the first image's size. Images of another size
    are resized with bilinear filtering. ``C`` is 1 when every image is greyscale, else 3.
    """
    if not sources:
        raise BadExpertError("no images to decode")
    out = None
    h = w = 0
    all_grey = True
    for i, (label, read) in enumerate(sources):
        try:
            with Image.open(io.BytesIO(read())) as im:
                grey = im.mode in _GREY_MODES
                all_grey &= grey
                if im.mode != ("L" if grey else "RGB"):
                    im = im.convert("L" if grey else "RGB")
                if out is None:
                    h, w = size if size is not None else (im.height, im.width)
                    out = np.empty((len(sources), 3, h, w), dtype=np.uint8)
                if im.size != (w, h):
                    im = im.resize((w, h), _BILINEAR)
                arr = np.asarray(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise BadExpertError(f"cannot decode image '{label}' ({exc}); replace or remove the file") from exc
        out[i] = arr if grey else arr.transpose(2, 0, 1)  # a grey image fills all three channels
    if all_grey:
        out = np.ascontiguousarray(out[:, :1])
    return torch.from_numpy(out)


# --- helpers --------------------------------------------------------------------------------------
def _as_hw(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 1:
        raise BadExpertError(f"image size must be a positive int or (height, width), got {size!r}")
    return hw  # type: ignore[return-value]


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
            classes[cdir.name] = [(str(f), f.read_bytes) for f in files]
        groups.append(classes)
    return _assign_labels(str(root), *groups)


def _scan_zip(zf: zipfile.ZipFile, path: Path):
    names = [
        i.filename for i in zf.infolist()
        if not i.is_dir() and not i.filename.startswith("__MACOSX/") and _is_image(i.filename)
    ]
    parts = [_zip_parts(n) for n in names]
    if any(p[0] in ("train", "test") and len(p) >= 3 for p in parts):
        depth = 0
    elif parts and len({p[0] for p in parts}) == 1 and any(len(p) >= 4 and p[1] == "train" for p in parts):
        depth = 1  # everything under one top-level folder
    else:
        raise BadExpertError(f"zip '{path}' has no train/ folder of images; {LAYOUT}")
    groups: dict[str, dict[str, list[Source]]] = {"train": {}, "test": {}}
    for info in zf.infolist():  # register empty class folders too, so they are reported
        p = _zip_parts(info.filename)
        if info.is_dir() and len(p) == depth + 2 and p[depth] in groups and (depth == 0 or p[0] == parts[0][0]):
            groups[p[depth]].setdefault(p[depth + 1], [])
    for n, p in zip(names, parts):
        if len(p) < depth + 3 or p[depth] not in groups:
            continue
        groups[p[depth]].setdefault(p[depth + 1], []).append((f"{path}:{n}", _zip_reader(zf, n)))
    if not groups["test"]:
        raise BadExpertError(f"zip '{path}' has no test/ folder of images; {LAYOUT}")
    return _assign_labels(str(path), groups["train"], groups["test"])


def _zip_parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.split("/") if p)


def _zip_reader(zf: zipfile.ZipFile, member: str) -> Callable[[], bytes]:
    return lambda: zf.read(member)
