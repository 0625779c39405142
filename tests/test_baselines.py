"""The baseline input detectors STRIP and SCALE-UP: their scores by hand on tiny models, seeded
per-input randomness, parameters, persistence, and end to end through evaluation and configs."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from badexpert.data import to_float
from badexpert.detectors import STRIP, ScaleUp, get_detector, load_detector
from badexpert.detectors.base import clone, detector_from_state
from badexpert.errors import BadExpertError


# --- tiny models whose outputs are known ---------------------------------------------------------
class Linear3(nn.Module):
    """Flatten + a fixed random linear layer to 3 classes."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.lin = nn.Linear(numel, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, numel, generator=g) * 3)
            self.lin.bias.copy_(torch.randn(3, generator=g))

    def forward(self, x):
        return self.lin(x.flatten(1))


class Recorder(Linear3):
    """Linear3 that records every batch it is given."""

    def __init__(self, numel: int) -> None:
        super().__init__(numel)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return super().forward(x)


class MeanRule(nn.Module):
    """Class 1 iff the mean pixel is above 0.55, else class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.cut = nn.Parameter(torch.tensor(0.55))

    def forward(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([self.cut - m, m - self.cut], 1)


def const(*values, shape=(1, 4, 4)) -> torch.Tensor:
    return torch.stack([torch.full(shape, float(v)) for v in values])


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.double(), 1)
    return -(p * torch.log2(p)).sum(1)


# --- STRIP ---------------------------------------------------------------------------------------
def test_strip_score_is_minus_the_mean_entropy_by_hand():
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(6, 1, 3, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.rand(4, 1, 3, 3, generator=g) * 0.6
    model = Linear3(9).eval()
    # n = pool size: drawn without replacement, every input is blended with every clean image once
    det = STRIP(n=6, alpha=0.7, device="cpu").fit(model, (pool, labels))
    want = []
    with torch.no_grad():
        for xi in x:
            ent = [entropy_bits(model((xi + 0.7 * c).clamp(0, 1)[None]))[0] for c in pool]
            want.append(-sum(ent) / len(ent))
    got = det.score(x)
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert torch.allclose(got.double(), torch.stack(want), atol=1e-5)
    # a uint8 clean set is blended as uint8 / 255
    pool8 = (pool * 255).round().to(torch.uint8)
    det8 = STRIP(n=6, alpha=0.7, device="cpu").fit(model, (pool8, labels))
    det_f = STRIP(n=6, alpha=0.7, device="cpu").fit(model, (pool8.float() / 255, labels))
    assert torch.allclose(det8.score(x), det_f.score(x))


def test_strip_entropy_handles_certain_predictions():
    """A model certain of its answer (probabilities underflow to 0) has entropy 0, not NaN."""
    from badexpert.detectors.strip import _entropy_bits

    logits = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    h = _entropy_bits(logits)
    assert h[0].item() == 0.0 and h[1].item() == pytest.approx(math.log2(3))
    assert torch.isnan(_entropy_bits(torch.tensor([[float("nan"), 0.0, 0.0]]))).all()  # a broken model is not hidden


def test_strip_overlays_come_from_the_fitted_clean_set_only():
    g = torch.Generator().manual_seed(1)
    pool = (torch.rand(10, 1, 3, 3, generator=g) * 0.5 * 255).round().to(torch.uint8)
    other = (torch.rand(10, 1, 3, 3, generator=g) * 0.5 * 255).round().to(torch.uint8)
    labels = torch.zeros(10, dtype=torch.int64)
    x = torch.rand(5, 1, 3, 3, generator=g) * 0.5  # x + overlay <= 1: no clamping, blend - x = overlay
    model = Recorder(9).eval()
    det = STRIP(n=4, alpha=1.0, batch_size=3, device="cpu")
    det.fit(model, (other, labels)).fit(model, (pool, labels))  # a refit replaces the pool
    assert torch.equal(det.overlays_, pool)
    clean = pool.float() / 255
    chosen = []
    for xi in x:
        model.seen.clear()
        det.score(xi[None])
        blends = torch.cat(model.seen)
        assert len(blends) == 4 and all(len(b) <= 3 for b in model.seen)  # chunks of batch_size blends
        diff = (blends - xi).flatten(1)
        dist = torch.cdist(diff, clean.flatten(1))
        assert (dist.min(1).values < 1e-5).all()  # every overlay is a fitted clean image
        idx = dist.argmin(1)
        assert len(set(idx.tolist())) == 4  # n <= pool: drawn without replacement
        assert torch.equal(idx, det.overlay_indices(xi[None])[0])
        chosen.append(tuple(idx.tolist()))
    assert len(set(chosen)) > 1  # each input draws its own overlays
    # fewer clean images than n: drawn with replacement, still only from the pool, with a warning
    with pytest.warns(UserWarning, match="fewer than n=25"):
        small = STRIP(n=25, device="cpu").fit(model, (pool, labels))
    idx = small.overlay_indices(to_float(pool[:2]))
    assert idx.shape == (2, 25) and int(idx.min()) >= 0 and int(idx.max()) < 10
    assert small.cost == {"forward": 25, "backward": 0}


def test_strip_scores_do_not_depend_on_batch_size_order_or_dtype(backdoored):
    model, _, _, te = backdoored
    reserved, x = te.subset(range(0, 300)), te.images[2000:2040]
    a = STRIP(n=12, batch_size=7, device="cpu").fit(model, reserved)
    b = STRIP(n=12, batch_size=64, device="cpu").fit(model, reserved)
    # the same overlays whatever the batch (the scores' independence of batch size, order and dtype,
    # and same seed same scores: the contract kit, tests/test_detectors.py)
    assert torch.equal(a.overlay_indices(to_float(x)), b.overlay_indices(to_float(x)))
    assert torch.equal(a.overlay_indices(to_float(x)), a.overlay_indices(x.flip(0).float().div(255)).flip(0))
    # the seed drives the draws
    assert not torch.equal(STRIP(n=12, seed=1, device="cpu").fit(model, reserved).overlay_indices(to_float(x)),
                           b.overlay_indices(to_float(x)))


def test_strip_cost_and_params():
    det = STRIP(n=37, alpha=0.5)
    assert det.cost == {"forward": 37, "backward": 0} and not det.needs_gradients
    assert det.get_params() == {"n": 37, "alpha": 0.5, "batch_size": 256, "seed": 0, "device": None}
    assert STRIP().get_params()["n"] == 100 and STRIP().alpha == 1.0
    assert repr(STRIP(n=5)) == "STRIP(n=5)" and clone(det).get_params() == det.get_params()
    assert det.set_params(n=3).cost["forward"] == 3


@pytest.mark.parametrize("params, match", [
    ({"n": 0}, "'n' must be an integer >= 1, got 0"),
    ({"n": 2.5}, "'n' must be an integer"),
    ({"alpha": 0}, "'alpha' must be a number > 0, got 0"),
    ({"alpha": -0.5}, "'alpha' must be a number > 0"),
    ({"alpha": "1"}, "'alpha'"),
    ({"m": 3}, "no parameter"),
])
def test_strip_bad_parameters_are_one_line_errors(params, match):
    with pytest.raises(BadExpertError, match=match) as err:
        get_detector("strip", **params)
    assert "\n" not in str(err.value)
    det = STRIP(n=4)
    with pytest.raises(BadExpertError, match=match):
        det.set_params(**params)
    assert det.n == 4 and det.alpha == 1.0  # a refused change leaves the detector as it was


# --- SCALE-UP ------------------------------------------------------------------------------------
# MeanRule on constant images of value v: x -> class [v > .55]; each scaled copy min(s v, 1) likewise.
#   v     pred   scaled x3 x5 x7 x9 x11   SPC vs pred
#   0.04  0      0  0  0  0  0              1
#   0.10  0      0  0  1  1  1              2/5
#   0.15  0      0  1  1  1  1              1/5
#   0.20  0      1  1  1  1  1              0
#   0.60  1      1  1  1  1  1              1
def test_scale_up_spc_by_hand():
    det = ScaleUp(device="cpu").fit(MeanRule(), (const(0.3, 0.7), torch.tensor([0, 1])))
    x = const(0.04, 0.10, 0.15, 0.20, 0.60)
    assert torch.allclose(det.score(x), torch.tensor([1.0, 0.4, 0.2, 0.0, 1.0]))
    assert det.scales == (3.0, 5.0, 7.0, 9.0, 11.0) and det.variant == "data_free"
    # other factors: x2 only -> v=0.10 gives 0.2 (class 0, consistent), v=0.30 gives 0.6 (not)
    two = ScaleUp(scales=(2,), device="cpu").fit(MeanRule(), (const(0.3, 0.7), torch.tensor([0, 1])))
    assert torch.equal(two.score(const(0.10, 0.30)), torch.tensor([1.0, 0.0]))
    # the guard's shared pass: the model's own logits give the same scores
    xb = to_float(x)
    assert torch.equal(det.score_given_logits(xb, MeanRule()(xb)).float(), det.score(x))


def test_scale_up_data_limited_standardises_with_clean_ground_truth_labels():
    # clean set with its true labels; SPC against the label (not against the model's prediction):
    #   v=0.10 label 0: scaled preds 0 0 1 1 1 -> 2/5 ; v=0.12 label 1: 0 1 1 1 1 -> 4/5 (vs pred: 1/5)
    #   v=0.20 label 1: 1 1 1 1 1 -> 1 (vs pred: 0) ; v=0.04 label 0: all 0 -> 1 ; v=0.60 label 0: all 1 -> 0 (vs pred: 1)
    clean = (const(0.10, 0.12, 0.20, 0.04, 0.60), torch.tensor([0, 1, 1, 0, 0]))
    truth = torch.tensor([0.4, 0.8, 1.0, 1.0, 0.0], dtype=torch.float64)
    det = ScaleUp(variant="data_limited", device="cpu").fit(MeanRule(), clean)
    assert det.spc_mean_ == pytest.approx(float(truth.mean())) and det.spc_mean_ != pytest.approx(0.52)
    assert det.spc_std_ == pytest.approx(float(truth.std()))
    spc = torch.tensor([1.0, 0.4, 0.2, 0.0, 1.0], dtype=torch.float64)
    want = ((spc - truth.mean()) / truth.std()).float()
    got = det.score(const(0.04, 0.10, 0.15, 0.20, 0.60))
    assert torch.allclose(got, want, atol=1e-6)
    # an increasing affine map of SPC: same ranking as data_free
    free = clone(det).set_params(variant="data_free").fit(MeanRule(), clean)
    assert torch.equal(free.score(const(0.04, 0.10, 0.15)).argsort(), got[:3].argsort())
    assert det.fit_report_["clean_spc_mean"] == pytest.approx(0.64) and not det.fit_report_["std_was_zero"]


def test_scale_up_zero_std_is_guarded():
    det = ScaleUp(variant="data_limited", device="cpu").fit(MeanRule(), (const(0.04, 0.05), torch.tensor([0, 0])))
    assert det.spc_mean_ == 1.0 and det.spc_std_ == 1.0 and det.fit_report_["std_was_zero"]
    assert torch.allclose(det.score(const(0.10, 0.60)), torch.tensor([0.4 - 1.0, 0.0]))


def test_scale_up_cost_and_params():
    assert ScaleUp().cost == {"forward": 6, "backward": 0}
    assert ScaleUp(scales=(2, 4)).cost == {"forward": 3, "backward": 0}
    det = get_detector("scale-up", scales=[2, 4.5], variant="DATA_LIMITED")
    assert det.scales == (2.0, 4.5) and det.variant == "data_limited" and isinstance(det, ScaleUp)
    assert repr(ScaleUp()) == "ScaleUp()"


@pytest.mark.parametrize("params, match", [
    ({"scales": []}, "'scales' must not be empty"),
    ({"scales": [3, 0]}, "'scales' must be a list of .*> 0.*, got .3, 0."),
    ({"scales": [-2]}, "'scales'"),
    ({"scales": 3}, "'scales' must be a list"),
    ({"variant": "data_rich"}, "'variant' must be one of: data_free, data_limited"),
])
def test_scale_up_bad_parameters_are_one_line_errors(params, match):
    with pytest.raises(BadExpertError, match=match) as err:
        get_detector("scale_up", **params)
    assert "\n" not in str(err.value)
    det = ScaleUp(scales=(2, 3))
    with pytest.raises(BadExpertError, match=match):
        det.set_params(**params)
    assert det.scales == (2, 3) and det.variant == "data_free"


# --- persistence ---------------------------------------------------------------------------------
def test_save_load_round_trips(tmp_path):
    g = torch.Generator().manual_seed(2)
    clean8 = (torch.rand(20, 1, 3, 3, generator=g) * 255).round().to(torch.uint8)
    labels = torch.randint(0, 3, (20,), generator=g)
    calib = (torch.rand(30, 1, 3, 3, generator=g) * 255).round().to(torch.uint8)
    x = torch.rand(15, 1, 3, 3, generator=g)
    model = Linear3(9).eval()
    for clean in (clean8, clean8.float() / 255 + 0.001):  # a uint8 pool and a float one
        det = STRIP(n=8, alpha=0.8, device="cpu").fit(model, (clean, labels)).calibrate(calib, 0.2, population="all")
        loaded = load_detector(det.save(tmp_path / "strip.safetensors"), model)
        assert isinstance(loaded, STRIP) and loaded.get_params() == det.get_params()
        assert loaded.overlays_.dtype == clean.dtype and torch.equal(loaded.overlays_, det.overlays_)
        assert torch.equal(loaded.score(x), det.score(x)) and loaded.threshold_ == det.threshold_
    tensors, meta = det.to_state()
    for bad in (None, tensors["overlays"][:, :, :2], tensors["overlays"] * float("nan")):
        damaged = {k: v for k, v in tensors.items() if k != "overlays"}
        if bad is not None:
            damaged["overlays"] = bad
        with pytest.raises(BadExpertError, match="lacks its overlay images.*it is damaged"):
            detector_from_state(damaged, meta, model)

    rule = MeanRule()
    clean = (const(0.10, 0.12, 0.20, 0.04, 0.60), torch.tensor([0, 1, 1, 0, 0]))
    for variant in ("data_free", "data_limited"):
        det = ScaleUp(variant=variant, device="cpu").fit(rule, clean).calibrate(const(0.3, 0.05, 0.13, 0.61), 0.3, population="all")
        loaded = load_detector(det.save(tmp_path / "scale_up.safetensors"), rule)
        assert isinstance(loaded, ScaleUp) and loaded.get_params() == det.get_params()
        assert (loaded.spc_mean_, loaded.spc_std_) == (det.spc_mean_, det.spc_std_)
        x = const(0.04, 0.10, 0.15, 0.20, 0.60)
        assert torch.equal(loaded.score(x), det.score(x)) and torch.equal(loaded.predict(x), det.predict(x))
    tensors, meta = det.to_state()
    meta["state"]["spc_std"] = 0.0
    with pytest.raises(BadExpertError, match="lacks valid clean SPC statistics"):
        detector_from_state(tensors, meta, rule)


# --- end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: STRIP(n=8, device="cpu"), lambda: ScaleUp(device="cpu"),
                                  lambda: ScaleUp(variant="data_limited", device="cpu")])
def test_evaluate_end_to_end(make, backdoored):
    from badexpert.evaluation.core import evaluate

    model, attack, _, te = backdoored
    reserved, calib, test = te.subset(range(0, 400)), te.subset(range(800, 1300)), te.subset(range(1600, 2000))
    det = make().fit(model, reserved).calibrate(calib, 0.05)
    r = evaluate(model, det, test, attack, n_boot=20, throughput=False)
    d = r.metrics["defense"]
    assert d["name"] == det.name and d["params"] == det.get_params()
    assert d["cost"]["forward_passes_per_input"] == det.cost["forward"] and d["cost"]["backward_passes_per_input"] == 0
    assert d["fpr"] <= 0.1 and np.allclose(r.arrays["clean_scores"], det.score(test).numpy())
    assert np.mean(r.arrays["trig_scores"]) > np.mean(r.arrays["clean_scores"])


def test_experiment_config_rejects_bad_detector_parameters_before_reading_data(tmp_path):
    from badexpert.pipeline.experiment import ExperimentConfig

    missing = str(tmp_path / "no-such-data")  # validate must fail on the parameter, never reach the data
    with pytest.raises(BadExpertError, match="detector 'strip' parameter 'n' must be an integer >= 1, got 0"):
        ExperimentConfig(detector="strip", detector_params={"n": 0}, data_path=missing).validate()
    with pytest.raises(BadExpertError, match="'alpha' must be a number > 0"):
        ExperimentConfig(detector="strip", detector_params={"alpha": -1.0}, data_path=missing).validate()
    with pytest.raises(BadExpertError, match="'scales' must not be empty"):
        ExperimentConfig(detector="scale_up", detector_params={"scales": []}, data_path=missing).validate()
    ok = ExperimentConfig(detector="SCALE-UP", detector_params={"variant": "data_limited"}, data_path=missing)
    assert ok.validate() is ok


def test_guard_scores_match_the_detector():
    """Behind a Guard, SCALE-UP reuses the model's logits for the input's own pass (STRIP scores on
    its own); the scores are the detector's either way."""
    from badexpert.deploy.guard import Guard

    g = torch.Generator().manual_seed(4)
    clean, labels = torch.rand(40, 1, 4, 4, generator=g), torch.randint(0, 2, (40,), generator=g)
    calib, x = torch.rand(30, 1, 4, 4, generator=g), torch.rand(12, 1, 4, 4, generator=g) * 0.3
    for det, model in ((STRIP(n=5, device="cpu"), Linear3(16).eval()), (ScaleUp(device="cpu"), MeanRule())):
        det.fit(model, (clean, labels)).calibrate(calib, 0.2, population="all")
        out = Guard(model, det)(x)
        assert torch.equal(out.score, det.score(x)) and torch.equal(out.reject, det.predict(x))
