"""The one digest module gives exactly the digests the package wrote before it existed (the old
implementations are copied here verbatim): cached models, detector files, bundles and grid keys
keep their keys."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from badexpert.attacks.components import tensor_digest
from badexpert.data.core import image_hashes
from badexpert.digests import file_sha256, json_digest, row_hashes
from badexpert.pipeline.experiment import files_fingerprint
from badexpert.deploy.guard import _checksum
from badexpert.io import model_fingerprint
from badexpert.jsonable import to_jsonable


# --- the implementations before badexpert.digests (verbatim) ------------------------------------
def old_model_fingerprint(model):
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{str(t.dtype)}|{list(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def old_checksum(meta, tensors):
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"|{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def old_tensor_digest(tensors):
    h = hashlib.sha256()
    items = sorted(tensors.items()) if isinstance(tensors, dict) else [("", tensors)]
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def old_json_hash(obj, n=16):  # grid._hash and experiment.suspect_key (the component key: n=20, no to_jsonable)
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()[:n]


def old_image_hashes(x):
    out = torch.empty(len(x), dtype=torch.int64)
    flat = x.reshape(len(x), -1).numpy()
    for i in range(len(flat)):
        out[i] = int.from_bytes(hashlib.blake2b(flat[i].tobytes(), digest_size=8).digest(), "little") >> 1
    return out


def tensors():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g)
    return {
        "w": w, "w_t": w.t(), "bias": torch.randn(6, generator=g), "half": torch.randn(3, 2, generator=g).half(),
        "bf16": torch.randn(5, generator=g).to(torch.bfloat16), "steps": torch.tensor(7), "mask": torch.rand(3, 3) > 0.5,
        "idx": torch.arange(10, dtype=torch.int64), "empty": torch.empty(0, 3), "u8": torch.randint(0, 256, (2, 1, 4, 4),
                                                                                               dtype=torch.uint8),
    }


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3).to(dtype)
        self.bn = nn.BatchNorm2d(3)  # buffers too (num_batches_tracked is int64)
        self.fc = nn.Linear(12, 2).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_model_fingerprint_unchanged(dtype):
    torch.manual_seed(1)
    m = Net(dtype)
    assert model_fingerprint(m) == old_model_fingerprint(m)


def test_bundle_checksum_and_component_digest_unchanged():
    t = tensors()
    meta = {"format": "badexpert-bundle/1", "model": {"arch": "small_cnn", "mean": [0.5], "classes": ["a", "b"]},
            "detector": {"threshold": 0.25, "nested": {"z": 1, "a": [1, 2.5]}}, "checksum": "sha256:old"}
    assert _checksum(meta, t) == old_checksum(meta, t)
    assert tensor_digest(t) == old_tensor_digest(t)
    for one in t.values():
        assert tensor_digest(one) == old_tensor_digest(one)


def test_json_keys_unchanged():
    payload = {"data": "x", "recipe": {"lr": 0.1, "epochs": 3, "milestones": (1, 2)}, "seed": np.int64(4),
               "weights": torch.tensor([0.5, 1.5]), "mean": np.array([0.1, 0.2], dtype=np.float32),
               "path": Path("/tmp/x"), "nan": float("nan"), "b": True, "none": None, 3: "int key"}
    assert json_digest(payload, length=16) == old_json_hash(payload)
    text = json.dumps({"kind": "k", "spec": {"a": 1}}, sort_keys=True)
    assert json_digest({"kind": "k", "spec": {"a": 1}}, length=20, jsonable=False) == \
        hashlib.sha256(text.encode()).hexdigest()[:20]


def test_file_digests_and_image_hashes_unchanged(tmp_path):
    f = tmp_path / "trigger.png"
    f.write_bytes(bytes(range(256)) * 5000)  # more than one read block
    assert file_sha256(f, block=1000) == hashlib.sha256(f.read_bytes()).hexdigest() == file_sha256(f)
    d = tmp_path / "folder"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.txt").write_text("a")
    (d / "b.txt").write_text("bb")
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert files_fingerprint([str(f), str(d), str(tmp_path / "missing")]) == [
        [["", f.stat().st_size, sha(f)]],
        [["b.txt", 2, sha(d / "b.txt")], ["sub/a.txt", 1, sha(d / "sub" / "a.txt")]],
        None]
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    x[7] = x[3]  # equal images, equal hashes
    new, old = image_hashes(x), old_image_hashes(x)
    assert new.dtype == torch.int64 and torch.equal(new, old) and new[7] == new[3] and bool((new >= 0).all())
    assert len(image_hashes(x[:0])) == 0
    assert row_hashes(x.reshape(50, -1).numpy()).tolist() == old.tolist()
