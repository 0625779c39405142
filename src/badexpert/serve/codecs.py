"""Requests into numpy batches, answers into bytes: the service's codecs.

Each parser raises :class:`RequestError` (a :class:`BadExpertError` with the HTTP status to answer
with); every batch goes through the package's one conversion rule
(:func:`badexpert.runtime.arrays.check_array` with ``nonfinite="allow"``: uint8 means ``[0, 255]``,
float means ``[0, 1]``, NaN/inf pixels reach the guard, which rejects them). Torch-free.
"""

import json
import math
import re
from typing import Mapping

import numpy as np

from ..errors import BadExpertError
from ..jsonable import to_jsonable

JSON_DTYPES = ("uint8", "float32")
RAW_DTYPES = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}
CONTENT_TYPES = "application/json, multipart/form-data, application/octet-stream (with X-Shape) or image/*"
_JSON_LITERALS = re.compile(rb"\b(?:true|false|null)\b")


class RequestError(BadExpertError):
    """A request the service refuses: one-line message and the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = int(status)


class Unavailable(RequestError):
    """The service cannot take the request now (warming up, overloaded, shutting down): 503."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 503)



def check_batch(x: np.ndarray, input_shape: tuple[int, ...], max_batch: int) -> np.ndarray:
    """Shape and batch-size checks, then the package's conversion rule; returns ``[N, C, H, W]``."""
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise RequestError(f"inputs must have shape [C, H, W] or [N, C, H, W], got {list(x.shape)}")
    if len(x) == 0:
        raise RequestError("empty batch: send at least one input")
    if len(x) > max_batch:
        raise RequestError(f"too many inputs: {len(x)} in one request, the limit is {max_batch} (--max-batch)", 413)
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise RequestError(f"each input must have shape {list(input_shape)} [C, H, W], got {list(x.shape[1:])}")
    return conversion_rule(x)


def conversion_rule(x: np.ndarray) -> np.ndarray:
    """The package's conversion rule (:func:`badexpert.runtime.arrays.check_array`, torch-free;
    non-finite values allowed: the guard rejects them); a refusal becomes a 422."""
    from ..runtime.arrays import check_array

    try:
        check_array(x, what="inputs", nonfinite="allow")
    except BadExpertError as exc:
        raise RequestError(str(exc)) from exc
    return x


def parse_json_body(body: bytes, input_shape: tuple[int, ...], max_batch: int) -> np.ndarray:
    """``{"inputs": [...], "dtype": "uint8" | "float32"}`` -> a checked batch.

    ``dtype`` is required (JSON numbers carry no type, and the scale would be ambiguous). uint8
    values must be integers in ``[0, 255]``; float32 values lie in ``[0, 1]``, and ``NaN``,
    ``Infinity`` and ``-Infinity`` (Python's and JavaScript's spelling) are accepted there: such an
    input reaches the guard, which rejects it, as the Python API does.
    """
    if not body.strip():
        raise RequestError("the request body is empty; send {\"inputs\": [...], \"dtype\": \"uint8\"}", 400)
    try:
        doc = json.loads(body)
    except RecursionError:
        raise RequestError("the JSON body is nested too deeply", 400) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"the body is not valid JSON ({str(exc).splitlines()[0]})", 400) from None
    if not isinstance(doc, dict):
        raise RequestError('the JSON body must be an object {"inputs": [...], "dtype": "uint8" or "float32"}')
    unknown = sorted(set(doc) - {"inputs", "dtype"})
    if unknown:
        raise RequestError(f"unknown field(s) in the JSON body: {', '.join(map(repr, unknown))}; "
                           "expected only 'inputs' and 'dtype'")
    dtype = doc.get("dtype")
    if dtype not in JSON_DTYPES:
        raise RequestError(f"'dtype' must be \"uint8\" (values 0-255) or \"float32\" (values in [0, 1]), got "
                           f"{json.dumps(dtype)}")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise RequestError("'inputs' must be a nested array: one image [C, H, W] or a batch [N, C, H, W]")
    if not inputs:
        raise RequestError("empty batch: send at least one input")
    # the only strings left are the two keys and the dtype, so these words can only be JSON literals
    if _JSON_LITERALS.search(body if isinstance(body, bytes) else bytes(body)):
        raise RequestError("'inputs' must hold numbers only (found true, false or null)")
    try:
        arr = np.asarray(inputs)
    except (ValueError, OverflowError, TypeError):
        raise RequestError("'inputs' must be a rectangular nested array of numbers (rows of different lengths?)") from None
    if arr.dtype.kind not in "iuf":
        raise RequestError("'inputs' must be a rectangular nested array of numbers")
    if arr.ndim not in (3, 4):
        raise RequestError(f"inputs must have shape [C, H, W] or [N, C, H, W], got {list(arr.shape)}")
    # shape and count first (cheap, and the most likely mistakes), then values
    batch = arr[None] if arr.ndim == 3 else arr
    if len(batch) > max_batch:
        raise RequestError(f"too many inputs: {len(batch)} in one request, the limit is {max_batch} (--max-batch)", 413)
    if tuple(batch.shape[1:]) != tuple(input_shape):
        raise RequestError(f"each input must have shape {list(input_shape)} [C, H, W], got {list(batch.shape[1:])}")
    return number_batch(batch, dtype, input_shape, max_batch)


#: How each protocol spells "send these values as float32" in its hints.
JSON_FLOAT_HINT = '"dtype": "float32"'


def number_batch(batch: np.ndarray, dtype: str, input_shape: tuple[int, ...], max_batch: int, *,
                 float_hint: str = JSON_FLOAT_HINT) -> np.ndarray:
    """JSON numbers (a numeric ``[N, C, H, W]`` array) typed by the request's dtype ("uint8" or
    "float32") -> a checked batch: the one rule for numbers that carry no type of their own, used by
    ``/v1/classify`` and the Open Inference Protocol. uint8 values must be whole numbers in
    ``[0, 255]`` (no NaN or inf); float values are checked by the conversion rule on their exact
    values (float64), then rounded to float32. ``float_hint`` is how the caller's protocol asks for
    float32 inputs, named in the errors."""
    if dtype == "uint8":
        if batch.dtype.kind == "f":
            if not bool(np.isfinite(batch).all()):
                raise RequestError(f"uint8 inputs cannot hold NaN or inf; send {float_hint} to have such inputs "
                                   "rejected by the guard")
            if not bool((batch == np.round(batch)).all()):
                raise RequestError(f"uint8 inputs must be whole numbers 0-255; for values in [0, 1] send {float_hint}")
        if batch.size and (float(batch.min()) < 0 or float(batch.max()) > 255):
            raise RequestError(f"uint8 inputs must lie in [0, 255], got values in [{batch.min():g}, {batch.max():g}]")
        return check_batch(batch.astype(np.uint8), input_shape, max_batch)
    # float32: the range check runs on the exact values (float64), before rounding to float32
    conversion_rule(np.ascontiguousarray(batch, dtype=np.float64))
    return check_batch(batch.astype(np.float32), input_shape, max_batch)


def parse_shape_header(text: str | None) -> tuple[int, ...]:
    if text is None:
        raise RequestError("raw tensor bodies need an X-Shape header, e.g. 'X-Shape: N,C,H,W' or 'C,H,W'", 400)
    parts = [p.strip() for p in text.replace("x", ",").replace("X", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise RequestError(f"X-Shape must be comma-separated integers N,C,H,W or C,H,W, got {text[:64]!r}", 400) from None
    if len(shape) not in (3, 4) or any(s < 0 for s in shape):
        raise RequestError(f"X-Shape must be N,C,H,W or C,H,W with non-negative sizes, got {text[:64]!r}", 400)
    return shape


def parse_raw_body(body: bytes, headers: Mapping[str, str], input_shape: tuple[int, ...], max_batch: int) -> np.ndarray:
    """Raw tensor bytes (C order) with ``X-Shape: N,C,H,W`` (or ``C,H,W``) and ``X-Dtype: uint8``
    (default) or ``float32`` (little-endian) -> a checked batch."""
    shape = parse_shape_header(headers.get("x-shape"))
    name = (headers.get("x-dtype") or "uint8").strip().lower()
    if name not in RAW_DTYPES:
        raise RequestError(f"X-Dtype must be uint8 or float32, got {name[:32]!r}")
    dtype = RAW_DTYPES[name]
    full = shape if len(shape) == 4 else (1, *shape)
    if full[0] > max_batch:
        raise RequestError(f"too many inputs: {full[0]} in one request, the limit is {max_batch} (--max-batch)", 413)
    need = math.prod(full) * dtype.itemsize
    if len(body) != need:
        raise RequestError(f"the body holds {len(body)} bytes but X-Shape {','.join(map(str, shape))} of {name} "
                           f"needs {need}")
    arr = np.frombuffer(body, dtype=dtype).reshape(full).astype(dtype.newbyteorder("="), copy=True)
    return check_batch(arr, input_shape, max_batch)


def decode_image(data: bytes, name: str, input_shape: tuple[int, ...], strict_size: bool) -> tuple[np.ndarray, bool]:
    """One image file -> ``([C, H, W] uint8, resized)``: decoded by
    :func:`badexpert.data.imagefolder.open_image` (format whitelist, pixel and decompression
    limits), converted to the model's channels (L or RGB) and resized (bilinear) to its input size,
    or refused when ``strict_size``."""
    from ..imagefile import _BILINEAR, open_image

    c, h, w = input_shape
    if c not in (1, 3):
        raise RequestError(f"this model takes {c}-channel inputs, which image files cannot give; send a tensor "
                           "(JSON or raw bytes)", 415)
    try:
        im = open_image(bytes(data), name=name, mode="L" if c == 1 else "RGB")
    except BadExpertError as exc:
        raise RequestError(str(exc)) from exc
    resized = im.size != (w, h)
    if resized:
        if strict_size:
            raise RequestError(f"image '{name}' is {im.size[0]}x{im.size[1]} (width x height) but the model takes "
                               f"{w}x{h}; the service runs with --strict-size, so resize it first")
        im = im.resize((w, h), _BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr), resized


def decode_images(files: list[tuple[str, bytes]], input_shape, strict_size: bool, max_batch: int):
    """Several image files -> (checked uint8 batch, per-file names, per-file resized flags)."""
    if not files:
        raise RequestError("no image files in the multipart body; upload them as files (curl: -F 'file=@image.png')")
    if len(files) > max_batch:
        raise RequestError(f"too many inputs: {len(files)} files in one request, the limit is {max_batch} "
                           "(--max-batch)", 413)
    arrays, resized = [], []
    for name, data in files:
        arr, moved = decode_image(data, name, input_shape, strict_size)
        arrays.append(arr)
        resized.append(moved)
    return check_batch(np.stack(arrays), input_shape, max_batch), [n for n, _ in files], resized


async def read_multipart(body: bytes, headers, max_batch: int) -> list[tuple[str, bytes]]:
    """The files of a ``multipart/form-data`` body, in order; a text field is refused. Every
    temporary file the parser makes is closed before this returns or raises."""
    from python_multipart.multipart import parse_options_header
    from starlette.formparsers import MultiPartException, MultiPartParser

    boundary = parse_options_header(headers.get("content-type", ""))[1].get(b"boundary")
    if boundary and b"--" + boundary + b"--" not in body:  # a part begun and never ended is never closed
        raise RequestError("malformed multipart body (no closing boundary: truncated?)", 400)

    async def stream():
        yield body
        yield b""

    parser = MultiPartParser(headers, stream(), max_files=max_batch, max_fields=max_batch)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        msg = str(getattr(exc, "message", exc)).splitlines()[0] if str(getattr(exc, "message", exc)) else "malformed"
        if "too many files" in msg.lower():
            raise RequestError(f"too many inputs: more than {max_batch} files in one request (--max-batch)", 413) from None
        raise RequestError(f"malformed multipart body ({msg})", 400) from None
    except Exception as exc:  # python-multipart's own parse errors
        raise RequestError(f"malformed multipart body ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                           400) from None
    files = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                raise RequestError(f"form field '{key[:64]}' holds text, not a file; upload images as files "
                                   "(curl: -F 'file=@image.png')")
            files.append((value.filename or key or f"file{len(files)}", value.file.read()))
    finally:
        await form.close()
        for f in getattr(parser, "_files_to_close_on_error", ()):  # also parts that never reached the form
            f.close()
    return files


async def read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(f"invalid Content-Length {declared[:32]!r}", 400) from None
        if size > limit:
            raise RequestError(f"the request body ({size} bytes) exceeds the limit of {limit} bytes (--max-body-mb)", 413)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise RequestError(f"the request body exceeds the limit of {limit} bytes (--max-body-mb)", 413)
    return bytes(buf)


def json_bytes(doc: dict) -> bytes:
    """An answer's body: compact JSON by the package's one policy (a non-finite number is ``null``)."""
    return json.dumps(to_jsonable(doc), separators=(",", ":"), allow_nan=False).encode()


__all__ = ["CONTENT_TYPES", "JSON_DTYPES", "JSON_FLOAT_HINT", "RAW_DTYPES", "RequestError", "Unavailable",
           "check_batch", "conversion_rule", "decode_image", "decode_images", "json_bytes", "number_batch",
           "parse_json_body", "parse_raw_body", "parse_shape_header", "read_body", "read_multipart"]
