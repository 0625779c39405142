"""Decoding one untrusted image file, checked: the format whitelist, the file size, the pixel
count read from the header before any pixel is decoded, Pillow's decompression-bomb warning
turned into an error, and one rule (:func:`to_8bit`) for reading every pixel mode at the 0..255
scale. Used by the ImageFolder/GTSRB readers, trigger images and the HTTP service.

This module imports neither torch nor the data package (an ONNX-runtime service uses it).
"""

from __future__ import annotations

import io
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from .errors import BadExpertError
from .limits import check_pixels, human_bytes

#: Pillow formats an image file may be decoded as (detected from the content, not the suffix);
#: Pillow's other formats (EPS, which runs Ghostscript, and a long tail of rare ones) are refused.
IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "DIB", "GIF", "TIFF", "WEBP")
#: Largest image file (or zip member, by its declared uncompressed size) read: 64 MiB.
MAX_IMAGE_FILE_BYTES = 64 * 1024**2

_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR  # Pillow < 9.1 has no Image.Resampling

#: Pillow modes that hold one grey channel (an alpha channel aside); an image of any other mode
#: is read as RGB. The wide ones (16-bit, 32-bit, float) become L through :func:`to_8bit`.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Modes of 1- or 8-bit samples, converted to L and RGB by Pillow itself (see to_8bit).
_EIGHT_BIT_MODES = frozenset({"1", "L", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr",
                              "LAB", "HSV"})
# Modes Pillow cannot convert to L (or RGB) directly: the mode they are converted through first.
_CONVERT_THROUGH = {"La": "LA", "RGBa": "RGBA", "LAB": "RGB"}
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

Source = tuple[str, Callable[[], bytes]]  # (name shown in errors, function returning the file's bytes)


def open_image(
    data: bytes | bytearray | memoryview | str | os.PathLike, name: str | None = None, mode: str | None = None
) -> Image.Image:
    """Decode one untrusted image file and return it as a loaded Pillow image (no file left open).

    ``data`` is the file's bytes or its path; ``name`` names it in error messages (default: the
    path, or ``<image>``); ``mode`` (``"RGB"``, ``"L"``...) converts the result. The pixels are
    read at the 0..255 scale by :func:`to_8bit` (without ``mode``, the result is in an 8-bit
    mode: a 16-bit or float image comes back as L). The file must be one of
    :data:`IMAGE_FORMATS` and at most :data:`MAX_IMAGE_FILE_BYTES`, and its header size within
    :data:`~badexpert.limits.MAX_IMAGE_PIXELS`, checked before the pixels are decoded. Every
    problem raises one :class:`BadExpertError`. For animated or multi-page files, the first frame.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        label = name or "<image>"
        raw = bytes(data)
        if len(raw) > MAX_IMAGE_FILE_BYTES:
            raise _too_big(label, len(raw))
    else:
        label, read = file_source(data)
        label = name or label
        raw = _read_source(label, read)
    with _bombs_are_errors():
        try:
            with _open_checked(raw, label) as im:
                im.load()
                out = to_8bit(im, label, mode)
                return out.copy() if out is im else out
        except BadExpertError:
            raise
        except Exception as exc:
            raise _decode_error(label, exc) from exc


def to_8bit(im: Image.Image, label: str, mode: str | None = None) -> Image.Image:
    """The one rule that reads a decoded image's pixels at the 0..255 scale, for every Pillow mode.

    ``im`` is an image as opened from its file (its ``format`` and TIFF tags are read: they
    declare the sample depth that Pillow's mode ``I`` does not); ``label`` names it in errors;
    ``mode`` (``"L"`` or ``"RGB"``) converts the result, else it is in an 8-bit mode. The rule:

    - **1- and 8-bit modes** (1, L, P, LA, PA, RGB, RGBA, RGBX, CMYK, YCbCr, LAB, HSV, and the
      premultiplied La and RGBa) are converted by Pillow: palettes applied, alpha dropped (not
      composited), CMYK, YCbCr and LAB turned into RGB. Pillow gives 16-bit colour files (RGB,
      RGBA and LA PNGs, PPMs with a maxval above 255, 16-bit RGB TIFFs) in these modes already,
      each sample reduced to 8 bits by Pillow (within 1 of the rule below).
    - **16-bit unsigned grey** (I;16, I;16L, I;16B, I;16N; and I when the file declares 16-bit
      unsigned samples: a 16-bit PNG in older Pillows, a PGM with a maxval above 255, which Pillow
      rescales to 0..65535, a TIFF with BitsPerSample 16): ``v -> round(v / 257)``, i.e.
      ``(v + 128) // 257``, the exact inverse of the standard 8-to-16-bit expansion ``x * 257``
      (PNG, PNM), so an 8-bit image saved at 16 bits reads back to the same bytes, and one
      shifted left by 8 bits (``x * 256``) to within 1.
    - **32-bit or signed integer grey** (I from a TIFF with 32-bit or signed samples) is refused:
      no white level is standard for it (65535? 2**31 - 1? 2**32 - 1?), and any guess misreads
      the image.
    - **float grey** (F: a float TIFF, a PFM) is read as 0 = black, 1 = white, the convention
      of float image files: ``v -> round(v * 255)``. An image with any value outside [0, 1], or
      NaN, is refused rather than rescaled: taking [0, 255] or the image's own range would be a
      guess from the pixel values, which an attacker chooses.
    - **any other mode** is refused.

    Every refusal is one :class:`BadExpertError` naming the file, the mode and what to do.
    """
    wide = im.mode not in _EIGHT_BIT_MODES
    if wide:
        im = Image.fromarray(_wide_to_uint8(im, label), "L")
    elif im.mode in _CONVERT_THROUGH and mode is not None and im.mode != mode:
        im = im.convert(_CONVERT_THROUGH[im.mode])
    if mode is not None and im.mode != mode:
        im = im.convert(mode)
    return im


def _wide_to_uint8(im: Image.Image, label: str) -> np.ndarray:
    """The pixels of a 16-bit, 32-bit or float grey image as uint8 (see :func:`to_8bit`)."""
    bits, signed = _declared_depth(im)
    if im.mode in _UINT16_MODES or (im.mode == "I" and bits == 16 and not signed):
        v = np.asarray(im).astype(np.int64)
        if v.size and (v.min() < 0 or v.max() > 65535):  # an I image that overflows its declared 16 bits
            raise BadExpertError(
                f"image '{label}' declares 16-bit samples but holds values from {v.min()} to {v.max()}; "
                "the file is damaged, save it again as 8- or 16-bit"
            )
        return ((v + 128) // 257).astype(np.uint8)
    if im.mode == "I":
        depth = f"{'signed ' if signed else ''}{bits or 32}-bit integer"
        raise BadExpertError(
            f"image '{label}' has {depth} pixels (Pillow mode I), which have no standard white level; "
            "save it as an 8- or 16-bit unsigned image"
        )
    if im.mode == "F":
        v = np.asarray(im, dtype=np.float64)
        finite = np.isfinite(v)
        if not finite.all():
            raise BadExpertError(
                f"image '{label}' has floating-point pixels that are NaN or infinite; "
                "float images are read as 0 = black, 1 = white: save it with values in [0, 1] or as 8-bit"
            )
        if v.size and (v.min() < 0 or v.max() > 1):
            raise BadExpertError(
                f"image '{label}' has floating-point pixels from {v.min():.6g} to {v.max():.6g}, outside [0, 1]; "
                "float images are read as 0 = black, 1 = white: rescale it to [0, 1] or save it as 8-bit"
            )
        return np.rint(v * 255).astype(np.uint8)
    raise BadExpertError(
        f"image '{label}' has pixel mode {im.mode!r}, which badexpert does not read; save it as an 8-bit "
        "RGB or greyscale image"
    )


def _declared_depth(im: Image.Image) -> tuple[int | None, bool]:
    """(bits per sample, signed) that the file declares for a grey image, ``None`` bits if unknown.

    Pillow gives mode I for 16-bit PNGs (before Pillow 10) and PGMs, always rescaled to unsigned
    0..65535; a TIFF says it in its BitsPerSample and SampleFormat tags.
    """
    if im.format in ("PNG", "PPM"):
        return 16, False
    tags = getattr(im, "tag_v2", None)
    if im.format == "TIFF" and tags is not None:
        bits = tags.get(258)  # BitsPerSample, one per channel
        fmt = tags.get(339)  # SampleFormat: 1 unsigned (the default), 2 signed, 3 float
        bits = bits[0] if isinstance(bits, tuple) and bits else bits
        fmt = fmt[0] if isinstance(fmt, tuple) and fmt else fmt
        return (int(bits) if isinstance(bits, int) else None), fmt == 2
    return None, False


def file_source(path: str | os.PathLike) -> Source:
    """A :data:`Source` for an image file on disk: its size is checked before it is read."""
    path = Path(path)

    def read() -> bytes:
        if path.stat().st_size > MAX_IMAGE_FILE_BYTES:
            raise _too_big(str(path), path.stat().st_size)
        with open(path, "rb") as fh:
            data = fh.read(MAX_IMAGE_FILE_BYTES + 1)  # a FIFO or a growing file stops here too
        if len(data) > MAX_IMAGE_FILE_BYTES:
            raise _too_big(str(path), len(data))
        return data

    return str(path), read


@contextmanager
def _bombs_are_errors() -> Iterator[None]:
    """Turn Pillow's DecompressionBombWarning into an exception (caught and reported per file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _open_checked(data: bytes, label: str) -> Image.Image:
    """Open (header only) one image of an allowed format and check its size before decoding."""
    try:
        im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombWarning:  # raised as an error by _bombs_are_errors
        # above Pillow's warning limit (89 Mpx), so above ours: open it again quietly, only to
        # report its width and height with the same message as any other oversized image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        with im:
            check_pixels(im.width, im.height, f"image '{label}'")
        raise  # Pillow's limit was lowered below ours: still an error
    try:
        check_pixels(im.width, im.height, f"image '{label}'")
    except BaseException:
        im.close()
        raise
    return im


def _read_source(label: str, read: Callable[[], bytes]) -> bytes:
    try:
        data = read()
    except BadExpertError:
        raise
    except Exception as exc:
        raise BadExpertError(f"cannot read image file '{label}' ({_why(exc)}); check that it exists and is readable") from exc
    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise _too_big(label, len(data))
    return data


def _why(exc: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _decode_error(label: str, exc: BaseException) -> BadExpertError:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return BadExpertError(f"image '{label}' is too large to decode ({_why(exc)}); shrink it or remove it")
    if isinstance(exc, Image.UnidentifiedImageError):
        why = f"not a {', '.join(IMAGE_FORMATS)} image"
    else:
        why = _why(exc)
    return BadExpertError(f"cannot decode image '{label}' ({why}); replace or remove the file")


def _too_big(label: str, nbytes: int) -> BadExpertError:
    return BadExpertError(
        f"image file '{label}' is {human_bytes(nbytes)}, above the limit of {human_bytes(MAX_IMAGE_FILE_BYTES)} "
        "for one image file; shrink it or remove it"
    )
