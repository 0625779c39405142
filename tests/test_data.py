"""Dataset readers (IDX, CIFAR-10 pickles, GTSRB, ImageFolder), splits and augmentation.

Every reader is run on small files written here in the official formats; the real datasets are
checked at the end when present (the tests skip cleanly otherwise).
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from badexpert.data import Dataset, augment, load_dataset, split
from badexpert.data.cifar import CIFAR10_CLASSES, CIFAR10_MEAN, load_pickle, read_cifar10
from badexpert.data.gtsrb import GTSRB_MEAN, read_gtsrb
from badexpert.data.idx import FASHION_MNIST_CLASSES, read_fashion_mnist, read_idx
from badexpert.data.imagefolder import _scan_zip, decode_images, read_imagefolder
from badexpert.errors import BadExpertError

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- IDX / Fashion-MNIST ------------------------------------------------------------------------
def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file: zero, zero, type code, ndim, big-endian dims, big-endian data."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_fashion(directory: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    r = rng(1)
    arrays = {
        "train-images-idx3-ubyte": r.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": r.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": r.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": r.integers(0, 10, n_test, dtype=np.uint8),
    }
    for base, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (directory / f"{base}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / base).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_roundtrip(tmp_path, gz):
    arrays = write_fashion(tmp_path, gz=gz)
    train, test = load_dataset("fashion-mnist", tmp_path)
    assert train.images.shape == (12, 1, 28, 28) and test.images.shape == (5, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(train.labels.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert train.classes == FASHION_MNIST_CLASSES and train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert train.name == "fashion-mnist" and train.hflip
    assert train.mean == pytest.approx((0.2860,)) and test.std == pytest.approx((0.3530,))


def test_read_idx_types_and_shapes(tmp_path):
    a = (np.arange(24, dtype=np.int16) * -300).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(a))
    out = read_idx(tmp_path / "a.idx")
    assert out.dtype == np.int16 and out.dtype.isnative and np.array_equal(out, a)
    f = np.linspace(-1, 1, 10, dtype=np.float32)
    (tmp_path / "f.idx.gz").write_bytes(gzip.compress(idx_bytes(f)))
    assert np.array_equal(read_idx(tmp_path / "f.idx.gz"), f)


def test_idx_bad_magic(tmp_path):
    good = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    (tmp_path / "bad").write_bytes(b"\x08\x03" + good[2:])  # first two bytes must be zero
    with pytest.raises(BadExpertError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "code").write_bytes(good[:2] + b"\x07" + good[3:])  # unknown type code
    with pytest.raises(BadExpertError, match="not an IDX file"):
        read_idx(tmp_path / "code")


def test_idx_truncated(tmp_path):
    good = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    (tmp_path / "short").write_bytes(good[:-10])
    with pytest.raises(BadExpertError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "header").write_bytes(good[:9])
    with pytest.raises(BadExpertError, match="truncated inside its header"):
        read_idx(tmp_path / "header")
    (tmp_path / "short.gz").write_bytes(gzip.compress(good)[:-20])  # a cut-off gzip stream
    with pytest.raises(BadExpertError, match="short.gz"):
        read_idx(tmp_path / "short.gz")


def test_fashion_mnist_errors(tmp_path):
    arrays = write_fashion(tmp_path, gz=False)
    labels = arrays["train-labels-idx1-ubyte"]
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:-1]))
    with pytest.raises(BadExpertError, match="12 images but .* 11 labels"):
        read_fashion_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(BadExpertError, match="train-labels-idx1-ubyte"):
        read_fashion_mnist(tmp_path)


# --- CIFAR-10 python release --------------------------------------------------------------------
class Py2Pickler(pickle._Pickler):
    """Writes strings the way Python 2's cPickle did (``str`` opcodes, no ``_codecs`` global)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj) -> bytes:
    """Protocol-2 pickle like the official CIFAR-10 files (numpy 1's module name for _reconstruct)."""
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    data = buf.getvalue().replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")
    assert data.startswith(b"\x80\x02") and b"_codecs" not in data
    return data


def write_cifar(root: Path, per_batch: int = 4, n_test: int = 6) -> dict[str, np.ndarray]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    r = rng(2)
    out = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        data = r.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in r.integers(0, 10, n)]
        batch = {b"batch_label": f"{name} of 5".encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        (d / name).write_bytes(py2_pickle(batch))
        out[name] = (data, np.array(labels))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    (d / "batches.meta").write_bytes(py2_pickle(meta))
    return out


@pytest.mark.parametrize("parent", [True, False])
def test_cifar_python_release(tmp_path, parent):
    batches = write_cifar(tmp_path)
    train, test = load_dataset("cifar10", tmp_path if parent else tmp_path / "cifar-10-batches-py")
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    train_data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    # row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major
    assert np.array_equal(train.images.numpy().reshape(20, -1), train_data)
    assert int(train.images[0, 1, 2, 3]) == int(train_data[0, 1024 + 2 * 32 + 3])
    assert np.array_equal(train.labels.numpy(), train_labels)
    assert np.array_equal(test.images.numpy().reshape(6, -1), batches["test_batch"][0])
    assert np.array_equal(test.labels.numpy(), batches["test_batch"][1])
    assert train.classes == CIFAR10_CLASSES and test.classes == CIFAR10_CLASSES
    assert train.name == "cifar10" and train.hflip and train.mean == pytest.approx(CIFAR10_MEAN)


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_malicious_pickle(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": Evil(marker), b"labels": [0]}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(py2_pickle(evil))
    with pytest.raises(BadExpertError, match=r"refusing to unpickle (posix|os|nt)\.system from .*data_batch_3"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()
    (tmp_path / "x.pkl").write_bytes(pickle.dumps({"f": eval}, protocol=4))
    with pytest.raises(BadExpertError, match="refusing to unpickle builtins.eval"):
        load_pickle(tmp_path / "x.pkl")


def test_cifar_damaged_files(tmp_path):
    write_cifar(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "test_batch").write_bytes(py2_pickle({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(BadExpertError, match="3 images but 2 labels"):
        read_cifar10(tmp_path)
    (d / "test_batch").write_bytes(py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:-30])
    with pytest.raises(BadExpertError, match="test_batch"):
        read_cifar10(tmp_path)
    (d / "data_batch_5").unlink()
    (d / "test_batch").unlink()
    with pytest.raises(BadExpertError, match="lacks data_batch_5, test_batch"):
        read_cifar10(tmp_path)


# --- image files -------------------------------------------------------------------------------
def save_image(path: Path, arr: np.ndarray, fmt: str | None = None, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)


def resized(arr: np.ndarray) -> torch.Tensor:
    """What the readers should give for an RGB image resized to 32x32: Pillow's bilinear, as [C, H, W]."""
    out = np.array(Image.fromarray(arr).resize((32, 32), Image.Resampling.BILINEAR))
    return torch.from_numpy(out.transpose(2, 0, 1))


def make_folder(root: Path, ext: str = "png", classes=("cat", "ant", "bee"), n=(3, 2), size=(6, 5)):
    """train/<class>/ and test/<class>/ with random RGB images; returns {split: [(array, class)]} in load order.

    JPEG images are smooth (8x8 blocks of one colour) so that the lossy round trip stays close.
    """
    r = rng(3)
    expected = {"train": [], "test": []}
    for split_name, count in zip(("train", "test"), n):
        for cls in sorted(classes):
            for i in range(count):
                if ext == "jpg":
                    blocks = r.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
                    arr = np.kron(blocks, np.ones((8, 8, 1), np.uint8))
                else:
                    arr = r.integers(0, 256, (*size, 3), dtype=np.uint8)
                save_image(root / split_name / cls / f"{i:03d}.{ext}", arr, quality=95, subsampling=0)
                expected[split_name].append((arr, cls))
    return expected


def check_roundtrip(train: Dataset, test: Dataset, expected, exact: bool = True):
    classes = sorted({c for _, c in expected["train"]})
    assert train.classes == classes and test.classes == classes
    for ds, rows in ((train, expected["train"]), (test, expected["test"])):
        assert len(ds) == len(rows)
        assert ds.labels.tolist() == [classes.index(c) for _, c in rows]
        want = torch.from_numpy(np.stack([a for a, _ in rows]).transpose(0, 3, 1, 2))
        assert ds.images.shape == want.shape and ds.images.dtype == torch.uint8
        if exact:
            assert torch.equal(ds.images, want)
        else:
            assert (ds.images.float() - want.float()).abs().mean() < 3


def zip_dir(src: Path, dest: Path, prefix: str = "", compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(dest, "w", compression) as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, prefix + f.relative_to(src).as_posix())
    return dest


def test_imagefolder_directory_png_exact(tmp_path):
    expected = make_folder(tmp_path / "data")
    (tmp_path / "data" / "train" / "ant" / "notes.txt").write_text("not an image")  # ignored
    train, test = read_imagefolder(tmp_path / "data", name="toy")
    check_roundtrip(train, test, expected)
    assert train.classes == ["ant", "bee", "cat"] and train.name == "toy"
    assert test.mean == train.mean and test.std == train.std  # both splits normalise alike


@pytest.mark.parametrize("prefix", ["", "toy/"])
def test_imagefolder_zip(tmp_path, prefix):
    expected = make_folder(tmp_path / "data")
    z = zip_dir(tmp_path / "data", tmp_path / "toy.zip", prefix=prefix)
    train, test = load_dataset("imagefolder", z)
    check_roundtrip(train, test, expected)


def test_imagefolder_jpeg_zip_and_nested_directory(tmp_path):
    expected = make_folder(tmp_path / "outer" / "inner", ext="jpg", size=(16, 16))
    train, test = read_imagefolder(tmp_path / "outer")  # one extra level is found
    check_roundtrip(train, test, expected, exact=False)
    z = zip_dir(tmp_path / "outer" / "inner", tmp_path / "j.zip", compression=zipfile.ZIP_STORED)
    train2, test2 = read_imagefolder(z)
    assert torch.equal(train2.images, train.images) and torch.equal(test2.labels, test.labels)


def test_imagefolder_grey_resize_and_mixed(tmp_path):
    r = rng(4)
    grey = [r.integers(0, 256, (7, 9), dtype=np.uint8) for _ in range(3)]
    save_image(tmp_path / "g" / "train" / "a" / "0.png", grey[0])
    save_image(tmp_path / "g" / "train" / "b" / "0.pgm", grey[1])
    save_image(tmp_path / "g" / "test" / "a" / "0.bmp", grey[2])
    train, test = read_imagefolder(tmp_path / "g")
    assert train.images.shape == (2, 1, 7, 9) and torch.equal(test.images[0, 0], torch.from_numpy(grey[2]))

    # mixed grey and colour -> RGB with the grey image in all three channels; the most common size wins
    colour = r.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    save_image(tmp_path / "g" / "test" / "b" / "1.ppm", colour)
    with pytest.warns(UserWarning, match="1 of 4 images were resized to 7x9"):
        train, test = read_imagefolder(tmp_path / "g")
    assert train.images.shape == (2, 3, 7, 9) and test.images.shape == (2, 3, 7, 9)
    assert all(torch.equal(train.images[0, c], torch.from_numpy(grey[0])) for c in range(3))
    resized = np.array(Image.fromarray(colour).resize((9, 7), Image.Resampling.BILINEAR))
    assert torch.equal(test.images[1], torch.from_numpy(resized.transpose(2, 0, 1)))

    train, test = read_imagefolder(tmp_path / "g", size=4)
    assert train.images.shape == (2, 3, 4, 4) and test.images.shape == (2, 3, 4, 4)
    train, _ = read_imagefolder(tmp_path / "g", size=(3, 5))
    assert train.image_size == (3, 5)


def test_imagefolder_errors(tmp_path):
    make_folder(tmp_path / "d")
    (tmp_path / "d" / "test" / "zebra").mkdir()
    save_image(tmp_path / "d" / "test" / "zebra" / "0.png", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(BadExpertError, match="zebra"):
        read_imagefolder(tmp_path / "d")

    make_folder(tmp_path / "e")
    (tmp_path / "e" / "train" / "empty").mkdir()
    with pytest.raises(BadExpertError, match="train/empty holds no images"):
        read_imagefolder(tmp_path / "e")
    with pytest.raises(BadExpertError, match="train/empty holds no images"):
        read_imagefolder(zip_dir(tmp_path / "e", tmp_path / "e.zip"))

    make_folder(tmp_path / "c")
    bad = tmp_path / "c" / "train" / "bee" / "001.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    with pytest.raises(BadExpertError, match="001.png"):
        read_imagefolder(tmp_path / "c")
    (tmp_path / "c" / "train" / "bee" / "001.png").write_bytes(b"garbage")
    with pytest.raises(BadExpertError, match="cannot decode image .*001.png"):
        read_imagefolder(zip_dir(tmp_path / "c", tmp_path / "c.zip"))

    make_folder(tmp_path / "n", n=(2, 0))
    with pytest.raises(BadExpertError, match="no test/ folder"):
        read_imagefolder(tmp_path / "n")
    with pytest.raises(BadExpertError, match="test/"):
        read_imagefolder(zip_dir(tmp_path / "n", tmp_path / "n.zip"))
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(BadExpertError, match="neither a directory nor a zip"):
        read_imagefolder(tmp_path / "plain.txt")


def test_cifar_and_gtsrb_imagefolder_delegation(tmp_path):
    expected = make_folder(tmp_path / "d", classes=("00", "01", "02"), size=(40, 36))
    z = zip_dir(tmp_path / "d", tmp_path / "g.zip")
    train, test = load_dataset("gtsrb", z)
    assert train.name == "gtsrb" and not train.hflip and train.mean == pytest.approx(GTSRB_MEAN)
    assert train.images.shape == (9, 3, 32, 32) and test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(train.images[0], resized(expected["train"][0][0]))

    expected = make_folder(tmp_path / "c", classes=CIFAR10_CLASSES[:3], n=(1, 1), size=(32, 32))
    train, test = load_dataset("cifar-10", tmp_path / "c")
    check_roundtrip(train, test, expected)
    assert train.name == "cifar10" and train.hflip and train.mean == pytest.approx(CIFAR10_MEAN)


# --- GTSRB official layout ----------------------------------------------------------------------
CSV_HEADER = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]


def write_gt_csv(path: Path, rows) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=";")
        w.writerow(CSV_HEADER)
        for name, arr, label in rows:
            h, wd = arr.shape[:2]
            w.writerow([name, wd, h, 1, 1, wd - 2, h - 2, label])


def write_gtsrb(base: Path, test_csv_at: str = "root"):
    """A tiny official GTSRB tree under ``base/GTSRB``; returns expected (train, test) [(array, label)]."""
    root = base / "GTSRB"
    r = rng(5)
    train, test = [], []
    for cls in (0, 2):
        cdir = root / "Final_Training" / "Images" / f"{cls:05d}"
        rows = []
        for i in range(2):
            arr = r.integers(0, 256, (40 + i, 35 + cls, 3), dtype=np.uint8)
            name = f"00000_{i:05d}.ppm"
            save_image(cdir / name, arr)
            rows.append((name, arr, cls))
            train.append((arr, cls))
        write_gt_csv(cdir / f"GT-{cls:05d}.csv", rows)
    tdir = root / "Final_Test" / "Images"
    rows = []
    for i, label in enumerate([2, 0, 42]):
        arr = r.integers(0, 256, (30 + i, 28, 3), dtype=np.uint8)
        save_image(tdir / f"{i:05d}.ppm", arr)
        rows.append((f"{i:05d}.ppm", arr, label))
        test.append((arr, label))
    # the unlabelled test CSV of GTSRB_Final_Test_Images.zip: no ClassId column
    with open(tdir / "GT-final_test.test.csv", "w") as fh:
        fh.write("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\n")
    where = {"root": root, "images": tdir, "parent": base}[test_csv_at]
    write_gt_csv(where / "GT-final_test.csv", rows)
    return train, test


@pytest.mark.parametrize("test_csv_at,given", [("root", "parent"), ("images", "gtsrb"), ("parent", "parent")])
def test_gtsrb_official(tmp_path, test_csv_at, given):
    exp_train, exp_test = write_gtsrb(tmp_path, test_csv_at)
    train, test = load_dataset("gtsrb", tmp_path if given == "parent" else tmp_path / "GTSRB")
    assert train.images.shape == (4, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.labels.tolist() == [0, 0, 2, 2] and test.labels.tolist() == [2, 0, 42]
    assert train.classes == [f"{i:02d}" for i in range(43)]
    assert not train.hflip and train.name == "gtsrb" and test.mean == pytest.approx(GTSRB_MEAN)
    for ds, rows in ((train, exp_train), (test, exp_test)):
        for k, (arr, _) in enumerate(rows):
            assert torch.equal(ds.images[k], resized(arr))  # whole image, bilinear, no ROI crop


def test_gtsrb_missing_csvs(tmp_path):
    write_gtsrb(tmp_path, "root")
    (tmp_path / "GTSRB" / "GT-final_test.csv").unlink()
    with pytest.raises(BadExpertError, match="GT-final_test.csv are missing.*GTSRB_Final_Test_GT.zip"):
        read_gtsrb(tmp_path)
    (tmp_path / "GTSRB" / "Final_Test" / "GT-final_test.csv").write_text("Filename;Width\n00000.ppm;28\n")
    with pytest.raises(BadExpertError, match="ClassId column.*GTSRB_Final_Test_GT.zip"):
        read_gtsrb(tmp_path)
    (tmp_path / "GTSRB" / "Final_Training" / "Images" / "00002" / "GT-00002.csv").unlink()
    with pytest.raises(BadExpertError, match="GT-00002.csv' is missing"):
        read_gtsrb(tmp_path)


def test_gtsrb_not_a_copy(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(BadExpertError, match="not a GTSRB copy"):
        read_gtsrb(tmp_path)


# --- splits and augmentation ----------------------------------------------------------------------
def indexed(n: int, name: str) -> Dataset:
    """A dataset whose image i carries i in its first two pixels (to recover indices after a split)."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 0, 0, 1] = torch.arange(n) // 256
    return Dataset(images, torch.arange(n) % 3, ["a", "b", "c"], name=name)


def ids(ds: Dataset) -> list[int]:
    return (ds.images[:, 0, 0, 0].long() + 256 * ds.images[:, 0, 0, 1].long()).tolist()


def test_split_disjoint_sizes_and_seeds():
    train, test = indexed(300, "tr"), indexed(500, "te")
    s = split(train, test, seed=1, reserved=100, calibration=50)
    assert s.sizes() == {"train": 300, "reserved": 100, "calibration": 50, "test": 350}
    r, c, t = ids(s.reserved), ids(s.calibration), ids(s.test)
    assert not (set(r) & set(c) or set(r) & set(t) or set(c) & set(t))
    assert sorted(r + c + t) == list(range(500))
    assert s.reserved.labels.tolist() == [i % 3 for i in r]  # labels travel with their images
    again = split(train, test, seed=1, reserved=100, calibration=50)
    assert ids(again.reserved) == r and ids(again.test) == t
    other = split(train, test, seed=2, reserved=100, calibration=50)
    assert ids(other.reserved) != r
    capped = split(train, test, seed=1, reserved=100, calibration=50, train_size=120, test_size=30)
    assert capped.sizes() == {"train": 120, "reserved": 100, "calibration": 50, "test": 30}
    assert ids(capped.test) == t[:30] and len(set(ids(capped.train))) == 120
    with pytest.raises(BadExpertError, match="fewer than reserved"):
        split(train, test, seed=1, reserved=400, calibration=100)


def test_augment_identity_flip_crop_and_seeding():
    x = torch.rand(64, 3, 8, 6)
    assert torch.equal(augment(x, pad=0, hflip=False, generator=torch.Generator().manual_seed(0)), x)

    flipped = augment(x, hflip=True, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5
    assert 0 < int(mask.sum()) < 64
    assert torch.equal(flipped[mask], x[mask].flip(3)) and torch.equal(flipped[~mask], x[~mask])

    pad = 2
    cropped = augment(x, pad=pad, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    dy = torch.randint(0, 2 * pad + 1, (64,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (64,), generator=g)
    padded = F.pad(x, (pad, pad, pad, pad))
    for k in (0, 17, 63):
        want = padded[k, :, dy[k] : dy[k] + 8, dx[k] : dx[k] + 6]
        assert torch.equal(cropped[k], want)
    assert cropped.shape == x.shape and len({(int(a), int(b)) for a, b in zip(dy, dx)}) > 1

    a = augment(x, pad=pad, hflip=True, generator=torch.Generator().manual_seed(9))
    b = augment(x, pad=pad, hflip=True, generator=torch.Generator().manual_seed(9))
    c = augment(x, pad=pad, hflip=True, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- the real datasets, when present ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed (Debian dataset-fashion-mnist)")
def test_real_fashion_mnist():
    train, test = load_dataset("fashion-mnist")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape[1:] == (1, 28, 28) and train.classes == FASHION_MNIST_CLASSES
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert float(train.images[:10000].float().mean() / 255) == pytest.approx(0.286, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize(
    "zip_name,counts,classes",
    [("cifar10-jpeg.zip", (50000, 10000), CIFAR10_CLASSES), ("gtsrb32-jpeg.zip", (39209, 12630), [f"{i:02d}" for i in range(43)])],
)
def test_shared_zip_listing_and_first_images(zip_name, counts, classes):
    """The full loads take ~10 s each; here: the listing, and the first images of each split decoded."""
    path = SHARED_DATA / zip_name
    if not path.is_file():
        pytest.skip(f"{path} absent")
    with zipfile.ZipFile(path) as zf:
        train_src, test_src, found = _scan_zip(zf, path)
        assert found == classes and (len(train_src), len(test_src)) == counts
        assert [label for _, label in train_src[:1]] == [0] and train_src[-1][1] == len(classes) - 1
        images = decode_images([s for s, _ in train_src[:8] + test_src[:8]], (32, 32))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    assert 20 < float(images.float().mean()) < 235 and float(images.float().std()) > 10
