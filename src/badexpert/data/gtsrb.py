"""GTSRB (German Traffic Sign Recognition Benchmark): the official layout or an ImageFolder.

Official layout (the three archives GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip
and GTSRB_Final_Test_GT.zip extracted side by side)::

    GTSRB/Final_Training/Images/00000/00000_00000.ppm ... GT-00000.csv
    GTSRB/Final_Test/Images/00000.ppm ...
    GT-final_test.csv   (in Final_Test/Images/, Final_Test/, GTSRB/ or the folder above)

The CSV files are semicolon-separated with a header (``Filename;Width;Height;Roi.X1;...;ClassId``).
Every image is resized as a whole (no ROI crop) to 32x32 (or the ``image_size`` asked for) with
bilinear filtering; each split's ``meta["resized"]`` counts the images that were not already that
size. Image files are decoded with the checks of :mod:`badexpert.data.imagefolder` (file size,
pixel count from the header before decoding, memory budget). Traffic signs are not flip-invariant, so ``hflip`` is false.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import torch

from ..errors import BadExpertError
from .core import Dataset
from .imagefolder import LAYOUT, decode_sets, file_source, is_imagefolder, parse_image_size, read_imagefolder

GTSRB_CLASSES = [f"{i:02d}" for i in range(43)]
GTSRB_MEAN = (0.3337, 0.3064, 0.3171)
GTSRB_STD = (0.2672, 0.2564, 0.2629)
GTSRB_SIZE = 32
TEST_CSV = "GT-final_test.csv"


def read_gtsrb(path: str | Path, image_size: int | tuple[int, int] | None = None) -> tuple[Dataset, Dataset]:
    """Read GTSRB from the official layout (``path`` is ``GTSRB/`` or its parent) or an ImageFolder.

    Images are resized to ``image_size`` (an int or ``(height, width)``; default 32x32).
    """
    path = Path(path)
    size = parse_image_size(image_size) or (GTSRB_SIZE, GTSRB_SIZE)
    root = find_official_root(path)
    if root is not None:
        return read_gtsrb_official(root, extra_dirs=[path], image_size=size)
    if is_imagefolder(path):
        return read_imagefolder(path, name="gtsrb", hflip=False, size=size, mean=GTSRB_MEAN, std=GTSRB_STD)
    raise BadExpertError(
        f"'{path}' is not a GTSRB copy: give the folder holding GTSRB/Final_Training/Images (official layout) "
        f"or an ImageFolder directory or zip ({LAYOUT})"
    )


def find_official_root(path: Path) -> Path | None:
    """``path`` or ``path/GTSRB`` if it holds ``Final_Training/Images``, else ``None``."""
    for candidate in (path, path / "GTSRB"):
        if (candidate / "Final_Training" / "Images").is_dir():
            return candidate
    return None


def read_gtsrb_official(
    root: str | Path, extra_dirs: Sequence[Path] = (), image_size: int | tuple[int, int] | None = None
) -> tuple[Dataset, Dataset]:
    """Read the official training and test sets under ``root`` (the ``GTSRB`` folder).

    ``extra_dirs`` are further places to look for ``GT-final_test.csv``; images are resized to
    ``image_size`` (default 32x32).
    """
    root = Path(root)
    size = parse_image_size(image_size) or (GTSRB_SIZE, GTSRB_SIZE)
    train_dir = root / "Final_Training" / "Images"
    test_dir = root / "Final_Test" / "Images"
    if not test_dir.is_dir():
        raise BadExpertError(
            f"'{root}' has no Final_Test/Images folder; extract GTSRB_Final_Test_Images.zip next to Final_Training"
        )
    train_files, train_labels = [], []
    class_dirs = sorted(p for p in train_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise BadExpertError(f"'{train_dir}' holds no class folders (00000 ... 00042); extract the training images again")
    for cdir in class_dirs:
        files, labels = _read_csv(cdir / f"GT-{cdir.name}.csv", cdir)
        if cdir.name.isdigit() and any(label != int(cdir.name) for label in labels):
            raise BadExpertError(
                f"'{cdir / f'GT-{cdir.name}.csv'}' lists ClassIds other than {int(cdir.name)}; the file is damaged"
            )
        train_files += files
        train_labels += labels
    test_csv = _find_test_csv(root, extra_dirs)
    test_files, test_labels = _read_csv(test_csv, test_dir)

    decoded = decode_sets([[file_source(f) for f in train_files], [file_source(f) for f in test_files]], size,
                          where=f"'{root}'")
    # an all-greyscale copy: still give RGB, as models expect
    train_x, test_x = (x if x.shape[1] == 3 else x.expand(-1, 3, -1, -1).contiguous() for x in decoded.parts)
    common = dict(name="gtsrb", hflip=False, mean=GTSRB_MEAN, std=GTSRB_STD)
    train = Dataset(train_x, torch.tensor(train_labels), list(GTSRB_CLASSES), **common,
                    meta={"source": str(root), "split": "train", "resized": decoded.resized[0]})
    test = Dataset(test_x, torch.tensor(test_labels), list(GTSRB_CLASSES), **common,
                   meta={"source": str(root), "split": "test", "resized": decoded.resized[1]})
    return train, test


def _find_test_csv(root: Path, extra_dirs: Sequence[Path]) -> Path:
    places = [root / "Final_Test" / "Images", root / "Final_Test", root, *extra_dirs]
    for place in places:
        if (place / TEST_CSV).is_file():
            return place / TEST_CSV
    raise BadExpertError(
        f"the GTSRB test labels {TEST_CSV} are missing (looked in {root / 'Final_Test' / 'Images'}, "
        f"{root / 'Final_Test'} and {root}); extract GTSRB_Final_Test_GT.zip into one of them"
    )


def _read_csv(csv_file: Path, image_dir: Path) -> tuple[list[Path], list[int]]:
    """The image files and ClassIds listed in one GTSRB annotation CSV, checked."""
    if not csv_file.is_file():
        raise BadExpertError(
            f"GTSRB label file '{csv_file}' is missing; extract the complete official archive again"
        )
    with open(csv_file, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh, delimiter=";"))
    if not rows:
        raise BadExpertError(f"GTSRB label file '{csv_file}' lists no images; the file is damaged")
    if "Filename" not in rows[0] or "ClassId" not in rows[0]:
        hint = (
            f" (the unlabelled GT-final_test.test.csv will not do: use {TEST_CSV} from GTSRB_Final_Test_GT.zip)"
            if csv_file.name == TEST_CSV else ""
        )
        raise BadExpertError(
            f"'{csv_file}' lacks a Filename or ClassId column; give the official semicolon-separated annotation file{hint}"
        )
    files, labels = [], []
    for line, row in enumerate(rows, start=2):
        try:
            label = int(row["ClassId"])
        except (TypeError, ValueError):
            raise BadExpertError(f"'{csv_file}' line {line}: ClassId {row['ClassId']!r} is not a number") from None
        if not 0 <= label < len(GTSRB_CLASSES):
            raise BadExpertError(f"'{csv_file}' line {line}: ClassId {label} is outside 0..42; the file is damaged")
        image = image_dir / row["Filename"]
        if not image.is_file():
            raise BadExpertError(f"'{csv_file}' line {line} lists '{image}', which does not exist; extract the images again")
        files.append(image)
        labels.append(label)
    return files, labels
