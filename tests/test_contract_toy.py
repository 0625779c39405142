"""The closed detector contract, end to end: a detector defined in this file, with its own option
and an exportable score, registered with one registry line, is offered by `defend --help` and
works through `defend`, `compare`, `grid`, `bundle`, the service and `export` (ONNX verified),
without any core module knowing its name."""

import json
import time
import warnings
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from badexpert.cli import main
from badexpert.detectors import DETECTORS, Detector, Option
from badexpert.utils import eval_mode
from badexpert.validation import NonNegativeInt, PositiveFloat, PositiveInt

from .conftest import train_blobs_model


class ToyConfidence(Detector):
    """Toy: the model's confidence in its label, from its logits centred on the clean mean by a
    fitted linear head (a backdoored model is very sure of the target on triggered inputs)."""

    name: ClassVar[str] = "toy_confidence"
    cli_options: ClassVar[tuple[Option, ...]] = (
        Option("--toy-temperature", "temperature", type=float, help="softmax temperature of the toy score"),
    )
    shares_model_pass: ClassVar[bool] = True
    exportable: ClassVar[bool] = True
    submodels: ClassVar[tuple[str, ...]] = ("head_",)

    def __init__(self, *, temperature: PositiveFloat = 1.0, batch_size: PositiveInt = 256, seed: NonNegativeInt = 0,
                 device: str | None = None) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.temperature = temperature

    def _head(self, bias: torch.Tensor) -> nn.Module:
        head = nn.Linear(len(bias), len(bias)).to(self.device_)
        with torch.no_grad():
            head.weight.copy_(torch.eye(len(bias)))
            head.bias.copy_(bias)
        return head.eval()

    def _fit(self, model, images, labels):
        with torch.no_grad(), eval_mode(model):
            logits = torch.cat([model(xb).float() for xb in self._batches(images)])
        self.head_ = self._head(-logits.mean(0))
        self.fit_report_ = {"clean_size": len(images)}

    def score_given_logits(self, xb, logits):
        return torch.softmax(self.head_(logits) / self.temperature, 1).max(1).values

    def _score_batch(self, xb):
        with eval_mode(self.model_):
            return self.score_given_logits(xb, self.model_(xb).float()).cpu()

    def _state_tensors(self):
        return {"head.bias": self.head_.bias.detach()}

    def _state_meta(self):
        return {"fit_report": self.fit_report_}

    def _load_state(self, model, tensors, meta):
        self.head_ = self._head(tensors["head.bias"].to(self.device_))
        self.fit_report_ = meta.get("fit_report") or {}


@pytest.fixture(scope="module")
def toy():
    DETECTORS.add(ToyConfidence.name, ToyConfidence)  # the one registry line
    yield ToyConfidence.name
    DETECTORS.remove(ToyConfidence.name)


RECIPE = {"optimizer": "adam", "lr": 0.003, "epochs": 8, "batch_size": 32, "weight_decay": 0, "augment": False}


@pytest.fixture(scope="module")
def made(toy, tmp_path_factory):
    """A backdoored model file on the tiny ImageFolder, and the toy detector defended on it."""
    root = tmp_path_factory.mktemp("toy")
    data, model = train_blobs_model(root)
    det = root / "toy.safetensors"
    assert main(["defend", "--model", str(model), "--method", toy, "--toy-temperature", "2", "--fpr", "0.05",
                 "--device", "cpu", "--out", str(det)]) == 0
    return root, data, model, det


def test_the_toy_detector_offers_its_option(toy, capsys):
    for command in ("defend", "compare"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert f"{toy} options" in out and "--toy-temperature" in out and "softmax temperature" in out
        assert "badexpert options" in out and "--preset" in out  # every detector's, grouped by detector
    # another detector's option: one line naming the detector it belongs to
    assert main(["defend", "--model", "m.safetensors", "--method", "strip", "--toy-temperature", "2",
                 "--out", "d.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "--toy-temperature is a ToyConfidence option (--method toy_confidence)" in err and err.count("\n") == 1


def test_defend_compare_grid_bundle_serve_export(toy, made, tmp_path, capsys):
    from badexpert.detectors import read_detector_file

    root, data, model, det = made
    _, meta = read_detector_file(det)
    assert meta["detector"] == toy and meta["params"]["temperature"] == 2.0
    assert meta["state"]["fit_report"] == {"clean_size": 80}

    # compare, with the option and --detector-param both reaching the detector
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(model), "--detectors", toy, "--toy-temperature", "3", "--fpr", "0.05",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert toy in capsys.readouterr().out
    text = (out / "compare.json").read_text()
    assert toy in text and '"temperature": 3.0' in text and '"clean_size": 80' in text  # the fit report, too

    # grid: the toy named in a config, as any registered detector
    grid = {"datasets": [{"name": "imagefolder", "label": "blobs", "data_path": str(data)}],
            "architectures": [{"arch": "cnn", "width": 8}],
            "attacks": [{"name": "badnet", "params": {"poison_rate": 0.1}}],
            "detectors": [{"name": toy, "params": {"temperature": 2.0}}], "seeds": [0], "recipe": RECIPE,
            "reserved": 80, "calibration": 80, "fpr": 0.05, "n_boot": 20, "device": "cpu"}
    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps(grid))
    assert main(["grid", "--config", str(cfg), "--out", str(tmp_path / "grid")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "grid" / "results.jsonl").read_text().splitlines()]
    assert [r["detector"] for r in rows] == [toy]
    capsys.readouterr()

    # bundle, then the service (in process) and the ONNX export from the same bundle
    bundle = tmp_path / "toy.bundle.safetensors"
    assert main(["bundle", "--model", str(model), "--detector", str(det), "--out", str(bundle)]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette 1.x: "install httpx2" (TestClient still uses httpx)
        from fastapi.testclient import TestClient

    from badexpert import load_bundle
    from badexpert.serve import create_app, load_service_model

    guard = load_bundle(bundle)
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in sorted((data / "test").rglob("*.png"))[:16]]))
    x = x[:, None]
    eager = guard(x)
    with TestClient(create_app(load_service_model(str(bundle)))) as c:
        deadline = time.monotonic() + 20
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.01)
        r = c.post("/v1/classify", json={"inputs": x.tolist(), "dtype": "uint8"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [v["label"] for v in results] == eager.label.tolist()
    assert [v["reject"] for v in results] == eager.reject.tolist()
    np.testing.assert_allclose([v["score"] for v in results], eager.score.numpy(), rtol=1e-5)

    pytest.importorskip("onnxruntime")
    from badexpert.runtime.onnx import OnnxGuard

    onnx = tmp_path / "toy.onnx"
    assert main(["export", str(bundle), "--onnx", str(onnx)]) == 0  # verified against the eager guard first
    assert "verified on" in capsys.readouterr().out
    g = OnnxGuard(onnx)
    assert g.score_rule == toy and g.threshold == guard.detector.threshold_
    got = g(x.numpy())
    assert np.array_equal(got["label"], eager.label.numpy()) and np.array_equal(got["reject"], eager.reject.numpy())
    np.testing.assert_allclose(got["score"], eager.score.numpy(), rtol=1e-4, atol=1e-4)


def test_a_detector_without_the_capability_is_refused_by_it(toy, made, tmp_path, capsys):
    """Export asks the capability, not the class: the same toy declared non-exportable is refused."""
    root, data, model, det = made
    bundle = tmp_path / "b.safetensors"
    assert main(["bundle", "--model", str(model), "--detector", str(det), "--out", str(bundle)]) == 0
    pytest.importorskip("onnxruntime")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ToyConfidence, "exportable", False)
        assert main(["export", str(bundle), "--onnx", str(tmp_path / "g.onnx")]) == 2
    err = capsys.readouterr().err
    assert "detector 'toy_confidence' cannot be exported" in err and err.count("\n") == 1
    assert not (tmp_path / "g.onnx").exists()


def test_an_incomplete_detector_is_one_line(toy):
    from badexpert.errors import BadExpertError

    class Half(Detector):
        name: ClassVar[str] = "half"

        def _fit(self, model, images, labels):
            pass

    with pytest.raises(BadExpertError, match="does not implement _score_batch"):
        Half()
    with pytest.raises(TypeError, match="constructor parameter"):
        type("Bad", (ToyConfidence,), {"cli_options": (Option("--x", "nope"),)})


def test_two_detectors_declaring_one_flag_are_one_line(toy, capsys):
    DETECTORS.add("toy_twin", type("Twin", (ToyConfidence,), {"name": "toy_twin"}))
    try:
        assert main(["defend", "--help"]) == 2
    finally:
        DETECTORS.remove("toy_twin")
    err = capsys.readouterr().err
    assert "detectors 'toy_confidence' and 'toy_twin' both declare the option --toy-temperature" in err
    assert err.count("\n") == 1
