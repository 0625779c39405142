"""The one reader of the JSON metadata that badexpert files carry.

Model checkpoints, detector files and bundles keep their metadata as JSON text in the
safetensors header (``__metadata__["badexpert"]``); an exported ONNX guard keeps it in the
model's ``metadata_props`` (key ``"badexpert"``). Every reader of those files goes through this
module, so a crafted file meets the same bounds whatever its format:

- :func:`parse_metadata`: the JSON text must be valid UTF-8 (raw bytes, or a string without lone
  surrogates), at most :data:`~badexpert.limits.MAX_METADATA_BYTES` long and within the memory
  budget once parsed, nested at most :data:`~badexpert.limits.MAX_METADATA_DEPTH` deep, and a
  JSON object; anything else is one :class:`BadExpertError` line (never a RecursionError,
  UnicodeDecodeError or MemoryError);
- :func:`check_fields`: the fields a format declares, type- and range-checked
  (:func:`badexpert.validation.check_value`), one line naming the field and the remedy;
- :func:`check_calibration`: the calibration record (scores and threshold) every calibrated
  file holds: scores present, finite and as many as declared; the threshold a finite number
  that the calibration reached (one of the scores);
- :func:`safetensors_header_size` and :func:`onnx_metadata_entry` find the metadata of a file
  and check its declared size before anything is read into memory.

This module imports neither torch nor anything that does (``OnnxGuard`` runs without PyTorch).
"""

from __future__ import annotations

import json
import math
import re
import struct
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadExpertError
from .limits import MAX_METADATA_BYTES, MAX_METADATA_DEPTH, check_allocation, human_bytes
from .validation import check_value

#: Bytes of Python objects per byte of JSON text at most (a list of short numbers: an 8-byte
#: reference and a 24-byte float for each 2 to 4 characters).
PARSED_BYTES_PER_BYTE = 16
#: A ``\\uD800``-``\\uDFFF`` escape: the only way a lone surrogate (not UTF-8) gets into parsed text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _fail(source: str, what: str, fix: str | None) -> BadExpertError:
    return BadExpertError(f"{source}: {what}" + (f"; {fix}" if fix else ""))


def _too_big(source: str, what: str, size: int, fix: str | None) -> BadExpertError:
    return _fail(source, f"{what} is {size:,} bytes, above the limit of {MAX_METADATA_BYTES:,} bytes "
                         f"({human_bytes(MAX_METADATA_BYTES)}); the file is damaged or was crafted", fix)


def parse_metadata(raw: str | bytes | bytearray, source: str, fix: str | None = None) -> dict[str, Any]:
    """The JSON object in ``raw`` (a file's metadata), read within the bounds of the module
    docstring. ``source`` names the file in messages ("bundle 'b.safetensors'"), ``fix`` says
    what to do ("rebuild it with `badexpert bundle`")."""
    if isinstance(raw, (bytes, bytearray)):
        size = len(raw)
        if size > MAX_METADATA_BYTES:
            raise _too_big(source, "its metadata", size, fix)
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(source, f"its metadata is not valid UTF-8 (byte {exc.start}); the file is damaged or was "
                                "edited", fix) from None
    elif isinstance(raw, str):
        text = raw
        size = len(text)  # characters: at most the UTF-8 size, enough to refuse before parsing
        if size > MAX_METADATA_BYTES:
            raise _too_big(source, "its metadata", size, fix)
    else:
        raise _fail(source, f"its metadata is a {type(raw).__name__}, not JSON text; the file is damaged", fix)
    check_allocation(size * PARSED_BYTES_PER_BYTE, f"{source}: parsing its {human_bytes(size)} of metadata",
                     "the file is probably crafted")
    try:
        meta = json.loads(text)
    except RecursionError:
        raise _fail(source, f"its metadata is nested deeper than {MAX_METADATA_DEPTH} levels; the file is damaged "
                            "or was crafted", fix) from None
    except json.JSONDecodeError as exc:
        raise _fail(source, f"corrupt metadata (not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno})",
                    fix) from None
    except ValueError as exc:  # an integer beyond Python's digit limit
        raise _fail(source, f"corrupt metadata ({str(exc).splitlines()[0][:80]})", fix) from None
    _check_tree(meta, source, fix, strings=bool(_SURROGATE_ESCAPE.search(text)))
    if not isinstance(meta, dict):
        raise _fail(source, f"its metadata is a JSON {type(meta).__name__}, not an object; the file is damaged or was "
                            "made by another tool", fix)
    return meta


def _check_tree(value: Any, source: str, fix: str | None, *, strings: bool) -> None:
    """Nesting depth (iteratively, no recursion) and, when ``strings``, that every string
    (keys included) is valid Unicode (no lone surrogate from a ``\\uD800`` escape)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            items = list(v.values())
            if strings:
                items += list(v.keys())
        elif isinstance(v, list):
            items = v
        else:
            if strings and isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise _fail(source, "its metadata holds a string that is not valid Unicode (a lone surrogate "
                                        "escape); the file is damaged or was crafted", fix) from None
            continue
        if depth > MAX_METADATA_DEPTH:
            raise _fail(source, f"its metadata is nested deeper than {MAX_METADATA_DEPTH} levels; the file is damaged "
                                "or was crafted", fix)
        stack.extend((item, depth + 1) for item in items if strings or isinstance(item, (dict, list)))


def check_fields(meta: dict[str, Any], types: dict[str, Any], source: str, fix: str | None = None) -> dict[str, Any]:
    """Type- and range-check (and normalise in place) the ``types`` fields of ``meta``; a missing
    field is ``None``. One line naming the field, what it must be, and ``fix``."""
    for key, tp in types.items():
        try:
            meta[key] = check_value(meta.get(key), tp, key, f"{source}: field")
        except BadExpertError as exc:
            raise BadExpertError(f"{exc}; {fix}" if fix else str(exc)) from None
    return meta


def check_classes(classes: Any, num_classes: int, source: str, fix: str | None = None) -> list[str] | None:
    """A class-name list is ``None`` or exactly ``num_classes`` strings."""
    if classes is None:
        return None
    classes = check_fields({"classes": classes}, {"classes": list[str]}, source, fix)["classes"]
    if len(classes) != num_classes:
        raise _fail(source, f"it names {len(classes)} classes for a model with {num_classes}; the file is damaged or "
                            "was edited", fix)
    return classes


def check_calibration(scores: Any, threshold: float, size: int | None, source: str, fix: str | None = None) -> None:
    """The calibration record of a calibrated detector: ``scores`` (a 1-D array-like) non-empty,
    finite and ``size`` long (when declared); ``threshold`` finite and one of the scores (the
    split-conformal threshold is always a calibration score: any other value, 1e308 or inf from
    an unreachable target FPR included, was never reached by calibration)."""
    try:
        a = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise _fail(source, "its calibration scores are not numbers; the file is damaged", fix) from None
    if a.ndim != 1:
        raise _fail(source, f"its calibration scores have shape {list(a.shape)}, not a list; the file is damaged", fix)
    n = a.size
    if n == 0:
        raise _fail(source, "it holds a threshold but no calibration scores; the file is damaged", fix)
    if size is not None and n != size:
        raise _fail(source, f"it holds {n} calibration scores but declares {size}; the file is damaged or was edited",
                    fix)
    if not np.isfinite(a).all():
        raise _fail(source, f"{int((~np.isfinite(a)).sum())} of its {n} calibration scores are not finite; the file is "
                            "damaged", fix)
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and bool((a == threshold).any())):
        raise BadExpertError(
            f"{source}: its threshold {threshold!r:.40} is not one of its {n} calibration scores: calibration never "
            f"reached it, so its false-positive rate is unknown (1e308 or inf rejects nothing); recalibrate with a "
            f"reachable target FPR (at least "
            f"1/(n+1) = {1 / (n + 1):.3g} with {n} calibration inputs, or use more calibration data) and rebuild "
            "the file"
        )


# --- finding the metadata in a file ---------------------------------------------------------------
def safetensors_header_size(path: str | Path, what: str) -> int:
    """The header size a safetensors file declares (its first 8 bytes), checked against the file's
    size and :data:`~badexpert.limits.MAX_METADATA_BYTES` before the header is read. ``what``
    names the kind of file ("bundle")."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
        total = p.stat().st_size
    except OSError as exc:
        raise BadExpertError(f"{what} '{p}' cannot be read ({exc.strerror or exc})") from None
    if len(head) < 8:
        raise BadExpertError(f"'{p}' is not a badexpert {what} (corrupt or wrong format: {total} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > total - 8:
        raise BadExpertError(f"'{p}' is not a badexpert {what} (corrupt or wrong format: its header declares "
                             f"{n:,} bytes, the file has {total:,})")
    if n > MAX_METADATA_BYTES:
        raise _too_big(f"{what} '{p}'", "its header", n, None)
    return n


class _Truncated(Exception):
    pass


def _varint(fh) -> int:
    shift = result = 0
    for _ in range(10):
        b = fh.read(1)
        if not b:
            raise _Truncated
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
    raise ValueError("a varint longer than 10 bytes")


def onnx_metadata_entry(model: str | PathLike | bytes | bytearray, key: str, source: str,
                        fix: str | None = None) -> bytes | None:
    """The raw value of metadata entry ``key`` of an ONNX model (a path or its bytes), found by
    walking the top-level fields of its ``ModelProto`` without reading the graph; ``None`` when
    the model has no such entry. Entry sizes are checked before they are read; a file that is
    not a protocol buffer, or holds ``key`` twice, is one line."""
    import io

    fh = io.BytesIO(model) if isinstance(model, (bytes, bytearray)) else open(model, "rb")  # noqa: SIM115
    found: list[bytes] = []
    try:
        with fh:
            end = fh.seek(0, 2)
            fh.seek(0)
            while fh.tell() < end:
                tag = _varint(fh)
                field, wire = tag >> 3, tag & 7
                if field == 0 or wire in (3, 4, 6, 7):
                    raise ValueError(f"field {field} has wire type {wire}")
                if wire == 0:
                    _varint(fh)
                    continue
                length = 8 if wire == 1 else 4 if wire == 5 else _varint(fh)
                if fh.tell() + length > end:
                    raise _Truncated
                if field == 14 and wire == 2:  # ModelProto.metadata_props: StringStringEntryProto
                    if length > MAX_METADATA_BYTES + 1024:
                        raise _too_big(source, "a metadata entry", length, fix)
                    entry = _entry(fh.read(length))
                    if entry.get(1) == key.encode():
                        found.append(entry.get(2, b""))
                else:
                    fh.seek(length, 1)
    except BadExpertError:
        raise
    except (_Truncated, ValueError) as exc:
        why = str(exc) or "truncated"
        raise BadExpertError(f"{source} cannot be loaded: it is not an ONNX model ({why})"
                             + (f"; {fix}" if fix else "")) from None
    except OSError as exc:
        raise _fail(source, f"cannot be read ({exc.strerror or exc})", None) from None
    if len(found) > 1:
        raise _fail(source, f"it holds {len(found)} '{key}' metadata entries; the file was edited", fix)
    return found[0] if found else None


def _entry(data: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a small message (a metadata entry: 1 key, 2 value)."""
    import io

    fh, out = io.BytesIO(data), {}
    while fh.tell() < len(data):
        tag = _varint(fh)
        field, wire = tag >> 3, tag & 7
        if wire != 2:
            raise ValueError(f"metadata entry field {field} has wire type {wire}")
        length = _varint(fh)
        if fh.tell() + length > len(data):
            raise _Truncated
        out[field] = fh.read(length)
    return out


__all__ = ["check_calibration", "check_classes", "check_fields", "onnx_metadata_entry", "parse_metadata",
           "safetensors_header_size"]
