"""Fuzz table of crafted files: every badexpert file format meets the same bounded metadata reader
and the same whole-file check (hardening II, classes 1 (load side), 2, 5 and 6).

The rows are generated, not hand-listed: each *metadata* mutation (nesting 100,000 deep or just
past the depth bound, invalid UTF-8, a lone surrogate, a non-object, broken JSON, an integer of
5,000 digits, metadata above the size limit) is applied to every format (model checkpoint,
detector file, bundle, ONNX guard) and run through every command that reads that format; each
*field* mutation (a field of a format x a malformed or inconsistent value: wrong types, class
lists of the wrong length, declared input shapes that disagree with the model or exceed the
memory budget, calibration records that are empty, NaN, of the wrong count, or whose threshold
calibration never reached) is run through every command of its format. A crafted bundle is
resealed (its checksum recomputed), as an attacker would.

Each row asserts the contract of ``tests/test_fuzz.py`` (:func:`run_cli`): exit status 2, one
``badexpert: error:`` line naming the problem, no traceback, nothing written, bounded memory.
``serve`` is run in-process with app creation replaced by a sentinel error, so a file that were
accepted fails the row instead of starting a server.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch

from badexpert import load_model, save_bundle
from badexpert.detectors import load_detector
from badexpert.errors import BadExpertError
from badexpert.deploy.guard import _checksum
from badexpert.limits import MAX_METADATA_BYTES, MAX_METADATA_DEPTH

from .test_fuzz import NO_DATA, _read_st, _write_st, artifacts, run_cli  # noqa: F401 - artifacts is a fixture

try:
    import onnx
    import onnxruntime  # noqa: F401
except ImportError:  # the export extra: the ONNX rows are skipped, the others run
    onnx = None
NEEDS_ONNX = pytest.mark.skipif(onnx is None, reason="the export extra (onnx, onnxruntime) is not installed")

CLASSES = [f"class{i}" for i in range(10)]
REACHED = "REACHED-THE-APP"


@pytest.fixture(scope="module")
def files(artifacts, tmp_path_factory):
    """The artifacts of tests/test_fuzz.py plus a bundle of them (with class names) and its
    verified ONNX export."""
    from badexpert.deploy.export import export_bundle  # torch-free at import; onnx only when exporting

    root = tmp_path_factory.mktemp("files")
    model, meta = load_model(artifacts["model"])
    det = load_detector(artifacts["detector"], model)
    bundle = save_bundle(root / "bundle.safetensors", model, det, {**meta, "classes": CLASSES})
    if onnx is not None:
        export_bundle(bundle, root / "guard.onnx")
    return {**artifacts, "bundle": bundle, "onnx": root / "guard.onnx"}


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """`serve` never starts: an accepted file reaches this sentinel and fails the row."""
    def refuse(*a, **k):
        raise BadExpertError(REACHED)

    monkeypatch.setattr("badexpert.serve.create_app", refuse)


# --- writing crafted files ----------------------------------------------------------------------
def _safetensors_with_text(src: Path, dst: Path, text: str | bytes) -> Path:
    """``src`` with its metadata replaced by ``text`` (bytes: written as they are, invalid UTF-8
    included, by building the safetensors header by hand)."""
    state, _ = _read_st(src)
    if isinstance(text, str):
        return _write_st(dst, state, text)
    placeholder = "@@META@@"
    _write_st(dst, state, placeholder)
    raw = dst.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    escaped = text.replace(b"\\", b"\\\\").replace(b'"', b'\\"')  # inside the header's JSON string
    header = raw[8 : 8 + n].rstrip(b" ").replace(placeholder.encode(), escaped)
    header += b" " * (-len(header) % 8)
    dst.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n :])
    return dst


def _pb_len(field: int, payload: bytes) -> bytes:
    def varint(v: int) -> bytes:
        out = b""
        while True:
            b, v = v & 0x7F, v >> 7
            out += bytes([b | (0x80 if v else 0)])
            if not v:
                return out
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def _onnx_with_text(src: Path, dst: Path, text: str | bytes) -> Path:
    """``src`` with its ``badexpert`` metadata entry replaced by ``text`` (raw bytes appended as a
    protobuf field, so invalid UTF-8 and oversized entries can be written)."""
    proto = onnx.load(str(src))
    del proto.metadata_props[:]
    value = text.encode() if isinstance(text, str) else text
    dst.write_bytes(proto.SerializeToString() + _pb_len(14, _pb_len(1, b"badexpert") + _pb_len(2, value)))
    return dst


def _onnx_meta(src: Path) -> dict:
    proto = onnx.load(str(src))
    return json.loads(next(p.value for p in proto.metadata_props if p.key == "badexpert"))


# --- the formats and the commands that read them ---------------------------------------------------
def _commands(kind: str, bad: Path, f: dict, tmp: Path) -> dict[str, list]:
    out = tmp / "out"
    if kind == "model":
        return {"info": ["info", bad],
                "bundle": ["bundle", "--model", bad, "--detector", f["detector"], "--out", out / "b.safetensors"]}
    if kind == "detector":
        return {"info": ["info", bad],
                "bundle": ["bundle", "--model", f["model"], "--detector", bad, "--out", out / "b.safetensors"],
                "evaluate": ["evaluate", "--model", f["model"], "--detector", bad, "--out", out / "eval"]}
    if kind == "bundle":
        return {"info": ["info", bad], "export": ["export", bad, "--onnx", out / "g.onnx"],
                "serve": ["serve", bad, "--port", "0"]}
    return {"info": ["info", bad], "serve": ["serve", "--onnx", bad, "--port", "0"]}


SUFFIX = {"model": ".safetensors", "detector": ".safetensors", "bundle": ".safetensors", "onnx": ".onnx"}
COMMANDS = {"model": ("info", "bundle"), "detector": ("info", "bundle", "evaluate"),
            "bundle": ("info", "export", "serve"), "onnx": ("info", "serve")}


def _valid_text(kind: str, f: dict) -> str:
    return json.dumps(_onnx_meta(f["onnx"]) if kind == "onnx" else _read_st(f[kind])[1])


def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


# (id, text or bytes from the valid metadata text, message): applied to every format
TEXT_CASES = [
    ("nested-100000", lambda t: _nest(100_000), "nested deeper"),
    ("field-nested-100000", lambda t: t[:-1] + f', "deep": {_nest(100_000)}}}', "nested deeper"),
    ("field-nested-past-bound", lambda t: t[:-1] + f', "deep": {_nest(MAX_METADATA_DEPTH + 1)}}}', "nested deeper"),
    ("invalid-utf8", lambda t: t[:-1].encode() + b', "bad": "\xff\xfe"}', ("utf-8", "corrupt")),
    ("lone-surrogate", lambda t: t[:-1] + ', "bad": "\\udc80"}', "not valid Unicode"),
    ("json-list", lambda t: "[1, 2]", "not an object"),
    ("json-broken", lambda t: t[: len(t) // 2], "corrupt"),
    ("integer-5000-digits", lambda t: t[:-1] + ', "big": ' + "9" * 5000 + "}", "corrupt"),
    ("oversized", lambda t: t[:-1] + ', "pad": [' + "0," * (MAX_METADATA_BYTES // 2) + "0]}", "above the limit"),
]


def _text_params():
    out = []
    for kind, cmds in COMMANDS.items():
        for cid, make, message in TEXT_CASES:
            for cmd in cmds:
                out.append(pytest.param(kind, cmd, make, message, id=f"{kind}-{cid}-{cmd}",
                                        marks=NEEDS_ONNX if kind == "onnx" else ()))
    return out


def _message_in(line: str, message) -> None:
    options = message if isinstance(message, tuple) else (message,)
    assert any(m.lower() in line.lower() for m in options), f"expected one of {options} in: {line}"


@pytest.mark.parametrize("kind, cmd, make, message", _text_params())
def test_crafted_metadata_text(kind, cmd, make, message, files, tmp_path, capsys):
    bad = tmp_path / f"bad{SUFFIX[kind]}"
    text = make(_valid_text(kind, files))
    (_onnx_with_text if kind == "onnx" else _safetensors_with_text)(files[kind], bad, text)
    line = run_cli(_commands(kind, bad, files, tmp_path)[cmd], tmp_path, capsys, not_message=REACHED)
    _message_in(line, message)
    assert "bad" in line  # names the file


# --- field mutations: (path in the metadata, value, message) per format --------------------------------
# tensor mutations of the calibration record: (id, scores, message)
SCORE_CASES = [
    ("scores-empty", torch.zeros(0), ("no calibration scores", "declares")),
    ("scores-nan", torch.full((30,), float("nan")), "not finite"),
    ("scores-one-inf", torch.cat([torch.zeros(29), torch.tensor([float("inf")])]), "not finite"),
    ("scores-2d", torch.zeros(5, 6), "shape"),
    ("scores-int", torch.zeros(30, dtype=torch.int64), "not floats"),
    ("scores-wrong-count", torch.zeros(7), "declares"),
]
# metadata field mutations shared by the detector sections of detector files and bundles
DETECTOR_FIELDS = [
    ("threshold", 1e308, "not one of its"),
    ("threshold", -1e308, "not one of its"),
    ("threshold", 0.123456, "not one of its"),
    ("threshold", "inf", "'threshold'"),
    ("calibration_size", 7, "declares"),
    ("calibration_size", 10**12, "declares"),
    ("data", {"classes": 12}, "'data.classes'"),
    ("data", {"classes": [1, 2]}, "'data.classes'"),
    ("data", {"hflip": "yes"}, "'data.hflip'"),
    ("input_shape", [1, 28, 28.5], "'input_shape'"),
    ("input_shape", "28x28", "'input_shape'"),
]
MODEL_FIELDS = [
    ("classes", 12, "'classes'"),
    ("classes", "abc", "'classes'"),
    ("classes", CLASSES[:3], "names 3 classes"),
    ("classes", list(range(10)), "'classes'"),
    ("classes", CLASSES + ["extra"], "names 11 classes"),
    ("num_classes", "10", "'num_classes'"),
]
ONNX_FIELDS = [
    ("classes", 12, "'classes'"),
    ("classes", CLASSES[:3], "names 3 classes"),
    ("num_classes", 3, "names 10 classes"),
    ("num_classes", "ten", "'num_classes'"),
    ("input_shape", [1, 14, 14], "graph takes"),
    ("input_shape", [3, 28, 28], "graph takes"),
    ("input_shape", [1, 4096, 4096], "shape [1, 4096, 4096]"),  # the budget or the graph, by machine
    ("input_shape", [1, 28], "'input_shape'"),
    ("input_shape", {"c": 1}, "'input_shape'"),
    ("threshold", 1e308, "not one of its"),
    ("threshold", None, "'threshold'"),
    ("calibration_scores", [], "no calibration scores"),
    ("calibration_scores", "many", "'calibration_scores'"),
    ("calibration_scores", [0.1, "x"], "not numbers"),
    ("calibration_scores", [[0.1]], "not numbers"),
    ("calibration_scores", [1e999] * 30, "not finite"),
    ("calibration_size", 7, "declares"),
    ("fpr_target", 2, "'fpr_target'"),
    ("model_fingerprint", 5, "'model_fingerprint'"),
]


def _set_path(meta: dict, path: str, value):
    *parents, last = path.split(".")
    node = meta
    for p in parents:
        node = node[p]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = {**node[last], **value}
    else:
        node[last] = value


def _field_rows():
    """(kind, id, mutate(state, meta) -> (state, meta), message)."""
    rows = []

    def meta_set(path, value):
        return lambda state, meta: (_set_path(meta, path, value), (state, meta))[1]

    def scores_set(prefix, scores):
        def f(state, meta):
            state[prefix + "record.calibration_scores"] = scores
            return state, meta
        return f

    for key, value, message in DETECTOR_FIELDS:
        for kind, path in (("detector", key), ("bundle", f"detector.{key}")):
            rows.append((kind, f"{key}={str(value)[:20]}", meta_set(path, value), message))
    for cid, scores, message in SCORE_CASES:
        rows.append(("detector", cid, scores_set("", scores), message))
        rows.append(("bundle", cid, scores_set("detector.", scores), message))
    for key, value, message in MODEL_FIELDS:
        rows.append(("model", f"{key}={str(value)[:20]}", meta_set(key, value), message))
        rows.append(("bundle", f"model.{key}={str(value)[:20]}", meta_set(f"model.{key}", value), message))
    # bundle-only consistency: the detector's input against the model's, and the memory budget
    rows += [
        ("bundle", "detector-input-4096", meta_set("detector.input_shape", [1, 4096, 4096]),
         "its model takes [1, 28, 28]"),
        ("bundle", "detector-input-3-channels", meta_set("detector.input_shape", [3, 28, 28]), "its model takes"),
        ("bundle", "model-and-detector-input-4096",
         lambda s, m: (_set_path(m, "model.image_size", [4096, 4096]),
                       _set_path(m, "detector.input_shape", [1, 4096, 4096]), (s, m))[-1], "memory budget"),
        ("bundle", "model-fingerprint-int", meta_set("model.fingerprint", 5), "'fingerprint'"),
        ("bundle", "model-hflip-string", meta_set("model.hflip", "no"), "'hflip'"),
        ("bundle", "detector-data-classes-3", meta_set("detector.data", {"classes": CLASSES[:3]}), "names 3 classes"),
    ]
    for key, value, message in ONNX_FIELDS:
        rows.append(("onnx", f"{key}={str(value)[:20]}", meta_set(key, value), message))
    return rows


def _field_params():
    return [pytest.param(kind, cmd, mutate, message, id=f"{kind}-{cid}-{cmd}",
                         marks=NEEDS_ONNX if kind == "onnx" else ())
            for kind, cid, mutate, message in _field_rows() for cmd in COMMANDS[kind]]


def _write_mutated(kind: str, src: Path, dst: Path, mutate) -> Path:
    if kind == "onnx":
        meta = _onnx_meta(src)
        _, meta = mutate({}, meta)
        return _onnx_with_text(src, dst, json.dumps(meta))
    state, meta = _read_st(src)
    state, meta = mutate(dict(state), copy.deepcopy(meta))
    if kind == "bundle":  # resealed, as whoever crafted it would
        meta["checksum"] = _checksum(meta, state)
    return _write_st(dst, state, meta)


@pytest.mark.parametrize("kind, cmd, mutate, message", _field_params())
def test_crafted_fields(kind, cmd, mutate, message, files, tmp_path, capsys):
    bad = _write_mutated(kind, files[kind], tmp_path / f"bad{SUFFIX[kind]}", mutate)
    argv = _commands(kind, bad, files, tmp_path)[cmd]
    line = run_cli(argv, tmp_path, capsys, not_message=REACHED)
    _message_in(line, message)
    assert NO_DATA not in line  # refused at the file, before any data is read


@pytest.mark.parametrize("kind", [pytest.param(k, marks=NEEDS_ONNX if k == "onnx" else ()) for k in sorted(COMMANDS)])
def test_untouched_files_pass_the_checks(kind, files, tmp_path, capsys):
    """Control: the files the rows start from are accepted (serve reaches the app sentinel)."""
    bad = _write_mutated(kind, files[kind], tmp_path / f"ok{SUFFIX[kind]}", lambda s, m: (s, m))
    capsys.readouterr()
    from badexpert.cli import main

    assert main(["info", str(bad)]) == 0
    assert json.loads(capsys.readouterr().out)
    if kind in ("bundle", "onnx"):
        argv = ["serve", str(bad)] if kind == "bundle" else ["serve", "--onnx", str(bad)]
        assert main([*argv, "--port", "0"]) == 2
        assert REACHED in capsys.readouterr().err


def test_threshold_message_says_how_to_recalibrate(files, tmp_path, capsys):
    bad = _write_mutated("bundle", files["bundle"], tmp_path / "b.safetensors",
                         lambda s, m: (_set_path(m, "detector.threshold", 1e308), (s, m))[1])
    line = run_cli(["info", bad], tmp_path, capsys)
    assert "recalibrate with a reachable target FPR" in line and "1/(n+1) = 0.0323" in line


@NEEDS_ONNX
def test_twenty_million_calibration_scores_are_refused_unread(files, tmp_path, capsys):
    """The ONNX repro of class 2 at scale: an entry far above the limit is refused from its
    declared length, before it is read (the row's memory bound would catch a read)."""
    proto = onnx.load(str(files["onnx"]))
    del proto.metadata_props[:]
    head = proto.SerializeToString()
    bad = tmp_path / "huge.onnx"
    n = 20_000_000 * 20
    with open(bad, "wb") as fh:  # a sparse tail: the declared entry is written as a hole
        fh.write(head + _pb_len(14, b"")[:1])
        v = n
        while True:
            b, v = v & 0x7F, v >> 7
            fh.write(bytes([b | (0x80 if v else 0)]))
            if not v:
                break
        fh.truncate(fh.tell() + n)
    line = run_cli(["serve", "--onnx", bad, "--port", "0"], tmp_path, capsys, not_message=REACHED)
    assert "above the limit" in line


# --- the Python API -------------------------------------------------------------------------------------
@NEEDS_ONNX
def test_api_refusals_are_one_line(files, tmp_path):
    from badexpert import Guard, load_bundle
    from badexpert.runtime.onnx import OnnxGuard

    model, _ = load_model(files["model"])
    det = load_detector(files["detector"], model)
    for call, message in [
        (lambda: Guard(model, det, abstain_label="x"), "'abstain_label'"),
        (lambda: Guard(model, det, abstain_label=True), "'abstain_label'"),
        (lambda: Guard(model, det, policy=["flag"]), "policy"),
        (lambda: OnnxGuard(None), "ONNX guard"),
        (lambda: OnnxGuard(12), "ONNX guard"),
        (lambda: OnnxGuard(_onnx_with_text(files["onnx"], tmp_path / "d.onnx", _nest(100_000)).read_bytes()),
         "nested deeper"),
        (lambda: load_bundle(_safetensors_with_text(files["bundle"], tmp_path / "d.safetensors", _nest(100_000))),
         "nested deeper"),
    ]:
        with pytest.raises(BadExpertError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert Guard(model, det, abstain_label=3.0).abstain_label == 3  # an integer from a JSON tool
