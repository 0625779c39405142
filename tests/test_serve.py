"""The HTTP service (`badexpert serve`): answers equal to the guard's, every bad request a one-line
4xx that leaves the served-traffic counters alone, Prometheus metrics, the drift alarm, the CLI's
refusals and one run over a real loopback socket."""

import asyncio
import copy
import importlib.util
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

with warnings.catch_warnings():  # starlette 1.x: "install httpx2" (TestClient still uses httpx)
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from badexpert.cli import main  # noqa: E402
from badexpert.detectors.base import ACCEPTED, REJECT_NONFINITE_INPUT  # noqa: E402
from badexpert.serve import (DriftMonitor, MicroBatcher, Settings, configure_logging, create_app,  # noqa: E402
                              restore_logging)

from .conftest import serve_process, served_bundle, service_client  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx`")

SERVED = ("badexpert_requests_total", "badexpert_inputs_total", "badexpert_rejections_total",
          "badexpert_request_latency_seconds_count", "badexpert_request_latency_seconds_sum",
          "badexpert_batches_total", "badexpert_drift_window_inputs", "badexpert_drift_window_rejections")
METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


@pytest.fixture(scope="module")
def setup(backdoored, tmp_path_factory):
    return served_bundle(backdoored, tmp_path_factory.mktemp("bundle"), "guard")


def client(guard, **settings):
    return service_client(guard, "/readyz", **{**settings})


@pytest.fixture(scope="module")
def svc(setup):
    with client(setup["guard"]) as c:
        yield c


@contextmanager
def json_logs():
    """The service's JSON log lines, captured (the loggers restored afterwards)."""
    stream = io.StringIO()
    handler = configure_logging("info", stream)
    lines = []
    try:
        yield lines
    finally:
        restore_logging(handler)
        lines.extend(json.loads(line) for line in stream.getvalue().splitlines())  # each line one JSON object


def metrics(c) -> dict[str, float]:
    """Parse /metrics, checking every line's format; labelled samples are summed per name too."""
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            assert line.startswith("# HELP ") or line.startswith("# TYPE "), line
            continue
        m = METRIC_LINE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        value = float(m.group(3))  # NaN / +Inf parse too
        out[m.group(1) + (m.group(2) or "")] = value
        if m.group(2):
            out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out


def classify_json(c, x: torch.Tensor, **extra):
    dtype = "uint8" if x.dtype == torch.uint8 else "float32"
    return c.post("/v1/classify", json={"inputs": x.tolist(), "dtype": dtype, **extra})


def assert_matches_guard(results, out, classes, atol=1e-5):
    assert [r["label"] for r in results] == out.label.tolist()
    assert [r["reject"] for r in results] == out.reject.tolist()
    assert [r["reason"] for r in results] == out.reason
    assert [r["class"] for r in results] == [classes[i] for i in out.label.tolist()]
    for key, ref in (("score", out.score), ("p_value", out.p_value), ("confidence", out.confidence)):
        got = np.array([np.nan if r[key] is None else r[key] for r in results], dtype=np.float64)
        np.testing.assert_allclose(got, ref.double().numpy(), atol=atol, err_msg=key)


def png(arr: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, "PNG")
    return buf.getvalue()


# --- answers -------------------------------------------------------------------------------------
def test_json_uint8_and_float_single_and_batch_match_the_guard(setup, svc):
    guard, classes = setup["guard"], setup["classes"]
    x = torch.cat([setup["clean"][:40], setup["trig"][:24]])
    r = classify_json(svc, x)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n"] == 64 and body["rejected"] == sum(res["reject"] for res in body["results"])
    assert r.headers["x-request-id"] == body["request_id"]
    out = guard(x)
    assert_matches_guard(body["results"], out, classes)
    # the detector does its job through the service: triggered inputs rejected, clean ones accepted
    rej = np.array([res["reject"] for res in body["results"]])
    assert rej[40:].mean() >= 0.8 and rej[:40].mean() <= 0.2
    assert all(res["reason"] == ACCEPTED for res in body["results"] if not res["reject"])

    xf = x.float() / 255  # float32 in [0, 1]: the same answers
    rf = classify_json(svc, xf)
    assert rf.status_code == 200, rf.text
    assert_matches_guard(rf.json()["results"], guard(xf), classes)

    single = classify_json(svc, x[0])  # [C, H, W]
    assert single.status_code == 200 and single.json()["n"] == 1
    assert_matches_guard(single.json()["results"], guard(x[:1]), classes)


def test_raw_tensor_bytes(setup, svc):
    guard, classes = setup["guard"], setup["classes"]
    x = torch.cat([setup["clean"][:5], setup["trig"][:3]])
    r = svc.post("/v1/classify", content=x.numpy().tobytes(),
                 headers={"content-type": "application/octet-stream", "x-shape": "8,1,12,12"})
    assert r.status_code == 200, r.text
    assert_matches_guard(r.json()["results"], guard(x), classes)
    r = svc.post("/v1/classify", content=x[3].numpy().tobytes(),
                 headers={"content-type": "application/octet-stream", "x-shape": "1, 12, 12"})
    assert r.status_code == 200 and r.json()["n"] == 1
    assert_matches_guard(r.json()["results"], guard(x[3:4]), classes)
    xf = x.float() / 255
    r = svc.post("/v1/classify", content=xf.numpy().astype("<f4").tobytes(),
                 headers={"content-type": "application/octet-stream", "x-shape": "8,1,12,12", "x-dtype": "float32"})
    assert r.status_code == 200, r.text
    assert_matches_guard(r.json()["results"], guard(xf), classes)


def test_image_uploads_converted_resized_or_refused_when_strict(setup, svc):
    guard, classes = setup["guard"], setup["classes"]
    imgs = setup["trig"][:2, 0].numpy()
    files = [("file", ("a.png", png(imgs[0]), "image/png")), ("file", ("b.png", png(imgs[1]), "image/png"))]
    r = svc.post("/v1/classify", files=files)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["name"] for x in res] == ["a.png", "b.png"] and not any(x["resized"] for x in res)
    assert_matches_guard(res, guard(setup["trig"][:2]), classes)  # PNG is lossless: the very same pixels

    # an RGB image of another size: converted to L and resized (bilinear) to 12x12
    rgb = np.stack([imgs[0]] * 3, -1).repeat(2, 0).repeat(3, 1)  # 24 x 36
    r = svc.post("/v1/classify", files=[("file", ("big.png", png(rgb, "RGB"), "image/png"))])
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["resized"] is True
    resized = np.asarray(Image.fromarray(rgb, "RGB").convert("L").resize((12, 12), Image.BILINEAR))
    assert_matches_guard(r.json()["results"], guard(torch.from_numpy(resized.copy())[None, None]), classes)

    # the image as the whole body
    r = svc.post("/v1/classify", content=png(imgs[1]), headers={"content-type": "image/png"})
    assert r.status_code == 200
    assert_matches_guard(r.json()["results"], guard(setup["trig"][1:2]), classes)

    with client(guard, strict_size=True) as strict:
        r = strict.post("/v1/classify", files=[("file", ("big.png", png(rgb, "RGB"), "image/png"))])
        assert r.status_code == 422 and "--strict-size" in r.json()["error"]
        r = strict.post("/v1/classify", files=[("file", ("a.png", png(imgs[0]), "image/png"))])
        assert r.status_code == 200


def test_json_nan_and_inf_are_rejected_like_the_python_api(setup, svc):
    x = setup["clean"][:3].float() / 255
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 5, 5] = float("inf")
    body = json.dumps({"inputs": x.tolist(), "dtype": "float32"})  # Python writes NaN / Infinity
    assert "NaN" in body and "Infinity" in body
    r = svc.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["reject"] for x in res[:2]] == [True, True]
    assert {x["reason"] for x in res[:2]} == {REJECT_NONFINITE_INPUT}
    assert res[0]["score"] is None and res[0]["p_value"] == 0.0
    out = setup["guard"](x)
    assert out.reject.tolist() == [x["reject"] for x in res]
    # uint8 has no NaN: refused, not silently read
    bad = json.dumps({"inputs": [[[float("nan")] * 12] * 12], "dtype": "uint8"})
    r = svc.post("/v1/classify", content=bad, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "float32" in r.json()["error"]


def test_abstain_hides_the_label_of_rejected_inputs(setup):
    x = torch.cat([setup["clean"][:4], setup["trig"][:4]])
    raising = copy.copy(setup["guard"])
    raising.policy = "raise"  # a guard of any policy is served by its flags
    with client(raising, on_reject="abstain") as c:
        res = classify_json(c, x).json()["results"]
    out = setup["guard"](x)
    for r, rej, label in zip(res, out.reject.tolist(), out.label.tolist()):
        assert r["reject"] == rej
        assert (r["label"], r["class"], r["confidence"] is None) == ((None, None, True) if rej else
                                                                     (label, setup["classes"][label], False))


# --- bad requests --------------------------------------------------------------------------------
def _bad_cases(setup):
    img = setup["clean"][0]
    ok = img.tolist()
    h = {"content-type": "application/json"}
    raw = {"content-type": "application/octet-stream"}
    js = lambda doc: {"content": json.dumps(doc), "headers": h}  # noqa: E731
    return [
        ("corrupt image upload", {"files": [("file", ("x.png", b"\x89PNG\r\n\x1a\nthis is not a png", "image/png"))]}, 422),
        ("not an image at all", {"files": [("file", ("x.png", b"GIF89a" + b"\0" * 20, "image/png"))]}, 422),
        ("text field instead of a file", {"files": [("file", (None, "image.png"))]}, 422),
        ("truncated multipart", {"content": b"--zz\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=zz"}}, 400),
        ("multipart without a boundary", {"content": b"--zz\r\n", "headers": {"content-type": "multipart/form-data"}}, 400),
        ("invalid JSON", {"content": b'{"inputs": [1, 2', "headers": h}, 400),
        ("empty body", {"content": b"", "headers": h}, 400),
        ("JSON not an object", js([1, 2, 3]), 422),
        ("unknown field", js({"inputs": [ok], "dtype": "uint8", "input": 1}), 422),
        ("missing dtype", js({"inputs": [ok]}), 422),
        ("wrong dtype", js({"inputs": [ok], "dtype": "int64"}), 422),
        ("wrong image shape", js({"inputs": [[[0] * 5] * 5], "dtype": "uint8"}), 422),
        ("wrong rank", js({"inputs": [[1, 2], [3, 4]], "dtype": "uint8"}), 422),
        ("ragged", js({"inputs": [[[0] * 12] * 11 + [[0] * 3]], "dtype": "uint8"}), 422),
        ("strings", js({"inputs": [[["1"] * 12] * 12], "dtype": "uint8"}), 422),
        ("booleans", js({"inputs": [[[True] + [0] * 11] * 12], "dtype": "uint8"}), 422),
        ("null", js({"inputs": [[[None] + [0] * 11] * 12], "dtype": "uint8"}), 422),
        ("uint8 above 255", js({"inputs": [[[256] * 12] * 12], "dtype": "uint8"}), 422),
        ("uint8 negative", js({"inputs": [[[-1] * 12] * 12], "dtype": "uint8"}), 422),
        ("uint8 fractional", js({"inputs": [[[0.5] * 12] * 12], "dtype": "uint8"}), 422),
        ("float32 in [0, 255]", js({"inputs": [ok], "dtype": "float32"}), 422),
        ("float32 normalised", js({"inputs": [[[-2.0] * 12] * 12], "dtype": "float32"}), 422),
        ("empty batch", js({"inputs": [], "dtype": "uint8"}), 422),
        ("too many inputs", js({"inputs": [ok] * 257, "dtype": "uint8"}), 413),
        ("raw without X-Shape", {"content": bytes(144), "headers": raw}, 400),
        ("raw with a bad X-Shape", {"content": bytes(144), "headers": {**raw, "x-shape": "1,1,twelve,12"}}, 400),
        ("raw of the wrong length", {"content": bytes(100), "headers": {**raw, "x-shape": "1,1,12,12"}}, 422),
        ("raw of the wrong shape", {"content": bytes(288), "headers": {**raw, "x-shape": "1,2,12,12"}}, 422),
        ("raw of an unknown dtype", {"content": bytes(288), "headers": {**raw, "x-shape": "1,1,12,12", "x-dtype": "int16"}}, 422),
        ("raw float32 out of range", {"content": np.full(144, 7.0, "<f4").tobytes(),
                                      "headers": {**raw, "x-shape": "1,1,12,12", "x-dtype": "float32"}}, 422),
        ("wrong content type", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
        ("no content type", {"content": b"hello"}, 415),
    ]


def _served(m):
    return {k: m.get(k, 0.0) for k in SERVED}


def _assert_refused(c, name, kwargs, status, method="POST"):
    before = metrics(c)
    r = c.request(method, "/v1/classify", **kwargs)
    assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/json"), name
    assert "\n" not in r.text.strip() and set(r.json()) == {"error"} and r.json()["error"], f"{name}: {r.text}"
    after = metrics(c)
    assert _served(after) == _served(before), f"{name} changed the served-traffic counters"
    assert after["badexpert_bad_requests_total"] == before["badexpert_bad_requests_total"] + 1, name
    assert after[f'badexpert_bad_requests_total{{status="{status}"}}'] == \
        before[f'badexpert_bad_requests_total{{status="{status}"}}'] + 1, name


def test_every_bad_request_is_a_one_line_4xx_and_leaves_served_counters(setup, svc):
    assert classify_json(svc, setup["clean"][:3]).status_code == 200  # counters are not all zero
    for name, kwargs, status in _bad_cases(setup):
        _assert_refused(svc, name, kwargs, status)
    _assert_refused(svc, "GET", {}, 405, method="GET")
    # still up and still right
    assert svc.get("/healthz").json() == {"status": "ok"}
    r = classify_json(svc, setup["trig"][:4])
    assert r.status_code == 200
    assert_matches_guard(r.json()["results"], setup["guard"](setup["trig"][:4]), setup["classes"])


def test_body_and_batch_limits(setup):
    x = setup["clean"][:9]
    with client(setup["guard"], max_body_mb=0.01, max_batch=8) as c:  # 10 KiB
        _assert_refused(c, "body over the limit", {"content": b"{" + b" " * 20000 + b"}",
                                                   "headers": {"content-type": "application/json"}}, 413)
        _assert_refused(c, "streamed body over the limit (no Content-Length)",
                        {"content": iter([b" " * 6000, b" " * 6000]), "headers": {"content-type": "application/json"}},
                        413)
        raw = {"content-type": "application/octet-stream"}
        _assert_refused(c, "nine inputs", {"content": x.numpy().tobytes(), "headers": {**raw, "x-shape": "9,1,12,12"}},
                        413)
        files = [("file", (f"{i}.png", png(x[i, 0].numpy()), "image/png")) for i in range(9)]
        _assert_refused(c, "nine files", {"files": files}, 413)
        r = c.post("/v1/classify", content=x[:8].numpy().tobytes(), headers={**raw, "x-shape": "8,1,12,12"})
        assert r.status_code == 200 and r.json()["n"] == 8


# --- health, readiness, metrics --------------------------------------------------------------------
def test_health_readiness_and_metrics(setup):
    app = create_app(setup["guard"], settings=Settings())
    cold = TestClient(app)  # no lifespan: never warmed up
    assert cold.get("/healthz").status_code == 200
    assert cold.get("/readyz").status_code == 503
    r = classify_json(cold, setup["clean"][:1])
    assert r.status_code == 503 and "warming up" in r.json()["error"] and r.headers["retry-after"]

    with client(setup["guard"]) as c:
        assert c.get("/readyz").json() == {"status": "ready"}
        m0 = metrics(c)
        assert m0["badexpert_ready"] == 1 and m0["badexpert_requests_total"] == 0
        x = torch.cat([setup["clean"][:6], setup["trig"][:4]])
        for part in (x[:3], x[3:]):
            assert classify_json(c, part).status_code == 200
        m = metrics(c)
        rejected = int(setup["guard"](x).reject.sum())
        assert m["badexpert_requests_total"] == 2 and m["badexpert_inputs_total"] == 10
        assert m["badexpert_rejections_total"] == rejected
        assert m["badexpert_drift_window_inputs"] == 10 and m["badexpert_drift_window_rejections"] == rejected
        # the reference: the share of all clean inputs the detector expects to reject (its 5% target
        # on the inputs the model gets right, plus the calibration errors it rejects)
        rate = setup["guard"].detector.clean_rejection_rate_
        assert rate >= 0.05 and m["badexpert_drift_reference_rate"] == pytest.approx(rate)
        assert m["badexpert_request_latency_seconds_count"] == 2 and m['badexpert_request_latency_seconds_bucket{le="+Inf"}'] == 2
        buckets = [v for k, v in m.items() if k.startswith("badexpert_request_latency_seconds_bucket{")]
        assert buckets == sorted(buckets)  # cumulative
        assert m["process_resident_memory_bytes"] > 10e6
        status = c.get("/v1/status").json()
        assert status["served"] == {"requests": 2, "inputs": 10, "rejections": rejected}
        assert status["model"]["input_shape"] == [1, 12, 12] and status["model"]["classes"] == setup["classes"]
        assert c.get("/nope").status_code == 404 and set(c.get("/nope").json()) == {"error"}


# --- micro-batching --------------------------------------------------------------------------------
class EchoModel:
    """A service model whose label is each input's first pixel: a request's answer shows whose inputs it got."""

    input_shape = (1, 2, 2)
    classes = None
    fpr_target = 0.1

    def __init__(self):
        self.calls = []

    def __call__(self, x):
        time.sleep(0.01)
        self.calls.append((len(x), x.dtype.str))
        v = x.reshape(len(x), -1)[:, 0].astype(np.float64)
        n = len(x)
        return {"label": v.astype(np.int64), "confidence": np.ones(n, np.float32), "score": v.astype(np.float32),
                "p_value": np.full(n, 0.5, np.float32), "reject": v > 200}


def test_micro_batcher_gathers_requests_and_answers_each_its_slice():
    model = EchoModel()
    seen = []

    async def scenario():
        b = MicroBatcher(model, max_batch=16, wait_s=0.05, max_queue=64, on_batch=lambda out, n: seen.append(n))
        b.start()
        await b.warm_up(model.input_shape)
        model.calls.clear()
        reqs = [np.full((k, 1, 2, 2), 10 * i + k, np.uint8) for i, k in enumerate([1, 3, 2, 5, 4, 3])]
        reqs.append(np.full((2, 1, 2, 2), 0.5, np.float32))  # another dtype: its own forward in the same round
        outs = await asyncio.gather(*(b.submit(x) for x in reqs))
        await b.stop()
        return reqs, outs

    reqs, outs = asyncio.run(scenario())
    for x, out in zip(reqs, outs):
        assert out["label"].tolist() == x.reshape(len(x), -1)[:, 0].astype(np.int64).tolist()
        assert len(out["reason"]) == len(x)
    # the first five requests (15 uint8 inputs) make one batch: the sixth would overflow it (max_batch 16), so
    # it waits for the next round, shared with the float32 request (one forward per dtype)
    assert model.calls == [(15, "|u1"), (3, "|u1"), (2, "<f4")]
    assert seen == [15, 5]


def test_a_lone_request_does_not_wait_for_company(setup):
    """With the queue empty and no other request on its way, the batcher closes the gathering at
    once ("idle"), whatever batch_wait_ms says: it never waits out the deadline for company."""
    with client(setup["guard"], batch_wait_ms=60_000) as c:
        batcher = c.app.state.batcher
        for n in (2, 1, 3):
            assert classify_json(c, setup["clean"][:n]).status_code == 200
        assert batcher.closed == {"full": 0, "idle": 3, "deadline": 0}


class Gate(EchoModel):
    """An echo model that, once armed, holds each forward pass until released."""

    def __init__(self, input_shape):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, x):
        if self.armed:
            self.entered.set()
            assert self.release.wait(60), "never released"
        return super().__call__(x)


def test_overload_is_503_not_a_bad_request(setup):
    """Inputs beyond max_queue waiting for the model are refused at once with 503 (Retry-After),
    counted as unavailable, not as bad requests; the requests already taken are answered."""
    model = Gate(setup["guard"].input_shape)
    with client(model, max_batch=4, max_queue=4, batch_wait_ms=0) as c:
        batcher = c.app.state.batcher
        model.armed = True
        codes = []

        def send():
            codes.append(classify_json(c, setup["clean"][:4]).status_code)

        running = threading.Thread(target=send)
        running.start()
        assert model.entered.wait(60)  # the first request is in the model: the queue is empty again
        waiting = threading.Thread(target=send)
        waiting.start()
        deadline = time.monotonic() + 60
        while batcher.queued < 4:  # the second request's 4 inputs fill the queue (max_queue 4)
            assert time.monotonic() < deadline and waiting.is_alive()
            time.sleep(0.005)
        refused = classify_json(c, setup["clean"][:1])  # one more input would exceed the queue limit
        assert refused.status_code == 503 and "overloaded" in refused.json()["error"]
        assert refused.headers["retry-after"] == "1"
        model.release.set()
        for t in (running, waiting):
            t.join(60)
        m = metrics(c)
    assert codes == [200, 200]
    assert m["badexpert_unavailable_total"] == 1 and m["badexpert_bad_requests_total"] == 0
    assert m["badexpert_requests_total"] == 2


# --- drift alarm -----------------------------------------------------------------------------------
def test_drift_monitor_binomial_test():
    from scipy.stats import binom

    changes = []
    mon = DriftMonitor(0.05, window=100, alpha=1e-3, on_change=lambda alarm, st: changes.append(alarm))
    mon.update(np.array([False] * 90 + [True] * 10), np.full(100, 0.5))
    assert mon.p_value == pytest.approx(binom.sf(9, 100, 0.05)) and not mon.alarm  # 10% of 100: chance (p=0.03)
    mon.update(np.array([True] * 6), np.zeros(6))  # the window slides (six clean ones leave): 16 of the last 100
    assert mon.state()["n"] == 100 and mon.k == 16
    assert mon.p_value == pytest.approx(binom.sf(15, 100, 0.05)) and mon.alarm
    mon.update(np.zeros(100, bool), np.full(100, 0.5))
    assert not mon.alarm and mon.p_value == 1.0 and changes == [True, False] and mon.alarms_raised == 1
    assert not DriftMonitor(None).enabled


def _stream(c, x, per_request=25):
    alarms = []
    for start in range(0, len(x), per_request):
        assert classify_json(c, x[start:start + per_request]).status_code == 200
        alarms.append(c.get("/v1/status").json()["drift"]["alarm"])
    return alarms


def test_drift_alarm_on_a_shifted_stream_and_not_on_a_clean_one(setup):
    clean, trig, guard = setup["clean"], setup["trig"], setup["guard"]
    n = 600
    # the clean stream's own rejection rate is near the 5% target (what the alarm is tested against)
    clean_rate = float(guard(clean[:n]).reject.float().mean())
    assert clean_rate < 0.09, clean_rate
    with client(guard, drift_window=200) as c:
        alarms = _stream(c, clean[:n])
        drift = c.get("/v1/status").json()["drift"]
        assert not any(alarms) and drift["alarms_raised"] == 0 and drift["n"] == 200
        assert metrics(c)["badexpert_drift_alarm"] == 0

    with json_logs() as lines:
        with client(guard, drift_window=200) as c:
            shifted = torch.cat([clean[:200], trig[:n - 200]])  # clean, then triggered
            alarms = _stream(c, shifted)
            assert not any(alarms[:8]) and alarms[-1], alarms  # raised once the triggered share shows, not before
            st = c.get("/v1/status").json()["drift"]
            assert st["alarm"] and st["p_value"] < 1e-3 and st["rejection_rate"] > 0.5
            m = metrics(c)
            assert m["badexpert_drift_alarm"] == 1 and m["badexpert_drift_alarms_total"] >= 1
            _stream(c, clean[300:600])  # a window of clean traffic again: the alarm clears
            assert c.get("/v1/status").json()["drift"]["alarm"] is False
    raised = [x for x in lines if x["event"] == "drift_alarm_raised"]
    assert raised and raised[0]["level"] == "WARNING" and raised[0]["p_value"] < 1e-3
    assert any(x["event"] == "drift_alarm_cleared" for x in lines)


def test_structured_logs(setup):
    with json_logs() as lines:
        with client(setup["guard"]) as c:
            r = c.post("/v1/classify", json={"inputs": setup["trig"][:3].tolist(), "dtype": "uint8"},
                       headers={"x-request-id": "abc-123"})
            assert r.headers["x-request-id"] == "abc-123"
            c.post("/v1/classify", content=b"nope", headers={"content-type": "application/json",
                                                              "x-request-id": "not an id; <script>"})
    served = [x for x in lines if x["event"] == "classify"]
    assert len(served) == 1
    s = served[0]
    assert s["request_id"] == "abc-123" and s["n_inputs"] == 3 and s["level"] == "INFO"
    assert s["rejections"] == int(setup["guard"](setup["trig"][:3]).reject.sum()) and s["latency_ms"] > 0
    assert {"ts", "level", "event"} <= set(s)
    bad = [x for x in lines if x["event"] == "bad_request"]
    assert len(bad) == 1 and bad[0]["status"] == 400 and re.fullmatch(r"[0-9a-f]{16}", bad[0]["request_id"])
    assert any(x["event"] == "ready" for x in lines)


# --- ONNX guards plug in ---------------------------------------------------------------------------
def test_an_onnx_guard_is_served_like_the_torch_guard(setup, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from badexpert.deploy.export import export_bundle
    from badexpert.runtime.onnx import OnnxGuard

    export_bundle(setup["path"], tmp_path / "guard.onnx")
    x = torch.cat([setup["clean"][:20], setup["trig"][:12]])
    xf = x[:6].float() / 255
    xf[1, 0, 2, 2] = float("nan")  # rejected unscored, for the same reason as by the torch guard
    with client(OnnxGuard(tmp_path / "guard.onnx")) as c:
        res = classify_json(c, x).json()["results"]
        res_f = c.post("/v1/classify", content=json.dumps({"inputs": xf.tolist(), "dtype": "float32"}),
                       headers={"content-type": "application/json"}).json()["results"]  # Python writes NaN
    out = setup["guard"](x)
    assert [r["label"] for r in res] == out.label.tolist() and [r["reject"] for r in res] == out.reject.tolist()
    np.testing.assert_allclose([r["score"] for r in res], out.score.numpy(), atol=1e-3)
    assert [r["reason"] for r in res] == out.reason
    assert [r["reason"] for r in res_f] == setup["guard"](xf).reason and res_f[1]["reason"] == REJECT_NONFINITE_INPUT


# --- the command line ------------------------------------------------------------------------------
def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("badexpert: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_serve_refuses_a_tampered_or_missing_bundle_and_bad_options(setup, tmp_path, capsys):
    data = bytearray(Path(setup["path"]).read_bytes())
    data[-20] ^= 0x01  # one bit of one weight
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(data))
    # every call names a port already in use, so that a check that let a mistake through would end
    # in "cannot listen" (a failure here) rather than in a service that never returns
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = ["--port", str(taken.getsockname()[1])]
        assert main(["serve", str(tampered), *port]) == 2
        _one_line_error(capsys, "checksum")
        assert main(["serve", str(tmp_path / "missing.safetensors"), *port]) == 2
        _one_line_error(capsys, "does not exist")
        assert main(["serve", str(setup["path"]), "--max-batch", "0", *port]) == 2
        _one_line_error(capsys, "max_batch")
        assert main(["serve", str(setup["path"]), "--drift-alpha", "2", *port]) == 2
        _one_line_error(capsys, "drift_alpha")
        assert main(["serve", *port]) == 2
        _one_line_error(capsys, "bundle")
        assert main(["serve", str(setup["path"]), "--onnx", str(tmp_path / "g.onnx"), *port]) == 2
        _one_line_error(capsys, "not both")
        if importlib.util.find_spec("onnxruntime") is not None:
            assert main(["serve", "--onnx", str(tmp_path / "missing.onnx"), *port]) == 2
            _one_line_error(capsys, "does not exist")
        assert main(["serve", str(setup["path"]), *port]) == 2  # a good bundle: refused only for the port
        _one_line_error(capsys, "cannot listen")


def test_serve_without_the_extra_is_one_line(tmp_path):
    code = ("import sys\n"
            "for m in ('fastapi', 'uvicorn'): sys.modules[m] = None\n"
            "import badexpert, badexpert.serve, badexpert.cli\n"  # the core package imports without them
            "sys.exit(badexpert.cli.main(['serve', 'whatever.safetensors']))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("badexpert: error: ")
    assert "install the serve extra: pip install 'badexpert[serve]'" in lines[0]


def test_real_socket_concurrent_clients_and_clean_shutdown(setup):
    """`badexpert serve` on 127.0.0.1 (a free port), 8 concurrent clients, SIGTERM."""
    with serve_process(setup["path"], "--batch-wait-ms", "20") as srv:
        port, lines = srv.port, srv.lines
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)

        x = torch.cat([setup["clean"][:40], setup["trig"][:24]])
        expected = setup["guard"](x)
        answers, errors = {}, []

        def client_thread(t):
            try:
                for j in range(6):
                    i = (t * 6 + j) % len(x)
                    req = urllib.request.Request(base + "/v1/classify", data=x[i:i + 1].numpy().tobytes(), method="POST",
                                                 headers={"Content-Type": "application/octet-stream",
                                                          "X-Shape": "1,1,12,12"})
                    with urllib.request.urlopen(req, timeout=30) as r:
                        answers[(t, j)] = (i, json.loads(r.read())["results"][0])
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=client_thread, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and len(answers) == 48, errors
        for i, res in answers.values():
            assert res["label"] == expected.label[i].item() and res["reject"] == expected.reject[i].item()
            assert math.isclose(res["score"], expected.score[i].item(), abs_tol=1e-4)
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
        values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
        assert values["badexpert_requests_total"] == 48 and values["badexpert_inputs_total"] == 48
        assert values["badexpert_batches_total"] < 48  # concurrent requests shared forward passes
    events = [json.loads(ln)["event"] for ln in lines if ln.startswith("{")]
    assert events[-1] == "stopped" and events.count("classify") == 48


def test_the_onnx_service_never_imports_torch(setup, tmp_path):
    """`badexpert serve --onnx`: parsing, the conversion rule, image decoding, the guard and the
    answers run with torch made unimportable (an image of the service without torch works)."""
    import subprocess
    import sys

    pytest.importorskip("onnxruntime")
    from badexpert.deploy.export import export_bundle

    export_bundle(setup["path"], tmp_path / "guard.onnx")
    x = setup["clean"][:3].numpy()
    code = f"""
import sys, io, json
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
from badexpert.serve import create_app, load_service_model
app = create_app(load_service_model(onnx={str(tmp_path / 'guard.onnx')!r}))
x = np.array({x.tolist()}, dtype=np.uint8)
import time
with TestClient(app) as c:
    for _ in range(600):
        if c.get("/readyz").status_code == 200:
            break
        time.sleep(0.05)
    r = c.post("/v1/classify", json={{"dtype": "uint8", "inputs": x.tolist()}})
    assert r.status_code == 200, r.text
    buf = io.BytesIO(); Image.fromarray(x[0, 0]).save(buf, "PNG")
    u = c.post("/v1/classify", files={{"file": ("a.png", buf.getvalue(), "image/png")}})
    assert u.status_code == 200, u.text
    bad = c.post("/v1/classify", json={{"dtype": "float32", "inputs": (x.astype(float)).tolist()}})
    assert bad.status_code == 422, bad.text
print(json.dumps([r.json()["n"], "torch" in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[3, false]"
