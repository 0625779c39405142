"""Security and correctness guarantees of the hardening issue, on a real implanted backdoor:
non-finite and mis-scaled inputs, model fingerprints, leaked splits, data facts, typed
configs, output locations and atomic runs."""

import json
import warnings

import pytest
import torch

from badexpert import BaDExpert, evaluate, get_attack, load_detector
from badexpert.data import Dataset, to_float
from badexpert.errors import BadExpertError
from badexpert.detectors.base import ACCEPTED, REJECT_NONFINITE_INPUT, REJECT_SCORE


@pytest.fixture(scope="module")
def guarded(backdoored):
    """A BaDExpert detector fitted and calibrated on disjoint clean parts of the test blobs."""
    model, attack, _, te = backdoored
    reserved, calib, test = te.subset(range(0, 800)), te.subset(range(800, 1600)), te.subset(range(1600, 2400))
    det = BaDExpert(expert_lr=1e-2, aux_lr=0.1, aux_epochs=4, seed=0).fit(model, reserved).calibrate(calib, fpr=0.05)
    return model, attack, det, reserved, calib, test


def _triggered(attack, test):
    mask = attack.counts(test.labels)
    return (attack.apply(test.images[mask]) * 255).round().to(torch.uint8)


# --- security: nothing the detector cannot score is ever accepted ------------------------------
def test_hostile_variants_of_triggered_images_are_never_accepted(guarded):
    model, attack, det, _, _, test = guarded
    trig = _triggered(attack, test)[:64]
    assert det.predict(trig).float().mean() > 0.9  # the detector works on the real thing

    nan_pixel = trig.float() / 255
    nan_pixel[:, :, 0, 0] = float("nan")
    inf_pixel = trig.float() / 255
    inf_pixel[:, :, 5, 5] = float("inf")
    neg_inf = trig.float() / 255
    neg_inf[:, :1, 3, 3] = float("-inf")
    with torch.no_grad():  # the attack still works on the model through these inputs
        assert (model(torch.nan_to_num(nan_pixel, nan=0.0)).argmax(1) == 0).float().mean() > 0.8

    for name, x in (("nan", nan_pixel), ("inf", inf_pixel), ("-inf", neg_inf)):
        flags = det.predict(x)
        assert flags.all(), name
        assert torch.isnan(det.score(x)).all(), name
        assert set(det.predict_details(x)["reason"]) == {REJECT_NONFINITE_INPUT}, name

    for name, x in (("int64", trig.to(torch.int64)), ("int32", trig.to(torch.int32)), ("bool", trig > 127),
                    ("float [0, 255]", trig.float()), ("float64 [0, 255]", trig.double()),
                    ("half [0, 255]", trig.half())):
        try:
            flags = det.predict(x)
        except BadExpertError as exc:
            assert "\n" not in str(exc) and ("[0, 1]" in str(exc) or "uint8" in str(exc)), str(exc)
        else:  # pragma: no cover - would be the bug this test exists for
            assert flags.all(), f"{name}: accepted {int((~flags).sum())} triggered inputs"


def test_nan_score_never_compares_as_clean(guarded):
    det = guarded[2]
    flags = det.decide(torch.tensor([float("nan"), det.threshold_ - 1, det.threshold_, det.threshold_ + 1]))
    assert flags.tolist() == [True, False, False, True]


def test_one_batch_mixes_reasons(guarded):
    _, attack, det, _, _, test = guarded
    clean = test.images[:8].float() / 255
    batch = torch.cat([clean, _triggered(attack, test)[:4].float() / 255])
    batch[0, 0, 0, 0] = float("nan")
    out = det.predict_details(batch)
    assert out["reason"][0] == REJECT_NONFINITE_INPUT and bool(out["reject"][0])
    assert torch.equal(out["reject"][1:], det.predict(batch[1:]))  # the NaN image does not disturb the others
    assert out["reason"][-1] == REJECT_SCORE
    assert ACCEPTED in out["reason"][1:8]


def test_fit_and_calibrate_refuse_non_finite_and_mis_scaled_data(backdoored, guarded):
    model, _, _, te = backdoored
    x = te.images[:200].float() / 255
    y = te.labels[:200]
    bad = x.clone()
    bad[3, 0, 2, 2] = float("nan")
    det = BaDExpert(expert_lr=1e-2, aux_lr=0.1, aux_epochs=1)
    with pytest.raises(BadExpertError, match=r"non-finite values \(NaN or inf\) in 1 of 200"):
        det.fit(model, (bad, y))
    with pytest.raises(BadExpertError, match=r"divide by 255"):
        det.fit(model, (x * 255, y))
    with pytest.raises(BadExpertError, match="dtype int64 are not accepted"):
        det.fit(model, (te.images[:200].to(torch.int64), y))
    fitted = guarded[2]
    with pytest.raises(BadExpertError, match="non-finite"):
        fitted.calibrate((bad, y), 0.05)
    with pytest.raises(BadExpertError, match="among the images the detector was fitted on"):
        fitted.calibrate(guarded[3], 0.05)


def test_uint8_and_float_give_the_same_decisions(guarded):
    det, test = guarded[2], guarded[5]
    a = det.score(test.images[:100])
    b = det.score(test.images[:100].float() / 255)
    c = det.score(test.images[:100].double() / 255)
    assert torch.allclose(a, b) and torch.allclose(a, c)


def test_attacks_follow_the_conversion_rule(blobs):
    x = blobs[1].images[:4]
    attack = get_attack("badnet")
    assert torch.equal(attack.apply(x), attack.apply(x.float() / 255))
    with pytest.raises(BadExpertError, match="divide by 255"):
        attack.apply(x.float())
    with pytest.raises(BadExpertError, match="dtype int64"):
        attack.apply(x.long())
    assert to_float(torch.full((1, 1, 2, 2), 1.0005)).max() == 1.0  # within the tolerance: clipped


# --- provenance: the right model, data the detector has not seen ------------------------------
def test_detector_refuses_another_model(guarded, tmp_path):
    import copy

    model, attack, det, _, _, test = guarded
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 0.01
    with pytest.raises(BadExpertError, match="fitted on model sha256:[0-9a-f]+ but was given model sha256:"):
        evaluate(other, det, test, attack, n_boot=0, throughput=False)
    path = det.save(tmp_path / "d.safetensors")
    with pytest.raises(BadExpertError, match=r"given model sha256:[0-9a-f]+ \(other.safetensors\)"):
        load_detector(path, other, model_name="other.safetensors")


def test_evaluation_refuses_test_data_the_detector_has_seen(guarded):
    model, attack, det, reserved, calib, test = guarded
    leaky = test.with_data(torch.cat([test.images[:300], calib.images[:50], reserved.images[:7]]),
                           torch.cat([test.labels[:300], calib.labels[:50], reserved.labels[:7]]))
    with pytest.raises(BadExpertError, match="shares 7 image.* fitted on and 50 with its calibration data"):
        evaluate(model, det, leaky, attack, n_boot=0, throughput=False)
    with pytest.warns(UserWarning, match="flatter the detector"):
        res = evaluate(model, det, leaky, attack, n_boot=0, throughput=False, allow_overlap=True)
    assert res.metrics["defense"]["overlap"] == {"fit": 7, "calibration": 50, "total": 357}
    clean = evaluate(model, det, test, attack, n_boot=0, throughput=False)
    assert clean.metrics["defense"]["overlap"]["calibration"] == 0


def test_saved_detector_keeps_its_data_record(guarded, tmp_path):
    model, _, det, reserved, calib, test = guarded
    loaded = load_detector(det.save(tmp_path / "d.safetensors"), model)
    assert loaded.overlap(calib)["calibration"] == len(calib)
    assert loaded.overlap(reserved)["fit"] == len(reserved)
    assert loaded.overlap(test) == {"fit": 0, "calibration": 0, "total": len(test)}
    assert torch.equal(loaded.calibration_scores_, det.calibration_scores_)


def test_cached_suspect_model_records_this_runs_split(blobs, tmp_path):
    from badexpert.data import Splits
    from badexpert.pipeline.experiment import ExperimentConfig, train_suspect

    tr, te = blobs
    splits = Splits(train=tr.subset(range(400)), reserved=te.subset(range(100)), calibration=te.subset(range(100, 200)),
                    test=te.subset(range(200, 400)))
    common = dict(arch="cnn", width=4, recipe={"epochs": 1, "batch_size": 64}, attack="badnet",
                  attack_params={"poison_rate": 0.05}, data_path=str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    _, meta1 = train_suspect(ExperimentConfig(reserved=100, calibration=100, **common), splits,
                             cache_dir=tmp_path / "cache", log=lambda m: None)
    logs = []
    _, meta2 = train_suspect(ExperimentConfig(reserved=50, calibration=60, **common), splits,
                             cache_dir=tmp_path / "cache", log=logs.append)
    assert any("loaded cached" in m for m in logs)
    assert meta1["split"]["reserved"] == 100 and meta2["split"]["reserved"] == 50 and meta2["split"]["calibration"] == 60


# --- facts about the data -------------------------------------------------------------------------
def test_flips_come_from_the_data(backdoored):
    model, _, _, te = backdoored
    clean = te.subset(range(200))
    fast = dict(expert_lr=1e-2, aux_lr=0.1, aux_epochs=1)
    assert BaDExpert(**fast).fit(model, (clean.images, clean.labels)).hflip_ is False
    assert BaDExpert(**fast).fit(model, clean).hflip_ is False  # blobs declare no flips
    flippable = Dataset(clean.images, clean.labels, clean.classes, hflip=True)
    assert BaDExpert(**fast).fit(model, flippable).hflip_ is True
    assert BaDExpert(hflip=False, **fast).fit(model, flippable).hflip_ is False
    assert Dataset(clean.images, clean.labels, clean.classes).hflip is False  # undeclared: no flips


# --- typed configuration --------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    ({"reserved": "2000"}, "config field 'reserved' must be an integer >= 1, got '2000'"),
    ({"train_size": -10}, "config field 'train_size' must be an integer >= 1 or null"),
    ({"width": -4}, "config field 'width' must be an integer in [1, 4096]"),
    ({"asr_bar": 1.5}, "config field 'asr_bar' must be a number in [0, 1]"),
    ({"fpr": 0}, "config field 'fpr' must be a number in (0, 1)"),
    ({"seed": 1.5}, "config field 'seed' must be an integer >= 0"),
    ({"recipe": {"batch_size": 0}}, "recipe field 'batch_size' must be an integer >= 1, got 0"),
    ({"recipe": {"epochs": 0}}, "recipe field 'epochs' must be an integer >= 1"),
    ({"recipe": {"lr": "fast"}}, "recipe field 'lr' must be a number > 0"),
    ({"attack_params": {"size": -3}}, "attack 'badnet' parameter 'size' must be an integer >= 1"),
    ({"attack_params": {"poison_rate": 2}}, "attack 'badnet' parameter 'poison_rate' must be a number in [0, 1]"),
    ({"detector_params": {"preset": "fast"}}, "detector 'badexpert' parameter 'preset' must be one of: auto, paper"),
    ({"detector_params": {"aux_lr": 0}}, "detector 'badexpert' parameter 'aux_lr' must be a number > 0 or null"),
    ({"attack_params": []}, "config field 'attack_params' must be an object"),
])
def test_config_types_and_ranges_are_checked_before_any_data(fields, message, tmp_path):
    from badexpert.pipeline.experiment import ExperimentConfig

    with pytest.raises(BadExpertError) as exc:
        ExperimentConfig.from_dict({"data_path": str(tmp_path / "absent"), **fields}).validate()
    assert message in str(exc.value) and "\n" not in str(exc.value)


# --- output locations and atomic runs -------------------------------------------------------------
def test_output_locations_are_checked(tmp_path):
    from badexpert.pipeline.experiment import RUN_OUTPUTS
    from badexpert.utils import check_output_dir, check_output_file

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    with pytest.raises(BadExpertError, match="is a directory; --out must name a file"):
        check_output_file(tmp_path / "adir", suffix=".safetensors".replace(".safetensors", ""))
    with pytest.raises(BadExpertError, match="is a file, not a directory"):
        check_output_file(tmp_path / "afile" / "m.safetensors", suffix=".safetensors")
    with pytest.raises(BadExpertError, match="already exists; pass --overwrite"):
        check_output_file(tmp_path / "afile")
    with pytest.raises(BadExpertError, match="is a file; --out must name a directory"):
        check_output_dir(tmp_path / "afile", owned=RUN_OUTPUTS)
    (tmp_path / "adir" / "notes.txt").write_text("mine")
    with pytest.raises(BadExpertError, match=r"not badexpert run outputs \(notes.txt\)"):
        check_output_dir(tmp_path / "adir", owned=RUN_OUTPUTS, overwrite=True)
    assert (tmp_path / "adir" / "notes.txt").read_text() == "mine"


def test_a_run_directory_is_complete_or_absent(tmp_path):
    from badexpert.pipeline.experiment import RUN_OUTPUTS
    from badexpert.utils import atomic_directory

    out = tmp_path / "sub" / "run"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, owned=RUN_OUTPUTS) as tmp:
            (tmp / "metrics.json").write_text("{}")
            raise KeyboardInterrupt
    assert not out.exists() and not (tmp_path / "sub").exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(out, owned=RUN_OUTPUTS) as tmp:
        (tmp / "metrics.json").write_text("{}")
        (tmp / "roc.png").write_text("old plot")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "roc.png"]
    with pytest.raises(BadExpertError, match="already holds a run"):
        with atomic_directory(out, owned=RUN_OUTPUTS):
            pass
    with atomic_directory(out, owned=RUN_OUTPUTS, overwrite=True) as tmp:  # replaces the whole run
        (tmp / "metrics.json").write_text('{"new": 1}')
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    assert json.loads((out / "metrics.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["run"]  # no temporary left


def test_model_file_with_absurd_metadata_is_refused_before_allocating(tmp_path):
    from safetensors.torch import save_file

    from badexpert.io import load_model, save_model
    from badexpert.models import build_model

    meta = {"arch": "resnet18", "width": 4, "in_channels": 3, "num_classes": 10, "image_size": [32, 32],
            "mean": [0.5] * 3, "std": [0.5] * 3}
    path = save_model(tmp_path / "m.safetensors", build_model("resnet18", in_channels=3, num_classes=10,
                                                              image_size=32, width=4), meta)
    from safetensors.torch import load_file

    state = load_file(str(path))
    for bad, message in (({"width": 4096}, "do not match architecture 'resnet18'"),
                         ({"image_size": [100000, 100000]}, "field 'image_size' must be"),
                         ({"width": "wide"}, "field 'width' must be"), ({"std": [0.5, 0.5, 0.0]}, "field 'std'"),
                         ({"mean": [0.5]}, "'mean' has 1 values for 3 channels")):
        save_file(state, str(tmp_path / "bad.safetensors"),
                  metadata={"badexpert": json.dumps({"format": "badexpert-model/1", **meta, **bad})})
        with pytest.raises(BadExpertError, match=message.replace("(", r"\(")):
            load_model(tmp_path / "bad.safetensors")


def test_run_interrupted_leaves_nothing(monkeypatch, blobs, tmp_path):
    """An error in the last step of a run (the report) leaves no model, detector or config."""
    import badexpert.pipeline.experiment as ex
    from badexpert.data import Splits

    tr, te = blobs
    splits = Splits(train=tr.subset(range(600)), reserved=te.subset(range(300)), calibration=te.subset(range(300, 600)),
                    test=te.subset(range(600, 900)))
    monkeypatch.setattr(ex, "make_splits", lambda cfg: splits)

    def broken(*a, **k):
        raise BadExpertError("simulated failure while writing the report")

    monkeypatch.setattr(ex, "write_outputs", broken)
    cfg = ex.ExperimentConfig(arch="cnn", width=4, recipe={"epochs": 1, "batch_size": 64}, attack=None, n_boot=0,
                              detector_params={"expert_lr": 1e-2, "aux_lr": 0.1, "aux_epochs": 1})
    with pytest.raises(BadExpertError, match="simulated failure"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex.run(cfg, tmp_path / "run", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_fit_depends_on_the_detector_seed_only(backdoored):
    """Dropout in a user's model draws from torch's global RNG: the fit seeds it from the
    detector's seed (and restores the caller's state), so the caller's RNG state does not matter."""
    from torch import nn

    base, _, _, te = backdoored
    model = nn.Sequential(base, nn.Dropout(0.3)).eval()
    clean = te.subset(range(300))
    scores = []
    for outer in (1, 2):
        torch.manual_seed(outer)
        before = torch.random.get_rng_state()
        det = BaDExpert(expert_lr=1e-2, aux_lr=0.1, aux_epochs=2, seed=5).fit(model, clean)
        assert torch.equal(torch.random.get_rng_state(), before)
        scores.append(det.score(te.images[300:400]))
    assert torch.equal(scores[0], scores[1])
    other = BaDExpert(expert_lr=1e-2, aux_lr=0.1, aux_epochs=2, seed=6).fit(model, clean).score(te.images[300:400])
    assert not torch.equal(scores[0], other)


def test_detector_files_of_the_earlier_format_are_refused_with_a_hint(guarded, tmp_path):
    """A /1 detector file (before fingerprints and data records) is refused, saying to rebuild it."""
    from safetensors.torch import load_file, save_file

    model, _, det, _, _, _ = guarded
    path = det.save(tmp_path / "d.safetensors")
    meta = json.loads(__import__("safetensors").safe_open(str(path), framework="pt").metadata()["badexpert"])
    meta["format"] = "badexpert-detector/1"
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata={"badexpert": json.dumps(meta)})
    with pytest.raises(BadExpertError, match=r"this version reads 'badexpert-detector/2'; rebuild it with this "
                                             r"version \(`badexpert defend`\)"):
        load_detector(tmp_path / "old.safetensors", model)


def test_a_model_with_non_finite_weights_is_refused_in_one_line(guarded, backdoored, tmp_path, capsys):
    """A diverged training or a damaged file (NaN in a batch-norm buffer) answers every input with
    NaN: loading, fitting and evaluating refuse it, naming the tensor, and the CLI exits 2."""
    import copy

    from badexpert.cli import main
    from badexpert.io import load_model, save_model

    from .conftest import write_blobs

    model, attack, _, reserved, calib, test = guarded
    tr = backdoored[2]
    broken = copy.deepcopy(model)
    name, buf = next((k, v) for k, v in broken.state_dict().items() if k.endswith("running_var"))
    buf[0] = float("nan")
    assert torch.isnan(broken(to_float(test.images[:2]))).all()  # it really answers NaN
    for call in (lambda: BaDExpert(seed=0).fit(broken, reserved),
                 lambda: evaluate(broken, None, test, attack, n_boot=0, throughput=False)):
        with pytest.raises(BadExpertError, match=rf"non-finite weights \(1 of \d+ values of '{name}'") as e:
            call()
        assert "\n" not in str(e.value)
    meta = {"arch": "cnn", "width": 8, "in_channels": 1, "num_classes": 4, "image_size": [12, 12],
            "mean": [float(v) for v in tr.mean], "std": [float(v) for v in tr.std]}
    assert load_model(save_model(tmp_path / "ok.safetensors", model, meta))[0] is not None
    path = save_model(tmp_path / "nan.safetensors", broken, meta)
    with pytest.raises(BadExpertError, match="the model '.*nan.safetensors' has non-finite weights"):
        load_model(path)
    clean = write_blobs(tmp_path / "data") / "test"
    out = tmp_path / "det.safetensors"
    assert main(["defend", "--model", str(path), "--clean", str(clean), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite weights" in err[0] and not out.exists()
