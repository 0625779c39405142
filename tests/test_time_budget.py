"""The time budget of long runs (``badexpert grid --time-budget``): training stops at an epoch
boundary with its state kept, and the same training started again ends with exactly the weights of
an uninterrupted run; the grid stops between cells and resumes on the next call."""

from __future__ import annotations


import pytest
import torch

from badexpert.errors import TimeBudgetReached
from badexpert.models import build_model
from badexpert.training import Recipe, time_budget, train

from .conftest import make_blobs


def _model():
    torch.manual_seed(0)
    return build_model("cnn", in_channels=1, num_classes=4, image_size=12, width=4)


RECIPE = Recipe(optimizer="sgd", lr=0.05, epochs=3, batch_size=32, schedule="cosine", augment=True, hflip=False)


@pytest.mark.parametrize("layout", [False, True], ids=["usual", "channels_last"])
def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path, layout):
    from badexpert.training import channels_last

    data = make_blobs(256, seed=1)
    straight = _model()
    with channels_last(layout):
        train(straight, data, RECIPE, seed=3)

    m = _model()
    with pytest.raises(TimeBudgetReached, match="after epoch 1 of 3"):
        with time_budget(0, checkpoint_dir=tmp_path), channels_last(layout):  # stop after the first epoch
            train(m, data, RECIPE, seed=3)
    kept = list(tmp_path.glob("train-*.safetensors"))
    assert len(kept) == 1
    assert not all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), straight.state_dict().values()))

    resumed = _model()  # a fresh process: the same initial weights, then the checkpoint
    with time_budget(None, checkpoint_dir=tmp_path), channels_last(layout):
        log = train(resumed, data, RECIPE, seed=3)
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), name
    assert log.steps == 3 * (256 // 32)
    assert not list(tmp_path.glob("train-*.safetensors"))  # a finished training leaves no checkpoint


def test_a_checkpoint_serves_only_the_same_training(tmp_path):
    data = make_blobs(256, seed=1)
    with pytest.raises(TimeBudgetReached):
        with time_budget(0, checkpoint_dir=tmp_path):
            train(_model(), data, RECIPE, seed=3)
    # another seed, other data or another recipe train from scratch (and leave the kept state alone)
    for kwargs, d in (({"seed": 4}, data), ({"seed": 3}, make_blobs(256, seed=2))):
        ref, m = _model(), _model()
        train(ref, d, RECIPE, **kwargs)
        with time_budget(None, checkpoint_dir=tmp_path):
            train(m, d, RECIPE, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert len(list(tmp_path.glob("train-*.safetensors"))) == 1


def test_without_a_budget_nothing_changes(tmp_path):
    data = make_blobs(128, seed=1)
    a, b = _model(), _model()
    train(a, data, RECIPE, seed=0)
    with time_budget(3600, checkpoint_dir=tmp_path):
        train(b, data, RECIPE, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not list(tmp_path.iterdir())


def test_a_training_with_a_stopping_rule_is_not_cut_by_the_budget(tmp_path):
    """A finetuning that stops by its own rule (the detectors' ``callback``) keeps state outside the
    loop, so the budget leaves it alone: it runs to its end and keeps no checkpoint."""
    data = make_blobs(128, seed=1)
    a, b = _model(), _model()
    train(a, data, RECIPE, seed=0, callback=lambda step, m: False)
    with time_budget(0, checkpoint_dir=tmp_path):
        train(b, data, RECIPE, seed=0, callback=lambda step, m: False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not list(tmp_path.iterdir())


class _Running:
    """A callback that keeps state the training depends on (a running mean of the first layer's
    weights, fed back into every batch) and hands it over, as the BaDExpert-aware attack's does."""

    def __init__(self):
        self.mean, self.calls = None, 0

    def __call__(self, step, model):
        self.mean = next(model.parameters()).detach().mean().clone()
        self.calls += 1
        return False

    def nudge(self, x, y, generator):
        return (x if self.mean is None else (x + 0.1 * self.mean).clamp(0, 1)), y

    def state_dict(self):
        return {"calls": torch.tensor(self.calls), **({} if self.mean is None else {"mean": self.mean})}

    def load_state_dict(self, state):
        self.calls, self.mean = int(state["calls"]), state.get("mean")


def test_a_training_whose_callback_hands_over_its_state_resumes_to_the_same_weights(tmp_path):
    data = make_blobs(256, seed=1)
    kw = {"seed": 3, "callback_every": 3}
    cb = _Running()
    straight = _model()
    train(straight, data, RECIPE, callback=cb, batch_transform=cb.nudge, **kw)

    cb1 = _Running()
    with pytest.raises(TimeBudgetReached, match="after epoch 1 of 3"):
        with time_budget(0, checkpoint_dir=tmp_path):
            train(_model(), data, RECIPE, callback=cb1, batch_transform=cb1.nudge, **kw)
    cb2 = _Running()
    resumed = _model()
    with time_budget(None, checkpoint_dir=tmp_path):
        train(resumed, data, RECIPE, callback=cb2, batch_transform=cb2.nudge, **kw)
    assert cb2.calls == cb.calls and torch.equal(cb2.mean, cb.mean)
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_serves_only_the_cache_entry_it_was_building(tmp_path):
    """Two cache entries whose trainings start alike (online poisoning leaves the data as it is)
    keep separate checkpoints: the second trains from scratch and the first's state stays."""
    from badexpert.utils import build_lock

    data = make_blobs(256, seed=1)
    kept = tmp_path / "checkpoints"
    with pytest.raises(TimeBudgetReached):
        with build_lock(tmp_path / "suspect-a.safetensors"), time_budget(0, checkpoint_dir=kept):
            train(_model(), data, RECIPE, seed=3)
    ref, m = _model(), _model()
    train(ref, data, RECIPE, seed=3)
    with build_lock(tmp_path / "suspect-b.safetensors"), time_budget(None, checkpoint_dir=kept):
        train(m, data, RECIPE, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert len(list(kept.glob("train-*.safetensors"))) == 1
    with build_lock(tmp_path / "suspect-a.safetensors"), time_budget(None, checkpoint_dir=kept):
        train(_model(), data, RECIPE, seed=3)  # the first resumes and clears its checkpoint
    assert not list(kept.glob("train-*.safetensors"))


def test_the_grid_runner_skips_a_training_that_would_not_fit_and_runs_a_cached_cell_that_does(tmp_path,
                                                                                               monkeypatch):
    """``budget_runner`` estimates each cell: one that trains needs the longest cell so far, one
    whose suspect model is cached only its detectors. A training cell that would not fit is left
    for the rerun, and the cached cell after it still runs."""
    import badexpert.pipeline.grid as grid_mod

    clock = [0.0]
    monkeypatch.setattr(grid_mod.time, "monotonic", lambda: clock[0])
    (tmp_path / "suspect-cached.safetensors").write_bytes(b"")
    specs = [{"cell": "a", "suspect": "a"}, {"cell": "b", "suspect": "b"}, {"cell": "c", "suspect": "cached"},
             {"cell": "d", "suspect": "d"}]
    cost = {"a": (100.0, 90.0), "b": (100.0, 90.0), "c": (10.0, 0.0), "d": (100.0, 90.0)}
    ran = []

    def fn(spec):
        took, trained = cost[spec["cell"]]
        clock[0] += took
        ran.append(spec["cell"])
        return [{"model_cached": trained == 0.0, "train_seconds": trained}]

    logged = []
    runner = grid_mod.budget_runner(150.0, tmp_path, log=logged.append)
    assert len(list(runner(fn, specs))) == 2
    assert ran == ["a", "c"] and runner.stopped  # b and d would train for ~100 s with 50 s left
    assert "stopping with 2 cell(s) to run" in logged[-1]

    clock[0] = 0.0
    runner = grid_mod.budget_runner(1000.0, tmp_path, log=logged.append)
    ran.clear()
    list(runner(fn, specs))
    assert ran == ["a", "b", "c", "d"] and not runner.stopped
