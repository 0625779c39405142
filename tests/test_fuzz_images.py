"""Fuzz rows for image pixel modes and data-set paths (issue 16, classes 3 and 10).

**Pixel modes.** Every Pillow mode is written in every format Pillow can write it in (PNG, PPM,
TIFF), next to hand-made 16-bit files Pillow cannot write (16-bit grey, grey+alpha, RGB and RGBA
PNGs; PGMs and PPMs of maxval 65535 and 1023, raw and plain). Each file is read by every reader of
untrusted image files -- the single-image decoder (``open_image``: trigger images), the service's
``decode_image`` and the ImageFolder reader -- and must come out at the scale of the same content
in 8 bits (within 1), or be refused in one line, by all of them alike. Through the CLI a refused
file ends in exit status 2, one line, nothing written. The rule itself (``to_8bit``) is also run
on an in-memory image of every mode Pillow knows.

**Paths.** Zip member names and folder paths that climb (``..``), are absolute, hold a backslash, a
drive letter or control characters are refused in one line; plain names (spaces, accents, dots
inside a name) still load.

**CIFAR pickles.** Every pickle opcode, with no argument bytes and with some, in a
``batches.meta``: a value or one line, never a raw exception or two lines.
"""

from __future__ import annotations

import io
import pickletools
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from badexpert import load_dataset
from badexpert.attacks.base import load_trigger_image
from badexpert.data.cifar import load_pickle
from badexpert.data.gtsrb import read_gtsrb_official
from badexpert.data.imagefolder import read_imagefolder
from badexpert.errors import BadExpertError
from badexpert.imagefile import open_image, to_8bit
from badexpert.serve import RequestError, decode_image

from .conftest import bounded_memory
from .test_data import write_cifar, write_gtsrb
from .test_fuzz import MEM_LIMIT_MB, image_folder_members, png_bytes, run_cli, write_folder, write_zip

# small, and valid: 99 calibration inputs reach the default target FPR of 0.01, so the option checks
# pass and the data is read
TRAIN_ARGS = ["--reserved", "2", "--calibration", "99", "--epochs", "1", "--batch-size", "4"]

H, W = 5, 6
_r = np.random.default_rng(16)
GREY = _r.integers(0, 256, (H, W), dtype=np.uint8)
GREY[0, :3] = (0, 255, 128)  # black, white and mid-grey always present
RGBA = _r.integers(0, 256, (H, W, 4), dtype=np.uint8)
RGB = np.ascontiguousarray(RGBA[..., :3])
ALPHA = np.ascontiguousarray(RGBA[..., 3])


# --- the 8-bit content in other modes ---------------------------------------------------------------
def _wide(mode: str, values: np.ndarray, dtype: str) -> Image.Image:
    return Image.frombytes(mode, (W, H), values.astype(dtype).tobytes())


def _grey8() -> Image.Image:
    return Image.fromarray(GREY)


G16 = GREY.astype(np.uint32) * 257  # the standard 8-to-16-bit expansion (PNG, PNM)


@dataclass(frozen=True)
class Source:
    """An in-memory image, the same content in 8 bits (``None``: refused), whether it is grey,
    the refusal expected per format (``"*"``: every format), the formats to write it in."""

    image: Image.Image
    ref8: Image.Image | None
    grey: bool
    refusal: dict
    tol: int = 0
    formats: tuple = ("PNG", "PPM", "TIFF")


def _sources() -> dict[str, Source]:
    rgb = Image.fromarray(RGB)
    pal = rgb.convert("P")  # no transparency: Pillow warns when converting a P image that has some
    f_nan = (GREY / 255).astype(np.float32)
    f_nan[1, 1] = np.nan
    f_neg = (GREY / 255).astype(np.float32)
    f_neg[2, 2] = -0.25
    return {
        # 1- and 8-bit modes: Pillow's own conversion of the same in-memory image
        "1": Source(Image.fromarray(GREY > 127), None, True, {}),
        "L": Source(_grey8(), None, True, {}),
        "P": Source(pal, None, False, {}),
        "RGB": Source(rgb, None, False, {}),
        "RGBA": Source(Image.fromarray(RGBA, "RGBA"), None, False, {}),
        "RGBX": Source(rgb.convert("RGBX"), None, False, {}),
        "LA": Source(Image.fromarray(np.dstack([GREY, ALPHA]), "LA"), None, True, {}),
        "PA": Source(pal.convert("PA"), None, False, {}),
        "CMYK": Source(rgb.convert("CMYK"), None, False, {}),
        "YCbCr": Source(rgb.convert("YCbCr"), None, False, {}),
        "LAB": Source(rgb.convert("LAB"), rgb.convert("LAB").convert("RGB"), False, {}),
        # wide grey modes: the 8-bit grey image, scaled
        "I;16": Source(_wide("I;16", G16, "<u2"), _grey8(), True, {}),
        "I;16L": Source(_wide("I;16L", G16, "<u2"), _grey8(), True, {}),
        "I;16B": Source(_wide("I;16B", G16, ">u2"), _grey8(), True, {}),
        "I;16N": Source(_wide("I;16N", G16, "=u2"), _grey8(), True, {}),
        "I;16-shifted": Source(_wide("I;16", GREY.astype(np.uint32) << 8, "<u2"), _grey8(), True, {}, tol=1),
        "I": Source(Image.fromarray(G16.astype(np.int32)), _grey8(), True, {"TIFF": "32-bit integer"}),
        "I-0..255": Source(Image.fromarray(GREY.astype(np.int32)), None, True, {"TIFF": "32-bit integer"},
                           formats=("TIFF",)),
        "F": Source(Image.fromarray((GREY / 255).astype(np.float32)), _grey8(), True, {}),
        "F-0..255": Source(Image.fromarray(GREY.astype(np.float32)), None, True, {"*": "outside [0, 1]"}),
        "F-negative": Source(Image.fromarray(f_neg), None, True, {"*": "outside [0, 1]"}),
        "F-nan": Source(Image.fromarray(f_nan), None, True, {"*": "NaN"}),
    }


SOURCES = _sources()
SUFFIX = {"PNG": ".png", "PPM": ".ppm", "TIFF": ".tif"}


@dataclass(frozen=True)
class Row:
    id: str
    data: bytes
    suffix: str
    ref8: Image.Image | None  # the same content in 8 bits, or None when refused
    grey: bool
    refusal: str | None
    tol: int = 0

    def expected(self, target: str) -> np.ndarray:
        assert self.ref8 is not None
        return np.asarray(self.ref8.convert(target), dtype=np.int64)


def _mode_rows() -> list[Row]:
    rows = []
    for name, src in SOURCES.items():
        for fmt in src.formats:
            buf = io.BytesIO()
            try:
                src.image.save(buf, format=fmt)
            except (OSError, KeyError, ValueError):  # Pillow cannot write this mode in this format
                continue
            refusal = src.refusal.get(fmt, src.refusal.get("*"))
            ref8 = None if refusal else (src.ref8 or src.image)
            rows.append(Row(f"{name}-{fmt}", buf.getvalue(), SUFFIX[fmt], ref8, src.grey, refusal, src.tol))
    return rows


# --- hand-made wide files Pillow cannot write ----------------------------------------------------------
def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG of ``arr`` (uint16, [H, W] or [H, W, 2|3|4]: grey, grey+alpha, RGB, RGBA)."""
    k = 1 if arr.ndim == 2 else arr.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[k]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = arr.reshape(arr.shape[0], -1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def pnm(arr: np.ndarray, maxval: int, plain: bool = False) -> bytes:
    """A PGM ([H, W]) or PPM ([H, W, 3]) of ``arr`` (values up to ``maxval``), raw or plain (ASCII)."""
    colour = arr.ndim == 3
    magic = ("P3" if colour else "P2") if plain else ("P6" if colour else "P5")
    head = f"{magic}\n{arr.shape[1]} {arr.shape[0]}\n{maxval}\n".encode()
    if plain:
        return head + " ".join(str(int(v)) for v in arr.ravel()).encode() + b"\n"
    return head + arr.astype(">u2" if maxval > 255 else "u1").tobytes()


def _scaled(arr8: np.ndarray, maxval: int) -> np.ndarray:
    return np.rint(arr8.astype(np.float64) * maxval / 255).astype(np.uint32)


def _hand_rows() -> list[Row]:
    la = np.dstack([GREY, ALPHA])
    grey8, rgb8 = _grey8(), Image.fromarray(RGB)
    rows = [
        Row("png16-grey", png16(G16), ".png", grey8, True, None),
        Row("png16-grey-shifted", png16(GREY.astype(np.uint32) << 8), ".png", grey8, True, None, tol=1),
        # Pillow opens a 16-bit grey+alpha PNG as RGBA: grey content in three channels
        Row("png16-grey-alpha", png16(la.astype(np.uint32) * 257), ".png", grey8, False, None, tol=1),
        Row("png16-rgb", png16(RGB.astype(np.uint32) * 257), ".png", rgb8, False, None, tol=1),
        Row("png16-rgba", png16(RGBA.astype(np.uint32) * 257), ".png", rgb8, False, None, tol=1),
        Row("png16-rgb-shifted", png16(RGB.astype(np.uint32) << 8), ".png", rgb8, False, None, tol=1),
    ]
    for maxval in (65535, 1023, 300):
        for plain in (False, True):
            kind = f"{'plain' if plain else 'raw'}-maxval{maxval}"
            rows.append(Row(f"pgm-{kind}", pnm(_scaled(GREY, maxval), maxval, plain), ".pgm", grey8, True, None, tol=1))
            rows.append(Row(f"ppm-{kind}", pnm(_scaled(RGB, maxval), maxval, plain), ".ppm", rgb8, False, None, tol=1))
    return rows


ROWS = _mode_rows() + _hand_rows()
ROW_IDS = [r.id for r in ROWS]


def _params(rows=ROWS):
    return [pytest.param(r, id=r.id) for r in rows]


def _one_line_refusal(exc: BaseException, row: Row) -> str:
    text = str(exc)
    assert text and len(text.splitlines()) == 1 and "\n" not in text, repr(text)
    assert row.refusal in text, f"expected {row.refusal!r} in: {text}"
    return text


def _close(got: np.ndarray, want: np.ndarray, tol: int) -> None:
    got = np.asarray(got, dtype=np.int64)
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = int(np.abs(got - want).max())
    assert diff <= tol, f"off by up to {diff} from the same image in 8 bits (allowed {tol}):\n{got}\n{want}"


# --- the grid covers what the probe found -----------------------------------------------------------
def test_grid_covers_the_wide_modes_in_every_format():
    """The rows are generated from what Pillow can write: make sure the wide ones are there."""
    for needed in ("I;16-PNG", "I;16-PPM", "I;16-TIFF", "I;16B-TIFF", "I-PPM", "I-TIFF", "F-PPM", "F-TIFF",
                   "F-0..255-TIFF", "F-nan-PPM", "L-PNG", "RGB-PPM", "CMYK-TIFF", "LAB-TIFF"):
        assert needed in ROW_IDS, needed
    # and the wide files really open in a wide mode (else the rows would test nothing)
    for rid, mode in (("I;16-PNG", "I;16"), ("I;16-PPM", "I"), ("F-TIFF", "F"), ("png16-grey", "I;16"),
                      ("pgm-raw-maxval65535", "I")):
        row = ROWS[ROW_IDS.index(rid)]
        with Image.open(io.BytesIO(row.data)) as im:
            assert im.mode == mode, (rid, im.mode)


def test_the_probe_case_16_bit_png_is_not_white():
    """The reproduction: a 16-bit PNG decoded almost all white (the 8-bit clip of Pillow's I;16 -> L)."""
    im = open_image(png16(G16), "x.png", mode="L")
    assert np.array_equal(np.asarray(im), GREY)
    with Image.open(io.BytesIO(png16(G16))) as raw:  # what Pillow alone gives: the bug this guards against
        assert (np.asarray(raw.convert("L")) == 255).mean() > 0.9


# --- the single-image decoder (trigger images, refool) and the service --------------------------------
@pytest.mark.parametrize("row", _params())
@pytest.mark.parametrize("target", ["L", "RGB"])
def test_open_image(row, target):
    if row.refusal:
        with pytest.raises(BadExpertError) as e:
            open_image(row.data, f"x{row.suffix}", mode=target)
        assert f"x{row.suffix}" in _one_line_refusal(e.value, row)
        return
    im = open_image(row.data, f"x{row.suffix}", mode=target)
    assert im.mode == target and im.size == (W, H)
    _close(np.asarray(im), row.expected(target), row.tol)


@pytest.mark.parametrize("row", _params())
def test_open_image_without_mode_gives_an_8_bit_image(row):
    if row.refusal:
        with pytest.raises(BadExpertError):
            open_image(row.data, "x")
        return
    im = open_image(row.data, "x")
    assert np.asarray(im).dtype in (np.uint8, np.bool_)  # 8-bit samples (mode 1: bits)
    _close(np.asarray(im.convert("RGB")), row.expected("RGB"), row.tol)


@pytest.mark.parametrize("row", _params())
@pytest.mark.parametrize("channels", [1, 3])
def test_service_decode_image(row, channels):
    """The service answered 200 with another label than the same image in 8 bits: same pixels now."""
    if row.refusal:
        with pytest.raises(RequestError) as e:
            decode_image(row.data, f"up{row.suffix}", (channels, H, W), False)
        _one_line_refusal(e.value, row)
        assert e.value.status == 422
        return
    arr, resized = decode_image(row.data, f"up{row.suffix}", (channels, H, W), False)
    assert arr.dtype == np.uint8 and arr.shape == (channels, H, W) and not resized
    want = row.expected("L")[None] if channels == 1 else row.expected("RGB").transpose(2, 0, 1)
    _close(arr, want, row.tol)


WIDE_ROWS = [r for r in ROWS if r.id.startswith(("I;16-", "I-", "F", "png16", "pgm", "ppm"))]


@pytest.mark.parametrize("row", _params(WIDE_ROWS))
def test_trigger_image(row, tmp_path):
    path = tmp_path / f"trigger{row.suffix}"
    path.write_bytes(row.data)
    channels = 1 if row.grey else 3
    if row.refusal:
        with pytest.raises(BadExpertError) as e:
            load_trigger_image(str(path), channels, (H, W))
        _one_line_refusal(e.value, row)
        return
    t = load_trigger_image(str(path), channels, (H, W)).numpy()
    want = row.expected("L")[None] if channels == 1 else row.expected("RGB").transpose(2, 0, 1)
    _close(np.rint(t * 255), want, row.tol)


# --- the data-set readers ------------------------------------------------------------------------------
def _folder_of(row: Row, root: Path) -> Path:
    return write_folder(root, {f"{split}/{cls}/0{row.suffix}": row.data for split in ("train", "test") for cls in "ab"})


@pytest.mark.parametrize("row", _params())
@pytest.mark.parametrize("size", [None, (H, W)], ids=["size-chosen", "size-declared"])
def test_imagefolder(row, size, tmp_path):
    folder = _folder_of(row, tmp_path / "data")
    if row.refusal:
        with pytest.raises(BadExpertError) as e:
            read_imagefolder(folder, size=size)
        assert f"0{row.suffix}" in _one_line_refusal(e.value, row)
        return
    train, test = read_imagefolder(folder, size=size)
    channels = 1 if row.grey else 3
    assert train.images.shape == (2, channels, H, W) and test.images.shape == (2, channels, H, W)
    want = row.expected("L")[None] if row.grey else row.expected("RGB").transpose(2, 0, 1)
    for x in (*train.images, *test.images):
        _close(x.numpy(), want, row.tol)


def test_imagefolder_mixing_8_and_16_bit_files(tmp_path):
    """One zip with the same picture as an 8-bit PNG, a 16-bit PNG, a 16-bit PGM and a float TIFF."""
    ftif = io.BytesIO()
    Image.fromarray((GREY / 255).astype(np.float32)).save(ftif, format="TIFF")
    members = {
        "train/a/8bit.png": png_bytes(GREY), "train/a/16bit.png": png16(G16),
        "test/a/16bit.pgm": pnm(G16, 65535), "test/a/float.tif": ftif.getvalue(),
    }
    train, test = read_imagefolder(write_zip(tmp_path / "mixed.zip", members))
    assert train.images.shape[1] == 1
    for x in (*train.images, *test.images):
        assert np.array_equal(x[0].numpy(), GREY)


def test_gtsrb_official_layout_of_16_bit_ppms(tmp_path):
    """GTSRB ships PPMs: the same tree with 16-bit PPMs (maxval 65535) reads as the 8-bit one."""
    write_gtsrb(tmp_path / "a")
    eight = read_gtsrb_official(tmp_path / "a" / "GTSRB")
    for f in (tmp_path / "a" / "GTSRB").rglob("*.ppm"):
        with Image.open(f) as im:
            arr = np.asarray(im.convert("RGB"))
        f.write_bytes(pnm(arr.astype(np.uint32) * 257, 65535))
    sixteen = read_gtsrb_official(tmp_path / "a" / "GTSRB")
    for a, b in zip(eight, sixteen):
        assert np.array_equal(a.images.numpy(), b.images.numpy())


# --- the rule itself, on every mode Pillow knows ------------------------------------------------------------
PILLOW_MODES = list(getattr(Image, "MODES", [])) or sorted({*SOURCES, "La", "RGBa", "HSV"} & set(Image._MODEINFO))


def _in_memory(mode: str) -> tuple[Image.Image, Image.Image | None]:
    """An in-memory image of ``mode`` holding the test content where there is a known 8-bit twin."""
    if mode in SOURCES and mode != "I":  # a bare I image declares no depth: see below
        src = SOURCES[mode]
        return src.image, src.ref8 or src.image
    if mode == "La":
        im = SOURCES["LA"].image.convert("La")
        return im, im.convert("LA")
    if mode == "RGBa":
        im = SOURCES["RGBA"].image.convert("RGBa")
        return im, im.convert("RGBA")
    if mode == "HSV":
        im = Image.fromarray(RGB).convert("HSV")
        return im, im.convert("RGB")
    return Image.new(mode, (W, H)), None


@pytest.mark.parametrize("mode", PILLOW_MODES)
@pytest.mark.parametrize("target", ["L", "RGB"])
def test_to_8bit_handles_every_pillow_mode(mode, target):
    """Every mode gives an image of the target mode, or one line; an 8-bit twin is matched."""
    im, twin = _in_memory(mode)
    try:
        out = to_8bit(im, "mem", target)
    except BadExpertError as exc:
        assert len(str(exc).splitlines()) == 1 and "'mem'" in str(exc) and mode in str(exc)
        assert mode == "I", f"mode {mode} refused: {exc}"  # only the depth-less 32-bit I is refused here
        return
    assert out.mode == target and out.size == (W, H)
    if twin is not None:
        _close(np.asarray(out), np.asarray(twin.convert(target), dtype=np.int64), 0)


def test_to_8bit_keeps_an_8_bit_image_as_it_is():
    im = Image.fromarray(RGB)
    assert to_8bit(im, "x") is im


# --- the CLI: refused image files, exit status 2 and nothing written ---------------------------------------------
REFUSED = [r for r in ROWS if r.refusal]


@pytest.mark.parametrize("row", _params(REFUSED))
def test_cli_train_on_a_folder_of_refused_images(row, tmp_path, capsys):
    folder = _folder_of(row, tmp_path / "data")
    run_cli(["train", "--dataset", "imagefolder", "--data-path", folder, *TRAIN_ARGS,
             "--out", tmp_path / "out" / "m.safetensors"], tmp_path, capsys, message=(row.refusal, f"0{row.suffix}"))


@pytest.mark.parametrize("row", _params(REFUSED))
def test_cli_refused_trigger_image(row, tmp_path, capsys):
    data = write_folder(tmp_path / "data", image_folder_members(size=(12, 12), n=51))  # 102 test images
    trig = tmp_path / f"trigger{row.suffix}"
    trig.write_bytes(row.data)
    run_cli(["train", "--dataset", "imagefolder", "--data-path", data, *TRAIN_ARGS, "--attack", "badnet",
             "--poison-rate", "0.1", "--attack-param", f"trigger_image={trig}",
             "--out", tmp_path / "out" / "m.safetensors"],
            tmp_path, capsys, message=(row.refusal, trig.name))


# --- data-set paths: zip members and folders -----------------------------------------------------------------------
GOOD = {f"{split}/{cls}/0.png": png_bytes(GREY) for split in ("train", "test") for cls in "ab"}

# (id, member name, words the message must hold)
UNSAFE_ZIP_NAMES = [
    ("climb-to-class", "train/../../x.png", "'..'"),
    ("climb-inside", "train/a/../b/x.png", "'..'"),
    ("climb-deep", "train/a/../../../../etc/x.png", "'..'"),
    ("climb-first", "../train/a/x.png", "'..'"),
    ("climb-last-dir", "test/b/../x.png", "'..'"),
    ("dot-component", "train/./a/x.png", "'.'"),
    ("absolute", "/train/a/x.png", "absolute"),
    ("absolute-double-slash", "//train/a/x.png", "absolute"),
    ("backslash", "train\\a\\x.png", "backslash"),
    ("backslash-climb", "train/..\\..\\x.png", "backslash"),
    ("drive-letter", "C:/train/a/x.png", "drive letter"),
    ("drive-letter-relative", "c:train/a/x.png", "drive letter"),
    ("newline", "train/a\nb/x.png", "control character"),
    ("carriage-return", "train/a\r/x.png", "control character"),
    ("escape-sequence", "train/a/\x1b[31mx.png", "control character"),
    ("line-separator", "train/a\u2028b/x.png", "control character"),
    ("next-line", "train/a\x85b/x.png", "control character"),
    ("right-to-left-override", "train/gnp.\u202ex.png", "control character"),
    ("non-image-member-climbs", "../../README.txt", "'..'"),
    ("directory-entry-climbs", "train/../", "'..'"),
]


@pytest.mark.parametrize("name, words", [pytest.param(n, w, id=i) for i, n, w in UNSAFE_ZIP_NAMES])
def test_unsafe_zip_member_names_are_refused(name, words, tmp_path):
    z = write_zip(tmp_path / "data.zip", {**GOOD, name: png_bytes(GREY)})
    for load in (lambda: read_imagefolder(z), lambda: load_dataset("imagefolder", z)):
        with pytest.raises(BadExpertError) as e:
            load()
        text = str(e.value)
        assert len(text.splitlines()) == 1 and words in text and "data.zip" in text and repr(name) in text, text


@pytest.mark.parametrize("name, words", [pytest.param(n, w, id=i) for i, n, w in UNSAFE_ZIP_NAMES[:12]])
def test_cli_unsafe_zip_member_names(name, words, tmp_path, capsys):
    z = write_zip(tmp_path / "data.zip", {**GOOD, name: png_bytes(GREY)})
    run_cli(["train", "--dataset", "imagefolder", "--data-path", z, *TRAIN_ARGS,
             "--out", tmp_path / "out" / "m.safetensors"], tmp_path, capsys, message=(words, "data.zip"))


# names a Linux folder can hold (no '/', no NUL): the same check as a zip's
# (id, file to add, words the message must hold, the path it names: a bad class folder comes first)
UNSAFE_FOLDER_NAMES = [
    ("newline-class", "train/a\nb/0.png", "control character", "train/a\nb"),
    ("escape-file", "train/a/\x1b[2J0.png", "control character", "train/a/\x1b[2J0.png"),
    ("line-separator-class", "test/a\u2028/0.png", "control character", "test/a\u2028"),
    ("backslash-class", "train/a\\b/0.png", "backslash", "train/a\\b"),
]


@pytest.mark.parametrize("name, words, reported", [pytest.param(n, w, r, id=i) for i, n, w, r in UNSAFE_FOLDER_NAMES])
def test_unsafe_folder_paths_are_refused(name, words, reported, tmp_path, capsys):
    folder = write_folder(tmp_path / "data", {**GOOD, name: png_bytes(GREY)})
    with pytest.raises(BadExpertError) as e:
        read_imagefolder(folder)
    text = str(e.value)
    assert len(text.splitlines()) == 1 and words in text and repr(reported) in text, text
    run_cli(["train", "--dataset", "imagefolder", "--data-path", folder, *TRAIN_ARGS,
             "--out", tmp_path / "out" / "m.safetensors"], tmp_path, capsys, message=words)


@pytest.mark.parametrize("extra, classes", [
    pytest.param("train/a b/0.png", ["a", "a b", "b"], id="space"),
    pytest.param("train/café/0.png", ["a", "b", "café"], id="accent"),
    pytest.param("train/日本/0.png", ["a", "b", "日本"], id="cjk"),
    pytest.param("train/a..b/0.png", ["a", "a..b", "b"], id="dots-inside-a-name"),
    pytest.param("train/a.b/x..png", ["a", "a.b", "b"], id="dots-in-names"),
])
@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_plain_names_still_load(extra, classes, as_zip, tmp_path):
    members = {**GOOD, extra: png_bytes(GREY)}
    src = write_zip(tmp_path / "d.zip", members) if as_zip else write_folder(tmp_path / "d", members)
    train, _ = read_imagefolder(src)
    assert train.classes == classes


def test_empty_components_in_a_zip_are_dropped(tmp_path):
    z = write_zip(tmp_path / "d.zip", {**GOOD, "train//c/0.png": png_bytes(GREY)})
    assert read_imagefolder(z)[0].classes == ["a", "b", "c"]


# --- CIFAR pickles: every opcode, one line --------------------------------------------------------------------------
def _opcode_streams():
    """Each opcode after a protocol-2 header: bare, with a short argument, with a huge declared length."""
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")
        for tail_id, tail in (("bare", b"."), ("arg", b"\x01\x00\x00\x00a\n."),
                              ("huge", b"\xff\xff\xff\xff\xff\xff\xff\x7f.")):
            yield pytest.param(b"\x80\x02" + code + tail, id=f"{op.name}-{tail_id}")


@pytest.mark.parametrize("stream", list(_opcode_streams()))
def test_every_pickle_opcode_gives_a_value_or_one_line(stream, tmp_path):
    p = tmp_path / "batches.meta"
    p.write_bytes(stream)
    with bounded_memory(MEM_LIMIT_MB):
        try:
            load_pickle(p)
        except BadExpertError as exc:
            assert len(str(exc).splitlines()) == 1 and "batches.meta" in str(exc), repr(str(exc))


# (id, batches.meta content, words the message must hold)
CIFAR_CASES = [
    ("persistent-id", b"\x80\x02P0\n.", "persistent reference"),
    ("binary-persistent-id", b"\x80\x02X\x01\x00\x00\x00aQ.", "persistent reference"),
    ("extension-code-1", b"\x80\x02\x82\x01.", "extension code"),
    ("extension-code-4", b"\x80\x02\x84\x01\x00\x00\x00.", "extension code"),
    ("global-with-newline-in-module", b"\x80\x04\x8c\x05os\nxy\x8c\x06system\x93.", "refusing to unpickle"),
    ("out-of-band-buffer", b"\x80\x05\x97.", "out-of-band"),
    ("invalid-opcode", b"\x80\x02\xff.", "invalid load key"),
    ("memo-miss", b"\x80\x02h\x05.", "Memo"),
    ("empty", b"", "Ran out of input"),
]


@pytest.mark.parametrize("data, words", [pytest.param(d, w, id=i) for i, d, w in CIFAR_CASES])
def test_cifar_hostile_meta_is_one_line(data, words, tmp_path, capsys):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(data)
    with pytest.raises(BadExpertError) as e:
        load_dataset("cifar10", tmp_path)
    text = str(e.value)
    assert len(text.splitlines()) == 1 and words in text and "batches.meta" in text, repr(text)
    run_cli(["train", "--dataset", "cifar10", "--data-path", tmp_path, *TRAIN_ARGS,
            "--out", tmp_path / "out" / "m.safetensors"], tmp_path, capsys, message=(words, "batches.meta"))
