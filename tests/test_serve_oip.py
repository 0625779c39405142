"""The Open Inference Protocol v2 (KServe / Triton) beside /v1/classify: every route, answers equal
to /v1's, binary tensor data both ways, every bad request a one-line protocol error that leaves the
served-traffic counters alone, and the real `tritonclient[http]` client against `badexpert serve`
on a loopback socket."""

import json
import re
import shutil
import socket
import struct
import time
import urllib.request
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

with warnings.catch_warnings():  # starlette 1.x: "install httpx2" (TestClient still uses httpx)
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from badexpert.cli import main  # noqa: E402
from badexpert.detectors.base import ACCEPTED, REJECT_NONFINITE_INPUT  # noqa: E402
from badexpert.errors import BadExpertError  # noqa: E402
from badexpert.serve import Settings, create_app  # noqa: E402
from badexpert.serve.oip import is_infer_path  # noqa: E402

from .conftest import serve_process, served_bundle, service_client  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx`")

NAME = "fmnist-guard"
INFER = f"/v2/models/{NAME}/infer"
SERVED = ("badexpert_requests_total", "badexpert_inputs_total", "badexpert_rejections_total",
          "badexpert_request_latency_seconds_count", "badexpert_batches_total", "badexpert_drift_window_inputs")
OUTPUTS = ["label", "class", "confidence", "score", "p_value", "reject", "reason"]


@pytest.fixture(scope="module")
def setup(backdoored, tmp_path_factory):
    return served_bundle(backdoored, tmp_path_factory.mktemp("bundle"), NAME)


def client(guard, **settings):
    return service_client(guard, "/v2/health/ready", **{"name": NAME, **settings})


@pytest.fixture(scope="module")
def svc(setup):
    with client(setup["guard"]) as c:
        yield c


def metrics(c) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in c.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
            base = key.split("{")[0]
            if "{" in key:
                out[base] = out.get(base, 0.0) + float(value)
    return out


def tensor(x: np.ndarray, datatype: str, **extra) -> dict:
    return {"name": "images", "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist(), **extra}


def infer(c, x: np.ndarray, datatype: str = "UINT8", path: str = INFER, **doc):
    body = json.dumps({"inputs": [tensor(x, datatype)], **doc})  # Python writes NaN / Infinity
    return c.post(path, content=body, headers={"content-type": "application/json"})


def outputs(r) -> dict:
    """JSON outputs by name (checking each one's shape and that data length matches)."""
    assert r.status_code == 200, r.text
    doc = r.json()
    res = {}
    for o in doc["outputs"]:
        assert len(o["data"]) == o["shape"][0], o
        res[o["name"]] = o
    return res


def v1(c, x: np.ndarray) -> list[dict]:
    dtype = "uint8" if x.dtype == np.uint8 else "float32"
    r = c.post("/v1/classify", content=json.dumps({"inputs": x.tolist(), "dtype": dtype}),
               headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def assert_same_as_v1(out: dict, results: list[dict]) -> None:
    """The protocol's tensors (numpy arrays or JSON lists) equal /v1/classify's answers."""
    assert [int(v) for v in out["label"]] == [r["label"] for r in results]
    assert [bool(v) for v in out["reject"]] == [r["reject"] for r in results]
    assert [v.decode() if isinstance(v, bytes) else v for v in out["reason"]] == [r["reason"] for r in results]
    assert [v.decode() if isinstance(v, bytes) else v for v in out["class"]] == [r["class"] for r in results]
    for key in ("confidence", "score", "p_value"):
        got = np.array([np.nan if v is None else v for v in out[key]], dtype=np.float64)
        ref = np.array([np.nan if r[key] is None else r[key] for r in results], dtype=np.float64)
        np.testing.assert_array_equal(got, ref, err_msg=key)  # the same float32 values, NaN where /v1 says null


def batch(setup, clean=6, trig=4) -> np.ndarray:
    return torch.cat([setup["clean"][:clean], setup["trig"][:trig]]).numpy()


# --- health and metadata ---------------------------------------------------------------------------
def test_health_server_and_model_metadata(setup, svc):
    assert (svc.get("/v2/health/live").status_code, svc.get("/v2/health/live").json()) == (200, {"live": True})
    assert (svc.get("/v2/health/ready").status_code, svc.get("/v2/health/ready").json()) == (200, {"ready": True})
    meta = svc.get("/v2").json()
    assert meta["name"] == "badexpert" and meta["version"] and meta["extensions"] == ["binary_tensor_data"]
    for path in (f"/v2/models/{NAME}", f"/v2/models/{NAME}/versions/1"):
        m = svc.get(path).json()
        assert m["name"] == NAME and m["versions"] == ["1"] and m["platform"]
        assert m["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 1, 12, 12]}]
        assert [(o["name"], o["datatype"], o["shape"]) for o in m["outputs"]] == [
            ("label", "INT64", [-1]), ("class", "BYTES", [-1]), ("confidence", "FP32", [-1]), ("score", "FP32", [-1]),
            ("p_value", "FP32", [-1]), ("reject", "BOOL", [-1]), ("reason", "BYTES", [-1])]
    for path in (f"/v2/models/{NAME}/ready", f"/v2/models/{NAME}/versions/1/ready"):
        assert svc.get(path).status_code == 200 and svc.get(path).json() == {"name": NAME, "ready": True}
    for path in ("/v2/models/other", "/v2/models/other/ready", f"/v2/models/{NAME}/versions/2",
                 f"/v2/models/{NAME}/versions/2/ready"):
        r = svc.get(path)
        assert r.status_code == 404 and set(r.json()) == {"error"} and "\n" not in r.text, path
    assert "other" in svc.get("/v2/models/other").json()["error"]
    assert "version" in svc.get(f"/v2/models/{NAME}/versions/2").json()["error"]
    assert svc.get("/v1/status").json()["model"]["name"] == NAME


def test_not_ready_before_warm_up(setup):
    cold = TestClient(create_app(setup["guard"], settings=Settings(name=NAME)))  # no lifespan: never warmed up
    assert cold.get("/v2/health/live").status_code == 200
    for path in ("/v2/health/ready", f"/v2/models/{NAME}/ready"):
        r = cold.get(path)
        assert r.status_code == 503 and r.json()["ready"] is False and r.headers["retry-after"] == "1"
    before = metrics(cold)
    r = infer(cold, batch(setup, 1, 0))
    assert r.status_code == 503 and "warming up" in r.json()["error"]
    after = metrics(cold)
    assert after["badexpert_unavailable_total"] == before["badexpert_unavailable_total"] + 1
    assert after["badexpert_bad_requests_total"] == before["badexpert_bad_requests_total"]


def test_the_model_name_defaults_and_is_checked(setup, tmp_path, capsys):
    with client(setup["guard"], name=None) as c:  # create_app without a name: "guard"
        assert c.get("/v2/models/guard").status_code == 200
    with pytest.raises(BadExpertError, match="--name"):
        Settings(name="no spaces/allowed").validate()
    with socket.socket() as taken:  # a port in use: a mistake let through would end in "cannot listen"
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = ["--port", str(taken.getsockname()[1])]
        assert main(["serve", str(setup["path"]), "--name", "bad name", *port]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--name" in err, err
        odd = tmp_path / "my guard.safetensors"  # a stem that is no model name: told to choose one
        shutil.copy(setup["path"], odd)
        assert main(["serve", str(odd), *port]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--name" in err, err
        assert main(["serve", str(odd), "--name", "mine", *port]) == 2  # a good name: refused only for the port
        assert "cannot listen" in capsys.readouterr().err


# --- inference -------------------------------------------------------------------------------------
def test_infer_json_uint8_and_float_equal_v1_and_the_guard(setup, svc):
    x = batch(setup, 40, 24)
    r = infer(svc, x, id="req-7")
    assert r.headers["content-type"].startswith("application/json") and r.headers["x-request-id"]
    doc = r.json()
    assert doc["model_name"] == NAME and doc["model_version"] == "1" and doc["id"] == "req-7"
    out = outputs(r)
    assert list(out) == OUTPUTS
    assert {k: (o["datatype"], o["shape"]) for k, o in out.items()} == {
        "label": ("INT64", [64]), "class": ("BYTES", [64]), "confidence": ("FP32", [64]), "score": ("FP32", [64]),
        "p_value": ("FP32", [64]), "reject": ("BOOL", [64]), "reason": ("BYTES", [64])}
    data = {k: o["data"] for k, o in out.items()}
    assert_same_as_v1(data, v1(svc, x))
    g = setup["guard"](torch.from_numpy(x))
    assert data["label"] == g.label.tolist() and data["reject"] == g.reject.tolist() and data["reason"] == g.reason
    rej = np.array(data["reject"])
    assert rej[40:].mean() >= 0.8 and rej[:40].mean() <= 0.2  # the backdoor is caught through the protocol

    xf = x[:8].astype(np.float32) / 255  # FP32 in [0, 1], with NaN and inf pixels: rejected, never accepted
    xf[0, 0, 0, 0] = np.nan
    xf[1, 0, 3, 3] = np.inf
    f = {k: o["data"] for k, o in outputs(infer(svc, xf, "FP32")).items()}
    assert f["reject"][:2] == [True, True] and f["reason"][:2] == [REJECT_NONFINITE_INPUT] * 2
    assert f["score"][0] is None and f["p_value"][0] == 0.0  # NaN is JSON null
    assert_same_as_v1(f, v1(svc, xf))
    for dt, arr in (("FP64", xf.astype(np.float64)), ("FP16", xf.astype(np.float16))):
        same = {k: o["data"] for k, o in outputs(infer(svc, arr, dt)).items()}
        ref = v1(svc, arr.astype(np.float32))
        assert [s["label"] for s in ref] == same["label"] and [s["reject"] for s in ref] == same["reject"], dt

    nested = {"inputs": [{**tensor(x[:3], "UINT8"), "data": x[:3].tolist()}]}  # nested data, version route
    r = svc.post(f"/v2/models/{NAME}/versions/1/infer", json=nested)
    assert outputs(r)["label"]["data"] == data["label"][:3] and "id" not in r.json()


def test_output_selection_and_binary_tensor_data(setup, svc):
    x = batch(setup, 5, 3)
    ref = {k: o["data"] for k, o in outputs(infer(svc, x)).items()}
    r = infer(svc, x, outputs=[{"name": "reject"}, {"name": "score"}])
    assert [o["name"] for o in r.json()["outputs"]] == ["reject", "score"]

    # binary input and binary outputs (the binary_tensor_data extension), as tritonclient sends them
    head = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "UINT8",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "label", "parameters": {"binary_data": True}},
                                   {"name": "reason", "parameters": {"binary_data": True}},
                                   {"name": "reject", "parameters": {"binary_data": True}},
                                   {"name": "score", "parameters": {"binary_data": False}}]}).encode()
    r = svc.post(INFER, content=head + x.tobytes(), headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    doc, raw = json.loads(r.content[:n]), r.content[n:]
    sizes = [o.get("parameters", {}).get("binary_data_size") for o in doc["outputs"]]
    assert sizes[0] == 8 * 8 and sizes[2] == 8 and sizes[3] is None and sum(sizes[:3]) == len(raw)
    assert np.frombuffer(raw[:64], "<i8").tolist() == ref["label"]
    reasons, pos = [], 64
    while pos < 64 + sizes[1]:
        (k,) = struct.unpack("<I", raw[pos:pos + 4])
        reasons.append(raw[pos + 4:pos + 4 + k].decode())
        pos += 4 + k
    assert reasons == ref["reason"]
    assert np.frombuffer(raw[pos:], np.bool_).tolist() == ref["reject"]
    assert doc["outputs"][3]["data"] == ref["score"]

    # every output binary by the request's parameter; FP32 NaN travels as NaN there
    xf = x.astype(np.float32) / 255
    xf[2, 0, 1, 1] = np.nan
    head = json.dumps({"parameters": {"binary_data_output": True},
                       "inputs": [{"name": "images", "shape": list(xf.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": xf.nbytes}}]}).encode()
    r = svc.post(INFER, content=head + xf.tobytes(), headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    doc = json.loads(r.content[:n])
    assert [o["name"] for o in doc["outputs"]] == OUTPUTS and all("data" not in o for o in doc["outputs"])
    offsets = np.cumsum([0] + [o["parameters"]["binary_data_size"] for o in doc["outputs"]]) + n
    score = np.frombuffer(r.content[offsets[3]:offsets[4]], "<f4")
    assert np.isnan(score[2]) and not np.isnan(score[[0, 1, 3]]).any()


def test_abstain_gives_label_minus_one(setup):
    x = batch(setup, 4, 4)
    with client(setup["guard"], on_reject="abstain") as c:
        out = {k: o["data"] for k, o in outputs(infer(c, x)).items()}
    g = setup["guard"](torch.from_numpy(x))
    for label, cls, conf, rej, ref in zip(out["label"], out["class"], out["confidence"], out["reject"],
                                          g.label.tolist()):
        assert (label, cls, conf is None) == ((-1, "", True) if rej else (ref, setup["classes"][ref], False))
    assert out["reject"] == g.reject.tolist() and any(out["reject"])


# --- bad requests ----------------------------------------------------------------------------------
def _bad_cases(setup):
    x = batch(setup, 1, 0)
    ok = tensor(x, "UINT8")
    js = lambda doc: {"content": json.dumps(doc), "headers": {"content-type": "application/json"}}  # noqa: E731
    head = json.dumps({"inputs": [{**{k: v for k, v in ok.items() if k != "data"},
                                   "parameters": {"binary_data_size": 144}}]}).encode()
    binh = lambda h, body: {"content": body, "headers": {"Inference-Header-Content-Length": h}}  # noqa: E731
    return [
        ("unknown model", "/v2/models/other/infer", js({"inputs": [ok]}), 404),
        ("unknown version", f"/v2/models/{NAME}/versions/3/infer", js({"inputs": [ok]}), 404),
        ("GET on infer", INFER, {"method": "GET"}, 405),
        ("invalid JSON", INFER, {"content": b'{"inputs": [', "headers": {}}, 400),
        ("empty body", INFER, {"content": b"", "headers": {}}, 400),
        ("not an object", INFER, js([ok]), 422),
        ("unknown top-level field", INFER, js({"inputs": [ok], "input": 1}), 422),
        ("id not a string", INFER, js({"inputs": [ok], "id": 7}), 422),
        ("no inputs", INFER, js({"inputs": []}), 422),
        ("too many input tensors", INFER, js({"inputs": [ok, ok]}), 422),
        ("unknown input name", INFER, js({"inputs": [{**ok, "name": "x"}]}), 422),
        ("unknown input field", INFER, js({"inputs": [{**ok, "extra": 1}]}), 422),
        ("wrong datatype", INFER, js({"inputs": [{**ok, "datatype": "INT64"}]}), 422),
        ("BYTES datatype", INFER, js({"inputs": [{**ok, "datatype": "BYTES"}]}), 422),
        ("shape not integers", INFER, js({"inputs": [{**ok, "shape": [1, 1, 12, "12"]}]}), 422),
        ("shape of rank 3", INFER, js({"inputs": [{**ok, "shape": [1, 12, 12]}]}), 422),
        ("wrong image shape", INFER, js({"inputs": [{**ok, "shape": [1, 1, 12, 11], "data": ok["data"][:132]}]}), 422),
        ("empty batch", INFER, js({"inputs": [{**ok, "shape": [0, 1, 12, 12], "data": []}]}), 422),
        ("shape and data length differ", INFER, js({"inputs": [{**ok, "data": ok["data"][:-1]}]}), 422),
        ("shape and data length differ (two images' shape)", INFER,
         js({"inputs": [{**ok, "shape": [2, 1, 12, 12]}]}), 422),
        ("ragged nested data", INFER, js({"inputs": [{**ok, "data": [[0] * 12] * 11 + [[0] * 3]}]}), 422),
        ("booleans", INFER, js({"inputs": [{**ok, "data": [True] + ok["data"][1:]}]}), 422),
        ("null", INFER, js({"inputs": [{**ok, "data": [None] + ok["data"][1:]}]}), 422),
        ("strings", INFER, js({"inputs": [{**ok, "data": ["1"] * 144}]}), 422),
        ("data not an array", INFER, js({"inputs": [{**ok, "data": 3}]}), 422),
        ("no data", INFER, js({"inputs": [{k: v for k, v in ok.items() if k != "data"}]}), 422),
        ("uint8 above 255", INFER, js({"inputs": [{**ok, "data": [256] * 144}]}), 422),
        ("uint8 fractional", INFER, js({"inputs": [{**ok, "data": [0.5] * 144}]}), 422),
        ("uint8 NaN", INFER, {"content": json.dumps({"inputs": [{**ok, "data": [float("nan")] * 144}]}),
                              "headers": {}}, 422),
        ("FP32 in [0, 255]", INFER, js({"inputs": [{**ok, "datatype": "FP32"}]}), 422),
        ("FP32 normalised", INFER, js({"inputs": [{**ok, "datatype": "FP32", "data": [-2.0] * 144}]}), 422),
        ("huge integer", INFER, js({"inputs": [{**ok, "data": [10 ** 30] * 144}]}), 422),
        ("unknown output", INFER, js({"inputs": [ok], "outputs": [{"name": "logits"}]}), 422),
        ("output twice", INFER, js({"inputs": [ok], "outputs": [{"name": "label"}, {"name": "label"}]}), 422),
        ("classification extension", INFER,
         js({"inputs": [ok], "outputs": [{"name": "label", "parameters": {"classification": 2}}]}), 422),
        ("binary_data not a bool", INFER, js({"inputs": [ok], "parameters": {"binary_data_output": 1}}), 422),
        ("shared memory", INFER, js({"inputs": [{**ok, "parameters": {"shared_memory_region": "r"}}]}), 422),
        ("parameters not an object", INFER, js({"inputs": [ok], "parameters": [1]}), 422),
        ("binary and data both", INFER,
         js({"inputs": [{**ok, "parameters": {"binary_data_size": 144}}]}), 422),
        ("binary size not matching the shape", INFER, binh(str(len(head)), head.replace(b"144", b"100") + bytes(100)),
         422),
        ("binary shorter than declared", INFER, binh(str(len(head)), head + bytes(100)), 400),
        ("binary without the header", INFER, {"content": head + bytes(144), "headers": {}}, 400),
        ("header length past the body", INFER, binh("99999", head + bytes(144)), 400),
        ("header length not a number", INFER, binh("ten", head + bytes(144)), 400),
        ("binary bytes nobody declared", INFER, binh(str(len(json.dumps({"inputs": [ok]}))),
                                                     json.dumps({"inputs": [ok]}).encode() + bytes(8)), 400),
        ("compressed body", INFER, {"content": b"x", "headers": {"content-encoding": "gzip"}}, 415),
        ("too many inputs in the batch", INFER,
         js({"inputs": [{**ok, "shape": [257, 1, 12, 12], "data": ok["data"] * 257}]}), 413),
    ]


def _assert_refused(c, name, path, kwargs, status):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "POST")
    before = metrics(c)
    r = c.request(method, path, **kwargs)
    assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/json"), name
    assert "\n" not in r.text.strip() and set(r.json()) == {"error"} and r.json()["error"], f"{name}: {r.text}"
    after = metrics(c)
    assert {k: after.get(k) for k in SERVED} == {k: before.get(k) for k in SERVED}, f"{name} moved served counters"
    assert after["badexpert_bad_requests_total"] == before["badexpert_bad_requests_total"] + 1, name
    assert after[f'badexpert_bad_requests_total{{status="{status}"}}'] == \
        before[f'badexpert_bad_requests_total{{status="{status}"}}'] + 1, name
    return r.json()["error"]


def test_every_bad_request_is_a_one_line_protocol_error_and_leaves_served_counters(setup, svc):
    assert infer(svc, batch(setup, 2, 0)).status_code == 200  # the counters are not all zero
    errors = {name: _assert_refused(svc, name, path, kwargs, status)
              for name, path, kwargs, status in _bad_cases(setup)}
    assert "other" in errors["unknown model"] and "FP32" in errors["uint8 NaN"]
    assert "--max-batch" in errors["too many inputs in the batch"] and "one" in errors["too many input tensors"]
    # metadata routes of an unknown model are 404 too, but not inference traffic: not counted
    before = metrics(svc)["badexpert_bad_requests_total"]
    assert svc.get("/v2/models/other").status_code == 404
    assert metrics(svc)["badexpert_bad_requests_total"] == before
    x = batch(setup, 3, 3)  # still up and still right
    assert_same_as_v1({k: o["data"] for k, o in outputs(infer(svc, x)).items()}, v1(svc, x))


def test_body_and_batch_limits(setup):
    x = batch(setup, 9, 0)
    with client(setup["guard"], max_body_mb=0.01, max_batch=8) as c:  # 10 KiB
        _assert_refused(c, "body over the limit", INFER, {"content": b"{" + b" " * 20000 + b"}"}, 413)
        _assert_refused(c, "streamed body over the limit", INFER, {"content": iter([b" " * 6000, b" " * 6000])}, 413)
        head = json.dumps({"inputs": [{"name": "images", "shape": [9, 1, 12, 12], "datatype": "UINT8",
                                       "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        _assert_refused(c, "nine inputs", INFER, {"content": head + x.tobytes(),
                                                  "headers": {"Inference-Header-Content-Length": str(len(head))}}, 413)
        head = head.replace(b"[9,", b"[8,").replace(str(x.nbytes).encode(), str(x[:8].nbytes).encode())
        r = c.post(INFER, content=head + x[:8].tobytes(), headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [8]


def test_served_traffic_is_counted_and_logged_like_v1(setup):
    x = batch(setup, 3, 5)
    with client(setup["guard"]) as c:
        before = metrics(c)
        out = outputs(infer(c, x))
        after = metrics(c)
        rejected = sum(out["reject"]["data"])
        assert after["badexpert_requests_total"] == before["badexpert_requests_total"] + 1
        assert after["badexpert_inputs_total"] == before["badexpert_inputs_total"] + 8
        assert after["badexpert_rejections_total"] == before["badexpert_rejections_total"] + rejected
        assert after["badexpert_drift_window_inputs"] == before["badexpert_drift_window_inputs"] + 8


def test_infer_paths():
    assert is_infer_path("/v2/models/a/infer") and is_infer_path("/v2/models/a/versions/1/infer")
    assert not is_infer_path("/v2/models/a") and not is_infer_path("/v2/models/a/ready")
    assert not is_infer_path("/v2/models/a/x/1/infer") and not is_infer_path("/v1/classify")
    assert ACCEPTED  # the reasons come from the one rule (imported, not redefined)


# --- the real client on a real socket --------------------------------------------------------------
def test_tritonclient_against_a_real_server(setup):
    """`badexpert serve fmnist-guard.safetensors` on 127.0.0.1 (a free port); the real
    tritonclient[http] client: health, metadata, and a batch of clean, triggered and NaN images,
    in binary and in JSON, equal to /v1/classify's answers."""
    httpclient = pytest.importorskip("tritonclient.http")
    with serve_process(setup["path"]) as srv:
        port, lines = srv.port, srv.lines
        url = f"127.0.0.1:{port}"
        tc = httpclient.InferenceServerClient(url, connection_timeout=10, network_timeout=30)
        deadline = time.monotonic() + 30
        while not tc.is_server_ready():
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        assert tc.is_server_live() and tc.is_model_ready(NAME) and not tc.is_model_ready("other")
        assert "binary_tensor_data" in tc.get_server_metadata()["extensions"]
        meta = tc.get_model_metadata(NAME)
        assert meta["inputs"][0]["shape"] == [-1, 1, 12, 12] and meta["inputs"][0]["datatype"] == "UINT8"

        x = (batch(setup, 10, 6).astype(np.float32) / 255)
        x[3, 0, 4, 4] = np.nan  # a NaN image: rejected, never accepted
        with urllib.request.urlopen(urllib.request.Request(
                f"http://{url}/v1/classify", data=json.dumps({"inputs": x.tolist(), "dtype": "float32"}).encode(),
                headers={"Content-Type": "application/json"}), timeout=30) as r:
            ref = json.loads(r.read())["results"]
        assert ref[3]["reject"] and ref[3]["reason"] == REJECT_NONFINITE_INPUT

        for binary in (True, False):
            inp = httpclient.InferInput("images", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            want = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
            res = tc.infer(NAME, [inp], outputs=want, request_id=f"r{int(binary)}")
            assert res.get_response()["id"] == f"r{int(binary)}"
            got = {n: res.as_numpy(n) for n in OUTPUTS}
            assert got["label"].dtype == np.int64 and got["reject"].dtype == np.bool_
            assert got["score"].dtype == np.float32 and np.isnan(got["score"][3])  # JSON null reads back as NaN
            assert_same_as_v1(got, ref)
        res = tc.infer(NAME, [inp])  # no outputs named: all, in binary (tritonclient's default)
        assert_same_as_v1({n: res.as_numpy(n) for n in OUTPUTS}, ref)

        u8 = batch(setup, 4, 4)
        inp = httpclient.InferInput("images", list(u8.shape), "UINT8")
        inp.set_data_from_numpy(u8)
        res = tc.infer(NAME, [inp])
        assert res.as_numpy("label").tolist() == [r["label"] for r in v1_socket(url, u8)]

        from tritonclient.utils import InferenceServerException

        bad = httpclient.InferInput("images", [1, 1, 12, 12], "FP32")
        bad.set_data_from_numpy(np.full((1, 1, 12, 12), 7.0, np.float32))
        with pytest.raises(InferenceServerException, match=r"\[0, 1\]"):
            tc.infer(NAME, [bad])
        with pytest.raises(InferenceServerException, match="unknown model"):
            tc.infer("other", [inp])
        tc.close()
    assert re.search(r'"event": "classify".*"path": "/v2/models/' + NAME, "".join(lines))


def v1_socket(url: str, x: np.ndarray) -> list[dict]:
    req = urllib.request.Request(f"http://{url}/v1/classify", data=json.dumps({"inputs": x.tolist(),
                                                                               "dtype": "uint8"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["results"]
