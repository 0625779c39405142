"""``badexpert evaluate`` with the user's own data: the held-out part of the clean set a ``defend
--clean`` detector was made from (split again and checked to be the same split), a labelled test
set of one's own (``--test``, refused where it overlaps the fitting or calibration images), and
triggered images of one's own (``--triggered`` with ``--target``); every mistake one line, exit 2,
nothing written. (Every model source through defend, evaluate, bundle, serve and export:
tests/test_bundle_sources.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from badexpert.cli import main

from .test_clean_data import blobs_model  # noqa: F401 - the module-scoped fixture


def _write_images(root: Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    for i, (x, y) in enumerate(zip(images, labels)):
        d = root / f"c{int(y)}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[0].numpy(), "L").save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def defended(blobs_model, tmp_path_factory):  # noqa: F811
    """The blobs checkpoint defended on its clean folder with 80 images held out; a fresh labelled
    set of the same kind of images (never seen by the detector); triggered copies of some of them."""
    from badexpert.attacks import attack_from_meta
    from badexpert.data.clean import read_clean_set
    from badexpert.io import load_model

    root, model_path, clean = blobs_model
    tmp = tmp_path_factory.mktemp("evaluate-sources")
    det = tmp / "det.safetensors"
    assert main(["defend", "--model", str(model_path), "--clean", str(clean), "--holdout", "80", "--fpr", "0.05",
                 "--device", "cpu", "--out", str(det)]) == 0
    _, meta = load_model(model_path)
    fresh = read_clean_set(clean.parent / "train", num_classes=4, image_size=(12, 12), in_channels=1,
                           classes=meta["classes"])
    fresh = fresh.subset(range(0, len(fresh), 4))  # 100 images the detector never saw (the model's own data)
    test = _write_images(tmp / "fresh", fresh.images, fresh.labels)
    others = fresh.labels != 0
    trig_images = (attack_from_meta(meta).apply(fresh.images[others]) * 255).round().to(torch.uint8)
    triggered = _write_images(tmp / "triggered", trig_images, fresh.labels[others])
    return {"model": model_path, "clean": clean, "det": det, "test": test, "triggered": triggered, "tmp": tmp}


def _evaluate(d, tmp_path, *extra, detector=None):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(d["model"]), "--detector", str(detector or d["det"]), "--n-boot", "0",
               "--device", "cpu", "--out", str(out), *extra])
    return rc, out


def _refused(capsys, d, tmp_path, *extra, detector=None) -> str:
    capsys.readouterr()
    rc, out = _evaluate(d, tmp_path, *extra, detector=detector)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert not out.exists()
    return err[0]


def test_your_own_test_set_and_triggered_images(defended, tmp_path, capsys):
    # a labelled test set of one's own, under the model's recorded trigger
    rc, out = _evaluate(defended, tmp_path, "--test", str(defended["test"]))
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"]["path"] == str(defended["test"]) and m["dataset"]["splits"]["test"] == 100
    assert m["dataset"]["splits"]["reserved"] + m["dataset"]["splits"]["calibration"] == 240
    assert m["attack"]["name"] == "badnet" and m["defense"]["auroc"] > 0.95
    # triggered images of one's own instead of a known trigger: the images themselves are scored
    shutil.rmtree(out)
    rc, out = _evaluate(defended, tmp_path, "--triggered", str(defended["triggered"]), "--target", "0")
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["attack"] == {"name": "triggered-images", "target": 0, "images": m["sizes"]["test_triggered"],
                           "source": str(defended["triggered"])}
    assert m["dataset"]["splits"]["test"] == 80  # the held-out part of the detector's clean set
    assert m["attack_success_rate"] > 0.8 and m["defense"]["auroc"] > 0.95 and m["defense"]["tpr"] > 0.8
    assert (out / "examples.png").is_file() and "triggered-images" in (out / "report.md").read_text()
    # images that carry no trigger do not fool the model: the report says so instead of detection numbers
    shutil.rmtree(out)
    rc, out = _evaluate(defended, tmp_path, "--triggered", str(defended["test"]), "--target", "0")
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["attack_failed"] and "triggered images do not fool the model" in m["message"] and "defense" not in m


def test_the_held_out_part_is_split_again_and_checked(defended, tmp_path, capsys):
    # the recorded path is gone: say where the clean set is now with --clean
    moved = tmp_path / "moved"
    shutil.copytree(defended["clean"], moved)
    rc, out = _evaluate(defended, tmp_path, "--clean", str(moved), "--test-size", "50")
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"]["splits"]["test"] == 50 and m["sizes"]["test_clean"] == 50
    shutil.rmtree(out)
    # an image edited, or one removed, since defend: refused, as the held-out part could hold fitted images
    files = sorted(moved.rglob("*.png"))
    for f in files[::40]:  # 8 images: some of them are among the fitting or calibration images
        arr = np.array(Image.open(f))
        arr[0, 0] ^= 1
        Image.fromarray(arr).save(f)
    assert "does not split into the images the detector was fitted" in _refused(capsys, defended, tmp_path,
                                                                                "--clean", str(moved))
    files[1].unlink()
    assert "holds 319 images but the detector was made from 320" in _refused(capsys, defended, tmp_path,
                                                                             "--clean", str(moved))


def test_evaluate_mistakes_are_one_line_and_write_nothing(defended, tmp_path, capsys):
    d = defended
    cases = [
        (["--test", str(d["clean"])], "shares 120 image(s) with the data the detector was fitted on"),
        (["--test", str(d["test"]), "--clean", str(d["clean"])], "--clean and --test both say what to evaluate on"),
        (["--test", str(d["test"]), "--dataset", "imagefolder"], "--dataset and --test both say"),
        (["--allow-missing-classes"], "--allow-missing-classes goes with --test"),
        (["--triggered", str(d["triggered"])], "--triggered needs --target CLASS"),
        (["--triggered", str(d["triggered"]), "--target", "0", "--attack", "badnet"], "give one"),
        (["--triggered", str(d["triggered"]), "--target", "0", "--attack-param", "size=3"],
         "--triggered images carry their own"),
        (["--target", "1"], "--target describes an attack: give the attack with --attack NAME"),
        (["--triggered", str(d["triggered"]), "--target", "7"], "target class 7 is outside 0..3"),
        (["--test", str(d["tmp"] / "nowhere")], "does not exist"),
        (["--dataset", "cifar10"], "--dataset names a dataset, but detector"),
    ]
    for extra, message in cases:
        assert message in _refused(capsys, d, tmp_path, *extra), extra
    # a detector made without a held-out part, and one whose recorded clean set moved away
    det0 = tmp_path / "det0.safetensors"
    gone = tmp_path / "gone"
    shutil.copytree(d["clean"], gone)
    assert main(["defend", "--model", str(d["model"]), "--clean", str(gone), "--reserved", "100", "--calibration",
                 "100", "--holdout", "20", "--fpr", "0.05", "--device", "cpu", "--out", str(det0)]) == 0
    shutil.rmtree(gone)
    assert "is not there; say where it is now with --clean PATH" in _refused(capsys, d, tmp_path, detector=det0)
    assert main(["defend", "--model", str(d["model"]), "--clean", str(d["clean"]), "--fpr", "0.05", "--device", "cpu",
                 "--overwrite", "--out", str(det0)]) == 0
    assert "made with no held-out clean images" in _refused(capsys, d, tmp_path, detector=det0)
    # ... while --test works for it (and for any detector)
    assert _evaluate(d, tmp_path, "--test", str(d["test"]), detector=det0)[0] == 0
