"""An HTTP service in front of a guard: ``badexpert serve BUNDLE``.

:func:`create_app` builds a FastAPI application around a *service model*: anything callable as
``model(x) -> dict`` on a numpy batch ``x`` (uint8 ``[0, 255]`` or float32 ``[0, 1]``, shape
``[N, C, H, W]``) returning numpy arrays ``label``, ``confidence``, ``score``, ``p_value`` and
``reject`` (and optionally a list ``reason``), with attributes ``classes``, ``input_shape`` and
``fpr_target`` (and optionally ``clean_rejection_rate``, the expected share of all clean inputs
rejected, the drift monitor's reference). :class:`GuardAdapter` gives a :class:`badexpert.guard.Guard` that shape;
``badexpert.export.OnnxGuard`` has it natively. :func:`serve` loads a bundle, binds the socket and
runs uvicorn.

Endpoints: ``POST /v1/classify`` (JSON nested arrays, multipart image uploads, a single image
body or raw tensor bytes), ``GET /v1/status``, ``/healthz``, ``/readyz`` and ``/metrics``
(Prometheus text format, written here without a client library).

How a request is served: the body is read under ``max_body_mb``; it is parsed into one numpy
batch by small functions that raise :class:`RequestError` (a :class:`BadExpertError` with an HTTP
status); every batch goes through the package's one conversion rule
(:func:`badexpert.data.core.check_images` with ``nonfinite="allow"``: uint8 means ``[0, 255]``,
float means ``[0, 1]``, NaN/inf pixels reach the guard, which rejects them). The batch joins an
asyncio queue; one worker gathers queued inputs up to ``max_batch``, waiting at most
``batch_wait_ms`` for more (and not at all when no other request is being read or parsed), runs
the model once in a dedicated thread (one forward at a time) and answers each request its slice;
requests that arrive while the model runs are gathered into the next batch. Every served input
also enters the :class:`DriftMonitor`'s window.

fastapi, uvicorn and python-multipart are imported inside the functions that need them, so the
package imports without them; :func:`require_server_deps` turns their absence into one
:class:`BadExpertError` naming the ``serve`` extra.
"""

# no ``from __future__ import annotations``: FastAPI resolves the endpoints' annotations (``Request``,
# imported inside create_app) at definition time
import asyncio
import json
import logging
import math
import os
import re
import socket
import sys
import time
import traceback
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Callable, Mapping

import numpy as np

from .errors import BadExpertError
from .validation import OneOf, PositiveFloat, PositiveInt, Range, validate_fields

SERVE_EXTRA = "install the serve extra: pip install 'badexpert[serve]'"
LOGGER = "badexpert.serve"
ON_REJECT = ("flag", "abstain")
JSON_DTYPES = ("uint8", "float32")
#: The classification and status routes (HTTP paths, not files).
CLASSIFY_ROUTE = "/v1/classify"
STATUS_ROUTE = "/v1/status"
#: Linux's per-process memory file (a kernel interface); where it is absent the gauge is left out.
PROC_STATM = "/proc/self/statm"
RAW_DTYPES = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_JSON_LITERALS = re.compile(rb"\b(?:true|false|null)\b")

log = logging.getLogger(LOGGER)


class RequestError(BadExpertError):
    """A request the service refuses: one-line message and the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = int(status)


class Unavailable(RequestError):
    """The service cannot take the request now (warming up, overloaded, shutting down): 503."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 503)


def require_server_deps():
    """Import fastapi and uvicorn (and check python-multipart), or raise one BadExpertError."""
    missing = []
    for name in ("fastapi", "uvicorn", "python_multipart"):
        try:
            __import__(name)
        except ImportError:
            missing.append("python-multipart" if name == "python_multipart" else name)
    if missing:
        raise BadExpertError(f"the serve command needs {', '.join(missing)}, which is not installed; {SERVE_EXTRA}")
    import fastapi
    import uvicorn

    return fastapi, uvicorn


# --- settings ------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Limits and behaviour of the service (CLI options of ``badexpert serve``)."""

    max_body_mb: PositiveFloat = 16.0  #: largest request body, MiB (413 above)
    max_batch: PositiveInt = 256  #: most inputs in one request, and in one forward pass (413 above)
    max_queue: PositiveInt | None = None  #: most inputs waiting for the model (503 above); default 4 x max_batch
    batch_wait_ms: Annotated[float, Range(ge=0)] = 5.0  #: longest wait to fill a batch (only while other requests are being read)
    strict_size: bool = False  #: refuse uploaded images of another size instead of resizing them
    on_reject: Annotated[str, OneOf(*ON_REJECT)] = "flag"  #: "flag": answer everything; "abstain": no label/class/confidence for rejected inputs
    drift_window: PositiveInt = 500  #: served inputs in the drift monitor's sliding window
    drift_alpha: Annotated[float, Range(gt=0, lt=1)] = 1e-3  #: significance of the drift alarm's binomial test
    drift_rate: Annotated[float, Range(gt=0, lt=1)] | None = None  #: reference rejection rate (default: the detector's expected clean rejection rate)

    def validate(self) -> "Settings":
        """Types and ranges through the package's one validation layer; one-line errors."""
        validate_fields(self, "serve setting")
        if self.max_queue is not None and self.max_queue < self.max_batch:
            raise BadExpertError(f"max_queue ({self.max_queue}) must be at least max_batch ({self.max_batch})")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def queue_limit(self) -> int:
        return int(self.max_queue if self.max_queue is not None else 4 * self.max_batch)


# --- service models --------------------------------------------------------------------------------
class GuardAdapter:
    """A :class:`badexpert.guard.Guard` behind the service-model call shape (the module docstring).

    ``bare=True`` runs only the suspect model (no detector: nothing is ever rejected, score and
    p-value are NaN); it exists to measure what the guard costs, never to deploy.
    """

    def __init__(self, guard, *, bare: bool = False) -> None:
        import copy

        if getattr(guard, "policy", "flag") != "flag":  # the service reads every flag and applies --on-reject itself
            guard = copy.copy(guard)
            guard.policy = "flag"
        self.guard = guard
        self.bare = bool(bare)
        det = guard.detector
        self.input_shape = tuple(int(v) for v in guard.input_shape)
        self.classes = list(guard.classes) if guard.classes else None
        self.fpr_target = None if self.bare else float(det.fpr_target_)
        self.clean_rejection_rate = None if self.bare else float(det.clean_rejection_rate_)
        self.threshold = None if self.bare else float(det.threshold_)
        meta = guard.meta or {}
        dataset = meta.get("dataset")
        self.info = {
            "kind": "bare model (no detector)" if self.bare else f"{det.name} guard",
            "arch": meta.get("arch"),
            "dataset": dataset.get("name") if isinstance(dataset, dict) else dataset,
            "fingerprint": meta.get("fingerprint"),
            "calibration_size": None if self.bare else int(det.calibration_size_),
            "forward_passes_per_input": 1 if self.bare else int(guard.forward_passes_per_input),
        }

    def __call__(self, x: np.ndarray) -> dict:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x))
        if self.bare:
            from .data.core import to_float
            from .utils import eval_mode

            model = self.guard.model
            with torch.no_grad(), eval_mode(model):
                prob = torch.softmax(model(to_float(t)).float(), 1)
            conf, label = prob.max(1)
            n = len(label)
            nan = np.full(n, np.nan, dtype=np.float32)
            return {"label": label.numpy(), "confidence": conf.numpy(), "score": nan, "p_value": nan.copy(),
                    "reject": np.zeros(n, dtype=bool), "reason": ["not checked (bare model)"] * n}
        out = self.guard(t)
        return {"label": out.label.numpy(), "confidence": out.confidence.numpy(), "score": out.score.numpy(),
                "p_value": out.p_value.numpy(), "reject": out.reject.numpy(), "reason": list(out.reason)}


def _reasons(out: dict, n: int) -> list[str]:
    """The model's reasons, or (for a model that gives none) the guard's own rule applied to its flags."""
    from .reasons import ACCEPTED, REJECT_NONFINITE_SCORE, REJECT_SCORE

    if out.get("reason") is not None:
        return [str(r) for r in out["reason"]]
    score = np.asarray(out["score"], dtype=np.float64)
    reject = np.asarray(out["reject"], dtype=bool)
    return [REJECT_NONFINITE_SCORE if math.isnan(s) else REJECT_SCORE if r else ACCEPTED
            for s, r in zip(score.tolist(), reject.tolist())]


def _check_output(out: Any, n: int) -> dict:
    if not isinstance(out, Mapping):
        raise RuntimeError(f"the service model returned {type(out).__name__}, not a dict of arrays")
    fixed = {}
    for key in ("label", "confidence", "score", "p_value", "reject"):
        if key not in out:
            raise RuntimeError(f"the service model's output lacks '{key}'")
        arr = np.asarray(out[key]).reshape(-1)
        if len(arr) != n:
            raise RuntimeError(f"the service model returned {len(arr)} values of '{key}' for {n} inputs")
        fixed[key] = arr
    fixed["reason"] = _reasons({**out, **fixed}, n)
    return fixed


# --- request parsing (each raises RequestError) ---------------------------------------------------
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
    """The package's conversion rule (:func:`badexpert.arrays.check_array`, torch-free;
    non-finite values allowed: the guard rejects them); a refusal becomes a 422."""
    from .arrays import check_array

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
    if dtype == "uint8":
        if arr.dtype.kind == "f":
            if not bool(np.isfinite(arr).all()):
                raise RequestError('uint8 inputs cannot hold NaN or inf; send "dtype": "float32" to have such inputs '
                                   "rejected by the guard")
            if not bool((arr == np.round(arr)).all()):
                raise RequestError('uint8 inputs must be whole numbers 0-255; for values in [0, 1] send "dtype": '
                                   '"float32"')
        if arr.size and (float(arr.min()) < 0 or float(arr.max()) > 255):
            raise RequestError(f"uint8 inputs must lie in [0, 255], got values in [{arr.min():g}, {arr.max():g}]")
        arr = arr.astype(np.uint8)
        return check_batch(arr, input_shape, max_batch)
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
    from .imagefile import _BILINEAR, open_image

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


# --- drift / attack-campaign monitoring ------------------------------------------------------------
class DriftMonitor:
    """Sliding window over the last ``window`` served inputs' reject flags (and p-values).

    Under normal (clean) traffic each input is rejected with probability at most ``rate`` (the
    detector's expected clean rejection rate: the conformal bound on the inputs the model gets
    right, the measured rate on its calibration errors), so the number ``k`` of rejections among the
    ``n`` inputs of the window is at most Binomial(n, rate) in distribution. Every time the window
    advances, the one-sided exact binomial test ``P(K >= k) = binom.sf(k - 1, n, rate)`` is
    computed; the alarm is on while that p-value is below ``alpha`` and clears when it no longer is.
    """

    def __init__(self, rate: float | None, *, window: int = 500, alpha: float = 1e-3,
                 on_change: Callable[[bool, dict], None] | None = None) -> None:
        self.rate = rate
        self.window = int(window)
        self.alpha = float(alpha)
        self.on_change = on_change
        self.flags: deque[bool] = deque(maxlen=self.window)
        self.p_values: deque[float] = deque(maxlen=self.window)
        self.k = 0
        self.p_value = 1.0
        self.alarm = False
        self.alarms_raised = 0
        self.alarm_since: float | None = None
        self.checks = 0
        if self.enabled:
            import scipy.stats  # noqa: F401 - imported now, not inside the first request

    @property
    def enabled(self) -> bool:
        return self.rate is not None and 0 < self.rate < 1

    def update(self, reject, p_values) -> None:
        if not self.enabled:
            return
        for r, p in zip(np.asarray(reject, dtype=bool).tolist(), np.asarray(p_values, dtype=np.float64).tolist()):
            if len(self.flags) == self.window:
                self.k -= self.flags[0]
            self.flags.append(r)
            self.p_values.append(p)
            self.k += r
        self._test()

    def _test(self) -> None:
        from scipy.stats import binom

        n, k = len(self.flags), self.k
        self.p_value = float(binom.sf(k - 1, n, self.rate)) if k > 0 else 1.0
        self.checks += 1
        alarm = self.p_value < self.alpha
        if alarm != self.alarm:
            self.alarm = alarm
            if alarm:
                self.alarms_raised += 1
                self.alarm_since = time.time()
            else:
                self.alarm_since = None
            if self.on_change is not None:
                self.on_change(alarm, self.state())

    def state(self) -> dict:
        n = len(self.flags)
        finite = [p for p in self.p_values if not math.isnan(p)]
        return {
            "enabled": self.enabled,
            "test": "one-sided exact binomial: P(K >= k), K ~ Binomial(n, rate)",
            "window": self.window, "n": n, "rejections": self.k,
            "rejection_rate": (self.k / n) if n else None,
            "rate": self.rate, "alpha": self.alpha, "p_value": self.p_value,
            "mean_input_p_value": (sum(finite) / len(finite)) if finite else None,
            "alarm": self.alarm, "alarms_raised": self.alarms_raised,
            "alarm_since": (datetime.fromtimestamp(self.alarm_since, timezone.utc).isoformat(timespec="seconds")
                            if self.alarm_since else None),
        }


# --- metrics -----------------------------------------------------------------------------------------
class Metrics:
    """Counters and the latency histogram, rendered in the Prometheus text format by hand.

    Served traffic (requests, inputs, rejections, latency, drift window) and refused requests are
    counted apart: a bad request only moves ``badexpert_bad_requests_total``.
    """

    BAD_STATUSES = (400, 404, 405, 413, 415, 422)

    def __init__(self) -> None:
        self.started = time.time()
        self.requests = 0
        self.inputs = 0
        self.rejections = 0
        self.bad_requests = {s: 0 for s in self.BAD_STATUSES}
        self.unavailable = 0
        self.errors = 0
        self.batches = 0
        self.batch_inputs = 0
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe_served(self, n: int, rejected: int, seconds: float) -> None:
        self.requests += 1
        self.inputs += n
        self.rejections += rejected
        self.latency_sum += seconds
        self.latency_count += 1
        for i, le in enumerate(LATENCY_BUCKETS):
            if seconds <= le:
                self.buckets[i] += 1

    def bad(self, status: int) -> None:
        self.bad_requests[status] = self.bad_requests.get(status, 0) + 1

    def render(self, *, ready: bool, queued: int, drift: DriftMonitor, model_info: dict) -> str:
        lines: list[str] = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lab = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""
                lines.append(f"{name}{lab} {_num(value)}")

        metric("badexpert_requests_total", "counter", "classify requests served (2xx)", [({}, self.requests)])
        metric("badexpert_inputs_total", "counter", "inputs classified in served requests", [({}, self.inputs)])
        metric("badexpert_rejections_total", "counter", "served inputs rejected by the guard", [({}, self.rejections)])
        metric("badexpert_bad_requests_total", "counter", "classify requests refused as bad (4xx), by status",
               [({"status": str(s)}, v) for s, v in sorted(self.bad_requests.items())])
        metric("badexpert_unavailable_total", "counter", "classify requests answered 503 (not ready, overloaded)",
               [({}, self.unavailable)])
        metric("badexpert_errors_total", "counter", "classify requests that failed inside the service (5xx)",
               [({}, self.errors)])
        metric("badexpert_batches_total", "counter", "forward passes of the model (micro-batches)", [({}, self.batches)])
        metric("badexpert_batch_inputs_total", "counter", "inputs in those forward passes", [({}, self.batch_inputs)])
        cum = [({"le": _num(le)}, v) for le, v in zip(LATENCY_BUCKETS, self.buckets)]
        lines.append("# HELP badexpert_request_latency_seconds latency of served classify requests")
        lines.append("# TYPE badexpert_request_latency_seconds histogram")
        for labels, v in cum + [({"le": "+Inf"}, self.latency_count)]:
            lines.append(f'badexpert_request_latency_seconds_bucket{{le="{labels["le"]}"}} {v}')
        lines.append(f"badexpert_request_latency_seconds_sum {_num(self.latency_sum)}")
        lines.append(f"badexpert_request_latency_seconds_count {self.latency_count}")
        st = drift.state()
        metric("badexpert_drift_alarm", "gauge", "1 while the rejection rate in the window exceeds the reference rate "
               "beyond chance (binomial test p-value < alpha)", [({}, int(st["alarm"]))])
        metric("badexpert_drift_p_value", "gauge", "p-value of the binomial test of the window's rejections",
               [({}, st["p_value"])])
        metric("badexpert_drift_window_inputs", "gauge", "served inputs in the drift window", [({}, st["n"])])
        metric("badexpert_drift_window_rejections", "gauge", "rejected inputs in the drift window", [({}, st["rejections"])])
        metric("badexpert_drift_rejection_rate", "gauge", "share of rejected inputs in the drift window",
               [({}, st["rejection_rate"] if st["rejection_rate"] is not None else float("nan"))])
        metric("badexpert_drift_reference_rate", "gauge", "reference rejection rate (expected share of clean inputs rejected)",
               [({}, st["rate"] if st["rate"] is not None else float("nan"))])
        metric("badexpert_drift_alarms_total", "counter", "times the drift alarm was raised", [({}, st["alarms_raised"])])
        metric("badexpert_ready", "gauge", "1 once the model is loaded and warmed up", [({}, int(ready))])
        metric("badexpert_queue_inputs", "gauge", "inputs waiting for the model", [({}, queued)])
        metric("badexpert_info", "gauge", "the served model",
               [({k: str(v) for k, v in model_info.items() if v is not None}, 1)])
        rss = _resident_bytes()
        if rss is not None:
            metric("process_resident_memory_bytes", "gauge", "resident memory of the service", [({}, rss)])
        metric("process_start_time_seconds", "gauge", "start time of the service (unix seconds)", [({}, self.started)])
        return "\n".join(lines) + "\n"


def _escape(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v) -> str:
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _resident_bytes() -> int | None:
    """The process's resident memory from Linux's ``/proc/self/statm`` (a kernel interface, present
    on every Linux host); ``None`` where there is none (macOS, Windows): the gauge is then left out."""
    try:
        with open(PROC_STATM) as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# --- structured logs ---------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None)
        if event is None:  # uvicorn's, other libraries' and Python warnings' lines
            event = "warning" if record.name == "py.warnings" else "server"
        doc = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "event": event}
        if not hasattr(record, "event"):
            try:
                message = record.getMessage()
            except Exception:  # a library's malformed call (arguments that do not fit): its raw parts
                message = f"{record.msg} {record.args!r}"
            doc["message"] = str(message).strip()
            doc["logger"] = record.name
        doc.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            doc["error"] = "".join(traceback.format_exception_only(*record.exc_info[:2])).strip().splitlines()[-1]
            doc["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(_strict_json(doc), default=str, allow_nan=False)


def _strict_json(v):
    """NaN and inf (not JSON) become null, recursively."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict_json(x) for x in v]
    return v


#: The loggers the service's JSON handler is put on; "" is the root logger, which every other
#: library's logger (fastapi, starlette, asyncio, python-multipart) and Python's warnings reach.
LOG_TARGETS = (LOGGER, "uvicorn", "uvicorn.error", "")


def configure_logging(level: str = "info", stream=None) -> logging.Handler:
    """Send every log line of the process to ``stream`` (stderr) as one JSON object per line: the
    service's and uvicorn's from ``level``, other libraries' and Python warnings (captured through
    :func:`logging.captureWarnings`) from ``warning`` or ``level`` if higher. Returns the handler;
    :func:`restore_logging` undoes it all."""
    lvl = getattr(logging, str(level).upper(), None)
    if not isinstance(lvl, int):
        raise BadExpertError(f"unknown log level '{level}'; choose debug, info, warning or error")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.saved = []  # (logger, level, propagate) before, for restore_logging
    for name in LOG_TARGETS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h.formatter, JsonFormatter):
                lg.removeHandler(h)
        handler.saved.append((lg, lg.level, lg.propagate))
        lg.addHandler(handler)
        if name:
            lg.setLevel(lvl)
            lg.propagate = False
        else:  # other libraries: their warnings and errors, not their chatter
            lg.setLevel(max(lvl, logging.WARNING))
    logging.captureWarnings(True)
    return handler


def restore_logging(handler: logging.Handler) -> None:
    """Undo :func:`configure_logging`: the handler removed, levels and propagation as they were."""
    handler.flush()
    logging.captureWarnings(False)
    for lg, level, propagate in getattr(handler, "saved", ()):
        lg.removeHandler(handler)
        lg.setLevel(level)
        lg.propagate = propagate


def _event(level: int, event: str, exc_info=None, **fields) -> None:
    log.log(level, event, extra={"event": event, "fields": fields}, exc_info=exc_info)


# --- micro-batching ----------------------------------------------------------------------------------
class _Job:
    __slots__ = ("x", "future")

    def __init__(self, x: np.ndarray, future: asyncio.Future) -> None:
        self.x = x
        self.future = future


class MicroBatcher:
    """One worker coroutine: gather queued requests' inputs up to ``max_batch`` (waiting at most
    ``wait_s`` for more while ``incoming`` requests are still being read or parsed), run the model once in a single dedicated thread, hand each request its
    slice. Inputs of different dtypes (uint8 / float32) in one gathering are run as one forward per
    dtype, so every input is converted exactly as the Python API converts it."""

    def __init__(self, model, *, max_batch: int, wait_s: float, max_queue: int,
                 on_batch: Callable[[dict, int], None]) -> None:
        self.model = model
        self.max_batch = int(max_batch)
        self.wait_s = float(wait_s)
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self.queued = 0
        self.incoming = 0  # requests being read or parsed: inputs on their way to the queue
        self.ready = False
        self.failure: str | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="badexpert-model")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(Unavailable("the service is shutting down; retry"))
        self._executor.shutdown(wait=True)

    async def submit(self, x: np.ndarray) -> dict:
        if not self.ready or self._queue is None:
            raise Unavailable(self.failure or "the service is warming up; retry shortly")
        if self.queued + len(x) > self.max_queue:
            raise Unavailable(f"the service is overloaded ({self.queued} inputs waiting); retry shortly")
        fut = asyncio.get_running_loop().create_future()
        self.queued += len(x)
        self._queue.put_nowait(_Job(x, fut))
        return await fut

    def _forward(self, arrays: list[np.ndarray]) -> list[dict]:
        """In the model thread: one forward per dtype group, results back in request order."""
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.dtype.str, []).append(i)
        results: list[dict | None] = [None] * len(arrays)
        for idx in groups.values():
            x = np.concatenate([arrays[i] for i in idx]) if len(idx) > 1 else arrays[idx[0]]
            out = _check_output(self.model(x), len(x))
            start = 0
            for i in idx:
                n = len(arrays[i])
                results[i] = {k: v[start:start + n] for k, v in out.items()}
                start += n
        return results  # type: ignore[return-value]

    async def warm_up(self, input_shape) -> None:
        loop = asyncio.get_running_loop()
        x = np.zeros((1, *input_shape), dtype=np.uint8)
        t0 = time.perf_counter()
        await loop.run_in_executor(self._executor, self._forward, [x])
        await loop.run_in_executor(self._executor, self._forward, [np.zeros((min(self.max_batch, 32), *input_shape),
                                                                            dtype=np.uint8)])
        self.ready = True
        _event(logging.INFO, "ready", warmup_ms=round((time.perf_counter() - t0) * 1000, 1))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        carry: _Job | None = None
        while True:
            job = carry if carry is not None else await queue.get()
            carry = None
            jobs, n = [job], len(job.x)
            deadline = loop.time() + self.wait_s
            while n < self.max_batch:
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    if self.incoming == 0:  # nothing on its way: waiting would only add latency
                        break
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if n + len(nxt.x) > self.max_batch:
                    carry = nxt
                    break
                jobs.append(nxt)
                n += len(nxt.x)
            self.queued -= n
            live = [j for j in jobs if not j.future.done()]  # a cancelled request needs no answer
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._forward, [j.x for j in live])
            except asyncio.CancelledError:
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(Unavailable("the service is shutting down; retry"))
                raise
            except Exception as exc:  # the model failed: those requests get a 500, the worker goes on
                _event(logging.ERROR, "model_error", exc_info=exc, n_inputs=sum(len(j.x) for j in live))
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            try:
                self.on_batch({k: np.concatenate([r[k] for r in results]) if k != "reason" else
                               [s for r in results for s in r[k]] for k in results[0]},
                              sum(len(j.x) for j in live))
            except Exception as exc:  # monitoring must never take the service down
                _event(logging.ERROR, "monitor_error", exc_info=exc)
            for j, r in zip(live, results):
                if not j.future.done():
                    j.future.set_result(r)


# --- the application ---------------------------------------------------------------------------------
def _json_bytes(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _finite_or_none(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _request_id(headers) -> str:
    rid = headers.get("x-request-id")
    if rid and _REQUEST_ID.fullmatch(rid):
        return rid
    return uuid.uuid4().hex[:16]


async def _read_body(request, limit: int) -> bytes:
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


CONTENT_TYPES = "application/json, multipart/form-data, application/octet-stream (with X-Shape) or image/*"


def create_app(model, *, settings: Settings | None = None):
    """The FastAPI application serving ``model`` (a :class:`GuardAdapter`, an ``OnnxGuard`` or a
    :class:`badexpert.guard.Guard`, which is wrapped)."""
    fastapi, _ = require_server_deps()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    settings = (settings or Settings()).validate()
    guard_module = sys.modules.get("badexpert.guard")  # not imported: the model cannot be a Guard (ONNX)
    if guard_module is not None and isinstance(model, guard_module.Guard):
        model = GuardAdapter(model)
    for attr in ("input_shape", "classes", "fpr_target"):
        if not hasattr(model, attr):
            raise BadExpertError(f"the service model lacks the attribute '{attr}'")
    input_shape = tuple(int(v) for v in model.input_shape)
    if len(input_shape) != 3:
        raise BadExpertError(f"the service model's input_shape must be (C, H, W), got {input_shape}")
    classes = list(model.classes) if model.classes else None
    fpr = getattr(model, "fpr_target", None)
    # the reference is the expected rejection rate of clean traffic: above the FPR target when the
    # threshold was calibrated on the inputs the model gets right and it also rejects its errors
    clean_rate = getattr(model, "clean_rejection_rate", None)
    if clean_rate is None:
        clean_rate = fpr
    rate = settings.drift_rate if settings.drift_rate is not None else (float(clean_rate) if clean_rate is not None else None)
    info = dict(getattr(model, "info", None) or {"kind": type(model).__name__,
                                                 "fingerprint": getattr(model, "model_fingerprint", None)})
    model_info = {**info, "input_shape": "x".join(map(str, input_shape)),
                  "fpr_target": None if fpr is None else f"{float(fpr):g}"}

    metrics = Metrics()

    def on_drift(alarm: bool, state: dict) -> None:
        fields = {k: state[k] for k in ("n", "rejections", "rejection_rate", "rate", "p_value", "alpha")}
        if alarm:
            _event(logging.WARNING, "drift_alarm_raised", **fields)
        else:
            _event(logging.INFO, "drift_alarm_cleared", **fields)

    drift = DriftMonitor(rate, window=settings.drift_window, alpha=settings.drift_alpha, on_change=on_drift)

    def on_batch(out: dict, n: int) -> None:
        metrics.batches += 1
        metrics.batch_inputs += n
        drift.update(out["reject"], out["p_value"])

    batcher = MicroBatcher(model, max_batch=settings.max_batch, wait_s=settings.batch_wait_ms / 1000,
                           max_queue=settings.queue_limit, on_batch=on_batch)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()

        async def warm():
            try:
                await batcher.warm_up(input_shape)
            except Exception as exc:
                batcher.failure = f"the model failed to warm up ({str(exc).splitlines()[0] if str(exc) else exc!r})"
                _event(logging.ERROR, "warmup_failed", exc_info=exc)

        warming = asyncio.get_running_loop().create_task(warm())
        try:
            yield
        finally:
            warming.cancel()
            await batcher.stop()

    app = FastAPI(title="badexpert", summary="image classifier behind a backdoor-input detector", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.drift = drift
    app.state.batcher = batcher
    app.state.model = model

    def answer(status: int, doc: dict, rid: str | None = None, headers: dict | None = None) -> Response:
        h = dict(headers or {})
        if rid:
            h["X-Request-ID"] = rid
        return Response(_json_bytes(doc), status_code=status, media_type="application/json", headers=h)

    def refuse(exc: BadExpertError, rid: str, started: float, path: str = CLASSIFY_ROUTE) -> Response:
        """The one place a refused request becomes an answer: ``{"error": "..."}``, one line."""
        status = exc.status if isinstance(exc, RequestError) else 422
        message = " ".join(str(exc).split()) or type(exc).__name__
        headers = {}
        if status == 503:
            metrics.unavailable += 1
            headers["Retry-After"] = "1"
        else:
            metrics.bad(status)
        _event(logging.INFO, "bad_request" if status != 503 else "unavailable", request_id=rid, path=path,
               status=status, error=message, latency_ms=round((time.perf_counter() - started) * 1000, 2))
        return answer(status, {"error": message}, rid, headers)

    async def parse(request: Request, body: bytes):
        """Body -> (checked batch, names or None, resized flags or None)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        shape, mb = input_shape, settings.max_batch
        if ctype == "application/json" or ctype.endswith("+json"):
            fn = (lambda: (parse_json_body(body, shape, mb), None, None))
        elif ctype == "application/octet-stream":
            fn = (lambda: (parse_raw_body(body, request.headers, shape, mb), None, None))
        elif ctype == "multipart/form-data":
            files = await read_multipart(body, request.headers, mb)
            fn = (lambda: decode_images(files, shape, settings.strict_size, mb))
        elif ctype.startswith("image/"):
            fn = (lambda: decode_images([("<body>", body)], shape, settings.strict_size, mb))
        elif not ctype:
            raise RequestError(f"missing Content-Type; send {CONTENT_TYPES}", 415)
        else:
            raise RequestError(f"unsupported Content-Type '{ctype[:64]}'; send {CONTENT_TYPES}", 415)
        if len(body) < 64 * 1024:
            return fn()
        return await asyncio.to_thread(fn)  # large bodies: parse off the event loop

    @app.post(CLASSIFY_ROUTE)
    async def classify(request: Request):
        started = time.perf_counter()
        rid = _request_id(request.headers)
        try:
            if not batcher.ready:
                raise Unavailable(batcher.failure or "the service is warming up; retry shortly")
            batcher.incoming += 1
            try:
                body = await _read_body(request, settings.max_body_bytes)
                x, names, resized = await parse(request, body)
            finally:
                batcher.incoming -= 1
            out = await batcher.submit(x)
        except ClientDisconnect:
            _event(logging.INFO, "client_disconnected", request_id=rid)
            return Response(status_code=499)
        except BadExpertError as exc:
            return refuse(exc, rid, started)
        except Exception as exc:
            metrics.errors += 1
            _event(logging.ERROR, "internal_error", exc_info=exc, request_id=rid)
            return answer(500, {"error": f"internal error while serving request {rid}; see the service log"}, rid)
        n = len(x)
        abstain = settings.on_reject == "abstain"
        results = []
        for i in range(n):
            rej = bool(out["reject"][i])
            label = int(out["label"][i])
            item = {
                "label": label,
                "class": classes[label] if classes is not None and 0 <= label < len(classes) else None,
                "confidence": _finite_or_none(out["confidence"][i]),
                "score": _finite_or_none(out["score"][i]),
                "p_value": _finite_or_none(out["p_value"][i]),
                "reject": rej,
                "reason": out["reason"][i],
            }
            if abstain and rej:
                item.update(label=None, confidence=None, **{"class": None})
            if names is not None:
                item["name"] = names[i]
                item["resized"] = bool(resized[i])
            results.append(item)
        rejected = int(sum(r["reject"] for r in results))
        seconds = time.perf_counter() - started
        metrics.observe_served(n, rejected, seconds)
        _event(logging.INFO, "classify", request_id=rid, n_inputs=n, rejections=rejected,
               latency_ms=round(seconds * 1000, 2))
        return answer(200, {"request_id": rid, "n": n, "rejected": rejected, "results": results}, rid)

    @app.get("/healthz")
    async def healthz():
        return answer(200, {"status": "ok"})

    @app.get("/readyz")
    async def readyz():
        if batcher.ready:
            return answer(200, {"status": "ready"})
        return answer(503, {"error": batcher.failure or "warming up"}, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def prometheus():
        text = metrics.render(ready=batcher.ready, queued=batcher.queued, drift=drift, model_info=model_info)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get(STATUS_ROUTE)
    async def status():
        return answer(200, {
            "ready": batcher.ready,
            "model": {**info, "input_shape": list(input_shape), "classes": classes,
                      "fpr_target": None if fpr is None else float(fpr),
                      "clean_rejection_rate": None if clean_rate is None else float(clean_rate),
                      "threshold": getattr(model, "threshold", None)},
            "limits": {**asdict(settings), "max_queue": settings.queue_limit},
            "drift": drift.state(),
            "served": {"requests": metrics.requests, "inputs": metrics.inputs, "rejections": metrics.rejections},
            "refused": {"bad_requests": sum(metrics.bad_requests.values()), "unavailable": metrics.unavailable,
                        "errors": metrics.errors},
        })

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if request.url.path == CLASSIFY_ROUTE and 400 <= exc.status_code < 500:
            metrics.bad(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 404:
            detail = f"no endpoint {request.url.path[:100]}; see /v1/classify, /v1/status, /healthz, /readyz, /metrics"
        return answer(exc.status_code, {"error": " ".join(str(detail).split())}, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors() or [{}]
        where = ".".join(str(v) for v in errors[0].get("loc", ()) or ("request",))
        if request.url.path == CLASSIFY_ROUTE:
            metrics.bad(422)
        message = f"invalid request: {where}: {errors[0].get('msg', 'not valid')}"
        return answer(422, {"error": " ".join(message.split())[:300]})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # Starlette re-raises the exception after this answer: uvicorn logs it (a JSON line with its traceback)
        metrics.errors += 1
        return answer(500, {"error": f"internal error on {request.url.path[:100]}; see the service log"})

    return app


# --- running it --------------------------------------------------------------------------------------
def load_service_model(bundle: str | None = None, *, onnx: str | None = None, bare: bool = False):
    """The service model from a bundle (torch) or an exported ONNX guard; a damaged file is one
    BadExpertError."""
    if (bundle is None) == (onnx is None):
        raise BadExpertError("serve needs exactly one of a bundle file or an ONNX file")
    if onnx is not None:
        if bare:
            raise BadExpertError("bare mode needs a bundle, not an ONNX file")
        try:
            from .export import OnnxGuard
        except ImportError as exc:
            raise BadExpertError(f"cannot serve an ONNX file: {str(exc).splitlines()[0]}") from exc
        return OnnxGuard(onnx)
    from .guard import load_bundle

    return GuardAdapter(load_bundle(bundle), bare=bare)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port), or one BadExpertError."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise BadExpertError(f"port must be 0-65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BadExpertError(f"cannot resolve host '{host}' ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise BadExpertError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def serve(bundle: str | None, host: str = "127.0.0.1", port: int = 8000, *, settings: Settings | None = None,
          onnx: str | None = None, bare: bool = False, threads: int | None = None, log_level: str = "info") -> None:
    """Load ``bundle`` (or ``onnx``), bind ``host:port`` and serve until SIGTERM or SIGINT
    (graceful: requests in flight are answered; after SIGTERM this returns normally, after SIGINT
    KeyboardInterrupt follows). Everything that can be checked is checked before the socket is
    bound; each problem is one BadExpertError."""
    import signal
    import threading

    _, uvicorn = require_server_deps()
    settings = (settings or Settings()).validate()
    if getattr(logging, str(log_level).upper(), None) is None or str(log_level).lower() not in (
            "debug", "info", "warning", "error", "critical"):
        raise BadExpertError(f"unknown log level '{log_level}'; choose debug, info, warning or error")
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise BadExpertError(f"threads must be a positive integer, got {threads!r}")
        if onnx is None:  # the ONNX service never imports torch
            import torch

            torch.set_num_threads(threads)
    model = load_service_model(bundle, onnx=onnx, bare=bare)
    app = create_app(model, settings=settings)
    sock = bind_socket(host, port)
    handler = configure_logging(log_level)
    main_thread = threading.current_thread() is threading.main_thread()
    # uvicorn re-raises the signal it shut down for once it has restored the previous handler: a
    # no-op SIGTERM handler makes a graceful SIGTERM shutdown end normally (exit status 0)
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main_thread else None
    try:
        _event(logging.INFO, "listening", host=host, port=sock.getsockname()[1], source=str(onnx or bundle),
               model=getattr(model, "info", {}).get("kind"), pid=os.getpid(),
               settings={**asdict(settings), "max_queue": settings.queue_limit})
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", server_header=False,
                                timeout_graceful_shutdown=30)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        _event(logging.INFO, "stopped")
        restore_logging(handler)


__all__ = ["DriftMonitor", "GuardAdapter", "Metrics", "MicroBatcher", "RequestError", "Settings", "Unavailable",
           "bind_socket", "check_batch", "configure_logging", "create_app", "decode_image", "load_service_model",
           "parse_json_body", "parse_raw_body", "require_server_deps", "restore_logging", "serve"]
