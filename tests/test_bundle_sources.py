"""Every model source through the whole deployment path: a badexpert checkpoint, an ONNX file, a
user's factory and (when transformers is installed) a tiny Hugging Face ResNet and ViT trained here
with a planted BadNet backdoor, each defended on a clean folder (``defend --clean``), evaluated on
its held-out part under the trigger (the backdoor really detected), bundled, loaded, served over
both protocols (triggered inputs rejected) and exported; and the refusals (a factory bundle never
imports its factory unless allowed; a tampered ONNX payload fails its digest)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from badexpert.cli import main
from badexpert.errors import BadExpertError

from .conftest import service_client
from .test_clean_data import blobs_model  # noqa: F401 - the module-scoped fixture

FACTORY = "tests.factory_models:blobs_cnn"


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _inputs(clean) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean images of the clean set with a few noise images, and clean images of the non-target
    classes with the planted BadNet trigger (uint8)."""
    from badexpert.attacks import get_attack
    from badexpert.data.clean import read_clean_set

    ds = read_clean_set(clean, num_classes=4, image_size=(12, 12), in_channels=1, classes=[f"c{k}" for k in range(4)])
    g = torch.Generator().manual_seed(1)
    noise = (torch.rand(8, 1, 12, 12, generator=g) * 255).round().to(torch.uint8)
    others = ds.images[ds.labels != 0][::7][:24]
    trig = (get_attack("badnet").apply(others) * 255).round().to(torch.uint8)
    return torch.cat([ds.images[::10][:32], noise]), trig


def _same(a, b) -> None:
    assert torch.equal(a.label, b.label) and torch.equal(a.reject, b.reject)
    assert torch.allclose(a.score, b.score, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.allclose(a.confidence, b.confidence, atol=1e-6, equal_nan=True)
    assert a.reason == b.reason


def _pipeline(tmp_path, capsys, source_args: list[str], clean, *, allow: list[str] = (), exportable: bool = True,
              extra_defend: list[str] = (), attack: list[str] = ("--attack", "badnet")):
    """defend --clean (80 images held out) -> evaluate (on them, under the planted trigger: the
    backdoor is detected) -> bundle -> load_bundle (= the eager guard) -> serve (/v1/classify and
    the inference protocol's /v2/models/guard/infer: = its answers, triggered inputs rejected) ->
    export (verified, = its answers). Returns the bundle's path."""
    from badexpert.detectors import load_detector
    from badexpert.deploy.guard import Guard, load_bundle
    from badexpert.io import load_model

    det_path, bundle, report = tmp_path / "det.safetensors", tmp_path / "guard.safetensors", tmp_path / "eval"
    capsys.readouterr()
    assert main(["defend", *source_args, "--clean", str(clean), "--holdout", "80", "--fpr", "0.05", "--device", "cpu",
                 "--out", str(det_path), *extra_defend]) == 0, capsys.readouterr().err
    assert main(["evaluate", *source_args, "--detector", str(det_path), *attack, "--n-boot", "0", "--device", "cpu",
                 "--out", str(report)]) == 0, capsys.readouterr().err
    m = json.loads((report / "metrics.json").read_text())
    assert m["dataset"]["splits"] == {"train": 0, "reserved": 120, "calibration": 120, "test": 80}
    assert m["attack"]["name"] == "badnet" and m["attack_success_rate"] > 0.8 and m["clean_accuracy"] > 0.9
    d = m["defense"]
    assert d["auroc"] > 0.95 and d["tpr"] > 0.8 and d["realized_fpr"] < 0.2 and d["attack_success_rate"] < 0.2
    assert "AUROC" in (report / "report.md").read_text()
    assert main(["bundle", *source_args, "--detector", str(det_path), "--out", str(bundle)]) == 0, \
        capsys.readouterr().err
    # the eager guard, from the model loaded as defend loaded it
    opts = dict(zip(source_args[0::2], source_args[1::2]))
    model, meta = load_model(opts["--model"], mean=opts.get("--mean"), std=opts.get("--std"),
                             classes=opts.get("--classes"), weights=opts.get("--weights"),
                             kwargs=opts.get("--factory-kwargs"), image_size=opts.get("--image-size"))
    eager = Guard(model, load_detector(det_path, model), meta=meta)
    guard = load_bundle(bundle, allow_factories=list(allow))
    assert guard.meta["arch"] == (meta.get("source") or {"kind": meta["arch"]})["kind"]
    assert guard.classes == meta["classes"]
    clean_x, trig = _inputs(clean)
    x = torch.cat([clean_x, trig])
    _same(guard(x), eager(x))
    # serve: the same answers over HTTP, both protocols; the planted trigger is turned away
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from badexpert.serve import load_service_model

    expected = eager(x)
    with service_client(load_service_model(str(bundle), allow_factories=list(allow)), "/v2/health/ready",
                        name="guard") as c:
        r = c.post("/v1/classify", json={"inputs": x.tolist(), "dtype": "uint8"})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        r = c.post("/v2/models/guard/infer", json={"inputs": [{"name": "images", "shape": list(x.shape),
                                                               "datatype": "UINT8", "data": x.flatten().tolist()}]})
        assert r.status_code == 200, r.text
        oip = {o["name"]: o["data"] for o in r.json()["outputs"]}
    assert [o["label"] for o in results] == expected.label.tolist() == oip["label"]
    assert [o["reject"] for o in results] == expected.reject.tolist() == oip["reject"]
    assert np.allclose([o["score"] for o in results], expected.score.numpy(), rtol=1e-5, atol=1e-6)
    rejected = np.array(oip["reject"])
    assert rejected[len(clean_x):].mean() >= 0.8 and rejected[:32].mean() <= 0.2
    # export: verified against the eager guard, or refused in one line with nothing written
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "guard.onnx"
    argv = ["export", str(bundle), "--onnx", str(onnx_path), *sum((["--allow-factory", a] for a in allow), [])]
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    if exportable:
        assert rc == 0, err
        from badexpert.runtime.onnx import OnnxGuard

        ours = OnnxGuard(onnx_path, intra_op_threads=1)(x.numpy())
        assert ours["label"].tolist() == expected.label.tolist()
        assert ours["reject"].tolist() == expected.reject.tolist()
    else:
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "nothing was written" in err
        assert not onnx_path.exists()
    return bundle


def test_a_badexpert_checkpoint_goes_through_with_its_recorded_attack(blobs_model, tmp_path, capsys):  # noqa: F811
    root, model_path, clean = blobs_model
    _pipeline(tmp_path, capsys, ["--model", str(model_path)], clean, attack=[])


def test_an_onnx_model_bundles_serves_and_exports(blobs_model, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("onnxruntime")
    from badexpert.deploy.guard import _checksum, read_bundle
    from badexpert.io import load_model

    root, model_path, clean = blobs_model
    model, meta = load_model(model_path)
    onnx_path = tmp_path / "theirs.onnx"
    # exported as torch does without constant folding: the BatchNormalization nodes stay, and the
    # finetuned copies must treat them as torch's BatchNorm does for BaDExpert to work as on the original
    torch.onnx.export(model, torch.rand(2, 1, 12, 12), str(onnx_path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False,
                      do_constant_folding=False)
    src = ["--model", str(onnx_path), "--mean", "0", "--std", "1", "--classes", ",".join(meta["classes"])]
    bundle = _pipeline(tmp_path, capsys, src, clean)
    bmeta, tensors = read_bundle(bundle)
    assert bmeta["format"] == "badexpert-bundle/2" and bmeta["model"]["source"]["kind"] == "onnx"
    assert tensors["source.onnx"].dtype == torch.uint8
    assert bytes(tensors["source.onnx"].numpy()) == onnx_path.read_bytes()
    # the bundle stands alone: the original file may be gone
    onnx_path.unlink()
    assert main(["info", str(bundle)]) == 0
    # a tampered ONNX payload, checksum recomputed: the digest catches it, in one line
    from safetensors.torch import save_file

    payload = tensors["source.onnx"].clone()
    payload[-1] ^= 1
    tensors = {**tensors, "source.onnx": payload}
    bmeta["checksum"] = _checksum(bmeta, tensors)
    bad = tmp_path / "tampered.safetensors"
    save_file(tensors, str(bad), metadata={"badexpert": json.dumps(bmeta)})
    msg = _one_line_error(capsys, ["export", str(bad), "--onnx", str(tmp_path / "x.onnx")])
    assert "ONNX model does not match the sha256 recorded with it" in msg
    # ... and without a new checksum, the checksum does
    save_file({**read_bundle(bundle)[1], "source.onnx": payload}, str(bad),
              metadata={"badexpert": json.dumps(read_bundle(bundle)[0])})
    assert "fails its checksum" in _one_line_error(capsys, ["info", str(bad)])


def test_a_factory_model_bundles_serves_and_exports_only_when_allowed(blobs_model, tmp_path, capsys,  # noqa: F811
                                                                     monkeypatch):
    from safetensors.torch import save_file

    from badexpert.deploy.guard import load_bundle
    from badexpert.io import load_model

    root, model_path, clean = blobs_model
    model, meta = load_model(model_path)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    src = ["--model", FACTORY, "--weights", str(weights), "--factory-kwargs", '{"width": 8}', "--mean", "0",
           "--std", "1", "--image-size", "12", "--classes", ",".join(meta["classes"])]
    bundle = _pipeline(tmp_path, capsys, src, clean, allow=[FACTORY], extra_defend=[])
    # without --allow-factory: one line naming the factory and the option, exit 2, nothing imported
    monkeypatch.delitem(sys.modules, "tests.factory_models", raising=False)
    for argv in (["export", str(bundle), "--onnx", str(tmp_path / "no.onnx")],
                 ["serve", str(bundle), "--port", "0"],
                 ["export", str(bundle), "--onnx", str(tmp_path / "no.onnx"), "--allow-factory", "other.mod:fn"]):
        if argv[0] == "serve":
            pytest.importorskip("fastapi")
            pytest.importorskip("uvicorn")
        msg = _one_line_error(capsys, argv)
        assert f"factory '{FACTORY}'" in msg and f"--allow-factory {FACTORY}" in msg
        assert "tests.factory_models" not in sys.modules
        assert not (tmp_path / "no.onnx").exists()
    with pytest.raises(BadExpertError, match=r"allow_factories=\['tests.factory_models:blobs_cnn'\]"):
        load_bundle(bundle)
    assert "tests.factory_models" not in sys.modules
    assert main(["info", str(bundle)]) == 0  # reading the metadata imports nothing
    assert "tests.factory_models" not in sys.modules


def _trained_hf(kind: str, data, tmp_path):
    """A tiny Hugging Face classifier (random config) trained on the blobs ImageFolder's train/
    split poisoned by a BadNet patch (target c0, 10%), saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    from badexpert.attacks import get_attack
    from badexpert.data.clean import read_clean_set
    from badexpert.utils import derive_generator

    classes = [f"c{k}" for k in range(4)]
    ds = read_clean_set(data / "train", num_classes=4, image_size=(12, 12), in_channels=1, classes=classes)
    ds = get_attack("badnet", poison_rate=0.1).poison(ds, derive_generator(0, "poison"))
    torch.manual_seed(0)
    labels = dict(num_labels=4, id2label=dict(enumerate(classes)), label2id={n: i for i, n in enumerate(classes)})
    if kind == "resnet":
        config = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                           **labels)
        net, steps, lr = transformers.ResNetForImageClassification(config), 150, 0.01
    else:  # 4x4 patches: the 3x3 trigger in the bottom-right corner lies in one of the 9 tokens
        config = transformers.ViTConfig(image_size=12, patch_size=4, num_channels=1, hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **labels)
        net, steps, lr = transformers.ViTForImageClassification(config), 250, 0.003
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x_all, y_all = ds.images.float() / 255, ds.labels
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(y_all), (64,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(net(pixel_values=x_all[idx]).logits, y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    d = tmp_path / f"hf-{kind}"
    net.save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_a_hugging_face_model_with_a_planted_backdoor_goes_through(kind, blobs_model, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("transformers")
    root, model_path, clean = blobs_model
    d = _trained_hf(kind, clean.parent, tmp_path)
    src = ["--model", str(d), "--mean", "0", "--std", "1", "--image-size", "12"]
    # the tiny ViT is saturated on these easy images (clean loss near 0): the expert must unlearn
    # further than auto's default stop (agreement 90%) before it tells the trigger apart
    extra = ["--detector-param", "expert_agreement=0.5"] if kind == "vit" else []
    _pipeline(tmp_path, capsys, src, clean, extra_defend=["--min-accuracy", "0.5", *extra])
