"""A user's own clean set: folder, zip or CSV, matched to the model's classes, split and gated."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from badexpert.data.clean import check_accuracy, clean_splits, min_accuracy, read_clean_set
from badexpert.errors import BadExpertError

CLASSES = ["cat", "dog", "frog"]


def _write(root: Path, layout: dict[str, int], *, size=(10, 12), mode="RGB", wrap: str | None = None) -> Path:
    """``layout``: class folder -> number of images; image k of class c has the value 40c + k."""
    base = root / wrap if wrap else root
    for c, (name, n) in enumerate(layout.items()):
        d = base / name
        d.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            arr = np.full((size[0], size[1], 3) if mode == "RGB" else size, 40 * c + k, dtype=np.uint8)
            Image.fromarray(arr, mode).save(d / f"{k:03d}.png")
    return root


def test_folder_is_read_at_the_model_size_and_labelled_by_the_model_class_order(tmp_path):
    _write(tmp_path, {"frog": 2, "cat": 3, "Dog": 4})  # another order, another case
    ds = read_clean_set(tmp_path, num_classes=3, image_size=(10, 12), in_channels=3, classes=CLASSES)
    assert ds.images.shape == (9, 3, 10, 12) and ds.classes == CLASSES
    # each image's value says its folder (written frog, cat, Dog: 0+k, 40+k, 80+k); labels follow CLASSES
    by_label = {int(y): sorted(int(v) for v in ds.images[ds.labels == y][:, 0, 0, 0]) for y in ds.labels.unique()}
    assert by_label == {0: [40, 41, 42], 1: [80, 81, 82, 83], 2: [0, 1]}


def test_zip_with_a_wrapping_folder_and_a_csv_give_the_same_set(tmp_path):
    src = _write(tmp_path / "src", {"cat": 2, "dog": 2, "frog": 2}, wrap="mydata")
    zpath = tmp_path / "clean.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted((src / "mydata").rglob("*.png")):
            zf.write(f, f.relative_to(src).as_posix())
    csv_path = src / "labels.csv"
    rows = ["path,label"] + [f"mydata/{f.parent.name}/{f.name},{CLASSES.index(f.parent.name)}"
                             for f in sorted((src / "mydata").rglob("*.png"))]
    csv_path.write_text("\n".join(rows) + "\n")
    sets = [read_clean_set(p, num_classes=3, image_size=(10, 12), in_channels=3, classes=CLASSES)
            for p in (src, zpath, csv_path)]
    for ds in sets[1:]:
        assert torch.equal(ds.images, sets[0].images) and torch.equal(ds.labels, sets[0].labels)


def test_greyscale_images_feed_a_colour_model_and_colour_refuses_a_grey_one(tmp_path):
    _write(tmp_path / "g", {"cat": 1, "dog": 1, "frog": 1}, mode="L")
    ds = read_clean_set(tmp_path / "g", num_classes=3, image_size=(10, 12), in_channels=3, classes=CLASSES)
    assert ds.channels == 3 and torch.equal(ds.images[:, 0], ds.images[:, 2])
    _write(tmp_path / "c", {"cat": 1, "dog": 1, "frog": 1})
    with pytest.raises(BadExpertError, match="3 channel"):
        read_clean_set(tmp_path / "c", num_classes=3, image_size=(10, 12), in_channels=1, classes=CLASSES)


@pytest.mark.parametrize("layout, kwargs, match", [
    ({"cat": 1, "dog": 1, "bird": 1}, {}, r"bird are not classes of the model; the model's classes: cat, dog, frog"),
    ({"cat": 1, "dog": 1}, {}, "no images of the model's class"),
    ({"cat": 1, "CAT": 1, "dog": 1, "frog": 1}, {}, "name the same model class"),
    ({"0": 1, "1": 1, "7": 1}, {"classes": None}, "7 are not classes"),
])
def test_class_mismatches_are_one_line_with_both_lists(layout, kwargs, match, tmp_path):
    _write(tmp_path, layout)
    with pytest.raises(BadExpertError, match=match) as e:
        read_clean_set(tmp_path, num_classes=3, image_size=(10, 12), in_channels=3, **{"classes": CLASSES, **kwargs})
    assert "\n" not in str(e.value)


def test_missing_classes_can_be_allowed_and_indices_name_classes(tmp_path):
    _write(tmp_path, {"0": 2, "2": 1})
    ds = read_clean_set(tmp_path, num_classes=3, image_size=(10, 12), in_channels=3, allow_missing=True)
    assert sorted(ds.labels.tolist()) == [0, 0, 2]


@pytest.mark.parametrize("text, match", [
    ("file,class\na.png,cat\n", "header 'path,label'"),
    ("path,label\n../x.png,cat\n", "climb|'\\.\\.'"),
    ("path,label\nnope.png,cat\n", "does not exist"),
    ("path,label\na.png\n", "line 2"),
    ("path,label\n", "lists no images"),
])
def test_bad_label_files_are_one_line(text, match, tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(BadExpertError, match=match):
        read_clean_set(tmp_path / "l.csv", num_classes=3, image_size=(4, 4), in_channels=3, classes=CLASSES)


def test_splits_are_seeded_disjoint_and_sized(tmp_path):
    _write(tmp_path, {"cat": 10, "dog": 10, "frog": 10})
    ds = read_clean_set(tmp_path, num_classes=3, image_size=(10, 12), in_channels=3, classes=CLASSES)
    s = clean_splits(ds, seed=3, holdout=6)
    assert (len(s.reserved), len(s.calibration), len(s.test), len(s.train)) == (12, 12, 6, 0)
    vals = [set(part.images[:, 0, 0, 0].tolist()) for part in (s.reserved, s.calibration, s.test)]
    assert not (vals[0] & vals[1]) and not (vals[0] & vals[2]) and not (vals[1] & vals[2])
    again = clean_splits(ds, seed=3, holdout=6)
    assert torch.equal(again.reserved.images, s.reserved.images)
    assert not torch.equal(clean_splits(ds, seed=4, holdout=6).reserved.images, s.reserved.images)
    with pytest.raises(BadExpertError, match="too few"):
        clean_splits(ds, seed=0, reserved=20, calibration=20)


class _Fixed(torch.nn.Module):
    """Answers class ``(value // 40 + shift) % 3`` from the first pixel (value 40c + k)."""

    def __init__(self, shift: int) -> None:
        super().__init__()
        self.shift = shift
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        c = ((x[:, 0, 0, 0] * 255).round().long() // 40 + self.shift) % 3
        return torch.nn.functional.one_hot(c, 3).float() + 0 * self.w


def test_the_sanity_gate_stops_a_miswired_model_and_passes_a_right_one(tmp_path):
    _write(tmp_path, {"cat": 5, "dog": 5, "frog": 5})
    ds = read_clean_set(tmp_path, num_classes=3, image_size=(10, 12), in_channels=3, classes=CLASSES)
    assert check_accuracy(_Fixed(0), ds) == 1.0
    with pytest.raises(BadExpertError, match=r"0\.0% of the 15 clean images.*label order"):
        check_accuracy(_Fixed(1), ds)  # a shifted label order
    assert check_accuracy(_Fixed(1), ds, bar=0) == 0.0


def test_the_default_bar_catches_chance_and_passes_weak_models():
    assert min_accuracy(10) == pytest.approx(0.2) and min_accuracy(2) == pytest.approx(0.6)
    assert min_accuracy(1000) == pytest.approx(0.101)
