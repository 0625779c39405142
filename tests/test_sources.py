"""Model sources: badexpert checkpoints, Hugging Face directories, ONNX files and a user's
``module:factory`` all load as ``[0, 1]`` images -> logits modules with declared preprocessing."""

from __future__ import annotations

import copy
import io
import json
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from badexpert.errors import BadExpertError
from badexpert.io import SOURCES, detect_source, load_model, rebuild_model, save_model
from badexpert.models import build_model

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _images(n=6, c=3, size=16, seed=1):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def _normalised(x, mean=MEAN, std=STD):
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def test_registry_names_every_source():
    assert list(SOURCES) == ["badexpert", "huggingface", "onnx", "factory"]
    assert SOURCES.canonical("HF") == "huggingface" and SOURCES.canonical("checkpoint") == "badexpert"


# --- badexpert checkpoints ---------------------------------------------------------------------


def test_checkpoints_load_as_before_and_accept_matching_declarations(tmp_path):
    torch.manual_seed(0)
    m = build_model("cnn", in_channels=1, num_classes=3, image_size=12, mean=[0.3], std=[0.2], width=4).eval()
    meta = {"arch": "cnn", "width": 4, "in_channels": 1, "num_classes": 3, "image_size": [12, 12], "mean": [0.3],
            "std": [0.2]}
    path = save_model(tmp_path / "m.safetensors", m, meta)
    assert detect_source(path) == "badexpert"
    loaded, got = load_model(path)
    assert "source" not in got and got["arch"] == "cnn"
    x = torch.rand(4, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    _, got = load_model(path, mean=[0.3], image_size=12, classes="a,b,c")
    assert got["classes"] == ["a", "b", "c"]
    with pytest.raises(BadExpertError, match=r"mean=0.5 contradicts checkpoint .* declares mean=0.3"):
        load_model(path, mean=[0.5])
    with pytest.raises(BadExpertError, match="2 class names given for a model with 3 classes"):
        load_model(path, classes=["a", "b"])
    assert isinstance(rebuild_model(got, loaded.state_dict()), nn.Module)


def test_unknown_files_are_one_line_errors(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "mine.pt")
    with pytest.raises(BadExpertError, match="give its module:factory as the model and this file as weights="):
        load_model(tmp_path / "mine.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadExpertError, match="is a directory but not a saved model"):
        load_model(tmp_path / "empty")
    with pytest.raises(BadExpertError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(BadExpertError, match="unknown model source 'keras'"):
        load_model(tmp_path / "mine.pt", kind="keras")


# --- Hugging Face ------------------------------------------------------------------------------


def _hf_resnet(tmp_path, *, preprocessor=True, labels=("cat", "dog", "frog"), **cfg):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=len(labels), id2label=dict(enumerate(labels)),
                                       label2id={n: i for i, n in enumerate(labels)}, **cfg)
    model = transformers.ResNetForImageClassification(config).eval()
    for mod in model.modules():  # non-trivial statistics, so a wrong normalisation shows
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
    d = tmp_path / "hf-resnet"
    model.save_pretrained(d)
    if preprocessor:  # what ConvNextImageProcessor writes for a ResNet, in 0-255 pixel units' scale
        (d / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "ConvNextImageProcessor", "crop_pct": 0.875, "do_normalize": True,
            "do_rescale": True, "do_resize": True, "image_mean": MEAN, "image_std": STD, "resample": 3,
            "rescale_factor": 1 / 255, "size": {"shortest_edge": 16}}))
    return model, d


def test_hugging_face_resnet_gives_the_original_logits(tmp_path):
    model, d = _hf_resnet(tmp_path)
    assert detect_source(d) == "huggingface"
    loaded, meta = load_model(d)
    assert meta["classes"] == ["cat", "dog", "frog"] and meta["num_classes"] == 3
    assert meta["image_size"] == [16, 16] and meta["in_channels"] == 3
    assert meta["mean"] == pytest.approx(MEAN) and meta["std"] == pytest.approx(STD)
    assert meta["source"]["kind"] == "huggingface" and meta["source"]["model_class"] == "ResNetForImageClassification"
    x = _images()
    with torch.no_grad():
        expected = model(pixel_values=_normalised(x)).logits
        assert torch.allclose(loaded(x), expected, atol=1e-5)
        again = rebuild_model(json.loads(json.dumps(meta)), loaded.state_dict())
        assert torch.allclose(again(x), expected, atol=1e-5)
    # declarations that agree are fine; ones that contradict the directory are refused
    load_model(d, mean=MEAN, classes="cat,dog,frog", image_size=16)
    with pytest.raises(BadExpertError, match=r"^mean=0.1,0.1,0.1 contradicts Hugging Face model"):
        load_model(d, mean=[0.1, 0.1, 0.1])
    with pytest.raises(BadExpertError, match="classes=dog,cat,frog contradicts"):
        load_model(d, classes=["dog", "cat", "frog"])


def test_hugging_face_vit_and_declared_preprocessing(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=4)
    model = transformers.ViTForImageClassification(config).eval()
    d = tmp_path / "vit"
    model.save_pretrained(d)  # no preprocessor config, placeholder labels LABEL_0..3
    with pytest.raises(BadExpertError, match=r"does not declare its mean, std \(no preprocessor_config.json\); "
                                             r"pass mean=\.\.\., std=\.\.\."):
        load_model(d)
    loaded, meta = load_model(d, mean=0.5, std=0.5, classes="a,b,c,d")
    assert meta["image_size"] == [16, 16] and meta["classes"] == ["a", "b", "c", "d"] and meta["mean"] == [0.5] * 3
    x = _images(seed=3)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(pixel_values=(x - 0.5) / 0.5).logits, atol=1e-5)
        assert torch.equal(rebuild_model(json.loads(json.dumps(meta)), loaded.state_dict())(x), loaded(x))
    with pytest.raises(BadExpertError, match="image_size=32,32 contradicts"):
        load_model(d, mean=0.5, std=0.5, image_size=32)
    with pytest.raises(BadExpertError, match="3 class names given for a model with 4 classes"):
        load_model(d, mean=0.5, std=0.5, classes="a,b,c")


def test_hugging_face_refusals(tmp_path):
    _, d = _hf_resnet(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(BadExpertError, match=r"needs remote code \(its config.json has auto_map\)"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_sizes": [8, 32]}))
    with pytest.raises(BadExpertError, match="do not fit the architecture in its config.json"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-model"}))
    with pytest.raises(BadExpertError, match="does not know model type 'no-such-model'"):
        load_model(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").unlink()
    with pytest.raises(BadExpertError, match="has no model.safetensors"):
        load_model(d)


# --- ONNX --------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Conv + BN + pooling + residual + dense: the operators exported image classifiers use."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.head = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(8, 8, 1), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.block(x) + x))


def _tiny_net():
    torch.manual_seed(0)
    net = TinyNet()
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def _export(module, opset=17, fold=True, dynamic=True, example=None, **kw):
    pytest.importorskip("onnxruntime")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example if example is not None else torch.rand(1, 3, 16, 16),), buf,
                          dynamo=False, opset_version=opset, do_constant_folding=fold, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "n"}} if dynamic else None, **kw)
    return buf.getvalue()


def _constants_as_nodes(data):
    """The graph as some tools ship it: every weight a Constant node, no initializers."""
    import onnx

    m = onnx.load_from_string(data)
    g = m.graph
    nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in g.initializer]
    names = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(inputs)
    del g.initializer[:]
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)
    return m.SerializeToString()


@pytest.mark.parametrize("opset", [17, 18, 19, 20, 21])
@pytest.mark.parametrize("variant", ["folded", "unfolded", "constant-nodes", "fixed-batch"])
def test_onnx_exports_convert_and_match(tmp_path, opset, variant):
    net = _tiny_net()
    data = _export(net, opset, fold=variant != "unfolded", dynamic=variant != "fixed-batch",
                   keep_initializers_as_inputs=variant == "fixed-batch")
    if variant == "constant-nodes":
        data = _constants_as_nodes(data)
    path = tmp_path / "net.onnx"
    path.write_bytes(data)
    loaded, meta = load_model(path, mean=MEAN, std=STD, classes="a,b,c,d,e")
    assert meta["source"]["kind"] == "onnx" and meta["source"]["opset"] == opset
    assert meta["source"]["max_logit_diff"] <= meta["source"]["tolerance"]
    assert meta["image_size"] == [16, 16] and meta["num_classes"] == 5 and meta["in_channels"] == 3
    x = _images()
    with torch.no_grad():
        expected = net(_normalised(x))
        got = loaded(x[:1]) if variant == "fixed-batch" else loaded(x)
    assert torch.allclose(got, expected[: len(got)], atol=1e-4)
    assert torch.equal(got.argmax(1), expected[: len(got)].argmax(1))


def test_onnx_module_is_trainable_and_rebuilds(tmp_path):
    path = tmp_path / "net.onnx"
    path.write_bytes(_export(_tiny_net(), 19, fold=True))
    loaded, meta = load_model(path, mean=MEAN, std=STD)
    params = dict(loaded.named_parameters())
    assert len(params) >= 8 and all(p.requires_grad for p in params.values())
    copy_ = copy.deepcopy(loaded).train()
    opt = torch.optim.SGD(copy_.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(copy_(_images()), torch.arange(6) % 5)
    loss.backward()
    opt.step()
    assert not torch.equal(copy_(_images()), loaded(_images()))  # the copy learned, the original did not move
    again = rebuild_model(json.loads(json.dumps(meta)), loaded.state_dict(), onnx_bytes=path.read_bytes())
    with torch.no_grad():
        assert torch.equal(again(_images()), loaded(_images()))
    with pytest.raises(BadExpertError, match="do not match the model record"):
        rebuild_model(meta, loaded.state_dict(), onnx_bytes=b"other")


def test_hugging_face_vit_onnx_export_converts(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3)).eval()

    class Logits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(pixel_values=x).logits

    path = tmp_path / "vit.onnx"
    path.write_bytes(_export(Logits(vit), 18))
    loaded, meta = load_model(path, mean=0.5, std=0.5)
    x = _images()
    with torch.no_grad():
        assert torch.allclose(loaded(x), vit(pixel_values=(x - 0.5) / 0.5).logits, atol=1e-4)


@pytest.mark.parametrize("activation, opset", [(nn.Softmax, 17), (nn.LogSoftmax, 17), (nn.Softmax, 12)])
def test_onnx_graphs_ending_in_softmax_give_their_logits(tmp_path, capsys, activation, opset):
    """A file that outputs probabilities: its final (Log)Softmax is dropped, its input is the logits
    (checked against onnxruntime running the same graph up to them), the metadata and the CLI say
    so, and the file's probabilities are the softmax of what the module returns."""
    import argparse

    import numpy as np
    import onnxruntime as ort

    from badexpert.cli import _load_source

    net = _tiny_net()
    path = tmp_path / "probs.onnx"
    path.write_bytes(_export(nn.Sequential(net, activation(dim=1)).eval(), opset))
    loaded, meta = load_model(path, mean=MEAN, std=STD)
    assert meta["source"]["final_activation"] == activation.__name__
    assert meta["source"]["max_logit_diff"] <= meta["source"]["tolerance"]
    x = _images()
    with torch.no_grad():
        logits = loaded(x)
        assert torch.allclose(logits, net(_normalised(x)), atol=1e-4)  # logits, not probabilities
    sess = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    probs = torch.from_numpy(sess.run(None, {"x": _normalised(x).numpy().astype(np.float32)})[0])
    again = torch.softmax(logits, 1) if activation is nn.Softmax else torch.log_softmax(logits, 1)
    assert torch.allclose(again, probs, atol=1e-5)
    rebuilt = rebuild_model(json.loads(json.dumps(meta)), loaded.state_dict(), onnx_bytes=path.read_bytes())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), logits)
    capsys.readouterr()
    args = argparse.Namespace(model=str(path), device="cpu", source=None, mean=",".join(map(str, MEAN)),
                              std=",".join(map(str, STD)), classes=None, weights=None, factory_kwargs=None)
    _load_source(args)
    assert f"ends in {activation.__name__}: its input is taken as the logits" in capsys.readouterr().err
    # a graph that ends in logits says nothing and records no activation
    path.write_bytes(_export(net, opset))
    assert load_model(path, mean=MEAN, std=STD)[1]["source"]["final_activation"] is None


def test_onnx_batchnorm_trains_like_torch_and_uses_its_statistics_in_eval(tmp_path):
    """An unfolded export keeps its BatchNormalization nodes: the converted copy, finetuned, must
    normalise by the batch's statistics and update the stored ones as torch's BatchNorm does, and
    use the stored ones in eval mode: the same steps on both give the same model."""
    net = _tiny_net()
    path = tmp_path / "bn.onnx"
    path.write_bytes(_export(net, 17, fold=False))
    import onnx

    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node) == 2
    loaded, _ = load_model(path, mean=0, std=1)
    ours, theirs = copy.deepcopy(loaded).train(), copy.deepcopy(net).train()
    x = _images(16, seed=5)
    y = torch.arange(16) % 5
    with torch.no_grad():  # training mode: the batch's statistics (not the stored ones, which eval uses)
        got = ours(x)  # (each call in training mode updates the stored statistics once)
        assert torch.allclose(got, theirs(x), atol=1e-5)
        assert not torch.allclose(got, loaded(x), atol=1e-3)
    ours_opt = torch.optim.SGD(ours.parameters(), lr=0.05)
    theirs_opt = torch.optim.SGD(theirs.parameters(), lr=0.05)
    for step in range(4):
        xb = _images(16, seed=10 + step)
        for model, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), y).backward()
            opt.step()
    stats = sorted(float(b.sum()) for n, b in ours.named_buffers() if n.startswith("net.") and b.is_floating_point())
    torch_stats = sorted(float(b.sum()) for n, b in theirs.named_buffers() if "running" in n)
    assert np.allclose(stats, torch_stats, atol=1e-4)  # the running statistics moved the same way
    ours.eval(), theirs.eval()
    x = _images(8, seed=20)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-4)
        assert not torch.allclose(ours(x), loaded(x), atol=1e-3)  # it did learn


def test_onnx_dropout_drops_only_while_training(tmp_path):
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    img = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 48])
    ratio = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "r")
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Dropout", ["f", "r"], ["y"])]
    p = tmp_path / "drop.onnx"
    p.write_bytes(_graph(nodes, [img], [out], [ratio]))
    loaded, _ = load_model(p, mean=0, std=1)
    x = torch.rand(6, 3, 4, 4) + 0.1
    with torch.no_grad():
        assert torch.equal(loaded(x), x.flatten(1))
        dropped = copy.deepcopy(loaded).train()(x)
    assert 0.2 < float((dropped == 0).float().mean()) < 0.8
    assert torch.allclose(dropped[dropped != 0], (x.flatten(1) * 2)[dropped != 0])


def _graph(nodes, inputs, outputs, inits=(), opset=17):
    import onnx

    g = onnx.helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)]).SerializeToString()


def test_onnx_refusals(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    img = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    pool = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    p = tmp_path / "m.onnx"

    def refused(data, match, **kw):
        p.write_bytes(data)
        with pytest.raises(BadExpertError, match=match) as err:
            load_model(p, **{"mean": MEAN, "std": STD, **kw})
        assert "\n" not in str(err.value)

    two = helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["n", 3, 8, 8])
    refused(_graph([helper.make_node("Add", ["x", "x2"], ["s"]), *pool[:1],
                    helper.make_node("Flatten", ["p"], ["y"])], [img, two], [out]),
            r"has 2 inputs \(x, x2\); badexpert guards image classifiers with one image input")
    flat = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    refused(_graph([helper.make_node("Relu", ["x"], ["y"])], [flat], [out]), r"2-D tensor .* not a float image batch")
    tokens = helper.make_tensor_value_info("x", TensorProto.INT64, ["n", 3, 8, 8])
    refused(_graph(pool, [tokens], [out]), "not a float image batch")
    refused(_graph([helper.make_node("TopK", ["x", "k"], ["y", "i"])], [img], [out],
                   [numpy_helper.from_array(np.array([3], dtype=np.int64), "k")]),
            "uses ONNX operator TopK that badexpert cannot convert")
    refused(_graph([helper.make_node("Custom", ["x"], ["y"], domain="com.acme")], [img], [out]),
            "uses ONNX operator com.acme.Custom")
    refused(_graph(pool, [img], [out]), r"does not declare its mean, std", mean=None, std=None)
    dyn = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])
    refused(_graph(pool, [dyn], [out]), r"does not declare its image_size \(its input size is dynamic\)")
    refused(_graph(pool, [img], [out]), "image_size=16,16 contradicts ONNX model .* declares image_size=8,8",
            image_size=16)
    refused(_graph(pool[:1], [img], [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 3, 1, 1])]),
            r"returns \[2, 3, 1, 1\] for a batch of 2 images, not logits \[N, num_classes\]")
    p.write_bytes(b"not a protobuf at all")
    with pytest.raises(BadExpertError, match="is not a readable ONNX file"):
        load_model(p, mean=MEAN, std=STD)
    # a converter that disagrees with onnxruntime is caught by the check, not shipped
    from badexpert.io import onnx_torch

    monkeypatch.setitem(onnx_torch.OPS, "GlobalAveragePool",
                        lambda a, opset: lambda x: x.amax(dim=(2, 3), keepdim=True))
    refused(_graph(pool, [img], [out]), r"disagrees with onnxruntime \(largest logit difference .*, tolerance")
    assert onnx  # imported for the helpers


# --- a user's own nn.Module --------------------------------------------------------------------

USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, channels=3, classes=4, hidden=8):
            super().__init__()
            self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
            self.fc = nn.Linear(hidden, classes)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    def make(**kw):
        return Net(**kw)

    def not_a_module():
        return 42

    def feature_map():
        return nn.Conv2d(3, 4, 1)

    def broken():
        raise RuntimeError("no GPU here")
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_nets_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_factory_with_weights_gives_the_original_logits(tmp_path, user_module):
    from safetensors.torch import save_file

    mod = __import__(user_module)
    torch.manual_seed(0)
    net = mod.Net(hidden=6).eval()
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": net.state_dict()}, tmp_path / "w.pt")
    x = _images()
    for weights in ("w.safetensors", "w.pt"):
        loaded, meta = load_model(f"{user_module}:make", weights=tmp_path / weights, kwargs='{"hidden": 6}',
                                  mean=MEAN, std=STD, image_size=16, classes=["a", "b", "c", "d"])
        with torch.no_grad():
            assert torch.allclose(loaded(x), net(_normalised(x)), atol=1e-6)
    assert meta["source"] == {"kind": "factory", "factory": f"{user_module}:make", "kwargs": {"hidden": 6},
                              "weights": str((tmp_path / "w.pt").resolve()),
                              "weights_sha256": meta["source"]["weights_sha256"]}
    assert meta["num_classes"] == 4 and meta["in_channels"] == 3
    record = json.loads(json.dumps(meta))
    with pytest.raises(BadExpertError, match=f"built by the factory '{user_module}:make'; badexpert imports it only"):
        rebuild_model(record, loaded.state_dict())
    again = rebuild_model(record, loaded.state_dict(), allow_factories=[f"{user_module}:make"])
    with torch.no_grad():
        assert torch.equal(again(x), loaded(x))


def test_factory_refusals(tmp_path, user_module):
    from safetensors.torch import save_file

    decl = {"mean": MEAN, "std": STD, "image_size": 16}
    save_file({"conv.weight": torch.zeros(8, 3, 5, 5)}, str(tmp_path / "bad.safetensors"))
    for source, extra, match in [
        ("no_such_pkg_xyz.nets:make", {}, r"cannot import module 'no_such_pkg_xyz.nets' .*ModuleNotFoundError"),
        (f"{user_module}:missing", {}, f"module '{user_module}' has no 'missing'"),
        (f"{user_module}:not_a_module", {}, "returned int, not a torch.nn.Module"),
        (f"{user_module}:broken", {}, r"failed with keyword arguments \{\} \(RuntimeError: no GPU here\)"),
        (f"{user_module}:make", {"kwargs": "{bad json"}, "keyword arguments are not valid JSON"),
        (f"{user_module}:make", {"kwargs": {"nope": 1}}, r"failed with keyword arguments .*TypeError"),
        (f"{user_module}:make", {"weights": tmp_path / "bad.safetensors"}, "do not fit its model"),
        (f"{user_module}:make", {"weights": tmp_path / "none.pt"}, "weights file .* does not exist"),
        (f"{user_module}:feature_map", {}, r"returns \[2, 4, 16, 16\] for a batch of 2 images, not logits"),
        (f"{user_module}:make", {"classes": "a,b"}, "2 class names given for a model with 4 classes"),
        (f"{user_module}:make", {"image_size": None}, r"does not declare its image_size"),
        (f"{user_module}:make", {"mean": [0.5, 0.5]}, "mean has 2 values and std has 3"),
        (f"{user_module}:make", {"tolerance": 1e-3}, "tolerance does not apply to a factory model"),
    ]:
        with pytest.raises(BadExpertError, match=match) as err:
            load_model(source, **{**decl, **extra})
        assert "\n" not in str(err.value), source


def test_loading_imports_nothing_unnamed(tmp_path, user_module):
    """A SOURCE that is a path never imports a module; only a named factory is imported."""
    assert user_module not in sys.modules
    with pytest.raises(BadExpertError):
        load_model(tmp_path / f"{user_module}.py")
    assert user_module not in sys.modules
    assert detect_source(f"{user_module}:make") == "factory" and user_module not in sys.modules


def test_a_foreign_network_runs_channels_last_only_when_it_declares_it_safe():
    """A wrapped network keeps the usual layout (it may ``view`` its activations); one whose module
    declares ``channels_last_safe = True`` gets its images in the channels-last layout on a CPU,
    with the same logits up to rounding, and trains so."""
    from badexpert.io.sources import ImageClassifier
    from badexpert.training import _layout

    class Net(nn.Sequential):
        def __init__(self, safe):
            super().__init__(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 4))
            if safe:
                self.channels_last_safe = True

    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    got = {}
    for safe in (False, True):
        torch.manual_seed(0)
        model = ImageClassifier(Net(safe), [0.5] * 3, [0.25] * 3).eval()
        seen = []
        model.net[2].register_forward_hook(lambda m, i, o: seen.append(i[0].is_contiguous(memory_format=torch.channels_last)))
        with torch.no_grad():
            got[safe] = model(x)
        assert seen == [safe] and model.channels_last_safe is safe
        assert (_layout(model, x, torch.device("cpu")) is torch.channels_last) is safe
    assert torch.allclose(got[False], got[True], rtol=1e-4, atol=1e-5)
