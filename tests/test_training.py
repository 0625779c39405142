import pytest
import torch

from badexpert.errors import BadExpertError
from badexpert.models import build_model
from badexpert.training import Recipe, accuracy, lr_at, train


def test_step_schedule_matches_the_papers_auxiliary_recipe():
    r = Recipe(lr=0.1, epochs=10, schedule="step", milestones=(2, 4, 6, 8), gamma=0.1)
    got = [lr_at(r, e * 32, 32) for e in range(10)]
    want = [0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5]
    assert got == pytest.approx(want)


def test_cosine_schedule_with_warmup():
    r = Recipe(lr=1.0, epochs=4, schedule="cosine", warmup_epochs=1)
    assert lr_at(r, 0, 10) == pytest.approx(0.1)
    assert lr_at(r, 9, 10) == pytest.approx(1.0)
    assert lr_at(r, 25, 10) == pytest.approx(0.5, abs=0.03)
    assert lr_at(r, 39, 10) < 0.01


def _fit(blobs, seed):
    tr, te = blobs
    torch.manual_seed(seed)
    m = build_model("cnn", in_channels=1, num_classes=4, image_size=12, mean=tr.mean, std=tr.std, width=8)
    train(m, tr.subset(range(1200)), Recipe(optimizer="adam", lr=3e-3, epochs=4, batch_size=64, weight_decay=0,
                                           augment=True, hflip=True, pad=0), seed=seed)
    return m, te


def test_training_learns_and_is_reproducible(blobs):
    m1, te = _fit(blobs, seed=0)
    m2, _ = _fit(blobs, seed=0)
    m3, _ = _fit(blobs, seed=1)
    assert accuracy(m1, te) > 0.9  # chance is 0.25
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))


def test_callback_can_stop_training(blobs):
    tr, _ = blobs
    m = build_model("cnn", in_channels=1, num_classes=4, image_size=12, width=4)
    seen = []
    log = train(m, tr.subset(range(640)), Recipe(epochs=3, batch_size=64, augment=False),
                callback=lambda step, model: seen.append(step) or step >= 4, callback_every=2)
    assert seen == [2, 4] and log.stopped_early and log.steps == 4


def test_recipe_errors():
    with pytest.raises(BadExpertError, match="recipe field 'optimizer' must be one of: sgd, adam, adamw"):
        train(build_model("cnn", in_channels=1, num_classes=2, image_size=8, width=4),
              (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)), Recipe(optimizer="rmsprop"))
    with pytest.raises(BadExpertError, match="unknown recipe field"):
        Recipe.from_dict({"lr": 0.1, "epoch": 3})


def test_callback_runs_once_per_step_at_epoch_boundaries(blobs):
    tr, _ = blobs
    m = build_model("cnn", in_channels=1, num_classes=4, image_size=12, width=4)
    seen = []
    train(m, tr.subset(range(640)), Recipe(epochs=2, batch_size=64, augment=False),  # 10 steps per epoch
          callback=lambda step, model: seen.append(step) or False, callback_every=5)
    assert seen == [5, 10, 15, 20]


def test_eval_mode_restores_every_submodule():
    from torch import nn

    from badexpert.utils import eval_mode

    inner = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    outer = nn.Sequential(inner)  # a train-mode wrapper around an eval-mode model
    with eval_mode(outer):
        assert not outer.training and not inner[1].training
    assert outer.training and not inner.training and not inner[1].training


@pytest.mark.parametrize("arch, width", [("cnn", 8), ("resnet18", 4)])
def test_channels_last_trains_the_same_model_faster_and_hands_it_back_in_the_usual_layout(blobs, arch, width):
    """Inside ``channels_last(True)`` a conv model trains in the channels-last layout: the same weights up
    to rounding, reproducible run to run, and handed back contiguous (safetensors needs that)."""
    from badexpert.training import channels_last

    tr, te = blobs
    recipe = Recipe(optimizer="sgd", lr=0.05, epochs=2, batch_size=32)

    def trained(layout: bool):
        torch.manual_seed(0)
        m = build_model(arch, in_channels=tr.channels, num_classes=tr.num_classes, image_size=tr.image_size,
                        width=width)
        seen = []
        with channels_last(layout):
            train(m, tr, recipe, seed=1, callback=lambda step, model: seen.append(
                next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
                .is_contiguous(memory_format=torch.channels_last)))
        return m, seen

    usual, seen_usual = trained(False)
    fast, seen_fast = trained(True)
    again, _ = trained(True)
    assert seen_fast and all(seen_fast) and not any(seen_usual)  # trained in the layout asked for
    for a, b, c in zip(usual.state_dict().values(), fast.state_dict().values(), again.state_dict().values()):
        assert b.is_contiguous() and torch.equal(b, c)
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)
    assert accuracy(fast, te) > 0.9 and abs(accuracy(fast, te) - accuracy(usual, te)) <= 0.02


def test_badexpert_models_train_channels_last_on_a_cpu_by_default_and_a_foreign_module_does_not(blobs):
    """Without the context: a convolutional model badexpert built (it declares ``channels_last_safe``)
    trains in the channels-last layout on a CPU; its ViT (which gains nothing from it) and a module
    from elsewhere keep the usual layout."""
    from torch import nn

    tr, _ = blobs
    recipe = Recipe(optimizer="sgd", lr=0.05, epochs=1, batch_size=32, max_steps=2)
    ours = build_model("cnn", in_channels=tr.channels, num_classes=tr.num_classes, image_size=tr.image_size, width=4)
    foreign = nn.Sequential(nn.Conv2d(tr.channels, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                            nn.LazyLinear(tr.num_classes))
    foreign(tr.images[:2].float())  # materialise the lazy layer
    from badexpert.training import _layout

    vit = build_model("vit", in_channels=3, num_classes=tr.num_classes, image_size=tr.image_size, width=16)
    cpu = torch.device("cpu")
    assert _layout(vit, torch.rand(2, 3, *tr.image_size), cpu) is None
    assert _layout(ours, tr.images[:2].float(), cpu) is torch.channels_last
    for model, expected in ((ours, True), (foreign, False)):
        seen = []
        train(model, tr, recipe, seed=0, callback_every=1, callback=lambda step, m: seen.append(
            next(p for p in m.parameters() if p.dim() == 4 and p.shape[1] > 1).is_contiguous(
                memory_format=torch.channels_last)))
        assert seen and all(s == expected for s in seen), (type(model).__name__, seen)
        assert all(p.is_contiguous() for p in model.parameters())
