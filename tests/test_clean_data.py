"""A user's own clean set: folder, zip or CSV, matched to the model's classes, split and gated."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from badexpert.data.clean import check_accuracy, clean_splits, min_accuracy, read_clean_set, resplit, sample
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


def test_resplit_gives_the_same_split_or_refuses_a_changed_set(tmp_path):
    from badexpert.data.core import image_hashes

    _write(tmp_path, {"cat": 10, "dog": 10, "frog": 10})
    ds = read_clean_set(tmp_path, num_classes=3, image_size=(10, 12), in_channels=3, classes=CLASSES)
    s = clean_splits(ds, seed=3, holdout=6)
    record = {"seed": 3, "reserved": 12, "calibration": 12, "holdout": 6}
    fit, cal = image_hashes(s.reserved.images), image_hashes(s.calibration.images)
    again = resplit(ds, record, fit_hashes=fit, calibration_hashes=cal, where="here")
    assert torch.equal(again.test.images, s.test.images) and torch.equal(again.test.labels, s.test.labels)
    with pytest.raises(BadExpertError, match="here holds 29 images but the detector was made from 30"):
        resplit(ds.subset(range(29)), record, fit_hashes=fit, calibration_hashes=cal, where="here")
    with pytest.raises(BadExpertError, match="does not split into the images the detector was fitted"):
        resplit(ds, {**record, "seed": 4}, fit_hashes=fit, calibration_hashes=cal, where="here")
    with pytest.raises(BadExpertError, match="lacks its split"):
        resplit(ds, {"seed": 3}, fit_hashes=fit, calibration_hashes=cal, where="here")
    part = sample(ds, 7, seed=0)
    assert len(part) == 7 and torch.equal(sample(ds, 7, seed=0).images, part.images) and sample(ds, 99, seed=0) is ds


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


# --- the command line: defend --clean on a model trained elsewhere -----------------------------------
@pytest.fixture(scope="module")
def blobs_model(tmp_path_factory):
    """A BadNet-backdoored CNN on a tiny ImageFolder of bars (classes c0..c3), and a clean folder of
    the same kind of images that the model never saw (its test/ split)."""
    from .conftest import train_blobs_model

    root = tmp_path_factory.mktemp("clean-cli")
    data, model = train_blobs_model(root)
    return root, model, data / "test"


def test_defend_on_your_own_clean_folder_detects_the_backdoor(blobs_model, tmp_path, capsys):
    from badexpert.attacks import attack_from_meta
    from badexpert.cli import main
    from badexpert.detectors import load_detector
    from badexpert.io import load_model

    root, model_path, clean = blobs_model
    det_path = tmp_path / "det.safetensors"
    capsys.readouterr()
    assert main(["defend", "--model", str(model_path), "--clean", str(clean), "--holdout", "60", "--fpr", "0.05",
                 "--device", "cpu", "--out", str(det_path)]) == 0
    out, err = capsys.readouterr()
    assert "clean images correctly" in err and "on the 60 held-out images it rejects" in out
    model, meta = load_model(model_path)
    det = load_detector(det_path, model)
    rec = det.extra_["clean"]
    assert (rec["reserved"], rec["calibration"], rec["holdout"]) == (130, 130, 60)
    assert rec["model_accuracy"] > 0.9
    # the detector really separates: the model's own trigger on clean images is mostly rejected
    ds = read_clean_set(clean, num_classes=4, image_size=(12, 12), in_channels=1, classes=meta["classes"])
    attack = attack_from_meta(meta, source="model")
    keep = ds.labels != attack.target
    triggered = attack.apply(ds.images[keep][:100])
    fooled = model(triggered.float() / 255).argmax(1) == attack.target
    assert fooled.float().mean() > 0.8
    assert det.predict(triggered[fooled]).float().mean() > 0.8
    assert det.predict(ds.images[keep][:100]).float().mean() < 0.2
    # the bundle takes the detector like any other
    assert main(["bundle", "--model", str(model_path), "--detector", str(det_path),
                 "--out", str(tmp_path / "guard.safetensors")]) == 0


def _shifted_csv(clean: Path, tmp: Path) -> Path:
    rows = ["path,label"]
    for f in sorted(clean.rglob("*.png")):
        rows.append(f"{f.relative_to(clean.parent).as_posix()},c{(int(f.parent.name[1:]) + 1) % 4}")
    p = clean.parent / f"shifted-{tmp.name}.csv"
    p.write_text("\n".join(rows) + "\n")
    return p


@pytest.mark.parametrize("case, extra, message", [
    ("shifted-labels", [], "wired to the data the wrong way"),
    ("unknown-class", [], "are not classes of the model"),
    ("holdout-without-clean", ["--holdout", "5"], "--holdout goes with --clean"),
    ("clean-and-data-path", ["--data-path", "x"], "give one"),
    ("too-few-for-fpr", ["--fpr", "0.001"], "cannot be reached with 160 calibration"),
])
def test_defend_clean_mistakes_are_one_line_and_write_nothing(case, extra, message, blobs_model, tmp_path, capsys):
    from badexpert.cli import main

    root, model_path, clean = blobs_model
    argv = ["defend", "--model", str(model_path), "--device", "cpu", "--out", str(tmp_path / "d.safetensors"), *extra]
    if case == "shifted-labels":
        argv += ["--clean", str(_shifted_csv(clean, tmp_path))]
    elif case == "unknown-class":
        bad = tmp_path / "bad"
        _write(bad, {"c0": 2, "c1": 2, "c2": 2, "c3": 2, "zebra": 2}, size=(12, 12), mode="L")
        argv += ["--clean", str(bad)]
    elif case != "holdout-without-clean":
        argv += ["--clean", str(clean)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "d.safetensors").exists()


def test_defend_an_onnx_model_from_elsewhere_with_your_own_clean_folder(blobs_model, tmp_path, capsys):
    """The model arrives as an ONNX file (exported by another team): defend converts it, checks the
    conversion, gates on its accuracy, fits BaDExpert on copies, and the detector rejects the
    backdoor's inputs."""
    pytest.importorskip("onnxruntime")
    from badexpert.attacks import attack_from_meta
    from badexpert.cli import main
    from badexpert.detectors import load_detector
    from badexpert.io import load_model

    root, model_path, clean = blobs_model
    model, meta = load_model(model_path)
    onnx_path = tmp_path / "theirs.onnx"
    torch.onnx.export(model, torch.rand(2, 1, 12, 12), str(onnx_path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)
    det_path = tmp_path / "det.safetensors"
    argv = ["defend", "--model", str(onnx_path), "--clean", str(clean), "--mean", "0", "--std", "1",
            "--classes", ",".join(meta["classes"]), "--fpr", "0.05", "--device", "cpu", "--out", str(det_path)]
    without = [a for i, a in enumerate(argv) if a != "--classes" and (i == 0 or argv[i - 1] != "--classes")]
    capsys.readouterr()
    assert main(without) == 2  # the ONNX file carries no class names: folders c0..c3 match nothing
    assert "are not classes of the model" in capsys.readouterr().err and not det_path.exists()
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    theirs, their_meta = load_model(onnx_path, mean=0, std=1, classes=meta["classes"])
    det = load_detector(det_path, theirs)
    ds = read_clean_set(clean, num_classes=4, image_size=(12, 12), in_channels=1, classes=meta["classes"])
    attack = attack_from_meta(meta, source="model")
    keep = ds.labels != attack.target
    triggered = attack.apply(ds.images[keep][:100])
    assert det.predict(triggered).float().mean() > 0.8
    assert det.predict(ds.images[keep][:100]).float().mean() < 0.2
