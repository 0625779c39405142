"""Fuzz table of user mistakes and hostile inputs: every one must end in one clear error.

The hardening contract checked here, case by case:

- **CLI** (``badexpert.cli.main(argv)``, called in-process): exit status 2; on stderr exactly one
  non-empty line, starting with ``badexpert: error: `` (lines starting with ``warning:`` are
  ignored: a warning is allowed in addition to the error line, nothing else is); no traceback;
  no file or directory created, changed or removed anywhere under the test's ``tmp_path`` (inputs
  and output locations alike), and no ``*.tmp`` leftovers.
- **Python API**: the exception is a :class:`badexpert.errors.BadExpertError` (never a
  TypeError/RuntimeError/KeyError/AttributeError from deep inside), except where the contract
  defines a result (a NaN image gets a NaN score and ``predict`` rejects it).
- **Memory**: around every case the peak resident set size (``VmHWM``, reset through
  ``/proc/self/clear_refs``) may rise at most :data:`MEM_LIMIT_MB` above the resident size before
  the case. Where ``clear_refs`` is not writable only that assertion is skipped.

Every case whose expected message is known also checks that the message names the problem (the
field, the file, the limit), so an error raised for the wrong reason fails the case. Config cases
point ``data_path`` at a directory that does not exist: the error must come from the field, before
any data is read.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import struct
import typing
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from badexpert import BaDExpert, Dataset, Recipe, accuracy, evaluate, get_attack, load_dataset, load_model, train
from badexpert.cli import main
from badexpert.data.core import IMAGE_TOLERANCE, check_images, to_float
from badexpert.data import split
from badexpert.detectors import get_detector, load_detector
from badexpert.metrics import conformal_threshold
from badexpert.errors import BadExpertError, NotFittedError
from badexpert.pipeline.experiment import ExperimentConfig
from badexpert.io import save_model
from badexpert.models import build_model

from .conftest import bounded_memory, make_blobs

MEM_LIMIT_MB = 400
ERROR_PREFIX = "badexpert: error: "


# --- measurement and snapshots --------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and directory under ``root``: kind, size and modification time."""
    out = {}
    for p in sorted(root.rglob("*")):
        st_ = p.lstat()
        out[str(p.relative_to(root))] = ("dir", 0, 0) if p.is_dir() else ("file", st_.st_size, st_.st_mtime_ns)
    return out


def run_cli(argv: list[str], root: Path, capsys, *, message: str | tuple[str, ...] | None = None,
            not_message: str | None = None) -> str:
    """Run the CLI and assert the whole error contract; returns the error line."""
    argv = [str(a) for a in argv]
    capsys.readouterr()
    before = snapshot(root)
    with bounded_memory(MEM_LIMIT_MB):
        rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert rc == 2, f"exit status {rc}; stderr:\n{err}"
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith(ERROR_PREFIX), line
    assert line[len(ERROR_PREFIX):].strip(), "empty error message"
    for m in (message,) if isinstance(message, str) else (message or ()):
        assert m in line, f"expected {m!r} in the error line: {line}"
    if not_message is not None:
        assert not_message not in line, f"the error is about {not_message!r}, not the input under test: {line}"
    after = snapshot(root)
    assert after == before, f"files changed: added {sorted(set(after) - set(before))}, removed " \
                            f"{sorted(set(before) - set(after))}, changed " \
                            f"{sorted(k for k in set(after) & set(before) if after[k] != before[k])}"
    assert not [k for k in after if k.endswith(".tmp") or ".tmp." in k or k.endswith(".old")], sorted(after)
    return line


# --- file builders -----------------------------------------------------------------------------------
def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def constant_png(width: int, height: int, *, header_only: bool = False) -> bytes:
    """A greyscale PNG of one colour (zero rows streamed through zlib: a few KB even for 12000x12000).
    ``header_only``: an IDAT of a few bytes, as a file whose header lies about its size would have."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if header_only:
        idat = zlib.compress(b"\x00" * 64)
    else:
        comp, parts, row, left = zlib.compressobj(9), [], b"\x00" * (1 + width), height
        while left:
            k = min(left, 512)
            parts.append(comp.compress(row * k))
            left -= k
        parts.append(comp.flush())
        idat = b"".join(parts)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_folder_members(size=(12, 12), n: int = 6, seed: int = 0) -> dict[str, bytes]:
    r = np.random.default_rng(seed)
    out = {}
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(n):
                out[f"{split}/{cls}/{i:03d}.png"] = png_bytes(r.integers(0, 256, size, dtype=np.uint8))
    return out


def write_folder(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def write_zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _central_entry(raw: bytes, member: str) -> int:
    eocd = raw.rindex(b"PK\x05\x06")
    count, = struct.unpack_from("<H", raw, eocd + 10)
    pos, = struct.unpack_from("<I", raw, eocd + 16)
    for _ in range(count):
        n, m, k = struct.unpack_from("<HHH", raw, pos + 28)
        if raw[pos + 46: pos + 46 + n].decode() == member:
            return pos
        pos += 46 + n + m + k
    raise AssertionError(member)


def zip_corrupt_member(path: Path, member: str = "train/a/002.png") -> Path:
    """Overwrite the middle of one member's compressed data (deflate stream or CRC breaks)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    n, m = struct.unpack_from("<HH", raw, info.header_offset + 26)
    start = info.header_offset + 30 + n + m
    for i in range(start + 8, start + info.compress_size - 4):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    return path


def zip_declare_size(path: Path, member: str = "train/a/001.png", size: int = 0xFFFFFF00) -> Path:
    """Make the central directory declare a huge uncompressed size for one member."""
    raw = bytearray(path.read_bytes())
    pos = _central_entry(bytes(raw), member)
    struct.pack_into("<I", raw, pos + 24, size)
    path.write_bytes(bytes(raw))
    return path


def idx_bytes(code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def write_idx_set(directory: Path, *, n_train=20, n_test=12, train_hw=(28, 28), test_hw=(28, 28), gz=True,
                  train_labels_n=None, label_value=None) -> Path:
    """The four Fashion-MNIST files (train-images-idx3-ubyte(.gz), ...), random content."""
    directory.mkdir(parents=True, exist_ok=True)
    r = np.random.default_rng(0)
    parts = {
        "train-images-idx3-ubyte": idx_bytes(8, (n_train, *train_hw), r.integers(0, 256, n_train * math.prod(train_hw), dtype=np.uint8).tobytes()),
        "train-labels-idx1-ubyte": idx_bytes(8, (train_labels_n or n_train,), r.integers(0, 10, train_labels_n or n_train, dtype=np.uint8).tobytes()),
        "t10k-images-idx3-ubyte": idx_bytes(8, (n_test, *test_hw), r.integers(0, 256, n_test * math.prod(test_hw), dtype=np.uint8).tobytes()),
        "t10k-labels-idx1-ubyte": idx_bytes(8, (n_test,), (np.full(n_test, label_value, np.uint8) if label_value is not None else r.integers(0, 10, n_test, dtype=np.uint8)).tobytes()),
    }
    for name, data in parts.items():
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data, 6))
        else:
            (directory / name).write_bytes(data)
    return directory


def gzip_stream(header: bytes, zeros: int) -> bytes:
    """gzip of ``header`` followed by ``zeros`` zero bytes, compressed as a stream (never in memory)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts, left, block = [comp.compress(header)], zeros, b"\x00" * (1 << 20)
    while left:
        k = min(left, len(block))
        parts.append(comp.compress(block[:k]))
        left -= k
    parts.append(comp.flush())
    return b"".join(parts)


# --- CLI: run --config ----------------------------------------------------------------------------
NO_DATA = "no-such-data-dir"  # relative to tmp_path; never created

CONFIG_CASES = [
    # (id, text of the config file (NODATA is replaced by a path that does not exist), expected message)
    ("seed-string", {"seed": "0"}, "'seed'"),
    ("seed-bool", {"seed": True}, "'seed'"),
    ("seed-negative", {"seed": -1}, "'seed'"),
    ("seed-float-fraction", {"seed": 1.5}, "'seed'"),
    ("fpr-string", {"fpr": "0.01"}, "'fpr'"),
    ("fpr-zero", {"fpr": 0}, "'fpr'"),
    ("fpr-one", {"fpr": 1}, "'fpr'"),
    ("fpr-nan", '{"fpr": NaN, "data_path": "NODATA"}', "'fpr'"),
    ("fpr-infinity", '{"fpr": Infinity, "data_path": "NODATA"}', "'fpr'"),
    ("asr_bar-2", {"asr_bar": 2}, "'asr_bar'"),
    ("n_boot-negative", {"n_boot": -1}, "'n_boot'"),
    ("train_size--10", {"train_size": -10}, "'train_size'"),
    ("test_size-float", {"test_size": 1.5}, "'test_size'"),
    ("reserved-0", {"reserved": 0}, "'reserved'"),
    ("calibration-string", {"calibration": "2000"}, "'calibration'"),
    ("width-negative", {"width": -1}, "'width'"),
    ("width-huge", {"width": 100000}, "'width'"),
    ("width-string", {"width": "64"}, "'width'"),
    ("image_size-0", {"image_size": 0}, "'image_size'"),
    ("image_size-3-values", {"image_size": [28, 28, 3]}, "'image_size'"),
    ("image_size-huge", {"image_size": [100000, 100000]}, "'image_size'"),
    ("image_size-string", {"image_size": "28"}, "'image_size'"),
    ("device-int", {"device": 0}, "'device'"),
    ("device-unknown", {"device": "quantum"}, "quantum"),
    ("dataset-unknown", {"dataset": "mnist-9"}, "unknown dataset 'mnist-9'"),
    ("dataset-int", {"dataset": 5}, "'dataset'"),
    ("arch-unknown", {"arch": "resnet99"}, "unknown architecture 'resnet99'"),
    ("arch-list", {"arch": ["cnn"]}, "'arch'"),
    ("attack-unknown", {"attack": "sleeper"}, "unknown attack 'sleeper'"),
    ("attack-int", {"attack": 1}, "'attack'"),
    ("recipe-batch_size-0", {"recipe": {"batch_size": 0}}, "'batch_size'"),
    ("recipe-epochs-0", {"recipe": {"epochs": 0}}, "'epochs'"),
    ("recipe-lr-string", {"recipe": {"lr": "fast"}}, "'lr'"),
    ("recipe-lr-negative", {"recipe": {"lr": -0.1}}, "'lr'"),
    ("recipe-optimizer-unknown", {"recipe": {"optimizer": "rmsprop"}}, "'optimizer'"),
    ("recipe-milestones-strings", {"recipe": {"milestones": ["a"]}}, "'milestones'"),
    ("recipe-unknown-field", {"recipe": {"epochz": 3}}, "epochz"),
    ("recipe-not-object", {"recipe": "sgd"}, "'recipe'"),
    ("attack_params-size--3", {"attack_params": {"size": -3}}, "'size'"),
    ("attack_params-poison_rate-2", {"attack_params": {"poison_rate": 2}}, "'poison_rate'"),
    ("attack_params-target-string", {"attack_params": {"target": "0"}}, "'target'"),
    ("attack_params-target-negative", {"attack_params": {"target": -1}}, "'target'"),
    ("attack_params-trigger_image-int", {"attack_params": {"trigger_image": 5}}, "'trigger_image'"),
    ("attack_params-unknown", {"attack_params": {"sizee": 3}}, "sizee"),
    ("attack_params-not-object", {"attack_params": [3]}, "'attack_params'"),
    ("detector_params-preset-unknown", {"detector_params": {"preset": "turbo"}}, "'preset'"),
    ("detector_params-aux_epochs-0", {"detector_params": {"aux_epochs": 0}}, "'aux_epochs'"),
    ("detector_params-expert_lr-string", {"detector_params": {"expert_lr": "1e-4"}}, "'expert_lr'"),
    ("detector_params-score_rule-unknown", {"detector_params": {"score_rule": "vibes"}}, "'score_rule'"),
    ("detector_params-unknown", {"detector_params": {"bogus": 1}}, "bogus"),
    ("detector-unknown", {"detector": "sentinel"}, "unknown detector 'sentinel'"),
    ("unknown-field", {"atack": "badnet"}, "unknown config field(s) ['atack']"),
    ("json-list", "[1, 2]", "object"),
    ("json-null", "null", "object"),
    ("json-number", "42", "object"),
    ("json-string", '"fashion-mnist"', "object"),
    ("json-invalid", '{"seed": 0,', "not valid JSON"),
    ("json-empty-file", "", "not valid JSON"),
    ("json-binary-garbage", b"\xff\xfe\x00\x81garbage\x00", "config file"),
    ("json-deeply-nested", "[" * 100_000 + "]" * 100_000, "config file"),
    ("json-huge-integer", '{"seed": ' + "9" * 5000 + "}", "config file"),
    # a target FPR the calibration split cannot reach (below 1/(n+1)) would store a threshold that rejects nothing
    ("fpr-unreachable-1e-6", {"fpr": 1e-6}, "smallest reachable rate is 1/(n+1) = 0.0005"),
    ("fpr-unreachable-calibration-1", {"calibration": 1}, "cannot be reached with 1 calibration"),
    ("fpr-unreachable-calibration-50", {"calibration": 50, "fpr": 0.01}, "at least 99 calibration"),
]



def _config_params():
    out = []
    for cid, body, msg in CONFIG_CASES:
        out.append(pytest.param(body, msg, id=cid))
    return out


@pytest.mark.parametrize("body, message", _config_params())
def test_run_config_is_refused_before_any_data_is_read(body, message, tmp_path, capsys):
    nodata = str(tmp_path / NO_DATA)
    if isinstance(body, dict):
        text = json.dumps({"dataset": "fashion-mnist", "data_path": nodata, "arch": "cnn", **body})
    elif isinstance(body, bytes):
        text = body
    else:
        text = body.replace("NODATA", nodata)
    cfg = tmp_path / "config.json"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    run_cli(["run", "--config", cfg, "--out", tmp_path / "out"], tmp_path, capsys, message=message,
            not_message=NO_DATA)


def test_run_config_control_reaches_the_data_path(tmp_path, capsys):
    """A valid config with a missing data path fails on the path: the cases above do not."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"dataset": "fashion-mnist", "data_path": str(tmp_path / NO_DATA)}))
    run_cli(["run", "--config", cfg, "--out", tmp_path / "out"], tmp_path, capsys, message=(NO_DATA, "does not exist"))


@pytest.mark.parametrize("argv, message", [
    pytest.param(["--seed", "-1"], "'seed'", id="seed-override-negative"),
    pytest.param(["--device", "quantum"], "quantum", id="device-override-unknown"),
    pytest.param(["--cache-dir", "FILE"], "cache", id="cache-dir-is-a-file"),
])
def test_run_overrides_are_checked(argv, message, tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"dataset": "fashion-mnist", "data_path": str(tmp_path / NO_DATA)}))
    (tmp_path / "file.txt").write_text("x")
    argv = [a.replace("FILE", str(tmp_path / "file.txt")) for a in argv]
    run_cli(["run", "--config", cfg, "--out", tmp_path / "out", *argv], tmp_path, capsys, message=message,
            not_message=NO_DATA)


# --- CLI: output locations --------------------------------------------------------------------------
def _prepare_outputs(tmp: Path) -> dict[str, Path]:
    """Inputs and occupied output locations shared by the output-location cases."""
    cfg = tmp / "config.json"
    cfg.write_text(json.dumps({"dataset": "fashion-mnist", "data_path": str(tmp / NO_DATA)}))
    bad_cfg = tmp / "bad-config.json"
    bad_cfg.write_text(json.dumps({"dataset": "fashion-mnist", "data_path": str(tmp / NO_DATA), "seed": "0"}))
    (tmp / "a-file.txt").write_text("user data\n")
    (tmp / "existing.safetensors").mkdir()
    (tmp / "taken.safetensors").write_bytes(b"user's model")
    earlier = tmp / "earlier-run"
    earlier.mkdir()
    (earlier / "config.json").write_text("{}\n")
    (earlier / "metrics.json").write_text("{}\n")
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "metrics.json").write_text("{}\n")
    (foreign / "notes.txt").write_text("my notes\n")
    subdir = tmp / "has-subdir"
    (subdir / "roc.png").mkdir(parents=True)
    return {"BADCFG": bad_cfg, "CFG": cfg, "FILE": tmp / "a-file.txt", "DIR": tmp / "existing.safetensors",
            "TAKEN": tmp / "taken.safetensors", "EARLIER": earlier, "FOREIGN": foreign, "SUBDIR": subdir,
            "MISSING": tmp / "missing.safetensors"}


RUNLIKE = {
    "run": ["run", "--config", "CFG"],
    "demo": ["demo"],
    "evaluate": ["evaluate", "--model", "MISSING", "--detector", "MISSING"],
}
OUTPUT_CASES = [
    pytest.param(["train", "--out", "DIR"], "is a directory", id="train-out-is-existing-directory"),
    pytest.param(["train", "--out", "FILE/m.safetensors"], "is a file", id="train-out-parent-is-a-file"),
    pytest.param(["train", "--out", "FILE/deeper/m.safetensors"], "is a file", id="train-out-grandparent-is-a-file"),
    pytest.param(["train", "--out", "TAKEN"], "already exists", id="train-out-exists-without-overwrite"),
    pytest.param(["train", "--out", "DIR", "--overwrite"], "is a directory", id="train-out-directory-even-with-overwrite"),
    pytest.param(["train", "--out", "TAKEN", "--overwrite", "--epochs", "0"], "epochs",
                 id="train-overwrite-but-bad-option-keeps-old-file"),
    pytest.param(["run", "--config", "BADCFG", "--out", "EARLIER", "--overwrite"], "'seed'",
                 id="run-overwrite-but-bad-config-keeps-earlier-run"),
    pytest.param(["defend", "--model", "MISSING", "--out", "DIR"], "is a directory", id="defend-out-is-existing-directory"),
    pytest.param(["defend", "--model", "MISSING", "--out", "FILE/d.safetensors"], "is a file", id="defend-out-parent-is-a-file"),
    pytest.param(["defend", "--model", "MISSING", "--out", "TAKEN"], "already exists", id="defend-out-exists"),
    pytest.param(["defend", "--model", "MISSING", "--out", "d.pt"], ".safetensors", id="defend-out-wrong-suffix"),
]
for _cmd, _head in RUNLIKE.items():
    OUTPUT_CASES += [
        pytest.param(_head + ["--out", "FILE"], "is a file", id=f"{_cmd}-out-is-existing-file"),
        pytest.param(_head + ["--out", "FILE/run"], "is a file", id=f"{_cmd}-out-parent-is-a-file"),
        pytest.param(_head + ["--out", "EARLIER"], "already holds a run", id=f"{_cmd}-out-holds-earlier-run"),
        pytest.param(_head + ["--out", "FOREIGN"], "notes.txt", id=f"{_cmd}-out-holds-foreign-file"),
        pytest.param(_head + ["--out", "FOREIGN", "--overwrite"], "notes.txt", id=f"{_cmd}-out-foreign-file-with-overwrite"),
        pytest.param(_head + ["--out", "SUBDIR", "--overwrite"], "roc.png", id=f"{_cmd}-out-subdirectory-with-overwrite"),
    ]


@pytest.mark.parametrize("argv, message", OUTPUT_CASES)
def test_output_location_is_checked_before_any_work(argv, message, tmp_path, capsys):
    places = _prepare_outputs(tmp_path)
    resolved = []
    for a in argv:
        for key, p in places.items():
            if a == key or a.startswith(key + "/"):
                a = str(p) + a[len(key):]
        resolved.append(a)
    run_cli(resolved, tmp_path, capsys, message=message)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "my notes\n"
    assert (tmp_path / "a-file.txt").read_text() == "user data\n"


def _parse_argv(argv, places):
    out = []
    for a in argv:
        for key, p in places.items():
            if a == key or a.startswith(key + "/") or a.startswith(key + "=") or ("=" + key) in a:
                a = a.replace(key, str(p), 1)
        out.append(a)
    return out


OPTION_LATE = ("the option is only checked after the dataset is read (cli.py: the value is put into the config and "
               "validated after _splits_for / make_splits), so the error is about the data path")
OPTION_CASES = [
    # (argv, expected message); MODEL/DETECTOR are real files recording a missing dataset path, NODATA is missing
    (["defend", "--model", "MODEL", "--fpr", "2", "--out", "OUT/d.safetensors"], "fpr", "defend-fpr-2"),
    (["defend", "--model", "MODEL", "--fpr", "0", "--out", "OUT/d.safetensors"], "fpr", "defend-fpr-0"),
    (["defend", "--model", "MODEL", "--expert-lr", "-1", "--out", "OUT/d.safetensors"], "expert_lr", "defend-expert-lr-negative"),
    (["defend", "--model", "MODEL", "--detector-param", "aux_epochs=0", "--out", "OUT/d.safetensors"], "aux_epochs", "defend-aux-epochs-0"),
    (["defend", "--model", "MODEL", "--detector-param", "bogus=1", "--out", "OUT/d.safetensors"], "bogus", "defend-unknown-detector-param"),
    (["defend", "--model", "MODEL", "--detector-param", "noequals", "--out", "OUT/d.safetensors"], "key=value", "defend-detector-param-without-equals"),
    (["defend", "--model", "MODEL", "--score-rule", "vibes", "--out", "OUT/d.safetensors"], "score_rule", "defend-score-rule-unknown"),
    (["defend", "--model", "MODEL", "--reserved", "0", "--out", "OUT/d.safetensors"], "reserved", "defend-reserved-0"),
    (["defend", "--model", "MODEL", "--calibration", "-5", "--out", "OUT/d.safetensors"], "calibration", "defend-calibration-negative"),
    (["defend", "--model", "MODEL", "--device", "quantum", "--out", "OUT/d.safetensors"], "quantum", "defend-device-unknown"),
    (["defend", "--model", "MODEL", "--method", "vibes", "--out", "OUT/d.safetensors"], "unknown detector 'vibes'", "defend-method-unknown"),
    (["defend", "--model", "MODEL", "--method", "strip", "--preset", "paper", "--out", "OUT/d.safetensors"], "--preset is a BaDExpert option", "defend-method-strip-badexpert-option"),
    (["defend", "--model", "MODEL", "--method", "strip", "--detector-param", "n=0", "--out", "OUT/d.safetensors"], "'n'", "defend-method-strip-n-0"),
    (["evaluate", "--model", "MODEL", "--detector", "DETECTOR", "--asr-bar", "2", "--out", "OUT/e"], "asr_bar", "evaluate-asr-bar-2"),
    (["evaluate", "--model", "MODEL", "--detector", "DETECTOR", "--n-boot", "-1", "--out", "OUT/e"], "n_boot", "evaluate-n-boot-negative"),
    (["evaluate", "--model", "MODEL", "--detector", "DETECTOR", "--attack", "sleeper", "--out", "OUT/e"], "sleeper", "evaluate-attack-unknown"),
    (["evaluate", "--model", "MODEL", "--detector", "DETECTOR", "--attack", "badnet", "--attack-param", "size=-3", "--out", "OUT/e"], "size", "evaluate-attack-param-size--3"),
    (["evaluate", "--model", "MODEL", "--detector", "DETECTOR", "--attack", "badnet", "--target", "-1", "--out", "OUT/e"], "target", "evaluate-target-negative"),
    (["evaluate", "--model", "MODEL", "--detector", "DETECTOR", "--test-size", "0", "--out", "OUT/e"], "test_size", "evaluate-test-size-0"),
    (["train", "--data-path", "NODATA", "--width", "-1", "--out", "OUT/m.safetensors"], "width", "train-width-negative"),
    (["train", "--data-path", "NODATA", "--epochs", "0", "--out", "OUT/m.safetensors"], "epochs", "train-epochs-0"),
    (["train", "--data-path", "NODATA", "--lr", "-1", "--out", "OUT/m.safetensors"], "lr", "train-lr-negative"),
    (["train", "--data-path", "NODATA", "--batch-size", "0", "--out", "OUT/m.safetensors"], "batch_size", "train-batch-size-0"),
    (["train", "--data-path", "NODATA", "--optimizer", "rmsprop", "--out", "OUT/m.safetensors"], "optimizer", "train-optimizer-unknown"),
    (["train", "--data-path", "NODATA", "--recipe", "bogus=1", "--out", "OUT/m.safetensors"], "bogus", "train-recipe-unknown-field"),
    (["train", "--data-path", "NODATA", "--train-size", "-10", "--out", "OUT/m.safetensors"], "train_size", "train-train-size--10"),
    (["train", "--data-path", "NODATA", "--reserved", "0", "--out", "OUT/m.safetensors"], "reserved", "train-reserved-0"),
    (["train", "--data-path", "NODATA", "--image-size", "5000", "--out", "OUT/m.safetensors"], "image_size", "train-image-size-5000"),
    (["train", "--data-path", "NODATA", "--seed", "-1", "--out", "OUT/m.safetensors"], "seed", "train-seed-negative"),
    (["train", "--data-path", "NODATA", "--attack", "badnet", "--poison-rate", "2", "--out", "OUT/m.safetensors"], "poison_rate", "train-poison-rate-2"),
    (["train", "--data-path", "NODATA", "--attack", "badnet", "--target", "-1", "--out", "OUT/m.safetensors"], "target", "train-target-negative"),
    (["train", "--data-path", "NODATA", "--attack", "badnet", "--attack-param", "size=-3", "--out", "OUT/m.safetensors"], "size", "train-trigger-size--3"),
    (["train", "--data-path", "NODATA", "--attack", "blend", "--attack-param", "alpha=NaN", "--out", "OUT/m.safetensors"], "alpha", "train-blend-alpha-nan"),
    (["train", "--data-path", "NODATA", "--attack", "badnet", "--attack-param", "trigger_image=OUT/missing.png", "--out", "OUT/m.safetensors"], "missing.png", "train-trigger-image-missing"),
    (["train", "--data-path", "NODATA", "--attack", "badnet", "--attack-param", "trigger_image=BOMB", "--out", "OUT/m.safetensors"], "bomb.png", "train-trigger-image-bomb"),
    (["train", "--data-path", "NODATA", "--attack", "refool", "--out", "OUT/m.safetensors"], "reflections=PATH", "train-refool-no-reflections"),
    (["train", "--data-path", "NODATA", "--attack", "refool", "--attack-param", "reflections=OUT/none", "--out", "OUT/m.safetensors"], "does not exist", "train-refool-reflections-missing"),
    (["train", "--data-path", "NODATA", "--attack", "refool", "--attack-param", "reflections=BOMB", "--out", "OUT/m.safetensors"], "neither a folder nor a zip", "train-refool-reflections-not-images"),
    (["train", "--data-path", "NODATA", "--attack", "refool", "--attack-param", "reflections=OUT", "--out", "OUT/m.safetensors"], "no image files", "train-refool-reflections-empty"),
    (["train", "--data-path", "NODATA", "--attack", "wanet", "--attack-param", "k=1", "--out", "OUT/m.safetensors"], "'k'", "train-wanet-k-1"),
    (["train", "--data-path", "NODATA", "--attack", "wanet", "--attack-param", "strength=-1", "--out", "OUT/m.safetensors"], "'strength'", "train-wanet-strength-negative"),
    (["train", "--data-path", "NODATA", "--attack", "bpp", "--attack-param", "negative_rate=0.9", "--out", "OUT/m.safetensors"], "negative_rate", "train-bpp-rates-over-1"),
    (["train", "--data-path", "NODATA", "--attack", "bpp", "--attack-param", "squeeze_num=1", "--out", "OUT/m.safetensors"], "'squeeze_num'", "train-bpp-squeeze-1"),
    (["train", "--data-path", "NODATA", "--attack", "sleeper_agent", "--attack-param", "budget=tpu", "--out", "OUT/m.safetensors"], "'budget'", "train-sleeper-agent-budget-tpu"),
    (["train", "--data-path", "NODATA", "--attack", "sleeper_agent", "--attack-param", "eps=2", "--out", "OUT/m.safetensors"], "'eps'", "train-sleeper-agent-eps-2"),
    (["train", "--data-path", "NODATA", "--attack", "sleeper_agent", "--attack-param", "source_classes=[0]", "--out", "OUT/m.safetensors"], "contains the target class", "train-sleeper-agent-source-is-target"),
    (["train", "--data-path", "NODATA", "--attack", "dynamic", "--attack-param", "cross_rate=0.95", "--out", "OUT/m.safetensors"], "cross_rate", "train-dynamic-rates-over-1"),
    (["train", "--data-path", "NODATA", "--attack", "dynamic", "--attack-param", "mask_density=0", "--out", "OUT/m.safetensors"], "'mask_density'", "train-dynamic-mask-density-0"),
    (["train", "--data-path", "NODATA", "--attack", "dynamic", "--attack-param", "generator_blocks=9", "--out", "OUT/m.safetensors"], "'generator_blocks'", "train-dynamic-blocks-9"),
    (["train", "--data-path", "NODATA", "--attack", "issba", "--attack-param", "bits=0", "--out", "OUT/m.safetensors"], "'bits'", "train-issba-bits-0"),
    (["train", "--data-path", "NODATA", "--attack", "issba", "--attack-param", "max_residual=2", "--out", "OUT/m.safetensors"], "'max_residual'", "train-issba-max-residual-2"),
    (["train", "--data-path", "NODATA", "--attack", "ft", "--attack-param", "base=sig", "--out", "OUT/m.safetensors"], "clean-label attack", "train-ft-base-clean-label"),
    (["train", "--data-path", "NODATA", "--attack", "ft", "--attack-param", "base_params={\"alpha\": 2}", "--attack-param", "base=blend", "--out", "OUT/m.safetensors"], "'alpha'", "train-ft-base-params-invalid"),
    (["train", "--data-path", "NODATA", "--attack", "trojannn", "--attack-param", "neurons=0", "--out", "OUT/m.safetensors"], "'neurons'", "train-trojannn-neurons-0"),
    (["train", "--data-path", "NODATA", "--attack", "sra", "--attack-param", "factor=0", "--out", "OUT/m.safetensors"], "'factor'", "train-sra-factor-0"),
    (["train", "--data-path", "NODATA", "--attack", "sra", "--attack-param", "subnet_channels=0", "--out", "OUT/m.safetensors"], "'subnet_channels'", "train-sra-subnet-channels-0"),
    (["train", "--data-path", "NODATA", "--attack", "sra", "--poison-rate", "0.01", "--out", "OUT/m.safetensors"], "SRA poisons no training data", "train-sra-poison-rate"),
    (["train", "--data-path", "NODATA", "--arch", "mobilenetv2", "--attack", "sra", "--out", "OUT/m.safetensors"], "cnn, resnet18, vgg16bn models only", "train-sra-unsupported-arch"),
    (["train", "--data-path", "NODATA", "--attack", "cl", "--attack-param", "norm=l3", "--out", "OUT/m.safetensors"], "'norm'", "train-cl-norm-l3"),
    (["train", "--data-path", "NODATA", "--attack", "cl", "--attack-param", "norm=linf", "--out", "OUT/m.safetensors"], "8/255", "train-cl-linf-eps-too-big"),
    (["train", "--data-path", "NODATA", "--attack", "sig", "--attack-param", "delta=0", "--out", "OUT/m.safetensors"], "'delta'", "train-sig-delta-0"),
    (["train", "--data-path", "NODATA", "--attack", "tact", "--attack-param", "cover_classes=[5,12]", "--out", "OUT/m.safetensors"], "cover class 12", "train-tact-cover-class-12"),
    (["demo", "--data-path", "NODATA", "--fpr", "2", "--out", "OUT/run"], "fpr", "demo-fpr-2"),
    (["demo", "--data-path", "NODATA", "--train-size", "0", "--out", "OUT/run"], "train_size", "demo-train-size-0"),
    (["demo", "--data-path", "NODATA", "--poison-rate", "-1", "--out", "OUT/run"], "poison_rate", "demo-poison-rate-negative"),
    (["demo", "--data-path", "NODATA", "--attack", "sleeper", "--out", "OUT/run"], "sleeper", "demo-attack-unknown"),
    (["info", "OUT"], "OUT_NAME", "info-on-a-directory"),
    *[  # a target FPR the calibration split cannot reach: refused with the options, before any training
        (argv + extra + ["--out", out], message, f"{argv[0]}-unreachable-fpr-{'-'.join(extra).lstrip('-')}")
        for argv, out in ((["defend", "--model", "MODEL"], "OUT/d.safetensors"),
                          (["compare", "--model", "MODEL", "--detectors", "badexpert,strip"], "OUT/c"),
                          (["demo", "--data-path", "NODATA"], "OUT/run"))
        for extra, message in ((["--fpr", "0.0001"], "smallest reachable rate is 1/(n+1)"),
                               (["--fpr", "1e-9"], "at least 999999999 calibration inputs"),
                               (["--calibration", "1"], "cannot be reached with 1 calibration"),
                               (["--calibration", "98", "--fpr", "0.01"], "at least 99 calibration"))
        if not (argv[0] == "demo" and extra[0] == "--calibration")  # the demo has no --calibration
    ],
]


@pytest.mark.parametrize("argv, message", [
    pytest.param(a, m, id=i) for a, m, i in OPTION_CASES])
def test_command_options_are_checked_before_any_data_is_read(argv, message, artifacts, tmp_path, capsys):
    out = tmp_path / "work"
    out.mkdir()
    places = {"MODEL": artifacts["model"], "DETECTOR": artifacts["detector"], "NODATA": tmp_path / NO_DATA,
              "OUT": out, "BOMB": artifacts["bomb"]}
    resolved = _parse_argv(argv, places)
    message = out.name if message == "OUT_NAME" else message
    run_cli(resolved, tmp_path, capsys, message=message, not_message=NO_DATA)




@pytest.mark.parametrize("argv", [
    pytest.param(["train", "--epochs", "abc", "--out", "m.safetensors"], id="int-option-not-a-number"),
    pytest.param(["defend", "--model", "m.safetensors", "--fpr", "abc", "--out", "d.safetensors"], id="float-option-not-a-number"),
    pytest.param(["train"], id="required-out-missing"),
    pytest.param(["frobnicate"], id="unknown-command"),
    pytest.param(["train", "--out", "m.safetensors", "--bogus"], id="unknown-option"),
    pytest.param(["defend", "--model", "m.safetensors", "--preset", "turbo", "--out", "d.safetensors"], id="choice-option-invalid"),
    pytest.param(["train", "--image-size", "abc", "--out", "m.safetensors"], id="image-size-not-a-size"),
])
def test_argument_parsing_mistakes(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert snapshot(tmp_path) == before
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), f"stderr:\n{err}"


# --- model and detector files --------------------------------------------------------------------
MODEL_META = {"arch": "cnn", "width": 4, "in_channels": 1, "num_classes": 10, "image_size": [28, 28],
              "mean": [0.5], "std": [0.5]}


def _read_st(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        md = fh.metadata()
    return load_file(str(path)), json.loads(md["badexpert"])


def _write_st(path: Path, state: dict, meta) -> Path:
    from safetensors.torch import save_file

    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"badexpert": text})
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A real small model file and a detector fitted and calibrated on it (random 28x28 data);
    both record a dataset path that does not exist."""
    root = tmp_path_factory.mktemp("artifacts")
    nodata = str(root / NO_DATA)
    record = {"dataset": {"name": "fashion-mnist", "path": nodata, "image_size": None},
              "split": {"seed": 0, "reserved": 100, "calibration": 100, "train_size": None, "test_size": None}}
    torch.manual_seed(0)
    m = build_model("cnn", in_channels=1, num_classes=10, image_size=28, width=4)
    model_path = save_model(root / "model.safetensors", m, {**MODEL_META, **record})
    model, _ = load_model(model_path)
    g = torch.Generator().manual_seed(0)
    fit = (torch.randint(0, 256, (40, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(40) % 10)
    cal = (torch.randint(0, 256, (30, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(30) % 10)
    det = BaDExpert(preset="paper", expert_lr=1e-2, aux_lr=0.1, aux_epochs=1, expert_batch_size=20,
                    aux_batch_size=20, augment=False, seed=0)
    det.fit(model, fit).calibrate(cal, fpr=0.1, population="all")  # an untrained model: few inputs are "correct"
    det.model_name_ = "model.safetensors"
    det_path = det.save(root / "detector.safetensors", extra=record)
    bomb = root / "bomb.png"
    bomb.write_bytes(constant_png(12000, 12000))
    return {"root": root, "model": model_path, "detector": det_path, "bomb": bomb}


def _bytes_case(fn):
    return ("bytes", fn)


def _meta_case(fn):
    return ("meta", fn)


def _set(**kw):
    def f(state, meta):
        meta.update(kw)
        return state, meta
    return f


def _raw_meta(text):
    return lambda state, meta: (state, text)


def _torch_pickle(b: bytes) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    return buf.getvalue()


def _tamper_state(fn):
    def f(state, meta):
        fn(state)
        return state, meta
    return f


def _split_set(key, value):
    def f(state, meta):
        meta["split"] = {**meta["split"], key: value}
        return state, meta
    return f


# (id, mutation, expected message for defend/evaluate (load_model), info: "ok" or expected message)
MODEL_CASES = [
    ("truncated-half", _bytes_case(lambda b: b[: len(b) // 2]), "corrupt", "corrupt"),
    ("truncated-header", _bytes_case(lambda b: b[:20]), "corrupt", "corrupt"),
    ("random-bytes", _bytes_case(lambda b: np.random.default_rng(1).bytes(4096)), "corrupt", "corrupt"),
    ("empty-file", _bytes_case(lambda b: b""), "corrupt", "corrupt"),
    ("torch-pickle", _bytes_case(_torch_pickle), "corrupt", "corrupt"),
    ("header-length-huge", _bytes_case(lambda b: struct.pack("<Q", 2**62) + b"{}"), "corrupt", "corrupt"),
    ("header-not-json", _bytes_case(lambda b: struct.pack("<Q", 9) + b"{not json"), "corrupt", "corrupt"),
    ("meta-not-json", _meta_case(_raw_meta("{not json")), "corrupt", "corrupt"),
    ("meta-json-list", _meta_case(_raw_meta("[1, 2]")), "bad.safetensors", "bad.safetensors"),
    ("meta-json-null", _meta_case(_raw_meta("null")), "bad.safetensors", "bad.safetensors"),
    ("meta-json-string", _meta_case(_raw_meta('"hello"')), "bad.safetensors", "bad.safetensors"),
    ("meta-format-unknown", _meta_case(_set(format="badexpert-model/99")), "badexpert-model/99", "badexpert-model/99"),
    ("image_size-abc", _meta_case(_set(image_size="abc")), "'image_size'", "'image_size'"),
    ("image_size-100000", _meta_case(_set(image_size=[100000, 100000])), "'image_size'", "'image_size'"),
    ("image_size-3-values", _meta_case(_set(image_size=[28, 28, 1])), "'image_size'", "'image_size'"),
    ("width--1", _meta_case(_set(width=-1)), "'width'", "'width'"),
    ("width-bool", _meta_case(_set(width=True)), "'width'", "'width'"),
    ("in_channels-0", _meta_case(_set(in_channels=0)), "'in_channels'", "'in_channels'"),
    ("num_classes-0", _meta_case(_set(num_classes=0)), "'num_classes'", "'num_classes'"),
    ("mean-wrong-length", _meta_case(_set(mean=[0.5, 0.5])), "'mean'", "'mean'"),
    ("mean-nan", _meta_case(_set(mean=[float("nan")])), "'mean'", "'mean'"),
    ("std-zero", _meta_case(_set(std=[0.0])), "'std'", "'std'"),
    ("arch-int", _meta_case(_set(arch=5)), "'arch'", "'arch'"),
    # well-typed metadata that does not describe the weights: info prints it, loading refuses
    ("arch-unknown", _meta_case(_set(arch="resnet99")), "resnet99", "ok"),
    ("arch-vit-with-cnn-weights", _meta_case(_set(arch="vit")), "do not match", "ok"),
    ("width-4096-absurd", _meta_case(_set(width=4096)), "do not match", "ok"),
    ("extra-tensor", _meta_case(_tamper_state(lambda s: s.__setitem__("net.extra", torch.zeros(3)))), "do not match", "ok"),
    ("tensor-shape-tampered", _meta_case(_tamper_state(lambda s: s.__setitem__("net.fc.weight", torch.zeros(10, 7)))),
     "do not match", "ok"),
    ("tensor-missing", _meta_case(_tamper_state(lambda s: s.pop("net.fc.weight"))), "do not match", "ok"),
]
# split/dataset records: only `defend` reads them from the model (evaluate uses the detector's record)
MODEL_RECORD_CASES = [
    ("dataset-record-string", _meta_case(_set(dataset="fashion-mnist")), "does not record the dataset"),
    ("split-reserved-string", _meta_case(_split_set("reserved", "many")), "'reserved'"),
    ("split-seed-negative", _meta_case(_split_set("seed", -1)), "'seed'"),
    ("split-record-list", _meta_case(_set(split=[1, 2])), "does not record"),
]

def _apply_mutation(src: Path, dst: Path, mutation) -> Path:
    kind, fn = mutation
    if kind == "bytes":
        dst.write_bytes(fn(src.read_bytes()))
    else:
        state, meta = _read_st(src)
        state, meta = fn(dict(state), copy.deepcopy(meta))
        _write_st(dst, state, meta)
    return dst


def _model_params():
    out = []
    for cid, mutation, load_msg, info_msg in MODEL_CASES:
        for cmd in ("info", "defend", "evaluate"):
            expect = info_msg if cmd == "info" else load_msg
            out.append(pytest.param(cmd, mutation, expect, id=f"{cid}-{cmd}"))
    for cid, mutation, msg in MODEL_RECORD_CASES:
        out.append(pytest.param("defend", mutation, msg, id=f"{cid}-defend"))
    return out


def _run_case(argv, expect: str, fmt: str, tmp_path, capsys) -> None:
    """``expect == "ok"``: the command (info) succeeds, prints the file's metadata of format
    ``fmt`` and writes nothing; otherwise the whole error contract with ``expect`` in the line."""
    if expect != "ok":
        run_cli(argv, tmp_path, capsys, message=expect, not_message=NO_DATA)
        return
    before = snapshot(tmp_path)
    capsys.readouterr()
    with bounded_memory(MEM_LIMIT_MB):
        assert main([str(a) for a in argv]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["format"] == fmt and "Traceback" not in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("cmd, mutation, expect", _model_params())
def test_malformed_model_file(cmd, mutation, expect, artifacts, tmp_path, capsys):
    bad = _apply_mutation(artifacts["model"], tmp_path / "bad.safetensors", mutation)
    if cmd == "info":
        argv = ["info", bad]
    elif cmd == "defend":
        argv = ["defend", "--model", bad, "--out", tmp_path / "out" / "d.safetensors"]
    else:
        argv = ["evaluate", "--model", bad, "--detector", artifacts["detector"], "--out", tmp_path / "eval"]
    _run_case(argv, expect, "badexpert-model/1", tmp_path, capsys)


def _det_set(**kw):
    return _set(**kw)


def _det_model(**kw):
    def f(state, meta):
        meta["model"] = {**meta["model"], **kw}
        return state, meta
    return f


def _det_params(**kw):
    def f(state, meta):
        meta["params"] = {**meta["params"], **kw}
        return state, meta
    return f


DETECTOR_CASES = [
    ("truncated-half", _bytes_case(lambda b: b[: len(b) // 2]), "corrupt", "corrupt"),
    ("random-bytes", _bytes_case(lambda b: np.random.default_rng(2).bytes(4096)), "corrupt", "corrupt"),
    ("empty-file", _bytes_case(lambda b: b""), "corrupt", "corrupt"),
    ("torch-pickle", _bytes_case(_torch_pickle), "corrupt", "corrupt"),
    ("meta-json-list", _meta_case(_raw_meta("[1]")), "bad.safetensors", "bad.safetensors"),
    ("fingerprint-tampered", _meta_case(_det_model(fingerprint="sha256:" + "0" * 64)), "fitted on model", "ok"),
    ("fingerprint-int", _meta_case(_det_model(fingerprint=5)), "fingerprint", "fingerprint"),
    ("model-record-string", _meta_case(_det_set(model="abc")), "'model'", "'model'"),
    ("params-aux_epochs-string", _meta_case(_det_params(aux_epochs="ten")), "'aux_epochs'", "ok"),
    ("params-batch_size-negative", _meta_case(_det_params(batch_size=-1)), "'batch_size'", "ok"),
    ("params-preset-unknown", _meta_case(_det_params(preset="turbo")), "'preset'", "ok"),
    ("params-unknown-key", _meta_case(_det_params(bogus=1)), "bogus", "ok"),
    ("params-not-object", _meta_case(_det_set(params=[1])), "'params'", "'params'"),
    ("detector-name-unknown", _meta_case(_det_set(detector="strip")), "strip", "ok"),
    ("detector-name-int", _meta_case(_det_set(detector=5)), "'detector'", "'detector'"),
    ("input_shape-2d", _meta_case(_det_set(input_shape=[1, 28])), "'input_shape'", "'input_shape'"),
    ("input_shape-huge", _meta_case(_det_set(input_shape=[1, 28, 100000])), "'input_shape'", "'input_shape'"),
    ("threshold-string", _meta_case(_det_set(threshold="abc")), "'threshold'", "'threshold'"),
    ("threshold-nan", _meta_case(_det_set(threshold=float("nan"))), "'threshold'", "'threshold'"),
    ("fpr_target-2", _meta_case(_det_set(fpr_target=2)), "'fpr_target'", "'fpr_target'"),
    ("calibration_size-0", _meta_case(_det_set(calibration_size=0)), "'calibration_size'", "'calibration_size'"),
    ("calibration_population-unknown", _meta_case(_det_set(calibration_population="some")),
     "'calibration_population'", "'calibration_population'"),
    ("clean_rejection_rate-2", _meta_case(_det_set(clean_rejection_rate=2.0)), "'clean_rejection_rate'",
     "'clean_rejection_rate'"),
    ("clean_rejection_rate-string", _meta_case(_det_set(clean_rejection_rate="low")), "'clean_rejection_rate'",
     "'clean_rejection_rate'"),
    ("state-not-object", _meta_case(_det_set(state=5)), "'state'", "'state'"),
    ("data-not-object", _meta_case(_det_set(data=[])), "'data'", "'data'"),
    ("extra-not-object", _meta_case(_det_set(extra=5)), "extra", "extra"),
    ("extra-split-seed-string", _meta_case(_det_set(extra={"dataset": {"name": "fashion-mnist", "path": "NODATA"},
                                                           "split": {"seed": "x", "reserved": 100, "calibration": 100}})),
     "'seed'", "ok"),
    ("no-fit-hashes", _meta_case(_tamper_state(lambda s: s.pop("record.fit_hashes"))), "data record", "data record"),
    ("no-calibration-scores", _meta_case(_tamper_state(lambda s: s.pop("record.calibration_scores"))),
     "data record", "data record"),
    ("expert-weight-shape", _meta_case(_tamper_state(lambda s: s.__setitem__("expert.net.fc.weight", torch.zeros(10, 7)))),
     "do not match", "ok"),
    ("auxiliary-weight-missing", _meta_case(_tamper_state(lambda s: s.pop("auxiliary.net.fc.weight"))),
     "do not match", "ok"),
]



def _detector_params():
    out = []
    for cid, mutation, eval_msg, info_msg in DETECTOR_CASES:
        for cmd in ("info", "evaluate"):
            expect = info_msg if cmd == "info" else eval_msg
            out.append(pytest.param(cmd, mutation, expect, id=f"{cid}-{cmd}"))
    return out


@pytest.mark.parametrize("cmd, mutation, expect", _detector_params())
def test_malformed_detector_file(cmd, mutation, expect, artifacts, tmp_path, capsys):
    kind, fn = mutation
    if kind == "meta":
        nodata = str(tmp_path / NO_DATA)

        def fn2(state, meta, fn=fn):
            state, meta = fn(state, meta)
            if isinstance(meta, dict) and isinstance(meta.get("extra"), dict):
                meta["extra"] = json.loads(json.dumps(meta["extra"]).replace("NODATA", nodata))
            return state, meta

        mutation = (kind, fn2)
    bad = _apply_mutation(artifacts["detector"], tmp_path / "bad.safetensors", mutation)
    if cmd == "info":
        argv = ["info", bad]
    else:
        argv = ["evaluate", "--model", artifacts["model"], "--detector", bad, "--out", tmp_path / "eval"]
    _run_case(argv, expect, "badexpert-detector/2", tmp_path, capsys)


def test_detector_control_reaches_the_data_path(artifacts, tmp_path, capsys):
    """The untampered files load: evaluate gets as far as the recorded (missing) dataset path."""
    run_cli(["evaluate", "--model", artifacts["model"], "--detector", artifacts["detector"], "--out", tmp_path / "e"],
            tmp_path, capsys, message=(NO_DATA, "does not exist"))


def test_model_file_given_as_detector(artifacts, tmp_path, capsys):
    run_cli(["evaluate", "--model", artifacts["model"], "--detector", artifacts["model"], "--out", tmp_path / "e"],
            tmp_path, capsys, message="badexpert-model/1")


def test_detector_file_given_as_model(artifacts, tmp_path, capsys):
    run_cli(["defend", "--model", artifacts["detector"], "--out", tmp_path / "d.safetensors"],
            tmp_path, capsys, message="badexpert-detector/2")


# --- dataset files and trigger images ---------------------------------------------------------------
def _loader_zip_corrupt(tmp):
    return zip_corrupt_member(write_zip(tmp / "data.zip", image_folder_members()))


def _loader_zip_huge_member(tmp):
    return zip_declare_size(write_zip(tmp / "data.zip", image_folder_members()))


def _loader_zip_bzip2(tmp):
    return write_zip(tmp / "data.zip", image_folder_members(), compression=zipfile.ZIP_BZIP2)


def _loader_zip_truncated(tmp):
    p = write_zip(tmp / "data.zip", image_folder_members())
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def _loader_zip_deflate_bomb(tmp):
    """A member that really inflates to 200 MB of zeros (its declared size says so too)."""
    p = tmp / "data.zip"
    members = image_folder_members()
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        with zf.open("train/a/999.png", "w", force_zip64=True) as fh:
            block = b"\x00" * (1 << 20)
            for _ in range(200):
                fh.write(block)
    return p


def _loader_huge_header_png(tmp):
    members = image_folder_members()
    members["train/a/big.png"] = constant_png(100_000, 100_000, header_only=True)
    return write_folder(tmp / "data", members)


def _loader_just_over_limit_png(tmp):
    members = image_folder_members()
    members["train/b/big.png"] = constant_png(4097, 4097, header_only=True)
    return write_folder(tmp / "data", members)


def _loader_truncated_png(tmp):
    members = image_folder_members()
    members["test/a/000.png"] = members["test/a/000.png"][:40]
    return write_folder(tmp / "data", members)


def _loader_text_as_png(tmp):
    members = image_folder_members()
    members["train/a/000.png"] = b"this is not an image\n"
    return write_folder(tmp / "data", members)


def _loader_eps_as_png(tmp):
    members = image_folder_members()
    members["train/a/000.png"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    return write_folder(tmp / "data", members)


def _loader_empty_class(tmp):
    d = write_folder(tmp / "data", image_folder_members())
    (d / "train" / "c").mkdir()
    return d


def _idx_bomb(tmp):
    d = tmp / "fm"
    write_idx_set(d)
    header = idx_bytes(8, (100_000, 10_000, 10_000), b"")
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip_stream(header, 1 << 20))
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(8, (100_000,), bytes(100_000))))
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip_stream(idx_bytes(8, (12, 10_000, 10_000), b""), 1 << 20))
    return d


def _idx_trailing_zeros(tmp):
    d = tmp / "fm"
    write_idx_set(d)
    r = np.random.default_rng(3)
    header = idx_bytes(8, (20, 28, 28), r.integers(0, 256, 20 * 28 * 28, dtype=np.uint8).tobytes())
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip_stream(header, 64 << 20))
    return d


def _idx_truncated_gzip(tmp):
    d = write_idx_set(tmp / "fm")
    p = d / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return d


def _idx_size_mismatch(tmp):
    return write_idx_set(tmp / "fm", test_hw=(14, 14))


def _idx_count_mismatch(tmp):
    return write_idx_set(tmp / "fm", train_labels_n=19)


def _idx_bad_label(tmp):
    return write_idx_set(tmp / "fm", label_value=200)


def _idx_missing_file(tmp):
    d = write_idx_set(tmp / "fm")
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    return d


def _idx_swapped(tmp):
    d = write_idx_set(tmp / "fm", gz=False)
    a, b = d / "train-images-idx3-ubyte", d / "train-labels-idx1-ubyte"
    ab, bb = a.read_bytes(), b.read_bytes()
    a.write_bytes(bb)
    b.write_bytes(ab)
    return d


def _idx_bad_magic(tmp):
    d = write_idx_set(tmp / "fm", gz=False)
    p = d / "t10k-images-idx3-ubyte"
    p.write_bytes(b"\x12\x34" + p.read_bytes()[2:])
    return d


def _idx_plain_extra_bytes(tmp):
    d = write_idx_set(tmp / "fm", gz=False)
    p = d / "t10k-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes() + b"\x00" * 100)
    return d


def _idx_ndim_255(tmp):
    d = write_idx_set(tmp / "fm", gz=False)
    (d / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 255]) + b"\x00" * 16)
    return d


def _idx_medium_with_budget(tmp):
    """80 MB declared and present (a real 1000:1 gzip) under BADEXPERT_MAX_MEMORY=16M: refused by budget."""
    d = tmp / "fm"
    write_idx_set(d, train_hw=(200, 200), test_hw=(200, 200), n_train=2)
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip_stream(idx_bytes(8, (2000, 200, 200), b""), 2000 * 200 * 200))
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(8, (2000,), bytes(2000))))
    return d


# (id, builder, dataset name, expected message, env)
LOADER_CASES = [
    ("zip-corrupt-member", _loader_zip_corrupt, "imagefolder", "002.png", None),
    ("zip-huge-declared-member", _loader_zip_huge_member, "imagefolder", "001.png", None),
    ("zip-bzip2-members", _loader_zip_bzip2, "imagefolder", "compression", None),
    ("zip-truncated", _loader_zip_truncated, "imagefolder", "data.zip", None),
    ("zip-deflate-bomb-member", _loader_zip_deflate_bomb, "imagefolder", "999.png", None),
    ("png-huge-header", _loader_huge_header_png, "imagefolder", "big.png", None),
    ("png-4097x4097-header", _loader_just_over_limit_png, "imagefolder", "big.png", None),
    ("png-truncated", _loader_truncated_png, "imagefolder", "000.png", None),
    ("png-is-text", _loader_text_as_png, "imagefolder", "000.png", None),
    ("png-is-eps", _loader_eps_as_png, "imagefolder", "000.png", None),
    ("imagefolder-empty-class", _loader_empty_class, "imagefolder", "train/c", None),
    ("idx-gzip-bomb-header", _idx_bomb, "fashion-mnist", "memory budget", None),
    ("idx-gzip-trailing-64MB", _idx_trailing_zeros, "fashion-mnist", "train-images-idx3-ubyte", None),
    ("idx-gzip-truncated", _idx_truncated_gzip, "fashion-mnist", "train-images-idx3-ubyte", None),
    ("idx-train-test-size-mismatch", _idx_size_mismatch, "fashion-mnist", "14x14", None),
    ("idx-image-label-count-mismatch", _idx_count_mismatch, "fashion-mnist", "19 labels", None),
    ("idx-label-out-of-range", _idx_bad_label, "fashion-mnist", "label 200", None),
    ("idx-missing-file", _idx_missing_file, "fashion-mnist", "t10k-labels-idx1-ubyte", None),
    ("idx-images-labels-swapped", _idx_swapped, "fashion-mnist", "swapped", None),
    ("idx-bad-magic", _idx_bad_magic, "fashion-mnist", "not an IDX file", None),
    ("idx-plain-extra-bytes", _idx_plain_extra_bytes, "fashion-mnist", "t10k-labels-idx1-ubyte", None),
    ("idx-ndim-255", _idx_ndim_255, "fashion-mnist", "t10k-images-idx3-ubyte", None),
    ("idx-80MB-over-BADEXPERT_MAX_MEMORY", _idx_medium_with_budget, "fashion-mnist", "BADEXPERT_MAX_MEMORY", "16M"),
]


def _loader_params(via: str):
    return [pytest.param(b, ds, msg, env, id=f"{cid}-{via}") for cid, b, ds, msg, env in LOADER_CASES]


@pytest.mark.parametrize("builder, dataset, message, env", _loader_params("api"))
def test_hostile_dataset_files_api(builder, dataset, message, env, tmp_path, monkeypatch):
    if env:
        monkeypatch.setenv("BADEXPERT_MAX_MEMORY", env)
    path = builder(tmp_path)
    with bounded_memory(MEM_LIMIT_MB):
        with pytest.raises(BadExpertError) as e:
            load_dataset(dataset, path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("builder, dataset, message, env", _loader_params("cli"))
def test_hostile_dataset_files_cli(builder, dataset, message, env, tmp_path, monkeypatch, capsys):
    if env:
        monkeypatch.setenv("BADEXPERT_MAX_MEMORY", env)
    path = builder(tmp_path)
    run_cli(["train", "--dataset", dataset, "--data-path", path, "--out", tmp_path / "out" / "m.safetensors"],
            tmp_path, capsys, message=message)


def test_one_pixel_image_among_others_is_resized_not_fatal(tmp_path):
    """A 1x1 PNG does not decide the image size: it is resized to the common one, with a warning."""
    members = image_folder_members(size=(8, 8))
    members["train/a/tiny.png"] = png_bytes(np.full((1, 1), 200, np.uint8))
    d = write_folder(tmp_path / "data", members)
    with bounded_memory(MEM_LIMIT_MB), pytest.warns(UserWarning, match="1 of 25 images were resized to 8x8"):
        tr, te = load_dataset("imagefolder", d)
    assert tr.image_size == (8, 8) and te.image_size == (8, 8) and tr.meta["resized"] == 1


def _tiny_folder(tmp: Path, size=(12, 12)) -> Path:
    return write_folder(tmp / "data", image_folder_members(size=size))


TRAIN_SMALL = ["--reserved", "2", "--calibration", "2", "--epochs", "1", "--batch-size", "4"]


@pytest.mark.parametrize("trigger, message", [
    pytest.param("corrupt", "trigger-corrupt.png", id="trigger-image-corrupt"),
    pytest.param("truncated", "trigger-truncated.png", id="trigger-image-truncated-png"),
    pytest.param("missing", "does not exist", id="trigger-image-missing"),
    pytest.param("directory", "trigger-directory.png", id="trigger-image-is-directory"),
    pytest.param("header-bomb", "trigger-header-bomb.png", id="trigger-image-100000x100000-header"),
    pytest.param("bomb-12000", "trigger-bomb-12000.png", id="trigger-image-12000x12000-decompression-bomb"),
])
def test_trigger_image_file_cli(trigger, message, tmp_path, capsys):
    data = _tiny_folder(tmp_path)
    good = png_bytes(np.full((8, 8), 255, np.uint8))
    files = {
        "corrupt": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        "truncated": good[: len(good) // 2],
        "header-bomb": constant_png(100_000, 100_000, header_only=True),
        "bomb-12000": constant_png(12000, 12000),
    }
    trig = tmp_path / f"trigger-{trigger}.png"
    if trigger in files:
        trig.write_bytes(files[trigger])
    elif trigger == "directory":
        trig.mkdir()
    run_cli(["train", "--dataset", "imagefolder", "--data-path", data, *TRAIN_SMALL, "--attack", "badnet",
             "--poison-rate", "0.1", "--attack-param", f"trigger_image={trig}", "--out", tmp_path / "out" / "m.safetensors"],
            tmp_path, capsys, message=message)


@pytest.mark.parametrize("size, extra, message", [
    pytest.param((1, 1), [], "1x1", id="all-images-1x1"),
    pytest.param((12, 12), ["--image-size", "2"], "2x2", id="image-size-2"),
    pytest.param((12, 12), ["--image-size", "0"], "image_size", id="image-size-0"),
    pytest.param((12, 12), ["--image-size", "5000"], "image_size", id="image-size-5000"),
    pytest.param((12, 12), ["--reserved", "100"], "reserved", id="reserved-larger-than-test-split"),
    pytest.param((4, 4), ["--attack", "badnet", "--poison-rate", "0.5", "--attack-param", "size=5"], "does not fit",
                 id="badnet-trigger-larger-than-image"),
])
def test_degenerate_image_sizes_cli(size, extra, message, tmp_path, capsys):
    data = _tiny_folder(tmp_path, size=size)
    argv = ["train", "--dataset", "imagefolder", "--data-path", data, *TRAIN_SMALL, *extra,
            "--out", tmp_path / "out" / "m.safetensors"]
    run_cli(argv, tmp_path, capsys, message=message)


# --- Python API ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A tiny untrained CNN (1x12x12, 4 classes), a BaDExpert fitted (and a copy also calibrated) on
    synthetic data, clean evaluation data disjoint from both, and a few files."""
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=4, image_size=12, width=4).eval()
    other = build_model("cnn", in_channels=1, num_classes=4, image_size=12, width=4).eval()
    fit, cal, test = make_blobs(60, seed=3), make_blobs(60, seed=4), make_blobs(40, seed=5)
    det = BaDExpert(preset="paper", expert_lr=1e-2, aux_lr=0.1, aux_epochs=1, expert_batch_size=32,
                    aux_batch_size=32, augment=False, seed=0).fit(model, fit)
    uncalibrated = copy.deepcopy(det)
    det.calibrate(cal, fpr=0.1)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x01" * 30)
    (root / "bomb.png").write_bytes(constant_png(12000, 12000))
    return {"model": model, "other": other, "fit": fit, "cal": cal, "test": test, "det": det,
            "uncalibrated": uncalibrated, "root": root}


X = lambda c: c["test"].images[:6]  # noqa: E731 - uint8 [6, 1, 12, 12]
Y = lambda c: c["test"].labels[:6]  # noqa: E731


def _images(kind: str, c) -> object:
    x = X(c)
    return {
        "int64": lambda: x.long(),
        "int32": lambda: x.int(),
        "int16": lambda: x.short(),
        "bool": lambda: x.bool(),
        "float16-0-255": lambda: x.half(),
        "float64-0-255": lambda: x.double(),
        "float32-negative": lambda: x.float() / 255 - 0.5,
        "float32-normalised": lambda: (x.float() / 255 - 0.3) / 0.35,
        "complex64": lambda: (x.float() / 255).to(torch.complex64),
        "nan": lambda: torch.full(x.shape, float("nan")),
        "inf": lambda: torch.full(x.shape, float("inf")),
        "ndim-3": lambda: x[:, 0],
        "ndim-5": lambda: x[None],
        "ndim-0": lambda: torch.tensor(3, dtype=torch.uint8),
        "channels-3": lambda: x.expand(-1, 3, -1, -1).contiguous(),
        "string": lambda: "images.png",
        "none": lambda: None,
        "dict": lambda: {"images": x},
        "object-array": lambda: np.array([object(), object()], dtype=object),
        "ragged-list": lambda: [[1, 2], [3]],
    }[kind]()


BAD_IMAGES = ["int64", "int32", "int16", "bool", "float16-0-255", "float64-0-255", "float32-negative",
              "float32-normalised", "complex64", "ndim-3", "ndim-5", "ndim-0", "string", "none", "dict",
              "object-array", "ragged-list"]


def _fit(c, data, **kw):
    return BaDExpert(preset="paper", expert_lr=1e-2, aux_lr=0.1, aux_epochs=1, augment=False, **kw).fit(c["model"], data)


def _calibrate(c, data, fpr=0.1):
    return copy.deepcopy(c["uncalibrated"]).calibrate(data, fpr)


def _recipe():
    return Recipe(epochs=1, batch_size=4, augment=False)


def _fresh_model():
    return build_model("cnn", in_channels=1, num_classes=4, image_size=12, width=4)


IMAGE_APIS = {
    "score": lambda c, x: c["det"].score(x),
    "predict": lambda c, x: c["det"].predict(x),
    "fit": lambda c, x: _fit(c, (x, Y(c))),
    "calibrate": lambda c, x: _calibrate(c, (x, Y(c))),
    "accuracy": lambda c, x: accuracy(c["model"], (x, Y(c))),
    "train": lambda c, x: train(_fresh_model(), (x, Y(c)), _recipe()),
    "attack.apply": lambda c, x: get_attack("badnet").apply(x),
}




def _image_params():
    out = []
    for kind in BAD_IMAGES + ["channels-3"]:
        for api_name in IMAGE_APIS:
            if kind == "channels-3" and api_name == "attack.apply":
                continue  # an attack is channel-agnostic: 3 channels are valid input there
            out.append(pytest.param(kind, api_name, id=f"{api_name}-{kind}"))
    return out


@pytest.mark.parametrize("kind, api_name", _image_params())
def test_api_refuses_bad_images(kind, api_name, api):
    x = _images(kind, api)
    with bounded_memory(MEM_LIMIT_MB), pytest.raises(BadExpertError):
        IMAGE_APIS[api_name](api, x)


@pytest.mark.parametrize("api_name", ["fit", "calibrate", "accuracy", "train", "attack.apply"])
@pytest.mark.parametrize("kind", ["nan", "inf", "one-nan-image"])
def test_api_refuses_nonfinite_images_where_it_must(kind, api_name, api):
    x = _nonfinite(kind, api)
    with bounded_memory(MEM_LIMIT_MB), pytest.raises(BadExpertError, match="non-finite"):
        IMAGE_APIS[api_name](api, x)


def _nonfinite(kind, c):
    if kind == "one-nan-image":
        x = X(c).float() / 255
        x[2, 0, 3, 4] = float("nan")
        return x
    return _images(kind, c)


@pytest.mark.parametrize("kind", ["nan", "inf", "one-nan-image"])
def test_nonfinite_images_score_nan_and_are_rejected(kind, api):
    x = _nonfinite(kind, api)
    bad = ~torch.isfinite(x).flatten(1).all(1)
    with bounded_memory(MEM_LIMIT_MB):
        scores = api["det"].score(x)
        reject = api["det"].predict(x)
    assert scores.shape == (len(x),) and reject.dtype == torch.bool
    assert torch.isnan(scores[bad]).all() and torch.isfinite(scores[~bad]).all()
    assert reject[bad].all()


def test_empty_batch_scores_to_empty(api):
    x = X(api)[:0]
    assert api["det"].score(x).shape == (0,)
    assert api["det"].predict(x).shape == (0,) and api["det"].predict(x).dtype == torch.bool
    assert get_attack("badnet").apply(x).shape == (0, 1, 12, 12)


def _labels(kind: str, c):
    y = Y(c)
    return {
        "float": lambda: y.float(),
        "float-integral-numpy": lambda: y.numpy().astype(np.float64),
        "bool": lambda: y.bool(),
        "strings": lambda: ["a"] * len(y),
        "string": lambda: "labels",
        "negative": lambda: -y - 1,
        "wrong-length": lambda: y[:3],
        "2d": lambda: y[:, None],
        "dict": lambda: {"labels": y},
        "complex": lambda: y.to(torch.complex64),
    }[kind]()


LABEL_APIS = {
    "fit": lambda c, y: _fit(c, (X(c), y)),
    "accuracy": lambda c, y: accuracy(c["model"], (X(c), y)),
    "train": lambda c, y: train(_fresh_model(), (X(c), y), _recipe()),
}


@pytest.mark.parametrize("api_name", sorted(LABEL_APIS))
@pytest.mark.parametrize("kind", ["float", "float-integral-numpy", "bool", "strings", "string", "negative",
                                  "wrong-length", "2d", "dict", "complex"])
def test_api_refuses_bad_labels(kind, api_name, api):
    y = _labels(kind, api)
    with bounded_memory(MEM_LIMIT_MB), pytest.raises(BadExpertError):
        LABEL_APIS[api_name](api, y)


def _empty(c):
    return (X(c)[:0], Y(c)[:0])


def _dataset(images, labels, classes=4):
    return Dataset(images=images, labels=labels, classes=[f"c{k}" for k in range(classes)], name="d")


API_MISTAKES = [
    # --- empty data
    ("fit-empty", lambda c: _fit(c, _empty(c)), None),
    ("fit-one-sample", lambda c: _fit(c, (X(c)[:1], Y(c)[:1])), None),
    ("calibrate-empty", lambda c: _calibrate(c, _empty(c)), None),
    ("accuracy-empty", lambda c: accuracy(c["model"], _empty(c)), None),
    ("train-empty", lambda c: train(_fresh_model(), _empty(c), _recipe()), None),
    ("evaluate-empty-dataset", lambda c: evaluate(c["model"], c["det"], _dataset(X(c)[:0], Y(c)[:0]), None), None),
    # --- fit / calibrate / predict misuse
    ("fit-without-labels", lambda c: _fit(c, X(c)), None),
    ("fit-labels-beyond-model-outputs", lambda c: _fit(c, (X(c), torch.full((6,), 7))), None),
    ("fit-model-is-string", lambda c: BaDExpert().fit("model.safetensors", c["fit"]), None),
    ("fit-model-is-none", lambda c: BaDExpert().fit(None, c["fit"]), None),
    ("fit-preset-unknown", lambda c: BaDExpert(preset="turbo").fit(c["model"], c["fit"]), None),
    ("fit-aux_epochs-0", lambda c: BaDExpert(aux_epochs=0).fit(c["model"], c["fit"]), None),
    ("fit-batch_size-string", lambda c: BaDExpert(batch_size="64").fit(c["model"], c["fit"]), None),
    ("fit-data-is-dict", lambda c: _fit(c, {"images": X(c), "labels": Y(c)}), None),
    ("calibrate-fpr-0", lambda c: _calibrate(c, c["cal"], fpr=0), None),
    ("calibrate-fpr-1.5", lambda c: _calibrate(c, c["cal"], fpr=1.5), None),
    ("calibrate-fpr-string", lambda c: _calibrate(c, c["cal"], fpr="0.1"), None),
    ("calibrate-fpr-nan", lambda c: _calibrate(c, c["cal"], fpr=float("nan")), None),
    ("calibrate-on-fit-data", lambda c: _calibrate(c, c["fit"]), None),
    ("calibrate-before-fit", lambda c: BaDExpert().calibrate(c["cal"], 0.1), NotFittedError),
    ("score-before-fit", lambda c: BaDExpert().score(X(c)), NotFittedError),
    ("predict-before-calibrate", lambda c: c["uncalibrated"].predict(X(c)), NotFittedError),
    ("score-wrong-spatial-size", lambda c: c["det"].score(torch.zeros(2, 1, 10, 10, dtype=torch.uint8)), None),
    # --- evaluate
    ("evaluate-test-is-tuple", lambda c: evaluate(c["model"], c["det"], (X(c), Y(c)), None), None),
    ("evaluate-test-is-string", lambda c: evaluate(c["model"], c["det"], "test", None), None),
    ("evaluate-test-is-none", lambda c: evaluate(c["model"], c["det"], None, None), None),
    ("evaluate-uncalibrated", lambda c: evaluate(c["model"], c["uncalibrated"], c["test"], None), NotFittedError),
    ("evaluate-other-model", lambda c: evaluate(c["other"], c["det"], c["test"], None), None),
    ("evaluate-overlaps-fit-data", lambda c: evaluate(c["model"], c["det"], c["fit"], None), None),
    ("evaluate-wrong-class-count", lambda c: evaluate(c["model"], None, _dataset(X(c), Y(c) % 3, classes=3), None), None),
    ("evaluate-wrong-channels", lambda c: evaluate(c["model"], None, _dataset(X(c).expand(-1, 3, -1, -1).contiguous(), Y(c)), None), None),
    ("evaluate-attack-is-string", lambda c: evaluate(c["model"], None, c["test"], "badnet"), None),
    ("evaluate-attack-target-out-of-range", lambda c: evaluate(c["model"], None, c["test"], get_attack("badnet", target=99)), None),
    ("evaluate-model-is-string", lambda c: evaluate("model.safetensors", None, c["test"], None), None),
    # --- attacks
    ("get_attack-size--3", lambda c: get_attack("badnet", size=-3), None),
    ("get_attack-target-negative", lambda c: get_attack("badnet", target=-1), None),
    ("get_attack-target-string", lambda c: get_attack("badnet", target="0"), None),
    ("get_attack-poison_rate-2", lambda c: get_attack("badnet", poison_rate=2), None),
    ("get_attack-alpha-nan", lambda c: get_attack("blend", alpha=float("nan")), None),
    ("get_attack-unknown-param", lambda c: get_attack("badnet", sizee=3), None),
    ("get_attack-unknown-name", lambda c: get_attack("sleeper"), None),
    ("get_attack-name-none", lambda c: get_attack(None), None),
    ("get_attack-name-int", lambda c: get_attack(5), None),
    ("apply-trigger-larger-than-image", lambda c: get_attack("badnet", size=20).apply(X(c)), None),
    ("apply-trojan-on-2x2", lambda c: get_attack("trojan").apply(torch.zeros(1, 1, 2, 2, dtype=torch.uint8)), None),
    ("apply-trigger-image-missing", lambda c: get_attack("badnet", trigger_image=str(c["root"] / "nope.png")).apply(X(c)), None),
    ("apply-trigger-image-corrupt", lambda c: get_attack("badnet", trigger_image=str(c["root"] / "corrupt.png")).apply(X(c)), None),
    ("apply-trigger-image-12000x12000-bomb", lambda c: get_attack("badnet", trigger_image=str(c["root"] / "bomb.png")).apply(X(c)), None),
    ("poison-target-out-of-range", lambda c: get_attack("badnet", target=9, poison_rate=0.1).poison(c["fit"], torch.Generator()), None),
    # --- train
    ("train-recipe-is-dict", lambda c: train(_fresh_model(), (X(c), Y(c)), {"epochs": 1}), None),
    ("train-recipe-epochs-0", lambda c: train(_fresh_model(), (X(c), Y(c)), Recipe(epochs=0)), None),
    ("train-labels-beyond-model-outputs", lambda c: train(_fresh_model(), (X(c), torch.full((6,), 9)), _recipe()), None),
    ("train-model-is-string", lambda c: train("cnn", (X(c), Y(c)), _recipe()), None),
    ("accuracy-model-is-string", lambda c: accuracy("cnn", (X(c), Y(c))), None),
    # --- files and names
    ("load_model-path-none", lambda c: load_model(None), None),
    ("load_model-directory", lambda c: load_model(c["root"]), None),
    ("load_detector-model-is-string", lambda c: load_detector(c["det_file"], "model"), None),
    ("load_detector-other-model", lambda c: load_detector(c["det_file"], c["other"]), None),
    ("load_dataset-name-none", lambda c: load_dataset(None), None),
    ("load_dataset-path-int", lambda c: load_dataset("imagefolder", 123), None),
    ("load_dataset-image_size-0", lambda c: load_dataset("imagefolder", c["root"], image_size=0), None),
    ("load_dataset-image_size-string", lambda c: load_dataset("imagefolder", c["root"], image_size="28"), None),
    ("load_dataset-image_size-huge", lambda c: load_dataset("imagefolder", c["root"], image_size=(5000, 5000)), None),
    ("ExperimentConfig-from_dict-list", lambda c: ExperimentConfig.from_dict([1, 2]), None),
    ("ExperimentConfig-from_dict-none", lambda c: ExperimentConfig.from_dict(None), None),
    # --- a target FPR the calibration data cannot reach (no threshold that rejects nothing)
    ("calibrate-fpr-1e-12", lambda c: _calibrate(c, c["cal"], fpr=1e-12), None),
    ("calibrate-fpr-below-1/(n+1)", lambda c: _calibrate(c, c["cal"], fpr=0.99 / (len(c["cal"]) + 1)), None),
    ("conformal_threshold-unreachable", lambda c: conformal_threshold([1.0, 2.0, 3.0], 0.1), None),
    # --- constructors and functions called with what they do not take
    ("BaDExpert-unknown-parameter", lambda c: BaDExpert(bogus=1), None),
    ("BaDExpert-positional", lambda c: BaDExpert(0.01), None),
    ("STRIP-unknown-parameter", lambda c: get_detector("strip", name="x"), None),
    ("get_attack-name-as-parameter", lambda c: get_attack("badnet", name="blend"), None),
    ("get_attack-class-constant", lambda c: get_attack("badnet", clean_label=True), None),
    ("split-reserved-float", lambda c: split(c["test"], c["test"], seed=0, reserved=1.5, calibration=2), None),
    ("split-train_size-negative", lambda c: split(c["test"], c["test"], seed=0, reserved=2, calibration=2, train_size=-5), None),
    ("split-missing-test", lambda c: split(c["test"], reserved=2), None),
    ("evaluate-asr_bar-2", lambda c: evaluate(c["model"], c["det"], c["test"], None, asr_bar=2), None),
    ("evaluate-n_boot-string", lambda c: evaluate(c["model"], c["det"], c["test"], None, n_boot="10"), None),
    ("score-sparse-tensor", lambda c: c["det"].score(X(c).float().div(255).to_sparse()), None),
    ("score-meta-tensor", lambda c: c["det"].score(torch.zeros(2, 1, 12, 12, device="meta")), None),
    ("apply-sparse-tensor", lambda c: get_attack("badnet").apply(X(c).to_sparse()), None),
    ("predict-quantized-tensor", lambda c: c["det"].predict(torch.quantize_per_tensor(X(c).float() / 255, 0.01, 0, torch.quint8)), None),
]

API_MESSAGES = {  # where the message matters (the same error could be raised for the wrong reason)
    "ExperimentConfig-from_dict-list": "object",
    "fit-labels-beyond-model-outputs": "outputs",
    "calibrate-on-fit-data": "fitted on",
    "evaluate-other-model": "fitted on model",
    "evaluate-overlaps-fit-data": "shares",
    "evaluate-wrong-class-count": "classes",
    "load_detector-other-model": "fitted on model",
    "apply-trigger-image-missing": "does not exist",
    "apply-trigger-image-corrupt": "corrupt.png",
    "apply-trigger-image-12000x12000-bomb": "bomb.png",
    "poison-target-out-of-range": "target class 9",
    "load_dataset-image_size-huge": "4096",
    "calibrate-fpr-1e-12": "smallest reachable rate",
    "calibrate-fpr-below-1/(n+1)": "cannot be reached",
    "conformal_threshold-unreachable": "at least 9 calibration",
    "BaDExpert-unknown-parameter": "bogus",
    "BaDExpert-positional": "keyword",
    "STRIP-unknown-parameter": "'name'",
    "get_attack-name-as-parameter": "'name'",
    "get_attack-class-constant": "clean_label",
    "split-reserved-float": "'reserved'",
    "split-train_size-negative": "'train_size'",
    "split-missing-test": "'test'",
    "evaluate-asr_bar-2": "'asr_bar'",
    "evaluate-n_boot-string": "'n_boot'",
    "score-sparse-tensor": "sparse",
    "score-meta-tensor": "meta",
    "apply-sparse-tensor": "sparse",
    "predict-quantized-tensor": "quantized",
}


def _api_params():
    return [pytest.param(fn, exc, API_MESSAGES.get(cid), id=cid) for cid, fn, exc in API_MISTAKES]


@pytest.fixture(scope="module")
def api_files(api):
    p = api["det"].save(api["root"] / "det.safetensors")
    return {**api, "det_file": p}


@pytest.mark.parametrize("fn, exc, message", _api_params())
def test_api_mistakes_raise_badexpert_error(fn, exc, message, api_files):
    with bounded_memory(MEM_LIMIT_MB), pytest.raises(exc or BadExpertError) as e:
        fn(api_files)
    assert isinstance(e.value, BadExpertError)
    if message:
        assert message in str(e.value), str(e.value)


# --- properties (hypothesis) ---------------------------------------------------------------------------
DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.complex64]
_VALUES = {
    "unit": st.floats(0, 1),
    "near-unit": st.floats(-2e-3, 1 + 2e-3),
    "byte": st.integers(0, 255).map(float),
    "any": st.floats(allow_nan=True, allow_infinity=True, width=32),
}


@st.composite
def image_inputs(draw):
    """A tensor (or numpy array, or list) of random dtype, shape and values."""
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.sampled_from([4, 4, 4, 0, 1, 2, 3, 5]))
    shape = tuple(draw(st.lists(st.integers(0, 3), min_size=ndim, max_size=ndim)))
    n = math.prod(shape)
    values = draw(st.lists(_VALUES[draw(st.sampled_from(sorted(_VALUES)))], min_size=n, max_size=n))
    x = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if not (dtype.is_floating_point or dtype.is_complex):
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        info = torch.iinfo(dtype) if dtype != torch.bool else None
        x = x.round().clamp(info.min, info.max) if info else x != 0
    x = x.to(dtype)
    form = draw(st.sampled_from(["tensor", "tensor", "numpy", "list"]))
    if form == "numpy" and dtype != torch.bfloat16:
        return x.numpy()
    if form == "list" and dtype in (torch.float32, torch.float64) and min(shape, default=0) > 0:
        return x.tolist()  # nested lists keep their shape only when no dimension is 0
    return x


def _as_given(given) -> torch.Tensor:
    """What the caller handed over, as a tensor (a list of floats is float32, as torch reads it)."""
    if isinstance(given, torch.Tensor):
        return given
    if isinstance(given, np.ndarray):
        return torch.from_numpy(given)
    return torch.as_tensor(given)


def _expected_ok(x: torch.Tensor) -> bool:
    """The one image rule, written out independently of badexpert."""
    if x.dim() != 4:
        return False
    if x.dtype == torch.uint8:
        return True
    if not x.dtype.is_floating_point:
        return False
    if x.numel() == 0:
        return True
    xf = x.float()
    if not bool(torch.isfinite(xf).all()):
        return False
    return float(xf.min()) >= -IMAGE_TOLERANCE and float(xf.max()) <= 1 + IMAGE_TOLERANCE


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(image_inputs())
def test_property_to_float_returns_unit_floats_or_badexpert_error(given_):
    x = _as_given(given_)
    ok = _expected_ok(x)
    try:
        out = to_float(given_)
    except BadExpertError:
        assert not ok, f"{x.dtype} {tuple(x.shape)} refused but the rule accepts it"
        return
    assert ok, f"{x.dtype} {tuple(x.shape)} accepted but the rule refuses it"
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == x.shape
    if out.numel():
        assert float(out.min()) >= 0 and float(out.max()) <= 1
    ref = x.float() / 255 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
    assert torch.allclose(out, ref, atol=1e-6)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(image_inputs())
def test_property_check_images_allow_nonfinite(given_):
    """With nonfinite="allow" (detector scoring), NaN/inf are let through but every other rule holds."""
    x = _as_given(given_)
    finite = x.clone()
    if x.dtype.is_floating_point:
        finite = torch.where(torch.isfinite(x.float()), x.float(), torch.full_like(x.float(), 0.5)).to(x.dtype)
    ok = _expected_ok(finite)
    try:
        out = check_images(given_, nonfinite="allow")
    except BadExpertError:
        assert not ok
        return
    assert ok and out.shape == x.shape


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_RECIPE_KEYS = ["optimizer", "lr", "epochs", "batch_size", "momentum", "nesterov", "weight_decay", "schedule",
                "milestones", "gamma", "warmup_epochs", "augment", "hflip", "pad", "label_smoothing", "amp",
                "max_steps", "bogus"]


def _registry_strategies():
    """Names and parameters drawn from the registries (datasets, architectures, attacks, detectors):
    a new registry entry, and each of its parameters, is fuzzed without editing this file. Parameter
    values are a parameter's default, a value its annotation refuses (badexpert.testing.bad_values)
    or any JSON."""
    import dataclasses
    import inspect

    from badexpert.attacks import ATTACKS
    from badexpert.data import DATASETS
    from badexpert.detectors import DETECTORS
    from badexpert.models import ARCHITECTURES
    from badexpert.testing import bad_values
    from badexpert.validation import signature_hints

    def params_of(fields: dict[str, tuple]) -> st.SearchStrategy:
        """A dict of some of ``fields`` ({name: (default, annotation)}) plus an unknown one."""
        def value(name):
            default, hint = fields[name]
            known = [default, *bad_values(hint)] if name != "bogus" else [1]
            return st.sampled_from(known) | _json

        keys = sorted(fields) + ["bogus"]
        fields = {**fields, "bogus": (None, None)}
        return st.lists(st.sampled_from(keys), max_size=3, unique=True).flatmap(
            lambda ks: st.fixed_dictionaries({k: value(k) for k in ks}))

    def attack_fields(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        return {f.name: (f.default if f.default is not dataclasses.MISSING else None, hints.get(f.name))
                for f in dataclasses.fields(cls) if f.init}

    def detector_fields(cls):
        hints = signature_hints(cls.__init__)
        return {p.name: (p.default, hints.get(p.name)) for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind is p.KEYWORD_ONLY}

    names = lambda reg: st.sampled_from(sorted(reg))  # noqa: E731
    # an attack (detector) name with parameters of that attack (detector), or of any, or any JSON
    attack = names(ATTACKS).flatmap(lambda n: st.tuples(st.just(n), params_of(attack_fields(ATTACKS[n]))))
    detector = names(DETECTORS).flatmap(lambda n: st.tuples(st.just(n), params_of(detector_fields(DETECTORS[n]))))
    return {
        "dataset": names(DATASETS) | _json,
        "arch": names(ARCHITECTURES) | _json,
        "attack": names(ATTACKS) | st.none() | _json,
        "detector": names(DETECTORS) | _json,
        "attack+params": attack,
        "detector+params": detector,
    }


_REGISTRY = _registry_strategies()
_CONFIG_VALUES = {
    "dataset": _REGISTRY["dataset"],
    "arch": _REGISTRY["arch"],
    "attack": _REGISTRY["attack"],
    "detector": _REGISTRY["detector"],
    "recipe": st.dictionaries(st.sampled_from(_RECIPE_KEYS), _json, max_size=3) | _json,
    "attack_params": _REGISTRY["attack+params"].map(lambda t: t[1]) | _json,
    "detector_params": _REGISTRY["detector+params"].map(lambda t: t[1]) | _json,
}
_CONFIG_FIELDS = ["dataset", "data_path", "image_size", "arch", "width", "attack", "attack_params", "recipe",
                  "reserved", "calibration", "train_size", "test_size", "detector", "detector_params", "fpr",
                  "asr_bar", "seed", "device", "n_boot", "noisy_clean", "bogus"]


@st.composite
def config_dicts(draw):
    keys = draw(st.lists(st.sampled_from(_CONFIG_FIELDS), max_size=4, unique=True))
    out = {k: draw(_CONFIG_VALUES.get(k, _json)) for k in keys}
    # often a registered attack / detector with its own parameters, so every entry's fields are fuzzed
    for field, key in (("attack", "attack+params"), ("detector", "detector+params")):
        if draw(st.booleans()):
            out[field], out[f"{field}_params"] = draw(_REGISTRY[key])
    return out


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config_dicts())
def test_property_config_validation_raises_only_badexpert_errors(d):
    """Any JSON-shaped config either validates or raises BadExpertError (never anything else)."""
    try:
        ExperimentConfig.from_dict(d).validate()
    except BadExpertError:
        pass



def test_the_config_strategies_reach_every_registry_entry():
    """The property test above draws from the registries: every registered attack and detector is
    drawn, with parameters of its own (a new entry needs no edit here)."""
    from badexpert.attacks import ATTACKS
    from badexpert.detectors import DETECTORS

    seen: dict[str, set] = {"attack+params": set(), "detector+params": set()}

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_REGISTRY["attack+params"], _REGISTRY["detector+params"])
    def draw(attack, detector):
        for key, (name, params) in (("attack+params", attack), ("detector+params", detector)):
            if set(params) - {"bogus"}:
                seen[key].add(name)

    draw()
    assert seen["attack+params"] == set(ATTACKS), set(ATTACKS) - seen["attack+params"]
    assert seen["detector+params"] == set(DETECTORS), set(DETECTORS) - seen["detector+params"]
