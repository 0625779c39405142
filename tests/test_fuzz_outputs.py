"""Fuzz rows for output locations, the grid's Ray address and the service's protocol edges.

- **Output locations** (issue 16, class 4): every command that writes (``train``, ``defend``,
  ``bundle``, ``export``, ``evaluate``, ``run``, ``compare``, ``demo``, ``grid``) times every kind
  of place that cannot be written (a virtual file system, a parent that is a file, a name longer
  than the file system allows, a read-only folder, a pipe): exit 2, one line naming the problem,
  nothing written (the contract of ``tests/test_fuzz.py``'s :func:`run_cli`). The inputs are real
  (a model, a detector, a bundle), so a check that came after the work would fail the row. A write
  that fails after the checks (disk full) is one line too, with nothing left behind.
- **Ray** (class 7): an unreachable ``grid --ray`` address is one line after a bounded wait, and
  no output folder appears.
- **Service** (class 8): protocol-level errors the application can shape (wrong method, unknown
  route, content type, malformed JSON or multipart, oversize bodies, request validation, an
  internal error) are one-line JSON; the log is JSON lines, Python warnings and other libraries'
  lines included; uploaded files are closed after every request.
- **CLI attack parameters** (class 9): a parameter that collides with the attack's name or with
  an option of its own is one line.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import importlib.util
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from badexpert.cli import main
from badexpert.errors import BadExpertError

from .test_fuzz import NO_DATA, _prepare_outputs, artifacts, run_cli  # noqa: F401 (artifacts: a fixture)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --- output locations -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(artifacts, tmp_path_factory):  # noqa: F811
    """A real bundle made from the fuzz artifacts' model and detector."""
    out = tmp_path_factory.mktemp("bundle") / "guard.safetensors"
    assert main(["bundle", "--model", str(artifacts["model"]), "--detector", str(artifacts["detector"]),
                 "--out", str(out)]) == 0
    return out


#: command -> (argv with placeholders, what --out names: a file suffix, or "dir")
COMMANDS = {
    "train": (["train", "--data-path", "NODATA", "--epochs", "1", "--out", "OUT"], ".safetensors"),
    "defend": (["defend", "--model", "MODEL", "--out", "OUT"], ".safetensors"),
    "bundle": (["bundle", "--model", "MODEL", "--detector", "DETECTOR", "--out", "OUT"], ".safetensors"),
    "export": (["export", "BUNDLE", "--onnx", "OUT"], ".onnx"),
    "evaluate": (["evaluate", "--model", "MODEL", "--detector", "DETECTOR", "--out", "OUT"], "dir"),
    "run": (["run", "--config", "CFG", "--out", "OUT"], "dir"),
    "compare": (["compare", "--model", "MODEL", "--detectors", "badexpert,strip", "--out", "OUT"], "dir"),
    "demo": (["demo", "--data-path", "NODATA", "--out", "OUT"], "dir"),
    "grid": (["grid", "--config", "GRIDCFG", "--out", "OUT"], "dir"),
}
#: commands that also take --cache-dir (an output location too)
CACHE_COMMANDS = ("run", "demo", "grid")


def _virtual(mount: str) -> bool:
    """A virtual file system mounted here (where it is not, its rows are skipped)."""
    return os.path.ismount(mount)


#: place -> (path template, expected words, skip reason or None). NAME is the output's own name;
#: TMP the test's folder.
PLACES = {
    "proc-missing-folder": ("/proc/badexpert-no-such-dir/NAME", "cannot write to '/proc'",
                            None if _virtual("/proc") else "no /proc here"),
    "proc-self": ("/proc/self/NAME", "cannot write to '/proc/self'", None if _virtual("/proc") else "no /proc here"),
    "sys": ("/sys/NAME", "cannot write to '/sys'", None if _virtual("/sys") else "no /sys here"),
    "sys-kernel-deeper": ("/sys/kernel/no-such/NAME", "cannot write to '/sys/kernel'",
                          None if _virtual("/sys") and os.path.isdir("/sys/kernel") else "no /sys/kernel here"),
    "parent-is-a-file": ("TMP/a-file.txt/NAME", "is a file", None),
    "grandparent-is-a-file": ("TMP/a-file.txt/deeper/NAME", "is a file", None),
    "name-too-long": ("TMP/" + "n" * 300 + "/NAME", "longer than", None),
    "read-only-folder": ("TMP/read-only/NAME", "permission denied",
                         "root writes into read-only folders" if IS_ROOT else None),
}


def _output_rows():
    rows = []
    for cmd, (_, kind) in COMMANDS.items():
        name = "out" + kind if kind != "dir" else "run-dir"
        for place, (template, message, skip) in PLACES.items():
            marks = [pytest.mark.skip(reason=skip)] if skip else []
            rows.append(pytest.param(cmd, "--out", template.replace("NAME", name), message, [],
                                     marks=marks, id=f"{cmd}-{place}"))
        if kind != "dir":  # an existing pipe, even with --overwrite: never replaced
            rows.append(pytest.param(cmd, "--out", "TMP/fifo" + kind, "not a regular file", ["--overwrite"],
                                     id=f"{cmd}-existing-pipe"))
    for cmd in CACHE_COMMANDS:
        for place in ("proc-missing-folder", "proc-self", "sys", "parent-is-a-file", "name-too-long"):
            template, message, skip = PLACES[place]
            marks = [pytest.mark.skip(reason=skip)] if skip else []
            rows.append(pytest.param(cmd, "--cache-dir", template.replace("NAME", "cache"), message, [],
                                     marks=marks, id=f"{cmd}-cache-dir-{place}"))
    return rows


def _argv(cmd: str, option: str, place: str, extra: list[str], tmp: Path, inputs: dict) -> list[str]:
    argv, kind = COMMANDS[cmd]
    default_out = str(tmp / ("new-run" if kind == "dir" else "new" + kind))
    values = {**inputs, "OUT": place if option == "--out" else default_out}
    out = [values.get(a, a) for a in argv] + extra
    if option != "--out":
        out += [option, place]
    return out


@pytest.fixture
def output_inputs(artifacts, bundle, tmp_path):  # noqa: F811
    """Real inputs for every command, and the places of PLACES made under ``tmp_path``."""
    places = _prepare_outputs(tmp_path)
    grid_cfg = tmp_path / "grid.json"
    grid_cfg.write_text(json.dumps({
        "datasets": [{"name": "fashion-mnist", "data_path": str(tmp_path / NO_DATA)}], "architectures": ["cnn"],
        "attacks": [{"name": "badnet"}], "detectors": ["strip"], "seeds": [0]}))
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    os.mkfifo(tmp_path / "fifo.safetensors")
    os.mkfifo(tmp_path / "fifo.onnx")
    yield {"MODEL": str(artifacts["model"]), "DETECTOR": str(artifacts["detector"]), "BUNDLE": str(bundle),
           "CFG": str(places["CFG"]), "GRIDCFG": str(grid_cfg), "NODATA": str(tmp_path / NO_DATA)}
    ro.chmod(0o755)


@pytest.mark.parametrize("cmd, option, place, message, extra", _output_rows())
def test_unwritable_output_is_one_line_before_any_work(cmd, option, place, message, extra, output_inputs, tmp_path,
                                                       capsys):
    place = place.replace("TMP", str(tmp_path))
    t0 = time.perf_counter()
    line = run_cli(_argv(cmd, option, place, extra, tmp_path, output_inputs), tmp_path, capsys, message=message)
    assert time.perf_counter() - t0 < 60, "the check came after the work"
    assert "Traceback" not in line
    assert not os.path.exists(place) or Path(place).is_fifo()


def test_the_probe_leaves_nothing_in_the_checked_folder(tmp_path):
    from badexpert.utils import check_output_dir, check_output_file

    (tmp_path / "keep.txt").write_text("x")
    check_output_file(tmp_path / "m.safetensors", suffix=".safetensors")
    check_output_dir(tmp_path / "a" / "b" / "run", owned=frozenset())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


# --- a write that fails after the checks -------------------------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_atomic_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from badexpert.utils import atomic_write_bytes

    monkeypatch.setattr(os, "replace", _disk_full)
    with pytest.raises(BadExpertError, match="no space left") as e:
        atomic_write_bytes(tmp_path / "new" / "deeper" / "x.bin", b"data")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no temporary file, no parent folder made for it


def test_a_failed_run_directory_is_one_line_and_leaves_nothing(tmp_path):
    from badexpert.utils import atomic_directory

    with pytest.raises(BadExpertError, match="cannot write .*no space left") as e:
        with atomic_directory(tmp_path / "new" / "run", owned=frozenset({"a.txt"})) as out:
            (out / "a.txt").write_text("half")
            _disk_full()
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_disk_full_at_write_time_is_one_line(artifacts, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(os, "replace", _disk_full)
    run_cli(["bundle", "--model", artifacts["model"], "--detector", artifacts["detector"],
             "--out", tmp_path / "sub" / "deeper" / "b.safetensors"], tmp_path, capsys,
            message=("no space left", "b.safetensors"))


def test_grid_rows_that_cannot_be_appended_are_one_line(tmp_path):
    from badexpert.pipeline.grid import append_rows

    with pytest.raises(BadExpertError, match="cannot write") as e:
        append_rows(tmp_path / "a-folder-that-is-not-there" / "results.jsonl", [{"key": "k"}])
    assert "\n" not in str(e.value)


# --- grid --ray: a bounded wait ----------------------------------------------------------------------
def _grid_cfg(tmp_path: Path) -> Path:
    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps({
        "datasets": [{"name": "fashion-mnist", "data_path": str(tmp_path / NO_DATA)}], "architectures": ["cnn"],
        "attacks": [{"name": "badnet"}], "detectors": ["strip"], "seeds": [0]}))
    return cfg


def _refused_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY_ROWS = [
    pytest.param(["--ray", "127.0.0.1:1"], "cannot reach Ray at '127.0.0.1:1'", id="refused-port-1"),
    pytest.param(["--ray", "127.0.0.1:PORT", "--ray-timeout", "2"], "within 2 s", id="refused-free-port"),
    pytest.param(["--ray", "ray://127.0.0.1:PORT"], "cannot reach Ray at 'ray://127.0.0.1:", id="ray-client-refused"),
    pytest.param(["--ray", "no-such-host.invalid:6379", "--ray-timeout", "2"], "no-such-host.invalid",
                 id="unknown-host"),
    pytest.param(["--ray", "not an address"], "not an address", id="not-an-address"),
    pytest.param(["--ray", "127.0.0.1:1", "--ray-timeout", "0"], "positive number of seconds", id="zero-timeout"),
    pytest.param(["--ray", "127.0.0.1:1", "--ray-timeout", "nan"], "positive number of seconds", id="nan-timeout"),
]


@pytest.mark.parametrize("extra, message", RAY_ROWS)
def test_unreachable_ray_address_is_one_line_and_writes_nothing(extra, message, tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = str(_refused_port())
    extra = [a.replace("PORT", port) for a in extra]
    t0 = time.perf_counter()
    run_cli(["grid", "--config", _grid_cfg(tmp_path), "--out", tmp_path / "grid-out", *extra], tmp_path, capsys,
            message=message)
    assert time.perf_counter() - t0 < 40  # ray.init alone retries for many minutes
    assert not (tmp_path / "grid-out").exists()


def test_a_bad_out_is_told_before_the_ray_wait(tmp_path, capsys):
    pytest.importorskip("ray")
    (tmp_path / "a-file.txt").write_text("x")
    run_cli(["grid", "--config", _grid_cfg(tmp_path), "--out", tmp_path / "a-file.txt" / "g", "--ray", "127.0.0.1:1"],
            tmp_path, capsys, message="is a file")


# --- CLI attack parameters ---------------------------------------------------------------------------
ATTACK_PARAM_ROWS = [
    pytest.param(["--attack-param", "name=blend"], "'name'", id="name-is-not-a-parameter"),
    pytest.param(["--attack-param", "name=badnet"], "'name'", id="its-own-name"),
    pytest.param(["--attack-param", "target=1", "--target", "2"], "given twice", id="target-twice"),
    pytest.param(["--attack-param", "poison-rate=0.1", "--poison-rate", "0.2"], "given twice", id="rate-twice"),
    pytest.param(["--attack-param", "size=3", "--attack-param", "size=4"], "given twice", id="param-twice"),
    pytest.param(["--attack-param", "self=1"], "'self'", id="self"),
]


@pytest.mark.parametrize("extra, message", ATTACK_PARAM_ROWS)
@pytest.mark.parametrize("cmd", ["train", "evaluate", "demo"])
def test_colliding_attack_parameters_are_one_line(cmd, extra, message, artifacts, tmp_path, capsys):  # noqa: F811
    head = {"train": ["train", "--attack", "badnet", "--data-path", tmp_path / NO_DATA,
                      "--out", tmp_path / "m.safetensors"],
            "evaluate": ["evaluate", "--model", artifacts["model"], "--detector", artifacts["detector"],
                         "--attack", "badnet", "--out", tmp_path / "ev"],
            "demo": ["demo", "--attack", "badnet", "--data-path", tmp_path / NO_DATA, "--out", tmp_path / "demo"]}[cmd]
    run_cli(head + extra, tmp_path, capsys, message=message, not_message=NO_DATA)


# --- the service's edges -----------------------------------------------------------------------------
from badexpert.serve import Settings, configure_logging, create_app, restore_logging  # noqa: E402

HAS_SERVE = all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn", "python_multipart", "httpx"))
needs_serve = pytest.mark.skipif(not HAS_SERVE, reason="needs the serve extra and httpx")


class TinyModel:
    """A service model on 1x4x4 inputs: label = first pixel > 127; nothing rejected."""

    input_shape = (1, 4, 4)
    classes = ["dark", "bright"]
    fpr_target = 0.05
    threshold = 1.0

    def __call__(self, x):
        n = len(x)
        v = x.reshape(n, -1)[:, 0].astype(np.float64)
        v = v * 255 if x.dtype != np.uint8 else v
        return {"label": (v > 127).astype(np.int64), "confidence": np.ones(n, np.float32),
                "score": np.zeros(n, np.float32), "p_value": np.full(n, 0.5, np.float32), "reject": np.zeros(n, bool)}


def _serve(model=None, **settings):
    with warnings.catch_warnings():  # starlette 1.x: "install httpx2" (TestClient still uses httpx)
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    app = create_app(model or TinyModel(), settings=Settings(**{"max_body_mb": 0.01, "max_batch": 4, **settings}))
    client = TestClient(app, raise_server_exceptions=False)
    client.__enter__()
    deadline = time.monotonic() + 20
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the service never became ready"
        time.sleep(0.01)
    return app, client


@pytest.fixture(scope="module")
def svc():
    app, client = _serve()
    yield client
    client.__exit__(None, None, None)


def _png(value: int = 200, size=(4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


JSON = {"content-type": "application/json"}
MP = {"content-type": "multipart/form-data; boundary=b0undary"}
ROUTES = {"/v1/classify": "POST", "/v1/status": "GET", "/healthz": "GET", "/readyz": "GET", "/metrics": "GET"}


def _protocol_rows():
    rows = []
    for path, allowed in ROUTES.items():  # every route x every method it does not take
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            if method != allowed:
                rows.append(pytest.param(method, path, {}, 405, "not allowed", id=f"{method}-{path}"))
    for path in ("/nope", "/v1", "/v2/classify", "/v1/classify/extra", "/%ff", "/" + "x" * 5000):
        rows.append(pytest.param("GET", path, {}, 404, "no endpoint", id=f"unknown-route-{path[:12]}"))
    for ctype in ("text/plain", "application/xml", "application/x-www-form-urlencoded", "multipart/mixed",
                  "application/jsonx", "image"):
        rows.append(pytest.param("POST", "/v1/classify", {"content": b"{}", "headers": {"content-type": ctype}},
                                 415, "Content-Type", id=f"content-type-{ctype}"))
    rows.append(pytest.param("POST", "/v1/classify", {"content": b"{}"}, 415, "missing Content-Type",
                             id="content-type-missing"))
    for i, body in enumerate((b"{", b"[1,", b"\xff\xfe", b'{"inputs": [1]} trailing', b"", b"nul\x00",
                              b"[" * 10000, b'{"inputs": 1e999999}')):
        rows.append(pytest.param("POST", "/v1/classify", {"content": body, "headers": JSON}, (400, 422), "",
                                 id=f"malformed-json-{i}"))
    big = b"[" + b"0," * 6000 + b"0]"
    rows += [
        pytest.param("POST", "/v1/classify", {"content": big, "headers": JSON}, 413, "exceeds the limit",
                     id="oversize-declared"),
        pytest.param("POST", "/v1/classify", {"content": iter([big[:4000], big[4000:]]), "headers": JSON}, 413,
                     "exceeds the limit", id="oversize-chunked"),
        pytest.param("POST", "/v1/classify", {"content": b"{}", "headers": {**JSON, "content-length": "x"}}, 400,
                     "Content-Length", id="content-length-not-a-number"),
    ]
    multipart_bodies = {
        "no-boundary": (b"--b0undary\r\n", {"content-type": "multipart/form-data"}, 400),
        "truncated": (b"--b0undary\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.png\"\r\n\r\n\x89PN",
                      MP, 400),
        "other-boundary": (_multipart([("f", "a.png", _png())], "other"), MP, (400, 422)),
        "part-without-name": (b"--b0undary\r\nContent-Disposition: form-data; filename=\"a.png\"\r\n\r\nabc\r\n"
                              b"--b0undary--\r\n", MP, 400),
        "text-field": (_multipart([("f", None, b"hello")]), MP, 422),
        "too-many-files": (_multipart([("f", f"{i}.png", _png()) for i in range(5)]), MP, 413),
        "not-an-image": (_multipart([("f", "a.png", b"GIF89a" + b"\0" * 30)]), MP, 422),
        "empty": (b"", MP, (400, 422)),
    }
    for name, (body, headers, status) in multipart_bodies.items():
        rows.append(pytest.param("POST", "/v1/classify", {"content": body, "headers": headers}, status, "",
                                 id=f"multipart-{name}"))
    return rows


def _assert_json_error(r, status, message=""):
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, f"{r.status_code}: {r.text[:200]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    if r.request.method == "HEAD":
        return
    assert "\n" not in r.text.strip(), r.text
    doc = r.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"].strip(), doc
    assert message in doc["error"], doc["error"]


@needs_serve
@pytest.mark.parametrize("method, path, kwargs, status, message", _protocol_rows())
def test_protocol_errors_are_one_line_json(method, path, kwargs, status, message, svc):
    _assert_json_error(svc.request(method, path, **kwargs), status, message)


@needs_serve
def test_the_service_still_answers_after_the_protocol_errors(svc):
    r = svc.post("/v1/classify", content=_multipart([("f", "a.png", _png(200)), ("g", "b.png", _png(10))]), headers=MP)
    assert r.status_code == 200, r.text
    assert [x["class"] for x in r.json()["results"]] == ["bright", "dark"]


@needs_serve
def test_request_validation_and_internal_errors_are_one_line_json():
    class Broken(TinyModel):
        threshold = object()  # /v1/status cannot encode it: an internal error

    app, client = _serve(Broken())
    try:
        @app.get("/probe")
        async def probe(n: int):  # a route with a typed parameter: FastAPI validates it
            return {"n": n}

        _assert_json_error(client.get("/probe", params={"n": "abc"}), 422, "invalid request: query.n")
        _assert_json_error(client.get("/probe"), 422, "invalid request")
        _assert_json_error(client.get("/v1/status"), 500, "internal error")
        assert client.get("/healthz").status_code == 200
    finally:
        client.__exit__(None, None, None)


# --- the log ------------------------------------------------------------------------------------------
def test_every_log_line_is_json_warnings_and_other_libraries_included(capsys):
    stream = io.StringIO()
    root = logging.getLogger()
    before = (list(root.handlers), root.level, warnings.showwarning)
    handler = configure_logging("info", stream)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a Python warning\nover two lines", UserWarning)
        logging.getLogger("fastapi").warning("fastapi says %s", "hello")
        logging.getLogger("some.library").error("a library error")
        logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("asyncio").exception("Task exception was never retrieved")
        logging.getLogger("some.library").info("chatter below warning is left out")
    finally:
        restore_logging(handler)
    lines = stream.getvalue().splitlines()
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    messages = " | ".join(d.get("message", "") for d in docs)
    for needle in ("a Python warning", "fastapi says hello", "a library error", "Invalid HTTP request",
                   "Task exception"):
        assert needle in messages, messages
    assert "chatter" not in messages
    assert {d["event"] for d in docs} >= {"warning", "server"}
    assert any(d.get("traceback", "").count("ValueError") for d in docs)
    assert capsys.readouterr().err == ""  # nothing went around the JSON handler
    assert (list(root.handlers), root.level, warnings.showwarning) == before  # restored
    # a library's malformed logging call is still one JSON line
    from badexpert.serve import JsonFormatter

    bad = logging.LogRecord("some.library", logging.WARNING, __file__, 1, "arguments that do not fit %s %d", ("x",),
                            None)
    assert "arguments that do not fit" in json.loads(JsonFormatter().format(bad))["message"]


# --- uploaded files -------------------------------------------------------------------------------------
@needs_serve
def test_uploaded_files_are_closed_after_every_request(svc, monkeypatch):
    import starlette.formparsers as fp

    made = []

    class Recorded(fp.SpooledTemporaryFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(fp, "SpooledTemporaryFile", Recorded)
    bodies = [
        (_multipart([("f", "a.png", _png())]), 200),  # served
        (_multipart([("f", "a.png", _png()), ("t", None, b"text")]), 422),  # a text field after a file
        (_multipart([("f", f"{i}.png", _png()) for i in range(5)]), 413),  # too many files
        (_multipart([("f", "a.png", b"not a png")]), 422),  # undecodable
        (_multipart([("f", "a.png", _png())])[:-20], 400),  # truncated after a file began
        # the closing boundary's bytes only inside a file's data: the part never ends
        (b'--b0undary\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\n\r\n' + _png() + b"--b0undary--",
         (400, 422)),
        (_multipart([("f", "big.png", _png(size=(40, 40)) + b"\0" * 6000)]), (200, 422)),
    ]
    for body, status in bodies:
        r = svc.post("/v1/classify", content=body, headers=MP)
        assert r.status_code in (status if isinstance(status, tuple) else (status,)), r.text
    assert len(made) >= 8
    assert all(f.closed for f in made), f"{sum(not f.closed for f in made)} of {len(made)} upload files left open"

