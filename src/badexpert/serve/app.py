"""The FastAPI application: :func:`create_app` around a *service model*.

A service model is anything callable as ``model(x) -> dict`` on a numpy batch ``x`` (uint8
``[0, 255]`` or float32 ``[0, 1]``, shape ``[N, C, H, W]``) returning numpy arrays ``label``,
``confidence``, ``score``, ``p_value`` and ``reject`` (and optionally a list ``reason``), with
attributes ``classes``, ``input_shape`` and ``fpr_target`` (and optionally
``clean_rejection_rate``, the drift monitor's reference). :class:`GuardAdapter` gives a
:class:`badexpert.deploy.guard.Guard` that shape; :class:`badexpert.runtime.onnx.OnnxGuard` has it natively.
"""

# no ``from __future__ import annotations``: FastAPI resolves the endpoints' annotations (``Request``,
# imported inside create_app) at definition time
import asyncio
import logging
import re
import sys
import time
import uuid
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np

from ..errors import BadExpertError
from ..jsonable import finite_or_none
from .batching import MicroBatcher
from .codecs import (CONTENT_TYPES, RequestError, Unavailable, decode_images, json_bytes, parse_json_body,
                     parse_raw_body, read_body, read_multipart)
from .logs import log_event
from .monitoring import METRICS_MEDIA_TYPE, DriftMonitor, Metrics
from .oip import add_routes as add_oip_routes
from .oip import is_infer_path
from .settings import Settings, require_server_deps

#: The classification and status routes (HTTP paths, not files).
CLASSIFY_ROUTE = "/v1/classify"
STATUS_ROUTE = "/v1/status"
#: The model's name in the Open Inference Protocol routes when ``Settings.name`` is unset
#: (``badexpert serve`` sets it to the bundle's stem).
DEFAULT_MODEL_NAME = "guard"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class GuardAdapter:
    """A :class:`badexpert.deploy.guard.Guard` behind the service-model call shape (the module docstring).

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
            from ..data.core import to_float
            from ..utils import eval_mode

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


def _request_id(headers) -> str:
    rid = headers.get("x-request-id")
    if rid and _REQUEST_ID.fullmatch(rid):
        return rid
    return uuid.uuid4().hex[:16]


def create_app(model, *, settings: Settings | None = None):
    """The FastAPI application serving ``model`` (a :class:`GuardAdapter`, an ``OnnxGuard`` or a
    :class:`badexpert.deploy.guard.Guard`, which is wrapped)."""
    fastapi, _ = require_server_deps()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    settings = (settings or Settings()).validate()
    guard_module = sys.modules.get("badexpert.deploy.guard")  # not imported: the model cannot be a Guard (ONNX)
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
            log_event(logging.WARNING, "drift_alarm_raised", **fields)
        else:
            log_event(logging.INFO, "drift_alarm_cleared", **fields)

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
                log_event(logging.ERROR, "warmup_failed", exc_info=exc)

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
        return Response(json_bytes(doc), status_code=status, media_type="application/json", headers=h)

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
        log_event(logging.INFO, "bad_request" if status != 503 else "unavailable", request_id=rid, path=path,
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
                body = await read_body(request, settings.max_body_bytes)
                x, names, resized = await parse(request, body)
            finally:
                batcher.incoming -= 1
            out = await batcher.submit(x)
        except ClientDisconnect:
            log_event(logging.INFO, "client_disconnected", request_id=rid)
            return Response(status_code=499)
        except BadExpertError as exc:
            return refuse(exc, rid, started)
        except Exception as exc:
            metrics.errors += 1
            log_event(logging.ERROR, "internal_error", exc_info=exc, request_id=rid)
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
                "confidence": finite_or_none(out["confidence"][i]),
                "score": finite_or_none(out["score"][i]),
                "p_value": finite_or_none(out["p_value"][i]),
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
        log_event(logging.INFO, "classify", request_id=rid, n_inputs=n, rejections=rejected,
               latency_ms=round(seconds * 1000, 2))
        return answer(200, {"request_id": rid, "n": n, "rejected": rejected, "results": results}, rid)

    model_name = settings.name or DEFAULT_MODEL_NAME
    # the Open Inference Protocol v2 (KServe / Triton) on the same batcher, metrics and refusals
    add_oip_routes(app, SimpleNamespace(model_name=model_name, input_shape=input_shape, classes=classes,
                                        settings=settings, batcher=batcher, metrics=metrics, answer=answer,
                                        refuse=refuse, request_id=_request_id, platform="badexpert_guard"))

    def counted(path: str) -> bool:
        """Whether a refusal on ``path`` counts as a bad classify request (the inference routes)."""
        return path == CLASSIFY_ROUTE or is_infer_path(path)

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
        return Response(text, media_type=METRICS_MEDIA_TYPE)

    @app.get(STATUS_ROUTE)
    async def status():
        return answer(200, {
            "ready": batcher.ready,
            "model": {**info, "name": model_name, "input_shape": list(input_shape), "classes": classes,
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
        if counted(request.url.path) and 400 <= exc.status_code < 500:
            metrics.bad(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 404:
            detail = (f"no endpoint {request.url.path[:100]}; see /v1/classify, /v1/status, /healthz, /readyz, "
                      f"/metrics, /v2/models/{model_name}/infer")
        return answer(exc.status_code, {"error": " ".join(str(detail).split())}, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors() or [{}]
        where = ".".join(str(v) for v in errors[0].get("loc", ()) or ("request",))
        if counted(request.url.path):
            metrics.bad(422)
        message = f"invalid request: {where}: {errors[0].get('msg', 'not valid')}"
        return answer(422, {"error": " ".join(message.split())[:300]})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # Starlette re-raises the exception after this answer: uvicorn logs it (a JSON line with its traceback)
        metrics.errors += 1
        return answer(500, {"error": f"internal error on {request.url.path[:100]}; see the service log"})

    return app


__all__ = ["CLASSIFY_ROUTE", "DEFAULT_MODEL_NAME", "STATUS_ROUTE", "GuardAdapter", "create_app"]
