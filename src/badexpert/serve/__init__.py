"""An HTTP service in front of a guard: ``badexpert serve BUNDLE``.

:func:`create_app` builds a FastAPI application around a *service model*: anything callable as
``model(x) -> dict`` on a numpy batch ``x`` (uint8 ``[0, 255]`` or float32 ``[0, 1]``, shape
``[N, C, H, W]``) returning numpy arrays ``label``, ``confidence``, ``score``, ``p_value`` and
``reject`` (and optionally a list ``reason``), with attributes ``classes``, ``input_shape`` and
``fpr_target`` (and optionally ``clean_rejection_rate``, the expected share of all clean inputs
rejected, the drift monitor's reference). :class:`GuardAdapter` gives a :class:`badexpert.deploy.guard.Guard` that shape;
:class:`badexpert.runtime.onnx.OnnxGuard` has it natively. :func:`serve` loads a bundle, binds the
socket and runs uvicorn.

Endpoints: ``POST /v1/classify`` (JSON nested arrays, multipart image uploads, a single image
body or raw tensor bytes), ``GET /v1/status``, ``/healthz``, ``/readyz`` and ``/metrics``
(Prometheus text format, through ``prometheus_client``); beside them, the Open Inference Protocol
v2 of KServe and Triton (:mod:`.oip`: ``/v2/health/live``, ``/v2/health/ready``, ``/v2``,
``/v2/models/NAME``, ``/v2/models/NAME/ready`` and ``POST /v2/models/NAME/infer``, JSON or binary
tensor data, the guard's answers as named output tensors), on the same batcher, metrics and refusals.

How a request is served: the body is read under ``max_body_mb``; it is parsed into one numpy
batch by small functions that raise :class:`RequestError` (a :class:`BadExpertError` with an HTTP
status); every batch goes through the package's one conversion rule
(:func:`badexpert.runtime.arrays.check_array` with ``nonfinite="allow"``: uint8 means ``[0, 255]``,
float means ``[0, 1]``, NaN/inf pixels reach the guard, which rejects them). The batch joins an
asyncio queue; one worker gathers queued inputs up to ``max_batch``, waiting at most
``batch_wait_ms`` for more (and not at all when no other request is being read or parsed), runs
the model once in a dedicated thread (one forward at a time) and answers each request its slice;
requests that arrive while the model runs are gathered into the next batch. Every served input
also enters the :class:`DriftMonitor`'s window.

fastapi, uvicorn, python-multipart and prometheus-client are imported inside the functions that
need them, so the package imports without them; :func:`require_server_deps` turns their absence
into one :class:`BadExpertError` naming the ``serve`` extra. Nothing here imports torch unless a
bundle is served (``serve --onnx`` runs on :mod:`badexpert.runtime`).

The modules: :mod:`.settings` (the :class:`Settings` dataclass, also the CLI's options),
:mod:`.codecs` (request bodies to batches, answers to bytes), :mod:`.batching` (the micro-batcher),
:mod:`.monitoring` (drift alarm and metrics), :mod:`.logs` (JSON log lines), :mod:`.oip` (the Open
Inference Protocol's routes), :mod:`.app` (:func:`create_app`) and :mod:`.runner` (:func:`serve`).
"""

from .app import CLASSIFY_ROUTE, STATUS_ROUTE, GuardAdapter, create_app
from .batching import MicroBatcher, check_output
from .codecs import (CONTENT_TYPES, RequestError, Unavailable, check_batch, conversion_rule, decode_image,
                     decode_images, number_batch, parse_json_body, parse_raw_body, parse_shape_header, read_multipart)
from .logs import LOG_TARGETS, LOGGER, JsonFormatter, configure_logging, restore_logging
from .monitoring import LATENCY_BUCKETS, DriftMonitor, Metrics
from .runner import bind_socket, load_service_model, serve
from .settings import ON_REJECT, SERVE_EXTRA, Settings, add_arguments, require_server_deps

__all__ = ["CLASSIFY_ROUTE", "CONTENT_TYPES", "DriftMonitor", "GuardAdapter", "JsonFormatter", "LATENCY_BUCKETS",
           "LOGGER", "LOG_TARGETS", "Metrics", "MicroBatcher", "ON_REJECT", "RequestError", "SERVE_EXTRA",
           "STATUS_ROUTE", "Settings", "Unavailable", "add_arguments", "bind_socket", "check_batch", "check_output",
           "configure_logging", "conversion_rule", "create_app", "decode_image", "decode_images", "number_batch",
           "load_service_model", "parse_json_body", "parse_raw_body", "parse_shape_header", "read_multipart",
           "require_server_deps", "restore_logging", "serve"]
