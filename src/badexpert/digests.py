"""The package's one place for content digests: model fingerprints, bundle checksums, cache keys,
image hashes and file digests.

Every digest here is part of a file format or a cache key (cached models, detector files, bundles
and grid results are found or verified by them), so each rule is fixed: the framing strings below
are exactly what earlier versions hashed, and a change to any of them is a format change.

- :func:`json_digest`: SHA-256 of a value's canonical JSON (the package's JSON policy, keys sorted),
  optionally truncated: experiment, grid and component cache keys.
- :func:`update_tensors` / :func:`tensors_sha256`: SHA-256 over named tensors (name, dtype, shape
  and raw bytes), in one of the framings :data:`MODEL_FRAME`, :data:`BUNDLE_FRAME`,
  :data:`COMPONENT_FRAME`.
- :func:`file_sha256`: SHA-256 of a file's content, read in blocks.
- :func:`row_hashes`: one 63-bit BLAKE2b hash per row of a uint8 array (image content hashes).

Torch is never imported here: tensor functions take tensors from callers that have it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .jsonable import to_jsonable

#: ``name|dtype|[shape]|``: a model's weights fingerprint (:func:`badexpert.io.model_fingerprint`).
MODEL_FRAME = "{name}|{dtype}|{shape_list}|"
#: ``|name|dtype|[shape]|``: a bundle's checksum, after its metadata (:mod:`badexpert.deploy.guard`).
BUNDLE_FRAME = "|{name}|{dtype}|{shape_list}|"
#: ``name|dtype|(shape)|``: cached attack components (:mod:`badexpert.attacks.components`).
COMPONENT_FRAME = "{name}|{dtype}|{shape_tuple}|"


def canonical_json(obj: Any, *, jsonable: bool = True) -> str:
    """The JSON text digests are taken of: keys sorted, default separators; ``jsonable`` first
    converts tensors, numpy values and paths by the package's one policy."""
    return json.dumps(to_jsonable(obj) if jsonable else obj, sort_keys=True)


def json_digest(obj: Any, *, length: int | None = None, jsonable: bool = True) -> str:
    """Hex SHA-256 of :func:`canonical_json` of ``obj``, its first ``length`` characters if given."""
    return sha256_hex(canonical_json(obj, jsonable=jsonable).encode(), length=length)


def sha256_hex(data: bytes, *, length: int | None = None) -> str:
    h = hashlib.sha256(data).hexdigest()
    return h if length is None else h[:length]


def tensor_bytes(t) -> bytes:
    """The raw bytes of a tensor (detached, on the CPU, contiguous, C order); bfloat16, which
    numpy cannot hold, as its bit pattern."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def update_tensors(h, tensors: Mapping[str, Any] | Iterable[tuple[str, Any]], frame: str = MODEL_FRAME) -> None:
    """Feed named tensors to hash ``h`` in name order: each one's ``frame`` (formatted with
    ``name``, ``dtype``, ``shape_list`` and ``shape_tuple``), then its raw bytes."""
    items = sorted(tensors.items() if isinstance(tensors, Mapping) else tensors, key=lambda kv: kv[0])
    for name, t in items:
        shape = tuple(int(s) for s in t.shape)
        h.update(frame.format(name=name, dtype=t.dtype, shape_list=list(shape), shape_tuple=shape).encode())
        h.update(tensor_bytes(t))


def tensors_sha256(tensors: Mapping[str, Any], frame: str = MODEL_FRAME, *, prefix: str = "") -> str:
    """``prefix`` + hex SHA-256 of named tensors (:func:`update_tensors`)."""
    h = hashlib.sha256()
    update_tensors(h, tensors, frame)
    return prefix + h.hexdigest()


def file_sha256(path: str | Path, *, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """One 63-bit content hash per row of a 2-D array (int64): the first 8 bytes of BLAKE2b of the
    row's bytes, little-endian, shifted right by one (non-negative)."""
    flat = np.ascontiguousarray(rows).reshape(len(rows), -1)
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") >> 1
                     for r in flat], dtype=np.int64)


__all__ = ["BUNDLE_FRAME", "COMPONENT_FRAME", "MODEL_FRAME", "canonical_json", "file_sha256", "json_digest",
           "row_hashes", "sha256_hex", "tensor_bytes", "tensors_sha256", "update_tensors"]
