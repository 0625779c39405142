"""The contract kit (badexpert.testing) certifies a user's own detector and attack, and a method
that breaks a guarantee fails with that guarantee's name. (The registered detectors and attacks
are run through it in test_detectors.py and test_attacks.py.)"""

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import pytest
import torch

from badexpert.attacks import Attack
from badexpert.detectors import DETECTORS, Detector
from badexpert.errors import BadExpertError
from badexpert.testing import ContractError, bad_values, check_attack, check_detector
from badexpert.validation import NonNegativeInt, PositiveFloat, PositiveInt, Range


class PixelOutlier(Detector):
    """A user's detector: how far the most unusual pixel lies from the clean pixels' mean, in
    clean standard deviations (a patch trigger puts saturated pixels where clean images have
    background). It never runs the model."""

    name = "pixel_outlier"
    forward_passes_per_input = 0
    uses_model = False

    def __init__(self, *, floor: PositiveFloat = 0.02, batch_size: PositiveInt = 256, seed: NonNegativeInt = 0,
                 device: str | None = None) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.floor = floor

    def _fit(self, model, images, labels):
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        self.mean_ = x.mean(0)
        self.std_ = x.std(0).clamp_min(self.floor)

    def _score_batch(self, x):
        z = (x - self.mean_.to(x.device)) / self.std_.to(x.device)
        return z.abs().flatten(1).max(1).values

    def _state_tensors(self):
        return {"mean": self.mean_, "std": self.std_}

    def _load_state(self, model, tensors, meta):
        self.mean_, self.std_ = tensors["mean"], tensors["std"]


@pytest.fixture(scope="module")
def task(backdoored):
    model, attack, _, te = backdoored
    data = te.subset(range(0, 256))
    test = te.subset(range(1600, 1700))
    triggered = attack.apply(test.images[attack.counts(test.labels)][:40])
    return model, data, triggered


def test_a_users_own_detector_passes_the_kit(task):
    model, data, triggered = task
    report = check_detector(PixelOutlier(), model, data, triggered=triggered)
    assert report["sign"] == "ok" and report["batch independence"] == "ok" and report["non-finite inputs"] == "ok"
    # not registered: load_detector cannot find the class, so the round trip is skipped, and says why
    assert report["save/load round trip"].startswith("skipped: 'pixel_outlier' is not registered")
    assert check_detector(PixelOutlier(), model, (data.images, data.labels))["sign"] == "skipped: no triggered inputs given"
    # registered (one registry line), the round trip runs too
    DETECTORS.add("pixel_outlier", PixelOutlier)
    try:
        report = check_detector(PixelOutlier(), model, data, triggered=triggered)
    finally:
        DETECTORS.remove("pixel_outlier")
    assert set(report.values()) == {"ok"} and "save/load round trip" in report


# --- broken detectors: each fails with the guarantee it breaks -------------------------------------
class BatchDependent(PixelOutlier):
    def _score_batch(self, x):
        s = super()._score_batch(x)
        return s - s.mean()  # relative to the rest of the batch


class LowerIsSuspicious(PixelOutlier):
    def _score_batch(self, x):
        return -super()._score_batch(x)


class GlobalRandom(PixelOutlier):
    def _score_batch(self, x):
        return super()._score_batch(x) + torch.rand(len(x), device=x.device)  # not from input_generators


class PublicFitted(PixelOutlier):
    def _fit(self, model, images, labels):
        super()._fit(model, images, labels)
        self.clean_mean = self.mean_.mean()


class Unseeded(PixelOutlier):
    calls = 0

    def _fit(self, model, images, labels):
        super()._fit(model, images, labels)
        Unseeded.calls += 1
        self.mean_ = self.mean_ + 0.01 * Unseeded.calls  # depends on something other than the seed


class Hidden(PixelOutlier):
    def __init__(self, *, floor: PositiveFloat = 0.02, batch_size: PositiveInt = 256, seed: NonNegativeInt = 0,
                 device: str | None = None) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        del self.floor
        self._floor = floor  # get_params cannot see it


class GradientsUndeclared(PixelOutlier):
    backward_passes_per_input = 1

    @property
    def needs_gradients(self):
        return False


class NanHidden(PixelOutlier):
    def score(self, x):
        return torch.nan_to_num(super().score(x), nan=0.0)


@pytest.mark.parametrize("cls, guarantee", [
    (BatchDependent, "batch independence"),
    (LowerIsSuspicious, "sign"),
    (GlobalRandom, "repeatable"),
    (PublicFitted, "fitted attributes end with _"),
    (Unseeded, "same seed same scores"),
    (Hidden, "parameters"),
    (GradientsUndeclared, "cost"),
    (NanHidden, "non-finite inputs"),
])
def test_a_broken_detector_fails_with_the_guarantee_it_breaks(cls, guarantee, task):
    model, data, triggered = task
    with pytest.raises(ContractError, match=f"^{cls.__name__} breaks '{guarantee}': ") as err:
        check_detector(cls(), model, data, triggered=triggered)
    assert isinstance(err.value, AssertionError) and "\n" not in str(err.value)


def test_the_sign_message_gives_the_numbers(task):
    model, data, triggered = task
    with pytest.raises(ContractError, match=r"higher scores must mean more suspicious.*AUROC 0\.\d+, needs > 0\.5"):
        check_detector(LowerIsSuspicious(), model, data, triggered=triggered)


def test_the_kits_own_arguments_are_one_line_errors(task):
    model, data, _ = task
    with pytest.raises(BadExpertError, match=r"a detector instance, e\.g\. PixelOutlier\(\), not the class"):
        check_detector(PixelOutlier, model, data)
    with pytest.raises(BadExpertError, match="at least 16 clean images, got 8"):
        check_detector(PixelOutlier(), model, data.subset(range(8)))
    with pytest.raises(BadExpertError, match="labelled clean data"):
        check_detector(PixelOutlier(), model, data.images)
    with pytest.raises(BadExpertError, match="takes a badexpert Attack"):
        check_attack(int)


def test_the_kit_leaves_the_callers_random_state_alone(task):
    model, data, _ = task
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    check_detector(PixelOutlier(), model, data)
    assert torch.equal(torch.rand(3), want)


def test_bad_values_come_from_the_annotation():
    assert bad_values(PositiveInt) == [0, 2.5, "not-a-number"]
    values = bad_values(Annotated[float, Range(gt=0, lt=1)])
    assert values[:2] == [0, 1] and math.isnan(values[2]) and values[3:] == ["not-a-number"]
    assert bad_values(Literal["a", "b"]) == ["no-such-choice"] and bad_values(bool) == [1]
    assert bad_values(str | None) == [] and bad_values(NonNegativeInt | None) == [-1, 2.5, "not-a-number"]


# --- attacks ----------------------------------------------------------------------------------------
@dataclass
class Corner(Attack):
    """A user's attack: a square of ``value`` in the top-left corner."""

    side: PositiveInt = 2
    value: Annotated[float, Range(ge=0, le=1)] = 1.0
    name: ClassVar[str] = "corner"

    def trigger(self, x, parts):
        out = x.clone()
        out[..., : self.side, : self.side] = self.value
        return out


def test_a_users_own_attack_passes_the_kit():
    report = check_attack(Corner, params={"poison_rate": 0.05})
    assert set(report.values()) == {"ok"}
    assert check_attack(Corner(side=3), shape=(1, 8, 8))["trigger state round trip"] == "ok"


@dataclass
class InPlace(Corner):
    def trigger(self, x, parts):
        x[..., : self.side, : self.side] = self.value  # writes into the caller's batch
        return x


@dataclass
class Unchecked(Corner):
    def __post_init__(self):
        self._cache = {}  # skips Attack.__post_init__: no field is validated


@dataclass
class Unseeded_(Corner):
    def trigger_train(self, x, parts, generator):
        return (x + 0.1 * torch.rand(x.shape)).clamp(0, 1)  # the global RNG, not the generator


@dataclass
class WrongLabels(Corner):
    def target_of(self, labels, num_classes=None):
        return torch.full_like(labels, self.target)

    def poison(self, dataset, generator):
        out = super().poison(dataset, generator)
        labels = out.labels.clone()
        labels[out.meta["poison_indices"]] = (self.target + 1) % dataset.num_classes
        return out.with_data(out.images, labels, **out.meta)


@pytest.mark.parametrize("cls, guarantee", [
    (InPlace, "apply"),
    (Unchecked, "parameters"),
    (Unseeded_, "seeded poison"),
    (WrongLabels, "seeded poison"),
])
def test_a_broken_attack_fails_with_the_guarantee_it_breaks(cls, guarantee):
    with pytest.raises(ContractError, match=f"^{cls.__name__} breaks '{guarantee}': "):
        check_attack(cls, params={"poison_rate": 0.05})
