"""BaDExpert's expert ensemble (``expert_ensemble``, issue 20's defensive variant): the expert's
finetuning goes on past ``expert_agreement`` and a snapshot is kept at each further agreement level;
``logit_x`` is the mean of the experts' log-odds. The first expert is the one fitted without the
option, bit for bit; the snapshots are where the levels say; scores, files, the shared trunk, the
guard and the ONNX graph all carry the snapshots; mistakes are one line."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from badexpert import BaDExpert, Guard, save_bundle
from badexpert.data.core import holdout, to_float
from badexpert.detectors import get_detector, load_detector
from badexpert.errors import BadExpertError
from badexpert.metrics import auroc
from badexpert.training import predict_logits
from badexpert.utils import derive_generator

META = {"arch": "cnn", "width": 8, "in_channels": 1, "num_classes": 4, "image_size": [12, 12],
        "classes": ["c0", "c1", "c2", "c3"]}
# the expert at its default lr (1e-4) reaches 90% agreement after ~165 steps on this data, 60% and
# 30% some 20 and 40 steps later: the snapshots are three distinct networks (2 s a fit)
FAST = {"aux_lr": 0.1, "aux_epochs": 4, "seed": 0}
LEVELS = (0.6, 0.3)


@pytest.fixture(scope="module")
def fitted(backdoored):
    model, attack, tr, te = backdoored
    reserved, calib, test = te.subset(range(0, 800)), te.subset(range(800, 1600)), te.subset(range(1600, 2400))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every level is reached: no warning
        plain = BaDExpert(**FAST).fit(model, reserved)
        det = BaDExpert(expert_ensemble=LEVELS, **FAST).fit(model, reserved).calibrate(calib, fpr=0.05)
    mask = attack.counts(test.labels)
    trig = (attack.apply(test.images[mask]) * 255).round().to(torch.uint8)
    meta = {**META, "mean": list(tr.mean), "std": list(tr.std)}
    return model, plain, det, reserved, calib, test, trig, meta


def _equal_states(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _by_hand(det: BaDExpert, x: torch.Tensor) -> torch.Tensor:
    """The score from the whole networks run apart: mean over the experts of log(p / (1 - p)) of
    M's label, minus the auxiliary model's, in float64."""
    x = to_float(x)
    with torch.no_grad():
        pred = det.model_(x).argmax(1)

        def logodds(net):
            logp = torch.log_softmax(net(x).double(), 1).gather(1, pred[:, None]).squeeze(1)
            return logp - torch.log1p(-logp.exp())

        experts = [det.expert_, *det.expert_snapshots_]
        return torch.stack([logodds(n) for n in experts]).mean(0) - logodds(det.auxiliary_)


def test_the_first_expert_is_the_one_fitted_without_the_option(fitted):
    """Same seed, same data: the expert (and the auxiliary model) are bit-identical with and without
    the ensemble, and the fit report's expert record is the same but for the ensemble's entry."""
    _, plain, det, *_ = fitted
    assert _equal_states(det.expert_, plain.expert_) and _equal_states(det.auxiliary_, plain.auxiliary_)
    report = dict(det.fit_report_["expert"])
    assert report.pop("ensemble") and report == plain.fit_report_["expert"]
    assert len(plain.expert_snapshots_) == 0 and plain.submodels == ("expert_", "auxiliary_")
    assert det.submodels == ("expert_", "auxiliary_", "expert_snapshots_")
    # the snapshots are further finetuned copies, distinct from the expert and from each other
    nets = [det.expert_, *det.expert_snapshots_]
    assert len(nets) == 3 and not any(_equal_states(a, b) for i, a in enumerate(nets) for b in nets[i + 1:])


def test_the_snapshots_are_taken_where_the_agreement_first_drops_to_each_level(fitted):
    """The recorded agreement is the snapshot's own agreement with M on the held-out slice (recomputed
    here), at most its level, later in the same run than the expert and than the level before."""
    model, _, det, reserved, *_ = fitted
    _, hold = holdout(reserved, det.holdout, derive_generator(det.seed, "badexpert-holdout"))
    ref = predict_logits(model, hold.images).argmax(1)
    expert = det.fit_report_["expert"]
    records = expert["ensemble"]
    assert [r["level"] for r in records] == list(LEVELS) and all(r["reached"] for r in records)
    steps = [expert["steps"]] + [r["steps"] for r in records]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    for r, net in zip(records, det.expert_snapshots_):
        agreement = float((predict_logits(net, hold.images).argmax(1) == ref).float().mean())
        assert agreement == pytest.approx(r["agreement"]) and agreement <= r["level"]
    assert expert["agreement"] <= det.expert_agreement and expert["reached_target"]
    assert "expert ensemble at agreement 0.6, 0.3" in det.fit_summary()


def test_the_score_is_the_mean_of_the_experts_log_odds_minus_the_auxiliary_models(fitted):
    _, plain, det, _, _, test, trig, _ = fitted
    x = torch.cat([test.images[:100], trig[:100]])
    torch.testing.assert_close(det.score(x), _by_hand(det, x).float(), rtol=1e-4, atol=1e-4)
    conf = det.confidences(x)
    torch.testing.assert_close(conf["x"], torch.sigmoid(conf["logit_x"]))
    # the auxiliary model's side and M's labels are those of the single-expert detector
    ref = plain.confidences(x)
    assert torch.equal(conf["y"], ref["y"]) and torch.equal(conf["logit_y"], ref["logit_y"])
    assert torch.equal(conf["pred"], ref["pred"])
    # the other rules read x, the sigmoid of the mean log-odds
    det2 = copy.deepcopy(det).set_params(score_rule="ratio")
    torch.testing.assert_close(det2.score(x), -conf["y"] / conf["x"].clamp_min(1e-8))


def test_it_still_separates_clean_from_triggered_and_costs_a_pass_per_level(fitted):
    model, plain, det, _, _, test, trig, _ = fitted
    sc, st = det.score(test.images), det.score(trig)
    assert auroc(sc.numpy(), st.numpy()) > 0.97
    assert det.predict(trig).float().mean() > 0.9 and det.predict(test.images).float().mean() < 0.15
    assert plain.cost == {"forward": 3, "backward": 0} and det.cost == {"forward": 5, "backward": 0}
    guard = Guard(model, det)
    assert guard.forward_passes_per_input == 5
    x = torch.cat([test.images[:30], trig[:20]])
    out = guard(x)
    assert torch.allclose(out.score, det.score(x), atol=1e-5) and torch.equal(out.reject, det.predict(x))


def test_the_detector_file_holds_the_snapshots_and_round_trips(fitted, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, plain, det, _, _, test, trig, _ = fitted
    x = torch.cat([test.images[:100], trig[:100]])
    path = det.save(tmp_path / "det.safetensors")
    tensors = load_file(str(path))
    for i, net in enumerate([det.expert_, *det.expert_snapshots_]):
        prefix = f"expert{i or ''}."
        assert {k for k in tensors if k.startswith(prefix)} == {prefix + k for k in net.state_dict()}
    loaded = load_detector(path, model)
    assert loaded.expert_ensemble == LEVELS and len(loaded.expert_snapshots_) == 2
    assert torch.equal(loaded.score(x), det.score(x)) and loaded.threshold_ == det.threshold_
    # a file without the option holds no snapshots and loads as before
    plain_path = plain.save(tmp_path / "plain.safetensors")
    assert not any(k.startswith("expert1.") for k in load_file(str(plain_path)))
    again = load_detector(plain_path, model)
    assert len(again.expert_snapshots_) == 0 and torch.equal(again.score(x), plain.score(x))
    # a file that declares the levels but lacks a snapshot's weights is refused in one line
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file({k: v for k, v in tensors.items() if not k.startswith("expert2.")}, str(tmp_path / "cut.safetensors"),
              metadata=meta)
    with pytest.raises(BadExpertError, match="holds no weights for expert2; the file is damaged") as err:
        load_detector(tmp_path / "cut.safetensors", model)
    assert "\n" not in str(err.value)
    assert json.loads(meta["badexpert"])["params"]["expert_ensemble"] == list(LEVELS)


def _export_matches_eager(model, det, meta, test, trig, folder):
    """Export a bundle of ``det`` to ONNX; OnnxGuard answers as the eager guard. Returns the graph."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from badexpert import load_bundle
    from badexpert.deploy.export import export_bundle
    from badexpert.runtime.onnx import OnnxGuard

    bundle = save_bundle(folder / "guard.safetensors", model, det, meta)
    ver = export_bundle(bundle, folder / "guard.onnx")["verification"]
    assert ver["label_mismatches"] == ver["reject_mismatches"] == ver["scores_out_of_tolerance"] == 0
    guard, g = load_bundle(bundle), OnnxGuard(folder / "guard.onnx")
    assert guard.forward_passes_per_input == det.cost["forward"]
    x = torch.cat([test.images[:200], trig[:100]])
    a, b = g(x.numpy()), guard(x)
    assert np.array_equal(a["label"], b.label.numpy()) and np.array_equal(a["reject"], b.reject.numpy())
    np.testing.assert_allclose(a["score"], b.score.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a["score"], det.score(x).numpy(), rtol=1e-4, atol=1e-4)
    assert a["reject"][200:].mean() > 0.9 and a["reject"][:200].mean() < 0.15
    return onnx.load(str(folder / "guard.onnx")).graph


def test_the_onnx_graph_runs_every_expert_and_answers_as_the_eager_detector(fitted, tmp_path):
    model, _, det, _, _, test, trig, meta = fitted
    graph = _export_matches_eager(model, det, meta, test, trig, tmp_path)
    # the CNN's three convolutions in each of five networks: the model, three experts, the auxiliary model
    assert len([n for n in graph.node if n.op_type == "Conv"]) == 5 * 3


def test_with_a_shared_trunk_the_snapshots_are_heads_too(fitted, tmp_path):
    from safetensors.torch import load_file

    from badexpert.models import split_model

    model, _, _, reserved, calib, test, trig, meta = fitted
    det = BaDExpert(shared_trunk="block2", expert_ensemble=(0.5,), **FAST).fit(model, reserved).calibrate(calib, 0.05)
    single = BaDExpert(shared_trunk="block2", **FAST).fit(model, reserved)
    assert _equal_states(det.expert_.head, single.expert_.head)
    (snap,) = det.expert_snapshots_
    trunk, head = split_model(model, "block2")
    assert {id(p) for p in snap.trunk.parameters()} == {id(p) for p in trunk.parameters()}  # the model's own trunk
    assert det.fit_report_["expert"]["ensemble"][0]["agreement"] <= 0.5
    x = torch.cat([test.images[:100], trig[:100]])
    torch.testing.assert_close(det.score(x), _by_hand(det, x).float(), rtol=1e-4, atol=1e-4)
    tensors = load_file(str(det.save(tmp_path / "det.safetensors")))
    assert {k for k in tensors if k.startswith("expert1.")} == {f"expert1.{k}" for k in head.state_dict()}
    loaded = load_detector(tmp_path / "det.safetensors", model)
    assert torch.equal(loaded.score(x), det.score(x))
    graph = _export_matches_eager(model, det, meta, test, trig, tmp_path)
    # the trunk's two convolutions once, the head's one in each of four heads (model, two experts, auxiliary)
    assert len([n for n in graph.node if n.op_type == "Conv"]) == 2 + 4 * 1


def test_a_level_not_reached_warns_and_keeps_the_runs_last_expert(fitted):
    model, plain, _, reserved, *_ = fitted
    steps = plain.fit_report_["expert"]["steps"] + 8  # room for the expert, not for the levels
    with pytest.warns(UserWarning, match=r"did not reach agreement 60%, 30% within expert_max_steps \(\d+\); the "
                                         r"run's last expert \(\d+% agreement\) stands in"):
        det = BaDExpert(expert_ensemble=LEVELS, expert_max_steps=steps, **FAST).fit(model, reserved)
    assert _equal_states(det.expert_, plain.expert_)
    a, b = (r for r in det.fit_report_["expert"]["ensemble"])
    assert not a["reached"] and not b["reached"] and a["steps"] == b["steps"] == steps
    assert a["agreement"] == b["agreement"] > 0.6
    s1, s2 = det.expert_snapshots_
    assert _equal_states(s1, s2) and s1 is not s2  # copies of the last expert, stored apart


@pytest.mark.parametrize("params, message", [
    ({"expert_ensemble": [0.4, 0.6]}, "strictly decreasing, e.g. \\[0.4\\] or \\[0.6, 0.4\\]; got \\[0.4, 0.6\\]"),
    ({"expert_ensemble": [0.4, 0.4]}, "strictly decreasing"),
    ({"expert_ensemble": [0.9]}, "below expert_agreement \\(0.9\\)"),
    ({"expert_ensemble": [0.5], "expert_agreement": 0.5}, "below expert_agreement \\(0.5\\)"),
    ({"expert_ensemble": [0.0]}, "above 0"),
    ({"expert_ensemble": [0.4], "preset": "paper"}, "needs preset 'auto'"),
    ({"expert_ensemble": 0.4}, "parameter 'expert_ensemble' must be a list"),
    ({"expert_ensemble": ["a"]}, "parameter 'expert_ensemble' must be a list"),
])
def test_parameter_mistakes_are_one_line(params, message):
    with pytest.raises(BadExpertError, match=message) as err:
        get_detector("badexpert", **params)
    assert "\n" not in str(err.value)
    # set_params refuses it too, and leaves the detector as it was
    det = BaDExpert()
    with pytest.raises(BadExpertError, match=message):
        det.set_params(**params)
    assert det.expert_ensemble == () and det.preset == "auto" and det.expert_agreement == 0.9


def test_the_option_is_accepted_where_the_agreement_rule_runs():
    assert get_detector("badexpert", expert_ensemble=[0.6, 0.4]).expert_ensemble == (0.6, 0.4)
    # with an explicit expert_lr, auto's agreement rule still runs (on that one learning rate)
    assert get_detector("badexpert", expert_ensemble=[0.4], expert_lr=1e-3).cost["forward"] == 4


def test_the_contract_kit_passes_with_the_option(backdoored):
    from badexpert.testing import check_detector

    model, attack, _, te = backdoored
    data = te.subset(range(256))
    triggered = attack.apply(te.images[1600:2400][attack.counts(te.labels[1600:2400])])[:40]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 128-image fit may not reach the levels: that is not what this checks
        det = BaDExpert(expert_ensemble=(0.5,), expert_lr=1e-3, **FAST)
        report = check_detector(det, model, data, triggered=triggered)
    assert report == dict.fromkeys(report, "ok") and len(report) == 15, report


def test_defend_takes_the_option_and_refuses_a_wrong_one_in_one_line(tmp_path, capsys):
    from badexpert.cli import main
    from badexpert.io import load_model

    from .conftest import train_blobs_model

    data, model_path = train_blobs_model(tmp_path)
    out = tmp_path / "det.safetensors"
    argv = ["defend", "--model", str(model_path), "--clean", str(data / "test"), "--holdout", "60", "--fpr", "0.05",
            "--device", "cpu", "--out", str(out)]
    for bad, message in (("0.95", "below expert_agreement (0.9)"), ("0.4,x", "invalid agreement_levels value")):
        capsys.readouterr()
        assert main([*argv, "--expert-ensemble", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and sum("error" in line for line in err) == 1, err
        assert not out.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a level the tiny clean set may not reach
        assert main([*argv, "--expert-ensemble", "0.6,0.4"]) == 0
    model, _ = load_model(model_path)
    det = load_detector(out, model)
    assert det.expert_ensemble == (0.6, 0.4) and len(det.expert_snapshots_) == 2
    assert [r["level"] for r in det.fit_report_["expert"]["ensemble"]] == [0.6, 0.4]
