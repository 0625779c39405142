"""The deployed guard: one shared model pass, policies, conformal p-values, bundles that refuse
tampering and other models."""

import copy
import json

import pytest
import torch

from badexpert import BaDExpert, Guard, RejectedInputError, load_bundle, save_bundle
from badexpert.detectors.base import ACCEPTED, REJECT_NONFINITE_INPUT, REJECT_SCORE
from badexpert.errors import BadExpertError
from badexpert.deploy.guard import conformal_p_values

META = {"arch": "cnn", "width": 8, "in_channels": 1, "num_classes": 4, "image_size": [12, 12],
        "classes": ["c0", "c1", "c2", "c3"]}


@pytest.fixture(scope="module")
def setup(backdoored):
    model, attack, tr, te = backdoored
    reserved, calib, test = te.subset(range(0, 800)), te.subset(range(800, 1600)), te.subset(range(1600, 2400))
    det = BaDExpert(expert_lr=1e-2, aux_lr=0.1, aux_epochs=4, seed=0).fit(model, reserved).calibrate(calib, fpr=0.05)
    mask = attack.counts(test.labels)
    trig = (attack.apply(test.images[mask]) * 255).round().to(torch.uint8)
    meta = {**META, "mean": list(tr.mean), "std": list(tr.std)}
    return model, det, test, trig, meta


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += len(x)
        return self.inner(x)


def test_guard_matches_the_detector_and_shares_the_model_pass(setup):
    model, det, test, trig, _ = setup
    g = Guard(model, det)
    x = torch.cat([test.images[:300], trig[:100]])
    out = g(x)
    assert torch.allclose(out.score, det.score(x), atol=1e-5)
    assert torch.equal(out.reject, det.predict(x))
    with torch.no_grad():
        logits = model(x.float() / 255)
    assert torch.equal(out.label, logits.argmax(1))
    assert torch.allclose(out.confidence, torch.softmax(logits, 1).max(1).values, atol=1e-6)
    assert out.reject[300:].float().mean() > 0.9 and out.reject[:300].float().mean() < 0.15
    assert g.forward_passes_per_input == 3
    # the model runs once per input: the detector's scoring reuses its logits
    counting = CountingModel(model)
    det2 = copy.copy(det)
    det2.model_ = counting
    det2.model_fingerprint_ = None  # the wrapper has other state-dict keys; the weights are the same
    Guard(counting, det2)(x[:50])
    assert counting.calls == 50


def test_p_values_are_conformal(setup):
    _, det, test, _, _ = setup
    cal = det.calibration_scores_
    p = conformal_p_values(torch.tensor([cal.max() + 1, cal.min() - 1, float("nan")]), cal)
    n = len(cal)
    assert p[0] == pytest.approx(1 / (n + 1)) and p[1] == pytest.approx(1.0) and p[2] == 0
    # on fresh clean data the p-values are close to uniform: P(p <= a) <= a (+ sampling noise)
    pv = Guard(setup[0], det)(test.images).p_value
    for a in (0.05, 0.2, 0.5):
        assert (pv <= a).float().mean() <= a + 0.05


def test_policies(setup):
    model, det, test, trig, _ = setup
    x = torch.cat([test.images[:20], trig[:20]])
    flagged = Guard(model, det)(x)
    abstain = Guard(model, det, policy="abstain", abstain_label=-7)(x)
    assert torch.equal(abstain.label[~flagged.reject], flagged.label[~flagged.reject])
    assert (abstain.label[flagged.reject] == -7).all() and bool(flagged.reject.any())
    with pytest.raises(RejectedInputError, match=r"input\(s\) rejected by the badexpert guard") as exc:
        Guard(model, det, policy="raise")(x)
    assert torch.equal(exc.value.output.reject, flagged.reject)
    clean_ok = test.images[:20][~flagged.reject[:20]]
    assert len(Guard(model, det, policy="raise")(clean_ok).label) == len(clean_ok)
    with pytest.raises(BadExpertError, match="unknown guard policy"):
        Guard(model, det, policy="ignore")


def test_hostile_inputs_are_rejected_with_reasons(setup):
    model, det, test, trig, _ = setup
    x = torch.cat([test.images[:4], trig[:2]]).float() / 255
    x[1, 0, 5, 5] = float("inf")
    out = Guard(model, det)(x)
    assert out.reason[1] == REJECT_NONFINITE_INPUT and bool(out.reject[1]) and out.p_value[1] == 0
    assert set(out.reason[4:]) == {REJECT_SCORE} and ACCEPTED in out.reason[:4]
    with pytest.raises(BadExpertError, match="divide by 255"):
        Guard(model, det)(test.images[:4].float())


def test_bundle_round_trip(setup, tmp_path):
    model, det, test, trig, meta = setup
    path = save_bundle(tmp_path / "b.safetensors", model, det, meta)
    g = load_bundle(path)
    x = torch.cat([test.images[:50], trig[:50]])
    a, b = Guard(model, det)(x), g(x)
    assert torch.equal(a.label, b.label) and torch.equal(a.reject, b.reject) and torch.equal(a.score, b.score)
    assert g.classes == META["classes"] and g.input_shape == (1, 12, 12)


def test_tampered_bundles_are_refused(setup, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, det, _, _, meta = setup
    path = save_bundle(tmp_path / "b.safetensors", model, det, meta)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        md = json.loads(fh.metadata()["badexpert"])
    # a lowered threshold (accept more), checksum left as it was
    evil = copy.deepcopy(md)
    evil["detector"]["threshold"] = 1e9
    save_file(tensors, str(tmp_path / "t1.safetensors"), metadata={"badexpert": json.dumps(evil)})
    with pytest.raises(BadExpertError, match="fails its checksum"):
        load_bundle(tmp_path / "t1.safetensors")
    # swapped auxiliary weights
    t2 = dict(tensors)
    key = next(k for k in t2 if k.startswith("detector.auxiliary.") and t2[k].is_floating_point())
    t2[key] = t2[key] * 0
    save_file(t2, str(tmp_path / "t2.safetensors"), metadata={"badexpert": json.dumps(md)})
    with pytest.raises(BadExpertError, match="fails its checksum"):
        load_bundle(tmp_path / "t2.safetensors")
    # flipped bytes anywhere
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "t3.safetensors").write_bytes(bytes(raw))
    with pytest.raises(BadExpertError):
        load_bundle(tmp_path / "t3.safetensors")


def test_a_guard_refuses_another_model(setup, tmp_path):
    model, det, _, _, meta = setup
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 0.01
    with pytest.raises(BadExpertError, match="fitted on model sha256"):
        Guard(other, det)
    with pytest.raises(BadExpertError, match="fitted on model sha256"):
        save_bundle(tmp_path / "b.safetensors", other, det, meta)
    assert not (tmp_path / "b.safetensors").exists()


def test_cli_bundle(setup, tmp_path, capsys):
    from badexpert.cli import main
    from badexpert.io import save_model

    model, det, _, _, meta = setup
    save_model(tmp_path / "m.safetensors", model, meta)
    det.save(tmp_path / "d.safetensors")
    assert main(["bundle", "--model", str(tmp_path / "m.safetensors"), "--detector", str(tmp_path / "d.safetensors"),
                 "--out", str(tmp_path / "b.safetensors")]) == 0
    assert main(["info", str(tmp_path / "b.safetensors")]) == 0
    assert '"format": "badexpert-bundle/1"' in capsys.readouterr().out
    assert main(["bundle", "--model", str(tmp_path / "m.safetensors"), "--detector", str(tmp_path / "d.safetensors"),
                 "--out", str(tmp_path / "b.safetensors")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_resealed_bundle_with_another_model_is_refused(setup, tmp_path):
    """Even with a valid checksum (re-sealed by whoever swapped the weights), a bundle whose model
    weights differ from the fingerprint its detector was fitted on is refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from badexpert.deploy.guard import _checksum

    model, det, _, _, meta = setup
    path = save_bundle(tmp_path / "b.safetensors", model, det, meta)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        md = json.loads(fh.metadata()["badexpert"])
    key = next(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[key] = tensors[key] + 0.01
    md["checksum"] = _checksum(md, tensors)
    save_file(tensors, str(tmp_path / "swapped.safetensors"), metadata={"badexpert": json.dumps(md)})
    with pytest.raises(BadExpertError, match="do not match the fingerprint"):
        load_bundle(tmp_path / "swapped.safetensors")
    # the model's own fingerprint rewritten too: the detector's record of its model still refuses it
    from badexpert.io import model_fingerprint

    swapped = copy.deepcopy(model)
    swapped.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    md["model"]["fingerprint"] = model_fingerprint(swapped)
    md["checksum"] = _checksum(md, tensors)
    save_file(tensors, str(tmp_path / "swapped2.safetensors"), metadata={"badexpert": json.dumps(md)})
    with pytest.raises(BadExpertError, match="fitted on model sha256"):
        load_bundle(tmp_path / "swapped2.safetensors")
