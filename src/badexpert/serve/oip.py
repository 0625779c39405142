"""The Open Inference Protocol v2 (KServe / Triton HTTP) beside ``/v1/classify``.

Routes (the model's name is ``Settings.name``: the bundle's stem unless ``--name`` says; its one
version is ``"1"``, and every model route also answers under ``/versions/1``):

* ``GET /v2/health/live``, ``GET /v2/health/ready`` (503 while warming up), ``GET /v2`` (server
  metadata), ``GET /v2/models/{name}`` (model metadata), ``GET /v2/models/{name}/ready``;
* ``POST /v2/models/{name}/infer``: one input tensor ``images`` of shape ``[N, C, H, W]``,
  datatype ``UINT8`` (``[0, 255]``) or ``FP32`` / ``FP16`` / ``FP64`` (``[0, 1]``; NaN and inf
  pixels reach the guard, which rejects them), as JSON ``data`` (flat row-major or nested) or as
  binary tensor data (the ``binary_tensor_data`` extension: ``Inference-Header-Content-Length``
  and ``parameters.binary_data_size``); the guard's answers come back as named output tensors of
  shape ``[N]``: ``label`` (INT64; -1 for a rejected input under ``--on-reject abstain``),
  ``class`` (BYTES; only when the model has class names), ``confidence``, ``score``,
  ``p_value`` (FP32; NaN where there is no value, ``null`` in JSON, which has no NaN), ``reject``
  (BOOL) and ``reason`` (BYTES), each as JSON or binary data as asked.

Everything else is the service's: the body limit, the package's conversion rule and the JSON
number rule (:func:`.codecs.number_batch`), the micro-batcher, the reasons, the metrics, the drift
window and the one place a refused request becomes ``{"error": "..."}`` (which is also the
protocol's error object). Torch-free.
"""

import asyncio
import json
import logging
import math
import struct
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from ..errors import BadExpertError
from .codecs import RequestError, Unavailable, check_batch, conversion_rule, json_bytes, number_batch, read_body
from .logs import log_event

PREFIX = "/v2"
#: The model's one input (the name ``badexpert export`` gives the ONNX guard's input too).
INPUT_NAME = "images"
MODEL_VERSION = "1"
SERVER_NAME = "badexpert"
EXTENSIONS = ("binary_tensor_data",)
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Input datatypes: UINT8 means [0, 255], the float types [0, 1] (the package's conversion rule).
INPUT_DATATYPES = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"),
                   "FP64": np.dtype("<f8")}
_BINARY = {"INT64": np.dtype("<i8"), "FP32": np.dtype("<f4"), "BOOL": np.dtype(np.bool_)}
_FLOAT_HINT = '"datatype": "FP32"'
_REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
_INPUT_KEYS = ("name", "shape", "datatype", "parameters", "data")
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def is_infer_path(path: str) -> bool:
    """Whether ``path`` is an inference route (its refusals count as bad requests)."""
    parts = path.split("/")
    return (len(parts) in (5, 7) and parts[:3] == ["", "v2", "models"] and parts[-1] == "infer"
            and (len(parts) == 5 or parts[4] == "versions"))


def output_specs(has_classes: bool) -> list[tuple[str, str]]:
    """The model's output tensors, ``(name, datatype)``, in the order they are answered."""
    specs = [("label", "INT64")] + ([("class", "BYTES")] if has_classes else [])
    return specs + [("confidence", "FP32"), ("score", "FP32"), ("p_value", "FP32"), ("reject", "BOOL"),
                    ("reason", "BYTES")]


def model_metadata(name: str, input_shape: tuple[int, ...], has_classes: bool, platform: str) -> dict:
    return {"name": name, "versions": [MODEL_VERSION], "platform": platform,
            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, *map(int, input_shape)]}],
            "outputs": [{"name": n, "datatype": d, "shape": [-1]} for n, d in output_specs(has_classes)]}


@dataclass
class InferRequest:
    x: np.ndarray  #: the checked batch ``[N, C, H, W]``
    id: str | None  #: the request's ``id``, echoed
    outputs: list[tuple[str, bool]]  #: the outputs to answer, in order, and whether each is binary


def _parameters(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{where}: 'parameters' must be an object, got {type(value).__name__}")
    shm = [k for k in _SHARED_MEMORY if k in value]
    if shm:
        raise RequestError(f"{where}: shared memory ({shm[0]}) is not supported; send the data in the body")
    return value


def _flag(params: dict, key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise RequestError(f"{where}: parameter '{key}' must be true or false, got {json.dumps(value)[:40]}")
    return value


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """``(JSON header, binary data)`` of a request body (all JSON without the header)."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length.strip())
    except ValueError:
        raise RequestError(f"invalid {HEADER_LENGTH} {header_length[:32]!r}", 400) from None
    if not 0 < n <= len(body):
        raise RequestError(f"{HEADER_LENGTH} {n} does not fit in the {len(body)}-byte body", 400)
    return body[:n], body[n:]


def _load_json(text: bytes):
    if not text.strip():
        raise RequestError('the request body is empty; send {"inputs": [{"name": "images", ...}]}', 400)
    try:
        return json.loads(text)
    except RecursionError:
        raise RequestError("the JSON body is nested too deeply", 400) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"the body is not valid JSON ({str(exc).splitlines()[0]})", 400) from None


def _shape(value, input_shape: tuple[int, ...], max_batch: int) -> list[int]:
    where = f"input '{INPUT_NAME}'"
    want = f"[N, {', '.join(map(str, input_shape))}]"
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise RequestError(f"{where}: 'shape' must be a list of non-negative integers {want}, got "
                           f"{json.dumps(value)[:60]}")
    if len(value) != 4:
        raise RequestError(f"{where}: 'shape' must be {want} ([N, C, H, W]), got {value}")
    if value[0] == 0:
        raise RequestError("empty batch: send at least one input")
    if value[0] > max_batch:
        raise RequestError(f"too many inputs: {value[0]} in one request, the limit is {max_batch} (--max-batch)", 413)
    if tuple(value[1:]) != tuple(input_shape):
        raise RequestError(f"{where}: each input must have shape {list(input_shape)} [C, H, W], got {value[1:]}")
    return value


def _binary_input(raw: bytes, datatype: str, shape: list[int], input_shape, max_batch: int) -> np.ndarray:
    """Binary tensor data -> a checked batch: uint8 as is; float by the conversion rule on its own
    values (FP64's exact ones), then float32."""
    dtype = INPUT_DATATYPES[datatype]
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)
    if datatype == "UINT8":
        return check_batch(arr, input_shape, max_batch)
    conversion_rule(arr)
    return check_batch(arr.astype(np.float32), input_shape, max_batch)


def _json_input(data, datatype: str, shape: list[int], input_shape, max_batch: int) -> np.ndarray:
    """JSON ``data`` (flat row-major or nested) -> a checked batch by the JSON number rule."""
    where = f"input '{INPUT_NAME}'"
    if not isinstance(data, list):
        raise RequestError(f"{where}: 'data' must be an array of numbers (flat in row-major order, or nested)")
    try:
        flat = np.asarray(data, dtype=object).ravel().tolist()
    except (ValueError, TypeError, RecursionError):
        raise RequestError(f"{where}: 'data' must be a flat or rectangular nested array of numbers") from None
    kinds = set(map(type, flat))
    if not kinds <= {int, float}:
        if list in kinds:
            raise RequestError(f"{where}: 'data' must be a flat or rectangular nested array of numbers "
                               "(rows of different lengths?)")
        raise RequestError(f"{where}: 'data' must hold numbers only (found true, false, null, strings or objects)")
    count = math.prod(shape)
    if len(flat) != count:
        raise RequestError(f"{where}: shape {shape} needs {count} values but 'data' holds {len(flat)}")
    try:
        values = np.array(flat, dtype=np.float64 if float in kinds or datatype != "UINT8" else np.int64)
    except OverflowError:
        raise RequestError(f"{where}: 'data' holds a number too large for any image") from None
    return number_batch(values.reshape(shape), "uint8" if datatype == "UINT8" else "float32", input_shape, max_batch,
                        float_hint=_FLOAT_HINT)


def _read_input(t, binary: bytes, input_shape, max_batch: int) -> np.ndarray:
    if not isinstance(t, dict):
        raise RequestError("each input must be an object {\"name\", \"shape\", \"datatype\", \"data\"}")
    unknown = sorted(set(t) - set(_INPUT_KEYS))
    if unknown:
        raise RequestError(f"unknown field(s) in the input: {', '.join(map(repr, unknown))}; expected "
                           f"{', '.join(map(repr, _INPUT_KEYS))}")
    if t.get("name") != INPUT_NAME:
        raise RequestError(f"unknown input {json.dumps(t.get('name'))[:64]}; this model takes one input "
                           f"'{INPUT_NAME}'")
    where = f"input '{INPUT_NAME}'"
    datatype = t.get("datatype")
    if datatype not in INPUT_DATATYPES:
        raise RequestError(f"{where}: datatype must be UINT8 (values 0-255) or FP32, FP16, FP64 (values in [0, 1]), "
                           f"got {json.dumps(datatype)[:40]}")
    shape = _shape(t.get("shape"), input_shape, max_batch)
    size = _parameters(t.get("parameters"), where).get("binary_data_size")
    if size is None:
        if binary:
            raise RequestError(f"the body carries {len(binary)} bytes after the JSON header but no input declares "
                               "parameters.binary_data_size", 400)
        if "data" not in t:
            raise RequestError(f"{where} has no 'data' (nor parameters.binary_data_size)")
        return _json_input(t["data"], datatype, shape, input_shape, max_batch)
    if "data" in t:
        raise RequestError(f"{where} has both 'data' and parameters.binary_data_size; send one")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RequestError(f"{where}: binary_data_size must be a non-negative integer, got {json.dumps(size)[:40]}")
    need = math.prod(shape) * INPUT_DATATYPES[datatype].itemsize
    if size != need:
        raise RequestError(f"{where}: binary_data_size {size} does not match shape {shape} of {datatype}, which "
                           f"needs {need} bytes")
    if len(binary) != size:
        raise RequestError(f"{where} declares binary_data_size {size} but the body carries {len(binary)} bytes after "
                           f"the JSON header ({HEADER_LENGTH})", 400)
    return _binary_input(binary, datatype, shape, input_shape, max_batch)


def _requested(outputs, names: list[str], binary_default: bool) -> list[tuple[str, bool]]:
    if outputs is None or outputs == []:
        return [(n, binary_default) for n in names]
    if not isinstance(outputs, list):
        raise RequestError("'outputs' must be a list of objects {\"name\": ...}")
    chosen: list[tuple[str, bool]] = []
    for o in outputs:
        if not isinstance(o, dict) or set(o) - {"name", "parameters"}:
            raise RequestError("each requested output must be an object {\"name\", \"parameters\"}")
        name = o.get("name")
        if name not in names:
            raise RequestError(f"unknown output {json.dumps(name)[:64]}; this model's outputs are {', '.join(names)}")
        if any(name == n for n, _ in chosen):
            raise RequestError(f"output '{name}' is requested twice")
        where = f"output '{name}'"
        params = _parameters(o.get("parameters"), where)
        if "classification" in params:
            raise RequestError(f"{where}: the classification extension is not supported; read 'label' and 'class'")
        chosen.append((name, _flag(params, "binary_data", binary_default, where)))
    return chosen


def parse_infer_request(body: bytes, header_length: str | None, input_shape: tuple[int, ...], max_batch: int,
                        output_names: list[str]) -> InferRequest:
    """An inference request's body (JSON, or JSON then binary tensor data) -> :class:`InferRequest`;
    every refusal a :class:`RequestError` with its status."""
    head, binary = split_body(body, header_length)
    doc = _load_json(head)
    if not isinstance(doc, dict):
        raise RequestError('the inference request must be a JSON object {"inputs": [...]}')
    unknown = sorted(set(doc) - set(_REQUEST_KEYS))
    if unknown:
        raise RequestError(f"unknown field(s) in the inference request: {', '.join(map(repr, unknown))}; expected "
                           f"{', '.join(map(repr, _REQUEST_KEYS))}")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise RequestError(f"'id' must be a string, got {json.dumps(rid)[:40]}")
    binary_default = _flag(_parameters(doc.get("parameters"), "the request"), "binary_data_output", False,
                           "the request")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(f"'inputs' must be a list of one input tensor {{\"name\": \"{INPUT_NAME}\", \"shape\", "
                           "\"datatype\", \"data\"}")
    if len(inputs) > 1:
        raise RequestError(f"too many input tensors: {len(inputs)}; this model takes one, '{INPUT_NAME}' "
                           "(a batch is its first dimension)")
    outputs = _requested(doc.get("outputs"), output_names, binary_default)  # cheap checks before the data
    return InferRequest(_read_input(inputs[0], binary, input_shape, max_batch), rid, outputs)


def guard_tensors(out: dict, classes: list[str] | None, abstain: bool) -> dict[str, tuple[str, object]]:
    """The batcher's answer (checked arrays and reasons) -> ``{name: (datatype, values)}``."""
    reject = np.asarray(out["reject"], dtype=bool)
    label = np.asarray(out["label"]).astype(np.int64)
    confidence = np.asarray(out["confidence"], dtype=np.float32)
    if abstain:
        label = np.where(reject, -1, label)
        confidence = np.where(reject, np.float32(np.nan), confidence)
    tensors: dict[str, tuple[str, object]] = {"label": ("INT64", label)}
    if classes is not None:
        tensors["class"] = ("BYTES", [classes[i] if 0 <= i < len(classes) else "" for i in label.tolist()])
    tensors.update(confidence=("FP32", confidence), score=("FP32", np.asarray(out["score"], dtype=np.float32)),
                   p_value=("FP32", np.asarray(out["p_value"], dtype=np.float32)), reject=("BOOL", reject),
                   reason=("BYTES", [str(r) for r in out["reason"]]))
    return tensors


def _raw(datatype: str, values) -> bytes:
    if datatype == "BYTES":  # each element: its length (uint32, little-endian), then its bytes
        return b"".join(struct.pack("<I", len(b)) + b for b in (str(v).encode() for v in values))
    return np.ascontiguousarray(values, dtype=_BINARY[datatype]).tobytes()


def encode_infer_response(model_name: str, request_id: str | None, tensors: dict,
                          requested: list[tuple[str, bool]]) -> tuple[bytes, dict[str, str], str]:
    """``(body, headers, media type)``: the response JSON (NaN as ``null``), then the binary data of
    the outputs asked for in binary, in order (with ``Inference-Header-Content-Length``)."""
    doc: dict = {"model_name": model_name, "model_version": MODEL_VERSION}
    if request_id is not None:
        doc["id"] = request_id
    outputs, chunks = [], []
    for name, binary in requested:
        datatype, values = tensors[name]
        entry = {"name": name, "datatype": datatype, "shape": [len(values)]}
        if binary:
            raw = _raw(datatype, values)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = values
        outputs.append(entry)
    doc["outputs"] = outputs
    head = json_bytes(doc)
    if not chunks:
        return head, {}, "application/json"
    return head + b"".join(chunks), {HEADER_LENGTH: str(len(head))}, "application/octet-stream"


def add_routes(app, ctx: SimpleNamespace) -> None:
    """The protocol's routes on ``app``. ``ctx`` holds the service's pieces (``create_app``):
    ``model_name``, ``input_shape``, ``classes``, ``settings``, ``batcher``, ``metrics``,
    ``platform``, ``answer``, ``refuse`` and ``request_id``."""
    from fastapi import Request
    from fastapi.responses import Response
    from starlette.requests import ClientDisconnect

    from .. import __version__

    name, settings, batcher, metrics = ctx.model_name, ctx.settings, ctx.batcher, ctx.metrics
    input_shape = tuple(ctx.input_shape)
    has_classes = ctx.classes is not None
    metadata = model_metadata(name, input_shape, has_classes, ctx.platform)
    output_names = [n for n, _ in output_specs(has_classes)]
    abstain = settings.on_reject == "abstain"

    def unknown(model: str, version: str | None) -> str | None:
        if model != name:
            return f"unknown model '{model[:64]}'; this server serves '{name}'"
        if version is not None and version != MODEL_VERSION:
            return f"model '{name}' has no version '{version[:32]}'; its one version is '{MODEL_VERSION}'"
        return None

    def not_ready(extra: dict) -> Response:
        return ctx.answer(503, {**extra, "ready": False, "error": batcher.failure or "warming up"},
                          headers={"Retry-After": "1"})

    @app.get(PREFIX + "/health/live")
    async def server_live():
        return ctx.answer(200, {"live": True})

    @app.get(PREFIX + "/health/ready")
    async def server_ready():
        return ctx.answer(200, {"ready": True}) if batcher.ready else not_ready({})

    @app.get(PREFIX)
    async def server_metadata():
        return ctx.answer(200, {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)})

    def model_metadata_route(model: str, version: str | None = None):
        problem = unknown(model, version)
        return ctx.answer(404, {"error": problem}) if problem else ctx.answer(200, metadata)

    def model_ready_route(model: str, version: str | None = None):
        problem = unknown(model, version)
        if problem:
            return ctx.answer(404, {"error": problem})
        return ctx.answer(200, {"name": name, "ready": True}) if batcher.ready else not_ready({"name": name})

    @app.get(PREFIX + "/models/{model}")
    async def model_meta(model: str):
        return model_metadata_route(model)

    @app.get(PREFIX + "/models/{model}/versions/{version}")
    async def model_meta_version(model: str, version: str):
        return model_metadata_route(model, version)

    @app.get(PREFIX + "/models/{model}/ready")
    async def model_ready(model: str):
        return model_ready_route(model)

    @app.get(PREFIX + "/models/{model}/versions/{version}/ready")
    async def model_ready_version(model: str, version: str):
        return model_ready_route(model, version)

    async def infer(request: Request, model: str, version: str | None):
        started = time.perf_counter()
        rid = ctx.request_id(request.headers)
        path = request.url.path
        try:
            problem = unknown(model, version)
            if problem:
                raise RequestError(problem, 404)
            if not batcher.ready:
                raise Unavailable(batcher.failure or "the service is warming up; retry shortly")
            encoding = request.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                raise RequestError(f"Content-Encoding '{encoding[:32]}' is not supported; send the body uncompressed",
                                   415)
            batcher.incoming += 1
            try:
                body = await read_body(request, settings.max_body_bytes)
                header = request.headers.get(HEADER_LENGTH)
                parse = (lambda: parse_infer_request(body, header, input_shape, settings.max_batch, output_names))
                req = parse() if len(body) < 64 * 1024 else await asyncio.to_thread(parse)  # large: off the loop
            finally:
                batcher.incoming -= 1
            out = await batcher.submit(req.x)
        except ClientDisconnect:
            log_event(logging.INFO, "client_disconnected", request_id=rid)
            return Response(status_code=499)
        except BadExpertError as exc:
            return ctx.refuse(exc, rid, started, path)
        except Exception as exc:
            metrics.errors += 1
            log_event(logging.ERROR, "internal_error", exc_info=exc, request_id=rid)
            return ctx.answer(500, {"error": f"internal error while serving request {rid}; see the service log"}, rid)
        body, headers, media = encode_infer_response(name, req.id, guard_tensors(out, ctx.classes, abstain),
                                                     req.outputs)
        n = len(req.x)
        rejected = int(np.asarray(out["reject"], dtype=bool).sum())
        seconds = time.perf_counter() - started
        metrics.observe_served(n, rejected, seconds)
        log_event(logging.INFO, "classify", request_id=rid, path=path, n_inputs=n, rejections=rejected,
                  latency_ms=round(seconds * 1000, 2))
        return Response(body, status_code=200, media_type=media, headers={**headers, "X-Request-ID": rid})

    @app.post(PREFIX + "/models/{model}/infer")
    async def model_infer(request: Request, model: str):
        return await infer(request, model, None)

    @app.post(PREFIX + "/models/{model}/versions/{version}/infer")
    async def model_infer_version(request: Request, model: str, version: str):
        return await infer(request, model, version)


__all__ = ["EXTENSIONS", "HEADER_LENGTH", "INPUT_DATATYPES", "INPUT_NAME", "InferRequest", "MODEL_VERSION",
           "add_routes", "encode_infer_response", "guard_tensors", "is_infer_path", "model_metadata", "output_specs",
           "parse_infer_request"]
