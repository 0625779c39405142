"""Hostile and malformed dataset files: each ends in one BadExpertError, with bounded memory.

Every case writes a small file that used to make a reader allocate far more than the file's size
(an image of huge declared size, a gzip or zip bomb, an image that decided the size of the whole
set) or escape with a traceback (a corrupt zip member, a cut-off gzip stream). The peak resident
memory of the test process is measured around each load (Linux ``/proc/self/clear_refs`` resets
the high-water mark); where that reset is not allowed the memory assertion is skipped, the rest
of the test is not.
"""

from __future__ import annotations

import gzip
import io
import struct
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from badexpert.data import load_dataset
from badexpert.data.gtsrb import read_gtsrb
from badexpert.data.idx import read_fashion_mnist, read_idx, read_idx_header
from badexpert.data.imagefolder import MAX_IMAGE_FILE_BYTES, decode_images, file_source, open_image, read_imagefolder
from badexpert.errors import BadExpertError

from .conftest import bounded_memory

MB = 1024  # VmHWM is in kB


# --- file builders ----------------------------------------------------------------------------------
def constant_png(width: int, height: int, depth: int = 8) -> bytes:
    """A greyscale PNG of one colour, streamed through zlib (never held in memory as pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width * depth + 7) // 8)  # filter byte + zero pixels
    per_block = max(1, (1 << 22) // len(row))
    comp, parts, left = zlib.compressobj(9), [], height
    while left:
        k = min(left, per_block)
        parts.append(comp.compress(row * k))
        left -= k
    parts.append(comp.flush())
    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def image_bytes(h: int, w: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A small RGB image with a smooth pattern (so deflate has something to squeeze)."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 7 + seed) % 256, (y * 5 + seed) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def small_members(n_train: int = 6, n_test: int = 2, size=(8, 8), fmt: str = "PNG", ext: str = "png") -> dict:
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in ("a", "b"):
            for i in range(n):
                out[f"{split}/{cls}/{i + 1:03d}.{ext}"] = image_bytes(*size, fmt=fmt, seed=i)
    return out


def patch_central(path: Path, member: str, **fields: int) -> None:
    """Rewrite fields of ``member``'s central-directory entry: flag, crc, csize, usize."""
    offsets = {"flag": (8, "<H"), "crc": (16, "<I"), "csize": (20, "<I"), "usize": (24, "<I")}
    raw = bytearray(path.read_bytes())
    eocd = raw.rindex(b"PK\x05\x06")
    count, = struct.unpack_from("<H", raw, eocd + 10)
    pos, = struct.unpack_from("<I", raw, eocd + 16)
    for _ in range(count):
        assert raw[pos : pos + 4] == b"PK\x01\x02"
        n, m, k = struct.unpack_from("<HHH", raw, pos + 28)
        if raw[pos + 46 : pos + 46 + n].decode() == member:
            for key, value in fields.items():
                off, fmt = offsets[key]
                struct.pack_into(fmt, raw, pos + off, value)
            path.write_bytes(bytes(raw))
            return
        pos += 46 + n + m + k
    raise AssertionError(f"{member} not in {path}")


def member_data_span(path: Path, member: str) -> tuple[int, int]:
    """(start, length) of ``member``'s compressed data inside the zip file."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    raw = path.read_bytes()
    n, m = struct.unpack_from("<HH", raw, info.header_offset + 26)
    return info.header_offset + 30 + n + m, info.compress_size


def idx_header(code: int, *dims: int) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def write_idx_set(directory: Path, train_hw=(28, 28), test_hw=(28, 28), n_train=20, n_test=10, gz=True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    r = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": idx_header(8, n_train, *train_hw) + r.integers(0, 256, n_train * train_hw[0] * train_hw[1], dtype=np.uint8).tobytes(),
        "train-labels-idx1-ubyte": idx_header(8, n_train) + r.integers(0, 10, n_train, dtype=np.uint8).tobytes(),
        "t10k-images-idx3-ubyte": idx_header(8, n_test, *test_hw) + r.integers(0, 256, n_test * test_hw[0] * test_hw[1], dtype=np.uint8).tobytes(),
        "t10k-labels-idx1-ubyte": idx_header(8, n_test) + r.integers(0, 10, n_test, dtype=np.uint8).tobytes(),
    }
    for base, data in files.items():
        if gz:
            (directory / f"{base}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / base).write_bytes(data)


def zeros_gzip(total_mb: int) -> bytes:
    """``total_mb`` MiB of zeros as a multi-member gzip stream (about 1 KB per MiB), built cheaply."""
    return gzip.compress(bytes(1024**2)) * total_mb


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """A 12000 x 12000 greyscale PNG (144 Mpx, under Pillow's own limit of ~179 Mpx; ~140 KB)."""
    return constant_png(12000, 12000)


# --- image size is decided by the data set, not by its first image -------------------------------------
def test_big_first_image_is_resized_to_the_common_size(tmp_path):
    members = {"train/a/000.png": constant_png(2000, 2000), **small_members()}
    z = write_zip(tmp_path / "big-first.zip", members)
    assert z.stat().st_size < 200_000
    with bounded_memory(300), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, test = load_dataset("imagefolder", z)
    assert train.images.shape == (13, 3, 8, 8) and test.images.shape == (4, 3, 8, 8)
    assert train.meta["resized"] == 1 and test.meta["resized"] == 0
    notes = [str(w.message) for w in caught if "resized" in str(w.message)]
    assert len(notes) == 1 and "1 of 17 images were resized to 8x8" in notes[0]
    # the small images are untouched, the big one is resized (bilinear) from its own pixels
    assert torch.equal(train.images[1], torch.from_numpy(np.asarray(Image.open(io.BytesIO(members["train/a/001.png"]))).transpose(2, 0, 1).copy()))
    assert int(train.images[0].max()) == 0


def test_tiny_first_image_does_not_shrink_the_set(tmp_path):
    members = {"train/a/000.png": image_bytes(1, 1), **small_members(size=(8, 6))}
    z = write_zip(tmp_path / "tiny-first.zip", members)
    with pytest.warns(UserWarning, match="1 of 17 images were resized to 8x6"):
        train, test = read_imagefolder(z)
    assert train.image_size == (8, 6) and test.image_size == (8, 6) and train.meta["resized"] == 1


def test_size_ties_go_to_the_larger_size_then_the_first(tmp_path):
    members = {"train/a/000.png": image_bytes(4, 4), "train/a/001.png": image_bytes(6, 6),
               "test/a/000.png": image_bytes(4, 4), "test/a/001.png": image_bytes(6, 6)}
    with pytest.warns(UserWarning, match="2 of 4 images were resized to 6x6"):
        train, _ = read_imagefolder(write_zip(tmp_path / "tie.zip", members))
    assert train.image_size == (6, 6)
    members = {"train/a/000.png": image_bytes(4, 9), "train/a/001.png": image_bytes(9, 4),
               "test/a/000.png": image_bytes(4, 9), "test/a/001.png": image_bytes(9, 4)}
    with pytest.warns(UserWarning, match="resized to 4x9"):
        train, _ = read_imagefolder(write_zip(tmp_path / "tie2.zip", members))
    assert train.image_size == (4, 9)


def test_image_size_override(tmp_path):
    members = small_members(size=(8, 8))
    members["train/b/zzz.png"] = image_bytes(12, 10)
    z = write_zip(tmp_path / "toy.zip", members)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an asked-for size is not warned about
        train, test = load_dataset("imagefolder", z, image_size=(16, 16))
    assert train.image_size == (16, 16) and test.image_size == (16, 16)
    assert train.meta["resized"] == len(train) and test.meta["resized"] == len(test)
    want = np.asarray(Image.open(io.BytesIO(members["train/a/001.png"])).resize((16, 16), Image.Resampling.BILINEAR))
    assert torch.equal(train.images[0], torch.from_numpy(want.transpose(2, 0, 1).copy()))
    train, _ = load_dataset("cifar10", z, image_size=12)
    assert train.image_size == (12, 12) and train.name == "cifar10"
    train, _ = load_dataset("gtsrb", z, image_size=(10, 20))
    assert train.image_size == (10, 20) and train.name == "gtsrb"
    train, _ = load_dataset("gtsrb", z)
    assert train.image_size == (32, 32)
    for bad in (0, (3,), (2, -1), "16", True, 1.5):
        with pytest.raises(BadExpertError, match="image size must be a positive int"):
            load_dataset("imagefolder", z, image_size=bad)
    with pytest.raises(BadExpertError, match="above the limit"):
        load_dataset("imagefolder", z, image_size=5000)


def test_fixed_size_formats_refuse_another_image_size(tmp_path):
    write_idx_set(tmp_path / "fm")
    train, _ = load_dataset("fashion-mnist", tmp_path / "fm", image_size=28)
    assert train.image_size == (28, 28)
    with pytest.raises(BadExpertError, match="hold 28x28 images, which are not resized; image size 32x32"):
        load_dataset("fashion-mnist", tmp_path / "fm", image_size=32)
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    (batches / "test_batch").write_bytes(b"")
    with pytest.raises(BadExpertError, match="32x32 images, which are not resized; image size 28x28"):
        load_dataset("cifar10", tmp_path, image_size=(28, 28))


# --- pixel limits --------------------------------------------------------------------------------------
def test_huge_png_is_refused_from_its_header(tmp_path, huge_png):
    members = {**small_members(), "train/b/999.png": huge_png}
    z = write_zip(tmp_path / "huge.zip", members)
    t = time.perf_counter()
    with bounded_memory(100), pytest.raises(BadExpertError) as info:
        load_dataset("imagefolder", z)
    assert "train/b/999.png' is 12000x12000 pixels, outside the limit of 16 megapixels" in str(info.value)
    assert "\n" not in str(info.value) and time.perf_counter() - t < 5
    # a declared size decodes in one pass: still refused before decoding
    with bounded_memory(100), pytest.raises(BadExpertError, match="12000x12000 pixels"):
        load_dataset("gtsrb", z)
    (tmp_path / "huge.png").write_bytes(huge_png)
    with bounded_memory(100), pytest.raises(BadExpertError, match="12000x12000 pixels"):
        open_image(tmp_path / "huge.png")


@pytest.mark.parametrize(
    "width,height,message",
    [(10000, 10000, "'bomb.png' is 10000x10000 pixels, outside the limit"),  # Pillow warns: reported like ours
     (20000, 10000, r"'bomb.png' is too large to decode \(Image size \(200000000 pixels\) exceeds limit")],  # Pillow raises
)
def test_pillow_decompression_bombs_become_one_error(tmp_path, width, height, message):
    """Above Pillow's own limits, Image.open warns (89 Mpx) or raises (179 Mpx): both end in our error."""
    data = constant_png(width, height, depth=1)
    z = write_zip(tmp_path / "bomb.zip", {**small_members(), "test/b/bomb.png": data})
    with bounded_memory(100), warnings.catch_warnings():
        warnings.simplefilter("error")  # and no DecompressionBombWarning escapes either
        with pytest.raises(BadExpertError, match=message):
            open_image(data, "bomb.png")
        with pytest.raises(BadExpertError, match=message.replace("'bomb.png'", "bomb.zip:test/b/bomb.png'")):
            read_imagefolder(z)


def test_open_image_helper(tmp_path):
    im = open_image(image_bytes(5, 7), "x.png", mode="L")
    assert im.size == (7, 5) and im.mode == "L" and np.asarray(im).shape == (5, 7)
    (tmp_path / "t.png").write_bytes(image_bytes(3, 4))
    im = open_image(tmp_path / "t.png")
    assert im.mode == "RGB" and im.size == (4, 3) and np.asarray(im).shape == (3, 4, 3)
    with pytest.raises(BadExpertError, match="cannot decode image 'eps.png' .*not a JPEG, PNG"):
        open_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "eps.png")  # EPS would run Ghostscript
    with pytest.raises(BadExpertError, match="cannot decode image 'cut.png'"):
        open_image(image_bytes(30, 30)[:80], "cut.png")
    with pytest.raises(BadExpertError, match="above the limit of 64.0 MiB for one image file"):
        open_image(bytes(MAX_IMAGE_FILE_BYTES + 1), "big.png")
    with pytest.raises(BadExpertError, match="cannot read image file .*missing.png"):
        open_image(tmp_path / "missing.png")


# --- memory budget -------------------------------------------------------------------------------------
def test_memory_budget_refuses_and_image_size_helps(tmp_path, monkeypatch):
    z = write_zip(tmp_path / "toy.zip", small_members(n_train=10, n_test=2, size=(128, 128)))  # 24 x 3 x 128 x 128 = 1.1 MiB
    write_idx_set(tmp_path / "fm", n_train=2000, n_test=100)
    monkeypatch.setenv("BADEXPERT_MAX_MEMORY", "1M")
    with pytest.raises(BadExpertError, match=r"24 x 3 x 128 x 128 .* above the memory budget of 1\.0 MiB; .*--image-size"):
        load_dataset("imagefolder", z)
    train, _ = load_dataset("imagefolder", z, image_size=16)  # the hint works
    assert train.image_size == (16, 16)
    with pytest.raises(BadExpertError, match="Fashion-MNIST in .* above the memory budget of 1.0 MiB"):
        load_dataset("fashion-mnist", tmp_path / "fm")


# --- zip members ---------------------------------------------------------------------------------------
def test_corrupt_deflate_member(tmp_path):
    members = small_members(fmt="BMP", ext="bmp", size=(32, 32))  # uncompressed images: a long deflate stream
    z = write_zip(tmp_path / "flip.zip", members)
    start, length = member_data_span(z, "train/b/002.bmp")
    raw = bytearray(z.read_bytes())
    for k in range(start + length // 3, start + length // 3 + 16):
        raw[k] ^= 0xA5
    z.write_bytes(bytes(raw))
    with pytest.raises(BadExpertError, match=r"zip member '.*flip.zip:train/b/002.bmp' is damaged .*re-create the zip"):
        load_dataset("imagefolder", z)


def test_bad_crc_and_truncated_members(tmp_path):
    members = small_members()
    z = write_zip(tmp_path / "crc.zip", members, compression=zipfile.ZIP_STORED)
    start, length = member_data_span(z, "test/a/002.png")
    raw = bytearray(z.read_bytes())
    raw[start + length - 20] ^= 0xFF  # inside the PNG's last chunk: only the zip CRC notices
    z.write_bytes(bytes(raw))
    with pytest.raises(BadExpertError, match=r"zip member '.*test/a/002.png' is damaged \(Bad CRC-32"):
        read_imagefolder(z)

    z = write_zip(tmp_path / "short.zip", members)
    _, length = member_data_span(z, "train/a/003.png")
    patch_central(z, "train/a/003.png", csize=length // 2)  # the deflate data ends half-way
    with pytest.raises(BadExpertError, match=r"zip member '.*train/a/003.png' is (damaged|truncated)"):
        read_imagefolder(z)


def test_zip_bombs_and_unsupported_members(tmp_path):
    members = small_members()
    z = write_zip(tmp_path / "declared.zip", members)
    patch_central(z, "train/a/001.png", usize=3 * 1024**3)
    with bounded_memory(100), pytest.raises(BadExpertError, match=r"train/a/001.png' is 3.0 GiB, above the limit of 64.0 MiB"):
        read_imagefolder(z)

    # a member that lies: declares 100 bytes, holds 200 MiB of zeros (a ~200 KB zip)
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        with zf.open("train/b/000.png", "w", force_zip64=False) as fh:
            chunk = bytes(1024**2)
            for _ in range(200):
                fh.write(chunk)
    patch_central(path, "train/b/000.png", usize=100)
    t = time.perf_counter()
    with bounded_memory(100), pytest.raises(BadExpertError, match="train/b/000.png' is (damaged|truncated)"):
        read_imagefolder(path)
    assert time.perf_counter() - t < 5

    z = write_zip(tmp_path / "bz.zip", members, compression=zipfile.ZIP_BZIP2)
    with pytest.raises(BadExpertError, match="uses bzip2 compression; only stored or deflate"):
        read_imagefolder(z)
    z = write_zip(tmp_path / "enc.zip", members)
    patch_central(z, "test/b/001.png", flag=0x1)
    with pytest.raises(BadExpertError, match="test/b/001.png' is encrypted"):
        read_imagefolder(z)
    z = write_zip(tmp_path / "cd.zip", members)
    raw = bytearray(z.read_bytes())
    cd = raw.index(b"PK\x01\x02")
    raw[cd : cd + 2] = b"XX"  # a damaged central directory (the end record still says "zip")
    z.write_bytes(bytes(raw))
    with pytest.raises(BadExpertError, match=r"cannot read zip file '.*cd.zip' \(Bad magic number for central directory"):
        read_imagefolder(z)
    raw = bytearray(write_zip(tmp_path / "cd2.zip", members).read_bytes())
    cd = raw.rindex(b"PK\x05\x06")
    struct.pack_into("<I", raw, cd + 16, 7)  # the central directory's offset is wrong: members are misplaced
    (tmp_path / "cd2.zip").write_bytes(bytes(raw))
    with pytest.raises(BadExpertError, match="zip member .* is damaged"):
        read_imagefolder(tmp_path / "cd2.zip")


def test_directory_file_limits(tmp_path):
    root = tmp_path / "d"
    for name, data in small_members().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    big = root / "train" / "a" / "big.png"
    with open(big, "wb") as fh:  # sparse: takes no disk space
        fh.truncate(MAX_IMAGE_FILE_BYTES + 1)
    with bounded_memory(100), pytest.raises(BadExpertError, match="big.png' is 64.0 MiB, above the limit of 64.0 MiB"):
        read_imagefolder(root)
    label, read = file_source(root / "train" / "a" / "001.png")
    assert label.endswith("001.png") and read() == (root / "train" / "a" / "001.png").read_bytes()
    with pytest.raises(BadExpertError, match="no images to decode"):
        decode_images([])


# --- IDX -----------------------------------------------------------------------------------------------
def test_gzip_idx_bomb_is_refused_from_its_header(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header(8, 10**5, 10**4, 10**4)) + zeros_gzip(512))  # ~0.5 MB, 512 MiB inside
    t = time.perf_counter()
    with bounded_memory(100), pytest.raises(BadExpertError) as info:
        read_idx(path)
    msg = str(info.value)
    assert "100000 x 10000 x 10000 uint8 values" in msg and "above the memory budget" in msg and "\n" not in msg
    assert time.perf_counter() - t < 2
    assert read_idx_header(path).shape == (10**5, 10**4, 10**4)


def test_gzip_idx_with_trailing_bomb(tmp_path):
    """A plausible header followed by far more data than it declares: stop after what was promised."""
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_header(8, 10, 28, 28) + bytes(10 * 28 * 28)) + zeros_gzip(1024))
    t = time.perf_counter()
    with bounded_memory(100), pytest.raises(BadExpertError, match="has more data after the 7840 bytes its header promises"):
        read_idx(path)
    assert time.perf_counter() - t < 2


def test_idx_truncated_and_damaged(tmp_path):
    good = idx_header(8, 30, 28, 28) + bytes(range(256)) * 92  # 23552 data bytes
    (tmp_path / "a.gz").write_bytes(gzip.compress(good)[:-100])  # cut-off gzip stream
    with pytest.raises(BadExpertError, match=r"cannot read IDX file '.*a.gz' \(.*\); the file is damaged"):
        read_idx(tmp_path / "a.gz")
    (tmp_path / "b.gz").write_bytes(gzip.compress(good[:-500]))  # a whole gzip stream of too little data
    with pytest.raises(BadExpertError, match=r"b.gz' is truncated: its header promises 23520 data bytes \[30, 28, 28\] but it holds 23052"):
        read_idx(tmp_path / "b.gz")
    (tmp_path / "c").write_bytes(good[:-500])
    with pytest.raises(BadExpertError, match="is truncated: its header promises 23520 data bytes"):
        read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(good + b"xy")
    with pytest.raises(BadExpertError, match="has 34 bytes after the 23520"):
        read_idx(tmp_path / "d")
    crc = bytearray(gzip.compress(good))
    crc[-8] ^= 0xFF  # the gzip trailer's CRC
    (tmp_path / "e.gz").write_bytes(bytes(crc))
    with pytest.raises(BadExpertError, match="e.gz"):
        read_idx(tmp_path / "e.gz")
    (tmp_path / "f.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(BadExpertError, match="cannot read IDX file '.*f.gz'"):
        read_idx(tmp_path / "f.gz")
    with pytest.raises(BadExpertError, match="does not exist"):
        read_idx(tmp_path / "nope")
    wide = np.arange(6, dtype=">i4").reshape(2, 3)
    (tmp_path / "w").write_bytes(idx_header(0x0C, 2, 3) + wide.tobytes())
    out = read_idx(tmp_path / "w")
    assert out.dtype == np.int32 and out.dtype.isnative and out.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_train_test_idx_size_mismatch(tmp_path):
    write_idx_set(tmp_path, train_hw=(28, 28), test_hw=(32, 32))
    with pytest.raises(BadExpertError) as info:
        read_fashion_mnist(tmp_path)
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz' holds 28x28 images but" in msg
    assert "t10k-images-idx3-ubyte.gz' holds 32x32 images" in msg and "\n" not in msg


# --- GTSRB official layout (image files on disk) -----------------------------------------------------
def test_gtsrb_official_refuses_a_huge_image(tmp_path, huge_png):
    root = tmp_path / "GTSRB"
    cdir = root / "Final_Training" / "Images" / "00000"
    cdir.mkdir(parents=True)
    tdir = root / "Final_Test" / "Images"
    tdir.mkdir(parents=True)
    (cdir / "a.ppm").write_bytes(image_bytes(40, 40, fmt="PPM"))
    (cdir / "b.ppm").write_bytes(huge_png)
    (cdir / "GT-00000.csv").write_text("Filename;ClassId\na.ppm;0\nb.ppm;0\n")
    (tdir / "c.ppm").write_bytes(image_bytes(30, 30, fmt="PPM"))
    (root / "GT-final_test.csv").write_text("Filename;ClassId\nc.ppm;0\n")
    with bounded_memory(100), pytest.raises(BadExpertError, match="b.ppm' is 12000x12000 pixels"):
        read_gtsrb(tmp_path)
    (cdir / "b.ppm").write_bytes(image_bytes(20, 50, fmt="PPM"))
    train, test = read_gtsrb(tmp_path)
    assert train.images.shape == (2, 3, 32, 32) and train.meta["resized"] == 2 and test.meta["resized"] == 1
