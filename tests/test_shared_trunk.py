"""BaDExpert with a shared trunk (issue 22): the architectures' cut points, the frozen trunk that
stays the model's own, the detector file that holds only the heads, a guard and an ONNX graph that
compute the trunk once, and one-line refusals for models that declare no cut points."""

import copy
import json

import numpy as np
import pytest
import torch

from badexpert import BaDExpert, Guard, load_bundle, save_bundle
from badexpert.detectors import load_detector
from badexpert.errors import BadExpertError
from badexpert.metrics import auroc
from badexpert.models import build_model, cut_points, split_model

META = {"arch": "cnn", "width": 8, "in_channels": 1, "num_classes": 4, "image_size": [12, 12],
        "classes": ["c0", "c1", "c2", "c3"]}
FAST = {"expert_lr": 1e-2, "aux_lr": 0.1, "aux_epochs": 4, "seed": 0}


@pytest.mark.parametrize("arch, width", [("cnn", 8), ("resnet18", 4), ("vgg16bn", 4), ("mobilenetv2", 4),
                                         ("vit", 16)])
def test_every_cut_point_splits_the_model_into_its_own_layers(arch, width):
    torch.manual_seed(0)
    model = build_model(arch, in_channels=3, num_classes=5, image_size=16, width=width).eval()
    x = torch.rand(3, 3, 16, 16)
    own = {id(p) for p in model.parameters()}
    points = cut_points(model)
    assert len(points) >= 3
    with torch.no_grad():
        ref = model(x)
        for cut in points:
            trunk, head = split_model(model, cut)
            assert torch.equal(head(trunk(x)), ref), cut  # operation for operation, bit for bit
            parts = list(trunk.parameters()) + list(head.parameters())
            assert {id(p) for p in parts} == own and len(parts) == len(own)  # no copies, nothing left out
    # deeper cuts leave smaller heads
    sizes = [sum(p.numel() for p in split_model(model, c)[1].parameters()) for c in points]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_a_model_without_cut_points_or_an_unknown_cut_is_one_line():
    from badexpert.io.sources import ImageClassifier

    foreign = ImageClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 4)), [0.5], [0.5])
    assert cut_points(foreign) == ()
    with pytest.raises(BadExpertError, match="declares no cut points"):
        split_model(foreign, "block1")
    model = build_model("cnn", in_channels=1, num_classes=4, image_size=12, width=8)
    with pytest.raises(BadExpertError, match="'stage9' is not a cut point of this model; choose one of: "
                                             "block1, block2, block3"):
        split_model(model, "stage9")


@pytest.fixture(scope="module")
def fitted(backdoored):
    model, attack, tr, te = backdoored
    reserved, calib, test = te.subset(range(0, 800)), te.subset(range(800, 1600)), te.subset(range(1600, 2400))
    before = copy.deepcopy(model.state_dict())
    det = BaDExpert(shared_trunk="block2", **FAST).fit(model, reserved).calibrate(calib, fpr=0.05)
    mask = attack.counts(test.labels)
    trig = (attack.apply(test.images[mask]) * 255).round().to(torch.uint8)
    meta = {**META, "mean": list(tr.mean), "std": list(tr.std)}
    return model, det, before, test, trig, meta, (reserved, calib)


def test_finetuning_leaves_the_frozen_trunk_bit_identical_and_moves_the_head(fitted):
    """Trained hard (SGD at a large learning rate, batch norm layers in train mode everywhere), the
    frozen trunk keeps every weight and batch-norm statistic of the model's; the head moves."""
    from badexpert.detectors.badexpert import _with_frozen_trunk
    from badexpert.training import Recipe, train

    model, det, before, test, _, _, (reserved, _) = fitted
    net = _with_frozen_trunk(model, "block2", reserved.images)
    train(net, reserved, Recipe(optimizer="sgd", lr=0.5, epochs=2, batch_size=64, augment=False), seed=0)
    trunk, head = split_model(model, "block2")
    mine, theirs = trunk.state_dict(), net.trunk.module.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(not torch.equal(a, b) for a, b in zip(head.state_dict().values(), net.head.state_dict().values()))
    # the fitted detector: the model untouched, both copies on its own trunk modules, their heads finetuned
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    own = {id(p) for p in trunk.parameters()}
    for net in (det.expert_, det.auxiliary_):
        assert {id(p) for p in net.trunk.parameters()} == own
        assert any(not torch.equal(a, b) for a, b in zip(head.state_dict().values(), net.head.state_dict().values()))
    assert det.fit_report_["shared_trunk"]["cut"] == "block2"
    assert "trunk up to block2 shared" in det.fit_summary()


def test_the_shared_trunk_detector_still_separates_clean_from_triggered(fitted):
    model, det, _, test, trig, _, _ = fitted
    sc, st = det.score(test.images), det.score(trig)
    assert auroc(sc.numpy(), st.numpy()) > 0.97
    assert det.predict(trig).float().mean() > 0.9 and det.predict(test.images).float().mean() < 0.15
    # the scores are those of the three whole networks (model, expert, auxiliary model) run apart
    x = torch.cat([test.images[:50], trig[:50]]).float() / 255
    with torch.no_grad():
        pred = model(x).argmax(1)
        lx = torch.log_softmax(det.expert_(x).double(), 1).gather(1, pred[:, None]).squeeze(1)
        ly = torch.log_softmax(det.auxiliary_(x).double(), 1).gather(1, pred[:, None]).squeeze(1)
    logit = lambda lp: lp - torch.log1p(-lp.exp())  # noqa: E731
    torch.testing.assert_close(det.score(x), (logit(lx) - logit(ly)).float(), rtol=1e-4, atol=1e-4)


def test_the_detector_file_holds_the_heads_only_and_round_trips(fitted, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, det, _, test, trig, _, _ = fitted
    path = det.save(tmp_path / "det.safetensors")
    tensors = load_file(str(path))
    _, head = split_model(model, "block2")
    for name in ("expert", "auxiliary"):
        assert {k for k in tensors if k.startswith(f"{name}.")} == {f"{name}.{k}" for k in head.state_dict()}
    loaded = load_detector(path, model)
    assert loaded.shared_trunk == "block2"
    x = torch.cat([test.images[:100], trig[:100]])
    assert torch.equal(loaded.score(x), det.score(x)) and loaded.threshold_ == det.threshold_
    # a file whose recorded trunk is not this model's is refused on load, in one line
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["badexpert"])
    meta["state"]["fit_report"]["shared_trunk"]["trunk_fingerprint"] = "sha256:" + "0" * 64
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"badexpert": json.dumps(meta)})
    with pytest.raises(BadExpertError, match="finetuned on another trunk"):
        load_detector(tmp_path / "other.safetensors", model)


def _count(modules, counts: dict):
    return [m.register_forward_hook(lambda mod, inp, out, k=k: counts.__setitem__(k, counts[k] + len(inp[0])))
            for k, m in modules.items()]


def test_the_guard_computes_the_trunk_once(fitted):
    model, det, _, test, trig, _, _ = fitted
    x = torch.cat([test.images[:30], trig[:20]])
    # the model's own layers: its normalisation and block 2's pooling (first and last of the trunk), its classifier
    parts = {"trunk_first": model.normalize, "trunk_last": model.net.features[7], "model_head": model.net.fc,
             "expert_head": det.expert_.head, "auxiliary_head": det.auxiliary_.head}
    assert split_model(model, "block2")[0][-1][-1] is parts["trunk_last"]
    counts = dict.fromkeys(parts, 0)
    hooks = _count(parts, counts)
    try:
        out = Guard(model, det)(x)
    finally:
        for h in hooks:
            h.remove()
    assert counts == dict.fromkeys(counts, 50)  # every part once per input: the trunk is not run three times
    assert torch.allclose(out.score, det.score(x), atol=1e-5) and torch.equal(out.reject, det.predict(x))
    with torch.no_grad():
        assert torch.equal(out.label, model(x.float() / 255).argmax(1))


def test_the_onnx_graph_has_the_trunk_once_and_answers_as_the_eager_guard(fitted, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from badexpert.deploy.export import export_bundle
    from badexpert.runtime.onnx import OnnxGuard

    model, det, _, test, trig, meta, _ = fitted
    bundle = save_bundle(tmp_path / "guard.safetensors", model, det, meta)
    report = export_bundle(bundle, tmp_path / "guard.onnx")
    ver = report["verification"]
    assert ver["label_mismatches"] == ver["reject_mismatches"] == ver["scores_out_of_tolerance"] == 0
    graph = onnx.load(str(tmp_path / "guard.onnx")).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    # the CNN has three convolutions, two of them in the trunk: 2 once + 1 in each of three heads
    assert len(convs) == 2 + 3 * 1
    weights = [n.input[1] for n in convs]
    assert len(set(weights)) == len(weights)  # five distinct convolutions, none of them run twice
    guard, g = load_bundle(bundle), OnnxGuard(tmp_path / "guard.onnx")
    x = torch.cat([test.images[:200], trig[:100]])
    a, b = g(x.numpy()), guard(x)
    assert np.array_equal(a["label"], b.label.numpy()) and np.array_equal(a["reject"], b.reject.numpy())
    np.testing.assert_allclose(a["score"], b.score.numpy(), rtol=1e-4, atol=1e-4)
    assert a["reject"][200:].mean() > 0.9 and a["reject"][:200].mean() < 0.15


def test_a_model_from_another_source_is_refused_in_one_line(fitted, tmp_path):
    """An ONNX file of the very same CNN: converted, it is a foreign module that declares no cut
    points, so the shared trunk is refused (before any finetuning); the full method still fits."""
    pytest.importorskip("onnxruntime")
    from badexpert.io import load_model

    model, _, _, test, _, meta, (reserved, _) = fitted
    path = tmp_path / "theirs.onnx"
    torch.onnx.export(model, torch.rand(2, 1, 12, 12), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)
    theirs, _ = load_model(path, mean=0, std=1, classes=meta["classes"])
    with pytest.raises(BadExpertError, match="declares none .* fit it without a shared trunk") as err:
        BaDExpert(shared_trunk="block2", **FAST).fit(theirs, reserved.subset(range(200)))
    assert "\n" not in str(err.value)
    with pytest.raises(BadExpertError, match="'conv9' is not a cut point of this model; choose one of: block1"):
        BaDExpert(shared_trunk="conv9", **FAST).fit(model, reserved.subset(range(200)))


def test_defend_takes_the_option_and_refuses_a_wrong_cut_in_one_line(tmp_path, capsys):
    from badexpert.cli import main

    from .conftest import train_blobs_model

    data, model_path = train_blobs_model(tmp_path)
    out = tmp_path / "det.safetensors"
    argv = ["defend", "--model", str(model_path), "--clean", str(data / "test"), "--holdout", "60", "--fpr", "0.05",
            "--device", "cpu", "--out", str(out)]
    capsys.readouterr()
    assert main([*argv, "--shared-trunk", "stage2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the one-line error
    assert "not a cut point of this model; choose one of: block1, block2, block3" in err[-1], err
    assert sum("error" in line for line in err) == 1
    assert not out.exists()
    assert main([*argv, "--shared-trunk", "block2"]) == 0
    from badexpert.io import load_model

    model, _ = load_model(model_path)
    det = load_detector(out, model)
    assert det.shared_trunk == "block2" and det.fit_report_["shared_trunk"]["cut"] == "block2"
