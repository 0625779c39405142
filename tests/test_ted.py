"""TED (Mo et al., S&P 2024): rank trajectories by hand, the layer choice, the fidelity claim (a
patch trigger's trajectory starts far from its predicted class and joins it late), determinism,
persistence and refusals. (The shared contract in test_detectors.py runs it on the backdoored
blobs model too.)"""

import copy

import pytest
import torch
from torch import nn

from badexpert.detectors import DETECTORS, TED, get_detector, load_detector
from badexpert.detectors.base import detector_from_state
from badexpert.detectors.ted import LOGITS, default_layers
from badexpert.errors import BadExpertError
from badexpert.metrics import auroc


@pytest.fixture(scope="module")
def setup(backdoored):
    model, attack, _, te = backdoored
    fit, test = te.subset(range(0, 800)), te.subset(range(1600, 2400))
    triggered = attack.apply(test.images[attack.counts(test.labels)])
    return TED(seed=0).fit(model, fit), model, fit, test, triggered


def test_fidelity_patch_trigger_trajectories_are_outliers(setup):
    """The paper's claim on the tiny BadNet CNN: clean inputs sit next to references of their
    predicted class at every layer (rank 0), triggered ones are far from the target class in the
    early layers and reach it only at the output, so their trajectories are outliers.
    Measured: AUROC 1.000; mean ranks clean [0, 0, 0, 0], triggered [20.2, 21.7, 19.3, 0]."""
    det, model, _, test, triggered = setup
    clean, trig = det.score(test).numpy(), det.score(triggered).numpy()
    assert auroc(clean, trig) > 0.97
    rc, rt = det.rank_trajectories(test.images[:200]).mean(0), det.rank_trajectories(triggered[:200]).mean(0)
    assert (rc[:-1] < 2).all() and (rt[:-1] > 10).all()  # early layers: triggered inputs far from the target class
    assert rt[-1] < 1  # at the logits they have joined it
    assert det.layers_ == ["net.features.2", "net.features.6", "net.features.10", LOGITS]
    assert det.cost == {"forward": 1, "backward": 0} and not det.needs_gradients


def test_ranks_by_hand():
    """K_l = the number of references strictly closer than the nearest one of the input's label."""
    det = TED()
    det.reference_labels_ = torch.tensor([0, 1, 1, 2])
    det.references_ = [torch.tensor([[0.0], [1.0], [2.0], [3.0]])]
    acts = [torch.tensor([[0.1], [2.9], [2.4], [0.0]])]
    labels = torch.tensor([1, 0, 2, 3])  # class 3 has no reference: the largest rank
    ranks = det._ranks(acts, labels)
    # x=0.1, label 1: refs by distance 0(0.1), 1(0.9) -> one closer; x=2.9, label 0: refs 3, 2, 1 closer
    # than ref 0 (2.9); x=2.4, label 2: ref 2 (0.4) is closer than ref 3 (0.6); no class-3 reference: 4
    assert ranks[:, 0].tolist() == [1.0, 3.0, 1.0, 4.0]


def test_default_layers_choose_blocks_activations_and_skip_inside_blocks():
    from badexpert.models import build_model

    resnet = build_model("resnet18", in_channels=1, num_classes=4, image_size=12, mean=[0.5], std=[0.5], width=4)
    assert default_layers(resnet) == ["net.stem.2"] + [f"net.layers.{i}" for i in range(8)]
    cnn = build_model("cnn", in_channels=1, num_classes=4, image_size=12, mean=[0.5], std=[0.5], width=4)
    assert default_layers(cnn) == ["net.features.2", "net.features.6", "net.features.10"]
    det = TED(layers=("net.features.6",), references_per_class=5).fit(cnn.eval(), _random_data(60))
    assert det.layers_ == ["net.features.6", LOGITS]


def _random_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 12, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_references_are_seeded_correct_and_per_class(setup, backdoored):
    det, model, fit, _, _ = setup
    rep = det.fit_report_
    assert rep["references"] == 80 and rep["references_per_class"] == [20] * 4 and rep["trajectory_samples"] == 720
    assert torch.equal(det.references_[-1].argmax(1), det.reference_labels_)  # the last layer is the logits: all correct
    again = TED(seed=0).fit(model, fit)
    assert all(torch.equal(a, b) for a, b in zip(again.references_, det.references_))
    other = TED(seed=1).fit(model, fit)
    assert not torch.equal(other.references_[0], det.references_[0])
    # the caller's global RNG is neither used nor advanced
    torch.manual_seed(5)
    before = torch.rand(2)
    torch.manual_seed(5)
    TED(seed=0).fit(model, fit)
    assert torch.equal(torch.rand(2), before)


def test_scores_do_not_depend_on_batch_size_order_or_dtype(setup):
    det, _, _, test, triggered = setup
    x = torch.cat([test.images[:20], (triggered[:20] * 255).round().to(torch.uint8)])
    ref = det.score(x)  # (batch, order, dtype, NaN: the contract kit, tests/test_detectors.py)
    d = det.score_details(x)
    assert d["ranks"].shape == (40, 4) and torch.allclose(torch.from_numpy(d["score"]), ref, atol=1e-5)


def test_save_load_round_trip(setup, tmp_path):
    det, model, _, test, triggered = setup
    det = copy.copy(det).calibrate(test.subset(range(0, 300)), fpr=0.1)
    path = det.save(tmp_path / "ted.safetensors")
    loaded = load_detector(path, model)
    assert loaded.layers_ == det.layers_ and loaded.fit_report_ == det.fit_report_  # (scores: the contract kit)
    tensors, meta = det.to_state()
    for drop in ("reference.0", "pca_variance"):
        damaged = {k: v for k, v in tensors.items() if k != drop}
        with pytest.raises(BadExpertError, match="TED detector file's references .* damaged"):
            detector_from_state(damaged, meta, model)
    bad = dict(tensors, pca_components=tensors["pca_components"][:2])
    with pytest.raises(BadExpertError, match="damaged"):
        detector_from_state(bad, meta, model)
    with pytest.raises(BadExpertError, match="damaged"):
        detector_from_state(dict(tensors), {**meta, "state": {**meta["state"], "layers": ["x"]}}, model)


def test_refusals_and_parameters(backdoored):
    model, _, _, te = backdoored
    with pytest.raises(BadExpertError, match="no module named 'nope'"):
        TED(layers=("nope",)).fit(model, te.subset(range(100)))
    with pytest.raises(BadExpertError, match="leave 0 beside the 40 references"):
        TED(references_per_class=10).fit(model, _balanced(te, 10))
    for params, field in [({"references_per_class": 0}, "references_per_class"), ({"layers": ("a", "a")}, "layers"),
                          ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(BadExpertError, match=f"'{field}'") as err:
            get_detector("ted", **params)
        assert "\n" not in str(err.value)
    assert DETECTORS["ted"] is TED and TED().get_params() == {
        "references_per_class": 20, "layers": (), "batch_size": 256, "seed": 0, "device": None}
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.extra = nn.Linear(144, 4), nn.ReLU()

        def forward(self, x):
            return self.lin(x.flatten(1))

    unused = Unused()
    with pytest.raises(BadExpertError, match="'extra' is not used by the model's forward pass"):
        TED(layers=("extra",), references_per_class=2).fit(unused, _random_data(40))


def _balanced(te, per_class):
    """``per_class`` test blobs of each class that the fixture model classifies correctly."""
    idx = torch.cat([(te.labels == c).nonzero().flatten()[:per_class] for c in range(4)])
    return te.subset(idx.tolist())
