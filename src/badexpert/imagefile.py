"""Decoding one untrusted image file, checked: the format whitelist, the file size, the pixel
count read from the header before any pixel is decoded, Pillow's decompression-bomb warning
turned into an error. Used by the ImageFolder/GTSRB readers, trigger images and the HTTP service.

This module imports neither torch nor the data package (an ONNX-runtime service uses it).
"""

from __future__ import annotations

import io
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from .errors import BadExpertError
from .limits import check_pixels, human_bytes

#: Pillow formats an image file may be decoded as (detected from the content, not the suffix);
#: Pillow's other formats (EPS, which runs Ghostscript, and a long tail of rare ones) are refused.
IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "DIB", "GIF", "TIFF", "WEBP")
#: Largest image file (or zip member, by its declared uncompressed size) read: 64 MiB.
MAX_IMAGE_FILE_BYTES = 64 * 1024**2

_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR  # Pillow < 9.1 has no Image.Resampling

Source = tuple[str, Callable[[], bytes]]  # (name shown in errors, function returning the file's bytes)


def open_image(
    data: bytes | bytearray | memoryview | str | os.PathLike, name: str | None = None, mode: str | None = None
) -> Image.Image:
    """Decode one untrusted image file and return it as a loaded Pillow image (no file left open).

    ``data`` is the file's bytes or its path; ``name`` names it in error messages (default: the
    path, or ``<image>``); ``mode`` (``"RGB"``, ``"L"``...) converts the result. The file must be
    one of :data:`IMAGE_FORMATS` and at most :data:`MAX_IMAGE_FILE_BYTES`, and its header size
    within :data:`~badexpert.limits.MAX_IMAGE_PIXELS`, checked before the pixels are decoded.
    Every problem raises one :class:`BadExpertError`. For animated or multi-page files, the first
    frame.
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
                return im.convert(mode) if mode is not None else im.copy()
        except BadExpertError:
            raise
        except Exception as exc:
            raise _decode_error(label, exc) from exc


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
