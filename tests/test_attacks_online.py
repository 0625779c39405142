"""``online=True``: an attack that poisons a stored training set can instead poison every batch
after augmentation (WaNet's own procedure), so crops and flips never move or mirror its trigger.
Records made without it keep their keys; attacks it does not apply to say so in one line."""

import pytest
import torch

import badexpert.training as training
from badexpert.attacks import ATTACKS, attack_from_dict, get_attack
from badexpert.attacks.base import restoring
from badexpert.errors import BadExpertError
from badexpert.evaluation.core import evaluate
from badexpert.models import build_model
from badexpert.training import Recipe

from .conftest import make_blobs

RECIPE = Recipe(optimizer="adam", lr=3e-3, epochs=4, batch_size=64, weight_decay=0, augment=True, pad=1, hflip=False)


def _cnn(data):
    return lambda: build_model("cnn", in_channels=1, num_classes=4, image_size=12, mean=data.mean, std=data.std,
                               width=8)


def test_online_is_left_out_of_the_record_while_off():
    """Cache keys hash ``to_dict()``: an attack without ``online`` records what it recorded before."""
    for name, cls in ATTACKS.items():
        if cls.can_poison_online():
            with restoring():  # the files an attack names (Refool's reflections) are not needed here
                assert "online" not in get_attack(name, **_needs(name)).to_dict(), name
    on = get_attack("wanet", online=True)
    assert on.to_dict()["online"] is True and attack_from_dict(on.to_dict()).online is True


def _needs(name):
    return {"reflections": "reflections.zip"} if name == "refool" else {}


@pytest.mark.parametrize("name, why", [("sig", "clean-label"), ("bpp", "already poisons every batch online"),
                                        ("issba", "learned"), ("sra", "implants its own way")])
def test_attacks_it_does_not_apply_to_say_so(name, why):
    with pytest.raises(BadExpertError, match=why):
        get_attack(name, online=True)
    with pytest.raises(BadExpertError, match="add up to more than 1 per batch"):
        get_attack("wanet", online=True, poison_rate=0.6, cover_rate=0.6)


def test_the_batch_is_poisoned_after_augmentation(monkeypatch):
    """Augmentation that blanks every image: offline, the stored patch is blanked with the rest and
    the model never sees it; online, the patch is stamped on the blank batch afterwards, on exactly
    the per-batch count of samples."""
    tr = make_blobs(256, seed=1)
    monkeypatch.setattr(training, "augment", lambda x, **kw: torch.zeros_like(x))
    recipe = RECIPE.replace(epochs=1)
    for online in (False, True):
        attack = get_attack("badnet", poison_rate=0.1, online=online)
        seen = []
        build = _cnn(tr)

        def hooked():
            m = build()
            m.register_forward_pre_hook(lambda mod, args: seen.append(int((args[0].flatten(1) > 0).any(1).sum()))
                                        if mod.training else None)
            return m

        _, info = attack.implant(tr, hooked, recipe, 0, log=lambda m: None)
        if online:
            assert info["poisoned_per_batch"] == 6 and info["batch_size"] == 64
            assert seen == [6] * (256 // 64)
        else:
            assert seen == [0] * (256 // 64)


def test_an_online_backdoor_implants_and_is_seeded():
    tr, te = make_blobs(1500, seed=1), make_blobs(600, seed=2)
    attack = get_attack("badnet", poison_rate=0.05, online=True)
    torch.manual_seed(0)  # the initial weights (the pipeline seeds them the same way)
    model, info = attack.implant(tr, _cnn(tr), RECIPE, 0, log=lambda m: None)
    m = evaluate(model.eval(), None, te, attack, n_boot=0, throughput=False).metrics
    assert m["attack_success_rate"] >= 0.9 and m["clean_accuracy"] >= 0.95
    torch.manual_seed(0)
    again, _ = get_attack("badnet", poison_rate=0.05, online=True).implant(tr, _cnn(tr), RECIPE, 0, log=lambda m: None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
