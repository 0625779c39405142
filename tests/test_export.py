"""ONNX export of a deployment bundle: one graph that agrees with the eager guard (logodds and
triangle rules, clean and triggered inputs, non-finite pixels, dynamic batch), OnnxGuard's
conversion rule, running without PyTorch, and the CLI's refusals."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from badexpert import BaDExpert, load_bundle, save_bundle  # noqa: E402
from badexpert.cli import main  # noqa: E402
from badexpert.errors import BadExpertError  # noqa: E402
from badexpert.deploy.export import build_onnx, export_bundle, verify_onnx  # noqa: E402
from badexpert.runtime.onnx import ONNX_FORMAT, OnnxGuard  # noqa: E402

META = {"arch": "cnn", "width": 8, "in_channels": 1, "num_classes": 4, "image_size": [12, 12],
        "classes": ["c0", "c1", "c2", "c3"]}
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def exported(backdoored, tmp_path_factory):
    """Bundles and verified ONNX files for a logodds detector and a triangle copy of it
    (recalibrated on the same clean split), with clean and triggered test inputs."""
    model, attack, tr, te = backdoored
    reserved, calib, test = te.subset(range(0, 800)), te.subset(range(800, 1600)), te.subset(range(1600, 2400))
    det = BaDExpert(expert_lr=1e-2, aux_lr=0.1, aux_epochs=4, seed=0).fit(model, reserved).calibrate(calib, fpr=0.05)
    tri = copy.deepcopy(det)
    tri.score_rule = "triangle"
    tri.calibrate(calib, fpr=0.05)
    meta = {**META, "mean": list(tr.mean), "std": list(tr.std)}
    root = tmp_path_factory.mktemp("export")
    out = {}
    for rule, d in (("logodds", det), ("triangle", tri)):
        bundle = save_bundle(root / f"{rule}.safetensors", model, d, meta)
        onnx_path = root / f"{rule}.onnx"
        report = export_bundle(bundle, onnx_path)
        out[rule] = {"bundle": bundle, "onnx": onnx_path, "report": report, "guard": load_bundle(bundle)}
    mask = attack.counts(test.labels)
    trig = (attack.apply(test.images[mask]) * 255).round().to(torch.uint8)
    return out, test.images.numpy(), trig.numpy(), root


def _compare(a: dict, b, *, n_cal: int):
    """OnnxGuard output ``a`` against eager GuardOutput ``b``."""
    assert np.array_equal(a["label"], b.label.numpy())
    assert np.array_equal(a["reject"], b.reject.numpy())
    assert np.array_equal(np.isnan(a["score"]), np.isnan(b.score.numpy()))
    ok = ~np.isnan(a["score"])
    np.testing.assert_allclose(a["score"][ok], b.score.numpy()[ok], rtol=1e-4, atol=1e-4)
    ok = ~np.isnan(a["confidence"])
    np.testing.assert_allclose(a["confidence"][ok], b.confidence.numpy()[ok], atol=1e-5)
    # p-values are the same formula on nearly the same scores: at most one calibration score apart
    assert np.abs(a["p_value"] - b.p_value.numpy()).max() <= 1.5 / (n_cal + 1)
    assert a["label"].dtype == np.int64 and a["reject"].dtype == np.bool_
    assert a["score"].dtype == a["confidence"].dtype == a["p_value"].dtype == np.float32


@pytest.mark.parametrize("rule", ["logodds", "triangle"])
def test_onnx_guard_equals_the_eager_guard(exported, rule):
    out, clean, trig, _ = exported
    e = out[rule]
    rep = e["report"]
    assert e["onnx"].is_file() and rep["score_rule"] == rule
    assert rep["verification"]["label_mismatches"] == rep["verification"]["reject_mismatches"] == 0
    assert rep["verification"]["scores_out_of_tolerance"] == rep["verification"]["nan_mismatches"] == 0
    assert rep["verification"]["max_rel_score_diff"] < 1e-3  # triangle scores reach 1e8 (x clamped at 1e-8)
    g, guard = OnnxGuard(e["onnx"]), e["guard"]
    assert g.score_rule == rule and g.input_shape == (1, 12, 12) and g.classes == META["classes"]
    assert g.threshold == guard.detector.threshold_ and g.fpr_target == 0.05
    assert g.clean_rejection_rate == guard.detector.clean_rejection_rate_  # the service's drift reference
    n_cal = len(g.calibration_scores)
    for x in (clean[:400], trig[:200]):  # uint8
        _compare(g(x), guard(torch.from_numpy(x)), n_cal=n_cal)
    xf = (trig[:100].astype(np.float32) / 255)  # float in [0, 1]
    _compare(g(xf), guard(torch.from_numpy(xf)), n_cal=n_cal)
    # the detector works through the graph: triggered inputs rejected, clean ones mostly accepted
    assert g(trig)["reject"].mean() > 0.9 and g(clean[:400])["reject"].mean() < 0.15


def test_metadata_records_the_guard(exported):
    import onnx

    e = exported[0]["logodds"]
    proto = onnx.load(str(e["onnx"]))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["badexpert"])
    det = e["guard"].detector
    assert meta["format"] == ONNX_FORMAT and meta["input_shape"] == [1, 12, 12]
    assert meta["threshold"] == det.threshold_ and meta["fpr_target"] == det.fpr_target_
    assert meta["model_fingerprint"] == det.model_fingerprint_ and meta["classes"] == META["classes"]
    assert np.array_equal(np.asarray(meta["calibration_scores"], np.float32), det.calibration_scores_.numpy())
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["label", "confidence", "score", "reject"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_nonfinite_pixels_are_rejected_unscored(exported):
    out, clean, trig, _ = exported
    g = OnnxGuard(out["logodds"]["onnx"])
    x = clean[:6].astype(np.float32) / 255
    x[0, 0, 0, 0] = np.nan
    x[1, 0, 5, 5] = np.inf
    x[2, 0, 3, 3] = -np.inf
    x[3] = np.nan
    r = g(x)
    assert r["reject"][:4].all() and np.isnan(r["score"][:4]).all() and (r["p_value"][:4] == 0).all()
    assert np.isnan(r["confidence"][:4]).all()
    alone = g(x[4:])  # the hostile images do not disturb the others
    assert np.array_equal(alone["score"], r["score"][4:]) and np.array_equal(alone["reject"], r["reject"][4:])
    _compare(r, out["logodds"]["guard"](torch.from_numpy(x)), n_cal=len(g.calibration_scores))
    # the same through the raw graph, without OnnxGuard's checks
    raw = g.session.run(None, {"images": x})
    assert raw[3][:4].all() and np.isnan(raw[2][:4]).all()


def test_conversion_rule(exported):
    out, clean, trig, _ = exported
    g = OnnxGuard(out["logodds"]["onnx"])
    x = trig[:8]
    as_u8, as_float = g(x), g(x.astype(np.float32) / 255)
    assert np.array_equal(as_u8["label"], as_float["label"]) and np.array_equal(as_u8["score"], as_float["score"])
    assert np.array_equal(g(x.astype(np.float64) / 255)["reject"], as_u8["reject"])
    with pytest.raises(BadExpertError, match="divide by 255") as info:
        g(x.astype(np.float32))  # float in [0, 255]
    assert "\n" not in str(info.value)
    for bad in (x.astype(np.int64), x > 100, x.astype(np.int32)):
        with pytest.raises(BadExpertError, match="uint8"):
            g(bad)
    with pytest.raises(BadExpertError, match=r"\[N, C, H, W\]"):
        g(x[0])
    with pytest.raises(BadExpertError, match="shape"):
        g(np.zeros((2, 1, 28, 28), np.uint8))
    edge = x.astype(np.float32) / 255
    edge[:, 0, 0, 0] = 1.0005  # within the package's tolerance: clipped, as the eager guard does
    _compare(g(edge), out["logodds"]["guard"](torch.from_numpy(edge)), n_cal=len(g.calibration_scores))
    from badexpert.data.core import IMAGE_TOLERANCE
    from badexpert.runtime.arrays import IMAGE_TOLERANCE as MINE
    assert MINE == IMAGE_TOLERANCE
    assert {k: v.shape for k, v in g(x[:0]).items()} == {k: (0,) for k in ("label", "confidence", "score", "p_value",
                                                                          "reject")}


@pytest.mark.parametrize("n", [1, 37])
def test_dynamic_batch(exported, n):
    out, clean, _, _ = exported
    e = out["logodds"]
    x = clean[100 : 100 + n]
    for g in (OnnxGuard(e["onnx"]), OnnxGuard(e["onnx"], batch_size=16, intra_op_threads=1)):
        r = g(x)
        assert r["label"].shape == (n,)
        _compare(r, e["guard"](torch.from_numpy(x)), n_cal=len(g.calibration_scores))


def test_verification_refuses_a_disagreeing_graph(exported):
    out, _, _, _ = exported
    guard = out["logodds"]["guard"]
    data = out["logodds"]["onnx"].read_bytes()
    assert verify_onnx(data, guard)["inputs"] > 100
    other = copy.copy(guard.detector)
    scores = np.sort(other.calibration_scores_.numpy())
    other.threshold_ = float(scores[len(scores) // 2])  # a calibration score that rejects half the clean inputs
    wrong = copy.copy(guard)
    wrong.detector = other
    with pytest.raises(BadExpertError, match="disagrees with the eager guard.*nothing was written"):
        verify_onnx(build_onnx(wrong), guard)


def test_cli_export_and_refusals(exported, tmp_path, capsys, monkeypatch):
    out, _, _, _ = exported
    bundle = out["logodds"]["bundle"]
    dest = tmp_path / "g.onnx"
    assert main(["export", str(bundle), "--onnx", str(dest), "--opset", "18"]) == 0
    import onnx

    assert "verified on" in capsys.readouterr().out
    assert {o.version for o in onnx.load(str(dest)).opset_import if o.domain in ("", "ai.onnx")} == {18}
    before = dest.read_bytes()
    # an existing file without --overwrite
    assert main(["export", str(bundle), "--onnx", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1 and dest.read_bytes() == before
    # a tampered bundle: one line, nothing written
    data = bytearray(Path(bundle).read_bytes())
    data[-100] ^= 0xFF
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(bytes(data))
    target = tmp_path / "evil.onnx"
    assert main(["export", str(evil), "--onnx", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("badexpert: error:") and err.count("\n") == 1 and not target.exists()
    # bad options
    for args in (["--opset", "7"], ["--opset", "99"]):
        assert main(["export", str(bundle), "--onnx", str(target), *args]) == 2
        assert "--opset" in capsys.readouterr().err and not target.exists()
    assert main(["export", str(bundle), "--onnx", str(tmp_path / "g.txt")]) == 2
    assert ".onnx" in capsys.readouterr().err
    # a graph that fails verification is not written
    monkeypatch.setattr("badexpert.deploy.export.SCORE_ATOL", -1.0)
    assert main(["export", str(bundle), "--onnx", str(target)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("badexpert: error:")]
    assert len(errors) == 1 and "disagrees" in errors[0] and err.endswith(errors[0] + "\n") and not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_onnx_guard_refuses_files_that_are_not_guards(exported, tmp_path):
    with pytest.raises(BadExpertError, match="does not exist"):
        OnnxGuard(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(BadExpertError, match="cannot be loaded") as info:
        OnnxGuard(junk)
    assert "\n" not in str(info.value)
    from badexpert.deploy.export import export_model_onnx

    model = exported[0]["logodds"]["guard"].model
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(export_model_onnx(model, (1, 12, 12)))
    with pytest.raises(BadExpertError, match="not a badexpert ONNX guard"):
        OnnxGuard(bare)


def test_onnx_guard_checks_its_clean_rejection_rate(exported, tmp_path):
    """The drift reference recorded in the file: refused when out of range, the FPR target when
    absent (files exported before it was recorded)."""
    import onnx

    src = exported[0]["logodds"]["onnx"]

    def with_rate(value, name):
        proto = onnx.load(str(src))
        prop = next(p for p in proto.metadata_props if p.key == "badexpert")
        meta = json.loads(prop.value)
        if value is None:
            del meta["clean_rejection_rate"]
        else:
            meta["clean_rejection_rate"] = value
        prop.value = json.dumps(meta)
        onnx.save(proto, str(tmp_path / name))
        return tmp_path / name

    for value in (1.5, -0.1, "high", True):
        with pytest.raises(BadExpertError, match="field 'clean_rejection_rate'") as info:
            OnnxGuard(with_rate(value, "bad.onnx"))
        assert "\n" not in str(info.value)
    assert OnnxGuard(with_rate(None, "old.onnx")).clean_rejection_rate == 0.05


_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, _Block())
sys.path.insert(0, {src!r})
"""


def _python(code: str, blocked: set[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = _BLOCK.format(blocked=sorted(blocked), src=SRC) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)


def test_onnx_guard_runs_without_torch(exported):
    out, clean, _, root = exported
    e = out["logodds"]
    x = clean[:20]
    expected = OnnxGuard(e["onnx"])(x)
    np.save(root / "x.npy", x)
    probe = _python("import badexpert", {"torch"})
    if probe.returncode != 0:
        pytest.skip("badexpert/__init__.py imports torch eagerly; OnnxGuard needs the lazy (PEP 562) package "
                    f"__init__: {probe.stderr.strip().splitlines()[-1]}")
    res = _python(f"""
        import json, numpy as np
        from badexpert.runtime.onnx import OnnxGuard
        g = OnnxGuard({str(e['onnx'])!r})
        r = g(np.load({str(root / 'x.npy')!r}))
        assert 'torch' not in sys.modules, 'torch was imported'
        print(json.dumps({{k: v.tolist() for k, v in r.items()}}))
    """, {"torch"})
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["label"] == expected["label"].tolist() and got["reject"] == expected["reject"].tolist()
    assert np.array_equal(np.asarray(got["score"], np.float32), expected["score"])


def test_missing_onnx_is_one_line_naming_the_extra(exported, tmp_path):
    bundle = exported[0]["logodds"]["bundle"]
    res = _python(f"""
        import badexpert, badexpert.deploy.guard  # the core package imports without onnx / onnxruntime
        from badexpert.cli import main
        sys.exit(main(["export", {str(bundle)!r}, "--onnx", {str(tmp_path / 'x.onnx')!r}]))
    """, {"onnx", "onnxruntime"})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'badexpert[export]'" in lines[0], res.stderr
    assert not (tmp_path / "x.onnx").exists()
    res = _python("""
        from badexpert.runtime.onnx import OnnxGuard
        try:
            OnnxGuard("x.onnx")
        except Exception as exc:
            print(type(exc).__name__, exc)
    """, {"onnx", "onnxruntime"})
    assert "BadExpertError" in res.stdout and "badexpert[export]" in res.stdout, res.stdout + res.stderr
