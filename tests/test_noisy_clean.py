"""The paper's AUROC protocol: noise-augmented clean negatives (issue 20, "Protocol").

The clean test split plus a seeded Gaussian-noised copy of it (sigma 0.05 in [0, 1] pixel space,
clipped) are the negatives of ``auroc_noisy``, beside today's ``auroc``. A detector that merely
flags unusual inputs (here a toy scoring high-frequency energy, defined through the contract)
loses AUROC under it; BaDExpert, which looks at the backdoor itself, does not.
"""

import json
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from badexpert.cli import main
from badexpert.detectors import DETECTORS, BaDExpert, Detector
from badexpert.errors import BadExpertError
from badexpert.evaluation.core import NOISY_SIGMA, evaluate, noisy_copy
from badexpert.metrics import detection_summary

from .conftest import make_blobs, train_blobs_model


class NoiseEnergy(Detector):
    """Toy: the mean squared difference between neighbouring pixels (high-frequency energy). It
    flags a checkerboard patch, and as readily any noisy input: an "unusual input" detector."""

    name: ClassVar[str] = "toy_noise_energy"
    uses_model: ClassVar[bool] = False

    def _fit(self, model, images, labels):
        pass

    def _score_batch(self, xb):
        dx = xb[..., :, 1:] - xb[..., :, :-1]
        dy = xb[..., 1:, :] - xb[..., :-1, :]
        return (dx.pow(2).mean((1, 2, 3)) + dy.pow(2).mean((1, 2, 3))).cpu()


@pytest.fixture(scope="module")
def toy():
    DETECTORS.add(NoiseEnergy.name, NoiseEnergy)
    yield NoiseEnergy.name
    DETECTORS.remove(NoiseEnergy.name)


def _smooth(data):
    """The blobs with a 3x3 box blur: smooth images, on which sigma-0.05 noise is unusual."""
    x = F.avg_pool2d(F.pad(data.images.float(), (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return data.with_data(x.round().to(torch.uint8), data.labels)


@pytest.fixture(scope="module")
def setting():
    """A CNN on smooth blobs with a faint (opacity 0.3) BadNet backdoor, the noise-energy toy and
    BaDExpert fitted on 800 clean images and calibrated at 5% FPR on 800 others, 800 test images."""
    from badexpert.attacks import get_attack
    from badexpert.models import build_model
    from badexpert.training import Recipe, train
    from badexpert.utils import derive_generator, seed_everything

    tr, te = _smooth(make_blobs(3000, seed=1)), _smooth(make_blobs(2400, seed=2))
    seed_everything(0)
    attack = get_attack("badnet", target=0, poison_rate=0.05, opacity=0.3)
    model = build_model("cnn", in_channels=1, num_classes=4, image_size=12, mean=tr.mean, std=tr.std, width=8)
    train(model, attack.poison(tr, derive_generator(0, "poison")),
          Recipe(optimizer="adam", lr=3e-3, epochs=6, batch_size=64, weight_decay=0, schedule="cosine", augment=False),
          seed=0)
    model.eval()
    reserved, calibration, test = te.subset(range(800)), te.subset(range(800, 1600)), te.subset(range(1600, 2400))
    energy = NoiseEnergy().fit(model, reserved).calibrate(calibration, 0.05)
    expert = BaDExpert(expert_lr=1e-2, aux_lr=0.1, aux_epochs=4, hflip=False).fit(model, reserved)
    expert.calibrate(calibration, 0.05)
    return model, attack, energy, expert, test


def _run(setting, detector, **kw):
    model, attack, *_, test = setting
    return evaluate(model, detector, test, attack, n_boot=50, throughput=False, **kw)


def test_the_noisy_copy_is_seeded_clipped_and_keeps_labels(setting):
    test = setting[-1]
    a, b, other = noisy_copy(test, seed=0), noisy_copy(test, seed=0), noisy_copy(test, seed=1)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, other.images)
    assert torch.equal(a.labels, test.labels) and a.images.dtype == torch.uint8 and len(a) == len(test)
    diff = a.images.float() - test.images.float()
    inside = (test.images > 60) & (test.images < 195)  # pixels the clipping cannot reach at 5 sigma
    assert diff[inside].std().item() == pytest.approx(NOISY_SIGMA * 255, rel=0.05)
    assert abs(diff[inside].mean().item()) < 0.5
    # clipped, not wrapped: a black pixel gets max(0, noise), whose mean is sigma / sqrt(2 pi), a
    # white one 255 minus that
    n = 64
    ends = test.with_data(torch.cat([torch.zeros(n, 1, 12, 12), torch.full((n, 1, 12, 12), 255.0)]).to(torch.uint8),
                          test.labels[: 2 * n])
    x = noisy_copy(ends, seed=0).images.float()
    half = NOISY_SIGMA * 255 / np.sqrt(2 * np.pi)
    assert x[:n].mean().item() == pytest.approx(half, rel=0.1) and x[:n].max() < 80
    assert x[n:].mean().item() == pytest.approx(255 - half, rel=0.01) and x[n:].min() > 175
    assert (x[:n] == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)  # half the noise is clipped away


def test_the_protocol_doubles_the_clean_set_keeps_todays_auroc_and_calibration_disjoint(setting):
    *_, energy, _, test = setting
    plain, noisy = _run(setting, energy), _run(setting, energy, noisy_clean=True)
    m, d = noisy.metrics, noisy.metrics["defense"]
    assert m["sizes"]["test_noisy"] == m["sizes"]["test_clean"] == len(test) == d["n_noisy"] == d["n_clean"]
    assert m["noisy_clean"]["sigma"] == NOISY_SIGMA and 0 <= m["noisy_clean"]["clean_accuracy"] <= 1
    # today's population is unchanged; the noisy numbers are new keys beside it
    for key in ("auroc", "auroc_filtered", "auroc_ci", "fpr", "tpr", "clean_accuracy", "attack_success_rate"):
        assert d[key] == plain.metrics["defense"][key]
    assert not any("noisy" in k for k in plain.metrics["defense"]) and "test_noisy" not in plain.metrics["sizes"]
    # auroc_noisy by hand: clean and noisy scores against the triggered ones
    a = noisy.arrays
    assert len(a["noisy_scores"]) == len(a["clean_scores"])
    y = np.r_[np.zeros(2 * len(test)), np.ones(len(a["trig_scores"]))]
    s = np.r_[a["clean_scores"], a["noisy_scores"], a["trig_scores"]]
    assert d["auroc_noisy"] == pytest.approx(roc_auc_score(y, s))
    assert d["fpr_noisy"] == pytest.approx((a["noisy_scores"] > energy.threshold_).mean())
    # the copies are made from the test split: none of them is an image the detector was fitted or
    # calibrated on, and their scores are those of noisy_copy(test, seed)
    copy = noisy_copy(test, seed=0)
    assert energy.overlap(copy.images) == {"fit": 0, "calibration": 0, "total": len(test)}
    assert np.allclose(a["noisy_scores"], energy.score(copy.images).numpy())


def test_the_same_seed_gives_the_same_number(setting):
    energy = setting[2]
    first, again = _run(setting, energy, noisy_clean=True), _run(setting, energy, noisy_clean=True)
    other = _run(setting, energy, noisy_clean=True, seed=1)
    for key in ("auroc_noisy", "auroc_noisy_ci", "auroc_noisy_filtered", "fpr_noisy"):
        assert first.metrics["defense"][key] == again.metrics["defense"][key]
    assert not np.array_equal(first.arrays["noisy_scores"], other.arrays["noisy_scores"])


def test_a_detector_that_flags_noise_pays_and_badexpert_does_not(setting):
    *_, energy, expert, _ = setting
    e = _run(setting, energy, noisy_clean=True).metrics["defense"]
    b = _run(setting, expert, noisy_clean=True).metrics["defense"]
    # on today's population the noise-energy toy looks excellent; with noisy negatives it is far worse
    assert e["auroc"] > 0.97 and e["auroc_noisy"] < 0.8 and e["auroc_noisy_filtered"] < 0.8
    assert e["realized_fpr_noisy"] > 0.5  # it rejects most noisy clean inputs at a 5% target
    # BaDExpert looks at the backdoor: the noisy copies barely move its AUROC
    assert b["auroc"] > 0.97 and b["auroc_noisy"] > b["auroc"] - 0.03
    assert b["auroc_noisy_filtered"] >= b["auroc_filtered"] - 0.01


def test_detection_summary_takes_all_three_noisy_arrays_or_none():
    args = dict(clean_scores=[0.1, 0.2, 0.3], clean_labels=[0, 1, 1], clean_preds=[0, 1, 0], trig_scores=[0.9, 0.25],
                trig_preds=[0, 0], trig_target=[0, 0], threshold=0.5, fpr_target=0.1, class_names=None, n_boot=0)
    assert not any("noisy" in k for k in detection_summary(**args))
    with pytest.raises(BadExpertError, match="give all three or none"):
        detection_summary(**args, noisy_scores=[0.4, 0.6, 0.1])
    d = detection_summary(**args, noisy_scores=[0.4, 0.6, 0.1], noisy_labels=[0, 1, 1], noisy_preds=[0, 1, 1])
    assert d["auroc_noisy"] == pytest.approx(roc_auc_score([0] * 6 + [1, 1], [0.1, 0.2, 0.3, 0.4, 0.6, 0.1, 0.9, 0.25]))
    # the paper's population: clean (0.1, 0.2) and noisy (0.4, 0.6, 0.1) the model gets right vs the successful 0.9, 0.25
    assert d["auroc_noisy_filtered"] == pytest.approx(roc_auc_score([0] * 5 + [1, 1], [0.1, 0.2, 0.4, 0.6, 0.1, 0.9, 0.25]))
    assert d["fpr_noisy"] == pytest.approx(1 / 3) and d["n_noisy"] == 3 and d["n_noisy_correct"] == 3
    assert d["auroc_noisy_ci"] is None  # n_boot 0, as auroc_ci
    with pytest.raises(BadExpertError, match="same length"):
        detection_summary(**args, noisy_scores=[0.4], noisy_labels=[0, 1], noisy_preds=[0, 1])


# --- the command line and the configs -----------------------------------------------------------
@pytest.fixture(scope="module")
def made(toy, tmp_path_factory):
    """A backdoored model file on the tiny ImageFolder and the toy detector defended on it."""
    root = tmp_path_factory.mktemp("noisy")
    data, model = train_blobs_model(root)
    det = root / "toy.safetensors"
    assert main(["defend", "--model", str(model), "--method", toy, "--fpr", "0.05", "--device", "cpu",
                 "--out", str(det)]) == 0
    return root, data, model, det


def test_cli_evaluate_and_compare_with_noisy_clean(toy, made, tmp_path, capsys):
    root, data, model, det = made
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(model), "--detector", str(det), "--noisy-clean", "--n-boot", "20",
                 "--out", str(out)]) == 0
    assert "AUROC +noisy" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["noisy_clean"] is True and m["sizes"]["test_noisy"] == m["sizes"]["test_clean"]
    d = m["defense"]
    assert d["n_noisy"] == d["n_clean"] and 0 <= d["auroc_noisy"] <= 1 and len(d["auroc_noisy_ci"]) == 2
    assert "noisy clean negatives" in (out / "report.md").read_text()
    plain = tmp_path / "plain"
    assert main(["evaluate", "--model", str(model), "--detector", str(det), "--n-boot", "20", "--out", str(plain)]) == 0
    p = json.loads((plain / "metrics.json").read_text())
    assert p["config"]["noisy_clean"] is False and "auroc_noisy" not in p["defense"]
    assert p["defense"]["auroc"] == d["auroc"]  # the protocol adds a number, it changes none

    cmp = tmp_path / "cmp"
    assert main(["compare", "--model", str(model), "--detectors", toy, "--fpr", "0.05", "--device", "cpu",
                 "--noisy-clean", "--out", str(cmp)]) == 0
    assert "AUROC with noisy negatives" in capsys.readouterr().out
    c = json.loads((cmp / "compare.json").read_text())
    assert c["sizes"]["test_noisy"] == c["sizes"]["test"] and "auroc_noisy" in c["detectors"][0]
    assert "Noisy negatives" in (cmp / "compare.md").read_text()


def test_grid_noisy_clean_from_the_flag_or_the_config(toy, made, tmp_path, capsys):
    from badexpert.pipeline.grid import format_matrix, plan, summarize

    root, data, model, det = made
    grid = {"datasets": [{"name": "imagefolder", "label": "blobs", "data_path": str(data)}],
            "architectures": [{"arch": "cnn", "width": 8}], "attacks": [{"name": "badnet", "params": {"poison_rate": 0.1}}],
            "detectors": [toy], "seeds": [0], "reserved": 80, "calibration": 80, "fpr": 0.05, "n_boot": 20,
            "device": "cpu", "recipe": {"optimizer": "adam", "lr": 0.003, "epochs": 8, "batch_size": 32,
                                         "weight_decay": 0, "augment": False}}
    # rows of grids run without the protocol keep their keys; with it, every row is a new one
    keys = [plan(g)[0]["detectors"][0]["key"] for g in (grid, {**grid, "noisy_clean": False},
                                                        {**grid, "noisy_clean": True})]
    assert keys[0] == keys[1] != keys[2]
    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps(grid))
    out = tmp_path / "grid"
    assert main(["grid", "--config", str(cfg), "--out", str(out), "--noisy-clean"]) == 0
    capsys.readouterr()
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["key"] == keys[2] and row["n_noisy"] == row["n_test"]
    assert 0 <= row["auroc_noisy"] <= 1 and 0 <= row["auroc_noisy_filtered"] <= 1 and row["fpr_noisy"] is not None
    assert json.loads((out / "grid.json").read_text())["noisy_clean"] is True
    assert "AUROC with noisy negatives" in (out / "summary.md").read_text()
    assert "noisy AUROC" in (out / "matrix.md").read_text()
    assert "auroc_noisy_mean" in (out / "summary.csv").read_text().splitlines()[0]
    # the summary's noisy column is the paper's population, as its AUROC column
    (s,) = summarize([row], n_boot=20)
    assert s["auroc_noisy_mean"] == row["auroc_noisy_filtered"] and s["auroc_mean"] == row["auroc_filtered"]
    # a row without the protocol (an earlier results.jsonl) reads as n/a in the noisy column
    old = {k: v for k, v in row.items() if "noisy" not in k}
    text = format_matrix(summarize([old, {**row, "attack": "other"}], n_boot=20))
    assert "n/a" in text.splitlines()[4] and "noisy AUROC" in text


@pytest.mark.parametrize("argv_tail, match", [
    (["run", "--config", "{cfg}", "--out", "{out}"], "config field 'noisy_clean' must be true or false"),
    (["grid", "--config", "{grid}", "--out", "{out}"], "'noisy_clean' must be true or false"),
    (["grid", "--config", "{missing}", "--out", "{out}", "--noisy-clean"], "missing.json"),
])
def test_noisy_clean_mistakes_are_one_line(argv_tail, match, tmp_path, capsys):
    cfg, grid = tmp_path / "cfg.json", tmp_path / "grid.json"
    cfg.write_text(json.dumps({"dataset": "fashion-mnist", "noisy_clean": "yes"}))
    grid.write_text(json.dumps({"datasets": ["fashion-mnist"], "architectures": ["cnn"], "attacks": ["badnet"],
                                "detectors": ["badexpert"], "seeds": [0], "noisy_clean": 1}))
    names = {"cfg": cfg, "grid": grid, "missing": tmp_path / "missing.json", "out": tmp_path / "out"}
    assert main([a.format(**names) for a in argv_tail]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_evaluate_and_compare_report_further_target_fprs(toy, made, tmp_path, capsys):
    """``--extra-fpr``: the same detector also reported at another target, in metrics.json and the
    printed table; an unreachable or invalid target is one line, with nothing written."""
    root, data, model, det = made
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(model), "--detector", str(det), "--extra-fpr", "0.2", "--n-boot", "0",
                 "--out", str(out)]) == 0
    assert "at 20.0% target FPR" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    (p,) = m["defense"]["operating_points"]
    assert m["config"]["extra_fprs"] == [0.2] and p["fpr_target"] == 0.2
    assert p["threshold"] <= m["defense"]["threshold"] and p["fpr"] >= m["defense"]["fpr"]
    cmp = tmp_path / "cmp"
    assert main(["compare", "--model", str(model), "--detectors", toy, "--fpr", "0.05", "--extra-fpr", "0.2",
                 "--device", "cpu", "--out", str(cmp)]) == 0
    assert "At further target FPRs" in capsys.readouterr().out
    (d,) = json.loads((cmp / "compare.json").read_text())["detectors"]
    assert [q["fpr_target"] for q in d["operating_points"]] == [0.2]
    for argv, match in ((["evaluate", "--model", str(model), "--detector", str(det), "--extra-fpr", "0.0001"],
                         "further target FPR 0.0001 cannot be reached"),
                        (["compare", "--model", str(model), "--detectors", toy, "--extra-fpr", "2"], "extra_fprs")):
        assert main([*argv, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()
