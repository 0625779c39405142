"""A user's own clean, labelled images for a model that came from elsewhere.

An engineer guarding a model holds a few hundred to a few thousand clean, correctly labelled
images, not a dataset with ``train/`` and ``test/`` splits. :func:`read_clean_set` reads them in
one of three forms:

- a folder of ``<class>/<image>`` (images may sit in sub-folders of their class folder), maybe
  under one extra top-level folder;
- a zip of the same layout;
- a CSV file with a header ``path,label`` (paths relative to the CSV's folder, labels a class name
  or a class index).

Class folders (or CSV labels) are matched to the model's classes: by name when the model has class
names (exactly, else ignoring case), by index when a label is a whole number (``"3"``) and the
model's names do not include it. A name the model does not know, or a model class without a single
image, is one :class:`~badexpert.errors.BadExpertError` line giving both lists (``allow_missing``
accepts sets that lack some classes). Images are decoded by the same checked reader as every
dataset (:func:`~badexpert.data.imagefolder.decode_sets`: formats, sizes, pixel modes, memory
budget) at the model's input size; greyscale images given to a colour model are repeated over its
three channels, colour images given to a greyscale model are refused.

:func:`clean_splits` splits the set (seeded) into the reserved set the detector is fitted on, the
calibration set its threshold is set on, and optionally a held-out part on which the clean
false-positive rate is reported; :func:`check_accuracy` is the sanity gate that stops a model wired
to its data the wrong way (label order, normalisation, image size, channel order) before anything
is fitted. :func:`resplit` makes that split again for evaluation, and checks it is the very one the
detector was fitted and calibrated on.
"""

from __future__ import annotations

import csv
import io
import math
import zipfile
from pathlib import Path
from typing import Sequence

import torch

from ..errors import BadExpertError
from ..imagefile import file_source
from .core import Dataset, Splits, image_hashes
from .imagefolder import _check_member, _is_image, _zip_reader, decode_sets, open_zip, safe_parts

CLEAN_LAYOUT = "expected <class>/<image> folders (a directory or zip), or a CSV file with a 'path,label' header"
#: Largest CSV of labels read (bytes): a million rows of short paths.
MAX_CSV_BYTES = 64 * 1024**2


def _subfolders(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _scan_folder(root: Path) -> dict[str, list]:
    subdirs = _subfolders(root)
    # one wrapping folder (data/<class>/...): it holds folders only, no image of its own
    if len(subdirs) == 1 and not any(f.is_file() and _is_image(f.name) for f in subdirs[0].iterdir()) \
            and _subfolders(subdirs[0]):
        root, subdirs = subdirs[0], _subfolders(subdirs[0])
    groups: dict[str, list] = {}
    for cdir in subdirs:
        files = sorted(f for f in cdir.rglob("*") if f.is_file() and _is_image(f.name))
        for f in (cdir, *files):
            safe_parts(f.relative_to(root).as_posix(), f"clean image folder '{root}'")
        groups[cdir.name] = [file_source(f) for f in files]
    return groups


def _scan_zip(zf: zipfile.ZipFile, path: Path) -> dict[str, list]:
    where = f"zip '{path}'"
    checked = {info.filename: safe_parts(info.filename, where) for info in zf.infolist()}
    members = [i for i in zf.infolist()
               if not i.is_dir() and not i.filename.startswith("__MACOSX/") and _is_image(i.filename)]
    parts = [checked[i.filename] for i in members]
    if not parts:
        raise BadExpertError(f"zip '{path}' holds no image files; {CLEAN_LAYOUT}")
    # one top-level folder holding the class folders (and no image of its own): skip it
    depth = 1 if len({p[0] for p in parts}) == 1 and all(len(p) >= 3 for p in parts) else 0
    groups: dict[str, list] = {}
    for info, p in zip(members, parts):
        if len(p) < depth + 2:
            raise BadExpertError(f"zip '{path}': image '{info.filename}' is not inside a class folder; {CLEAN_LAYOUT}")
        label = f"{path}:{info.filename}"
        _check_member(info, label)
        groups.setdefault(p[depth], []).append((label, _zip_reader(zf, info, label)))
    return groups


def _scan_csv(path: Path) -> dict[str, list]:
    size = path.stat().st_size
    if size > MAX_CSV_BYTES:
        raise BadExpertError(f"label file '{path}' is {size:,} bytes, above the limit of {MAX_CSV_BYTES:,}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadExpertError(f"label file '{path}' is not UTF-8 text ({exc.reason}); save it as UTF-8 CSV") from exc
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["path", "label"] or len(rows[0]) != 2:
        raise BadExpertError(f"label file '{path}' must start with the header 'path,label'; {CLEAN_LAYOUT}")
    base = path.parent
    groups: dict[str, list] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise BadExpertError(f"label file '{path}', line {n}: expected 'path,label', got {','.join(row)[:80]!r}")
        rel, label = row[0].strip(), row[1].strip()
        safe_parts(rel, f"label file '{path}', line {n}")
        f = base / rel
        if not f.is_file():
            raise BadExpertError(f"label file '{path}', line {n}: image '{rel}' does not exist (relative to '{base}')")
        groups.setdefault(label, []).append(file_source(f))
    if not groups:
        raise BadExpertError(f"label file '{path}' lists no images")
    return groups


def _match_classes(found: Sequence[str], classes: Sequence[str] | None, num_classes: int, where: str,
                   allow_missing: bool) -> dict[str, int]:
    """Folder (or CSV label) names -> model class index; one line on any mismatch."""
    names = list(classes) if classes else None
    exact = {c: i for i, c in enumerate(names or [])}
    folded: dict[str, int] = {}
    for i, c in enumerate(names or []):
        folded.setdefault(c.casefold(), i)
    index: dict[str, int] = {}
    unknown = []
    for f in found:
        if f in exact:
            index[f] = exact[f]
        elif f.casefold() in folded:
            index[f] = folded[f.casefold()]
        elif f.isdigit() and int(f) < num_classes:
            index[f] = int(f)
        else:
            unknown.append(f)
    model_list = ", ".join(names) if names else f"indices 0..{num_classes - 1}"
    if unknown:
        raise BadExpertError(
            f"{where}: class(es) {', '.join(sorted(unknown)[:8])} are not classes of the model; the model's classes: "
            f"{model_list}; the data's: {', '.join(sorted(found))}; rename the folders (or labels) to the model's class "
            "names or indices"
        )
    collide = {i for i in index.values() if list(index.values()).count(i) > 1}
    if collide:
        same = sorted(f for f, i in index.items() if i in collide)
        raise BadExpertError(f"{where}: {', '.join(same)} name the same model class; keep one folder per class")
    missing = sorted(set(range(num_classes)) - set(index.values()))
    if missing and not allow_missing:
        miss = ", ".join(names[i] if names else str(i) for i in missing[:8])
        raise BadExpertError(
            f"{where}: no images of the model's class(es) {miss}{' ...' if len(missing) > 8 else ''}; the model's "
            f"classes: {model_list}; the data's: {', '.join(sorted(found))}; add images of every class (or pass "
            "allow_missing / --allow-missing-classes)"
        )
    return index


def read_clean_set(path: str | Path, *, num_classes: int, image_size: Sequence[int], in_channels: int,
                   classes: Sequence[str] | None = None, allow_missing: bool = False) -> Dataset:
    """The user's clean images at ``path`` (folder, zip or CSV; see the module docstring) as a
    :class:`Dataset` labelled with the model's class indices, at the model's ``image_size``
    (height, width) and ``in_channels``."""
    path = Path(path).expanduser()
    where = f"clean data '{path}'"
    if path.is_dir():
        groups = _scan_folder(path)
        decode = lambda srcs: decode_sets([srcs], tuple(image_size), where=where)  # noqa: E731
        return _labelled(groups, decode, path, where, num_classes, classes, in_channels, allow_missing)
    if path.is_file() and path.suffix.lower() == ".csv":
        groups = _scan_csv(path)
        decode = lambda srcs: decode_sets([srcs], tuple(image_size), where=where)  # noqa: E731
        return _labelled(groups, decode, path, where, num_classes, classes, in_channels, allow_missing)
    if path.is_file() and zipfile.is_zipfile(path):
        with open_zip(path) as zf:
            groups = _scan_zip(zf, path)
            decode = lambda srcs: decode_sets([srcs], tuple(image_size), where=where)  # noqa: E731
            return _labelled(groups, decode, path, where, num_classes, classes, in_channels, allow_missing)
    if path.exists():
        raise BadExpertError(f"'{path}' is neither a folder, a zip file nor a .csv file; {CLEAN_LAYOUT}")
    raise BadExpertError(f"clean data '{path}' does not exist; {CLEAN_LAYOUT}")


def _labelled(groups, decode, path, where, num_classes, classes, in_channels, allow_missing) -> Dataset:
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        raise BadExpertError(f"{where} holds no images in class folders; {CLEAN_LAYOUT}")
    index = _match_classes(list(groups), classes, num_classes, where, allow_missing)
    sources, labels = [], []
    for name in sorted(groups):
        for src in sorted(groups[name], key=lambda s: s[0]):
            sources.append(src)
            labels.append(index[name])
    images = decode(sources).parts[0]
    if images.shape[1] != in_channels:
        if images.shape[1] == 1 and in_channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        else:
            raise BadExpertError(
                f"{where}: the images have {images.shape[1]} channel(s) but the model takes {in_channels}; "
                "give images of the model's kind (greyscale or colour)"
            )
    names = list(classes) if classes else [str(i) for i in range(num_classes)]
    return Dataset(images, torch.tensor(labels, dtype=torch.int64), names, name=path.stem,
                   meta={"source": str(path)})


def clean_splits(data: Dataset, *, seed: int, reserved: int | None = None, calibration: int | None = None,
                 holdout: int = 0) -> Splits:
    """Seeded, disjoint reserved / calibration / held-out parts of one clean set (``Splits.train``
    is empty: the model was trained elsewhere; ``Splits.test`` is the held-out part, maybe empty).

    Defaults: ``holdout`` images are set aside first, then half of the rest is reserved (the
    detector is fitted on it) and the other half calibrates."""
    from ..utils import derive_generator

    n = len(data)
    for name, v in (("reserved", reserved), ("calibration", calibration), ("holdout", holdout)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "holdout" else 1)):
            raise BadExpertError(f"clean split '{name}' must be a whole number >= {0 if name == 'holdout' else 1}, got {v!r}")
    rest = n - holdout
    if reserved is None and calibration is None:
        reserved = rest // 2
        calibration = rest - reserved
    elif reserved is None:
        reserved = rest - calibration
    elif calibration is None:
        calibration = rest - reserved
    if reserved < 2 or calibration < 1 or reserved + calibration + holdout > n:
        raise BadExpertError(
            f"the clean set has {n} images, too few for {reserved} reserved (at least 2) + {calibration} calibration "
            f"(at least 1) + {holdout} held out; give more images or smaller --reserved/--calibration/--holdout"
        )
    perm = torch.randperm(n, generator=derive_generator(seed, "clean-split"))
    h_idx, r_idx = perm[:holdout], perm[holdout:holdout + reserved]
    c_idx = perm[holdout + reserved:holdout + reserved + calibration]
    return Splits(train=data.subset(perm[:0]), reserved=data.subset(r_idx, name=f"{data.name}/reserved"),
                  calibration=data.subset(c_idx, name=f"{data.name}/calibration"),
                  test=data.subset(h_idx, name=f"{data.name}/held-out"))


def resplit(data: Dataset, record: dict, *, fit_hashes: torch.Tensor, calibration_hashes: torch.Tensor | None,
            where: str) -> Splits:
    """The split :func:`clean_splits` made of ``data`` when the detector was built (``record``: the
    ``seed``, ``reserved``, ``calibration`` and ``holdout`` sizes it recorded), checked to be the
    very same: its reserved and calibration parts must be, image for image, the ones the detector
    was fitted and calibrated on (``fit_hashes``, ``calibration_hashes``: their content hashes).
    A set that changed since (images added, removed or edited) is a one-line error, as its held-out
    part could then hold images the detector has seen."""
    try:
        seed, sizes = int(record["seed"]), [int(record[k]) for k in ("reserved", "calibration", "holdout")]
    except (KeyError, TypeError, ValueError):
        raise BadExpertError(f"the detector's record of {where} lacks its split (seed and sizes); rerun `badexpert "
                             "defend --clean`") from None
    reserved, calibration, holdout = sizes
    then = reserved + calibration + holdout
    if len(data) != then:
        raise BadExpertError(
            f"{where} holds {len(data)} images but the detector was made from {then} ({reserved} reserved, "
            f"{calibration} calibration, {holdout} held out): it changed since `badexpert defend`; give the set it "
            "was made from (--clean PATH) or a separate test set (--test PATH)"
        )
    splits = clean_splits(data, seed=seed, reserved=reserved, calibration=calibration, holdout=holdout)
    same = torch.equal(image_hashes(splits.reserved.images), fit_hashes) and (
        calibration_hashes is None or torch.equal(image_hashes(splits.calibration.images), calibration_hashes))
    if not same:
        raise BadExpertError(
            f"{where} does not split into the images the detector was fitted and calibrated on (its images changed "
            "since `badexpert defend`, or were read at another size); give the set it was made from (--clean PATH) "
            "or a separate test set (--test PATH)"
        )
    return splits


def sample(data: Dataset, n: int | None, *, seed: int) -> Dataset:
    """At most ``n`` images of ``data``, drawn without replacement (seeded), in their order."""
    from ..utils import derive_generator

    if n is None or n >= len(data):
        return data
    idx = torch.randperm(len(data), generator=derive_generator(seed, "test-sample"))[:n].sort().values
    return data.subset(idx)


def min_accuracy(num_classes: int) -> float:
    """The sanity gate's default bar: chance plus ten points, and at least twice chance (at most
    0.6, for two classes). A model wired to its data the wrong way (a wrong label order,
    normalisation, image size or channel order) scores near chance; a weak but real model clears
    it (a 10-class model at 25%, a 1000-class model at 11%)."""
    chance = 1.0 / max(1, num_classes)
    return min(0.6, max(2 * chance, chance + 0.1))


def check_accuracy(model, data: Dataset, *, bar: float | None = None, batch_size: int = 256) -> float:
    """The model's accuracy on the clean set; below ``bar`` (default :func:`min_accuracy`) a
    one-line error naming the usual causes, before anything is fitted. ``bar=0`` disables."""
    from ..training import accuracy

    acc = float(accuracy(model, data, batch_size=batch_size))
    bar = min_accuracy(data.num_classes) if bar is None else float(bar)
    if not math.isfinite(acc) or acc < bar:
        chance = 1.0 / max(1, data.num_classes)
        raise BadExpertError(
            f"the model classifies {acc:.1%} of the {len(data)} clean images correctly (chance: {chance:.1%}, bar: "
            f"{bar:.1%}): it is probably wired to the data the wrong way; check the label order (--classes), the "
            "normalisation (--mean/--std), the image size (--image-size) and the channel order (RGB), or lower "
            "--min-accuracy if the model really is this weak"
        )
    return acc


__all__ = ["CLEAN_LAYOUT", "check_accuracy", "clean_splits", "min_accuracy", "read_clean_set", "resplit", "sample"]
