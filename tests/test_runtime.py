"""The torch-free runtime and the service's one-of-each rules: one reasons rule, one p-value
function, one JSON policy, serve options generated from the service settings, the metrics text."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from badexpert.deploy.guard import conformal_p_values as torch_p_values
from badexpert.jsonable import finite_or_none, to_jsonable
from badexpert.runtime import (ACCEPTED, REJECT_NONFINITE_INPUT, REJECT_NONFINITE_SCORE, REJECT_SCORE,
                               conformal_p_values, reject_reasons, sorted_calibration)
from badexpert.runtime.reasons import nonfinite_inputs


def test_one_reasons_rule():
    nan = float("nan")
    reject = [False, True, True, True]
    score = [0.1, 2.0, nan, nan]
    assert reject_reasons(reject, score) == [ACCEPTED, REJECT_SCORE, REJECT_NONFINITE_SCORE, REJECT_NONFINITE_SCORE]
    assert reject_reasons(np.array(reject), np.array(score, np.float32), [False, False, False, True]) == \
        [ACCEPTED, REJECT_SCORE, REJECT_NONFINITE_SCORE, REJECT_NONFINITE_INPUT]
    assert reject_reasons(torch.tensor(reject), torch.tensor(score), torch.tensor([True, False, False, False]))[0] == \
        REJECT_NONFINITE_INPUT
    assert reject_reasons([], []) == []
    with pytest.raises(ValueError):
        reject_reasons([True], [1.0, 2.0])
    x = np.zeros((3, 1, 2, 2), np.float32)
    x[1, 0, 1, 1] = np.inf
    x[2, 0, 0, 0] = np.nan
    assert nonfinite_inputs(x).tolist() == [False, True, True]
    assert nonfinite_inputs(np.zeros((3, 1, 2, 2), np.uint8)).tolist() == [False] * 3 and len(nonfinite_inputs(x[:0])) == 0


def test_one_p_value_function_for_numpy_and_torch():
    rng = np.random.default_rng(0)
    cal = rng.normal(size=101)
    cal[:10] = cal[10]  # ties
    scores = np.concatenate([rng.normal(size=50), cal[:20], [np.nan, np.inf, -np.inf, cal.max() + 1]])
    p = conformal_p_values(scores, sorted_calibration(cal))
    # the formula, by hand
    ref = np.array([0.0 if math.isnan(s) else (1 + (cal >= np.nan_to_num(s)).sum()) / (len(cal) + 1) for s in scores])
    np.testing.assert_array_equal(p, ref.astype(np.float32))
    assert p.dtype == np.float32 and p[-4] == 0 and p[-1] == pytest.approx(1 / 102)
    t = torch_p_values(torch.from_numpy(scores).float(), torch.from_numpy(cal).float())
    assert t.dtype == torch.float32
    np.testing.assert_array_equal(t.numpy(), conformal_p_values(scores.astype(np.float32),
                                                                sorted_calibration(cal.astype(np.float32))))


def test_one_json_policy():
    doc = {"a": float("inf"), "b": -float("inf"), "c": float("nan"), "d": np.float32(0.5), "e": np.int64(3),
           "f": torch.tensor([1.0, float("inf")]), "g": np.array([np.nan, 2.0]), "h": (Path("x"), 1), 4: "k"}
    assert to_jsonable(doc) == {"a": None, "b": None, "c": None, "d": 0.5, "e": 3, "f": [1.0, None],
                                "g": [None, 2.0], "h": ["x", 1], "4": "k"}
    json.dumps(to_jsonable(doc), allow_nan=False)
    assert finite_or_none(np.float32("inf")) is None and finite_or_none(2) == 2.0
    from badexpert.utils import to_jsonable as from_utils
    from badexpert.serve.codecs import json_bytes

    assert from_utils is to_jsonable
    assert json.loads(json_bytes({"score": float("nan"), "p": [np.float32(0.25)]})) == {"score": None, "p": [0.25]}


def test_serve_options_come_from_the_settings():
    from badexpert.cli import build_parser
    from badexpert.serve import Settings

    parser = build_parser()
    args = parser.parse_args(["serve", "b.safetensors"])
    assert Settings.from_namespace(args) == Settings()  # every default lives in Settings only
    serve_parser = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("serve"))
    options = {a.dest: a for a in serve_parser._actions}
    for f in dataclasses.fields(Settings):
        assert f.name in options and f.metadata["help"]
        assert options[f.name].option_strings == ["--" + f.name.replace("_", "-")]
    assert options["on_reject"].choices == ("flag", "abstain")
    args = parser.parse_args(["serve", "b.safetensors", "--max-batch", "8", "--strict-size", "--drift-rate", "0.1",
                              "--on-reject", "abstain", "--batch-wait-ms", "0"])
    s = Settings.from_namespace(args)
    assert (s.max_batch, s.strict_size, s.drift_rate, s.on_reject, s.batch_wait_ms) == (8, True, 0.1, "abstain", 0.0)
    assert isinstance(s.max_batch, int) and isinstance(s.batch_wait_ms, float)
    text = " ".join(serve_parser.format_help().split())
    assert "(default 16; 413 above)" in text and "(default 0.001)" in text


def test_check_output_fills_reasons_by_the_guard_rule():
    from badexpert.serve import check_output

    x = np.zeros((3, 1, 2, 2), np.float32)
    x[2, 0, 0, 0] = np.nan
    out = {"label": [0, 1, 1], "confidence": [1, 1, np.nan], "score": [0.1, 5.0, np.nan],
           "p_value": [0.5, 0.01, 0.0], "reject": [False, True, True]}
    assert check_output(out, 3, x)["reason"] == [ACCEPTED, REJECT_SCORE, REJECT_NONFINITE_INPUT]
    assert check_output(out, 3)["reason"][2] == REJECT_NONFINITE_SCORE
    assert check_output({**out, "reason": ["a", "b", "c"]}, 3, x)["reason"] == ["a", "b", "c"]


def test_metrics_text_by_prometheus_client():
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from badexpert.serve import DriftMonitor, Metrics

    m = Metrics()
    m.observe_served(3, 1, 0.004)
    m.observe_served(1, 0, 2.0)
    m.bad(413)
    text = m.render(ready=True, queued=2, drift=DriftMonitor(None), model_info={"kind": "test", "arch": None})
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("badexpert_requests_total", ())] == 2 and samples[("badexpert_inputs_total", ())] == 4
    assert samples[("badexpert_bad_requests_total", (("status", "413"),))] == 1
    assert samples[("badexpert_request_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("badexpert_request_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("badexpert_request_latency_seconds_count", ())] == 2
    assert math.isnan(samples[("badexpert_drift_reference_rate", ())])
    assert samples[("badexpert_info", (("kind", "test"),))] == 1 and samples[("badexpert_queue_inputs", ())] == 2
    assert not any(name.endswith("_created") for name, _ in samples)


def test_runtime_and_service_import_without_torch():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
import numpy as np
import badexpert.runtime, badexpert.serve, badexpert.deploy.export
from badexpert.runtime import conformal_p_values, reject_reasons, sorted_calibration
from badexpert.jsonable import to_jsonable
assert reject_reasons([True], [float('nan')]) == ['score is not a number (the models produced NaN)']
assert abs(conformal_p_values([0.5], sorted_calibration([0.0, 1.0]))[0] - 2 / 3) < 1e-6
assert to_jsonable({"x": np.float32('inf')}) == {"x": None}
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
