"""An attack's trained parts (clean host, generators, encoders) are cached by content hash, built
once, reloaded exactly, and timed; a learned trigger does not exist before implanting."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from badexpert.attacks import Attack
from badexpert.attacks.components import Components, tensor_digest
from badexpert.errors import BadExpertError
from badexpert.models import build_model
from badexpert.training import Recipe

from .conftest import make_blobs


def _builder(data):
    return lambda: build_model("cnn", in_channels=1, num_classes=4, image_size=12, mean=data.mean, std=data.std, width=4)


def test_a_component_is_built_once_and_keyed_on_spec_and_data_content(tmp_path):
    data = make_blobs(200, seed=1)
    calls = []

    def build():
        calls.append(1)
        return {"w": torch.arange(6.0).view(2, 3), "n": torch.tensor(3)}

    a = Components(tmp_path, log=lambda m: None)
    first = a.fetch("encoder", {"bits": 8}, build, data=data)
    b = Components(tmp_path, log=lambda m: None)
    again = b.fetch("encoder", {"bits": 8}, build, data=data)
    assert len(calls) == 1 and tensor_digest(first) == tensor_digest(again)
    assert a.info()["components"]["encoder"]["cached"] is False and b.info()["components"]["encoder"]["cached"] is True
    assert "encoder" in a.info()["phase_seconds"] and "encoder" not in b.info()["phase_seconds"]
    b.fetch("encoder", {"bits": 16}, build)  # another spec
    other = make_blobs(200, seed=1)
    other.images[0, 0, 0, 0] ^= 1  # one bit of one pixel
    b.fetch("encoder", {"bits": 8}, build, data=other)
    assert len(calls) == 3 and len(list(tmp_path.glob("component-encoder-*.safetensors"))) == 3
    # without a directory nothing is cached
    Components(log=lambda m: None).fetch("encoder", {"bits": 8}, build, data=data)
    assert len(calls) == 4


def test_clean_model_is_deterministic_and_reloaded_exactly(tmp_path):
    data = make_blobs(300, seed=1)
    recipe = Recipe(optimizer="adam", lr=3e-3, epochs=1, batch_size=64, weight_decay=0, augment=False)
    torch.manual_seed(123)  # the caller's random state does not matter
    m1 = Components(log=lambda m: None).clean_model(_builder(data), data, recipe, seed=5)
    torch.manual_seed(999)
    m2 = Components(log=lambda m: None).clean_model(_builder(data), data, recipe, seed=5)
    assert tensor_digest(m1.state_dict()) == tensor_digest(m2.state_dict())
    trained = Components(tmp_path, log=lambda m: None)
    m3 = trained.clean_model(_builder(data), data, recipe, seed=5)
    loaded = Components(tmp_path, log=lambda m: None)
    m4 = loaded.clean_model(_builder(data), data, recipe, seed=5)
    assert tensor_digest(m3.state_dict()) == tensor_digest(m4.state_dict()) == tensor_digest(m1.state_dict())
    assert loaded.records["clean_model"]["cached"] and not m4.training
    # another seed or recipe is another model
    Components(tmp_path, log=lambda m: None).clean_model(_builder(data), data, recipe, seed=6)
    Components(tmp_path, log=lambda m: None).clean_model(_builder(data), data, recipe.replace(lr=1e-3), seed=5)
    assert len(list(tmp_path.glob("component-clean_model-*.safetensors"))) == 3


@pytest.mark.parametrize("damage", ["garbage", "nan", "kind"])
def test_a_damaged_cached_component_is_a_one_line_error(damage, tmp_path):
    from safetensors.torch import save_file

    c = Components(tmp_path, log=lambda m: None)
    c.fetch("encoder", {}, lambda: {"w": torch.ones(3)})
    (path,) = tmp_path.glob("component-encoder-*.safetensors")
    if damage == "garbage":
        path.write_bytes(b"\x00" * 40)
    elif damage == "nan":
        save_file({"w": torch.tensor([1.0, float("nan")])}, str(path), metadata={"badexpert_component": "encoder"})
    else:
        save_file({"w": torch.ones(3)}, str(path), metadata={"badexpert_component": "generator"})
    with pytest.raises(BadExpertError, match="delete it and run again") as err:
        Components(tmp_path, log=lambda m: None).fetch("encoder", {}, lambda: {"w": torch.ones(3)})
    assert "\n" not in str(err.value)


def test_the_pipeline_shares_the_clean_model_between_attacks(blobs, tmp_path):
    """The clean-label surrogate is the cached clean model: a second attack that needs the same
    clean model (here CL with another radius) loads it instead of training it again, and the
    model's metadata records each phase's seconds and where each part came from."""
    from badexpert.data import Splits
    from badexpert.pipeline.experiment import ExperimentConfig, train_suspect

    tr, te = blobs
    splits = Splits(train=tr.subset(range(600)), reserved=te.subset(range(100)), calibration=te.subset(range(100, 200)),
                    test=te.subset(range(200, 300)))
    cfg = dict(arch="cnn", width=4, attack="cl", recipe={"epochs": 1, "batch_size": 64}, seed=3)
    _, meta = train_suspect(ExperimentConfig(**cfg, attack_params={"poison_rate": 0.1}), splits, cache_dir=tmp_path,
                            log=lambda m: None)
    assert meta["components"]["clean_model"]["cached"] is False
    assert set(meta["phase_seconds"]) == {"clean_model", "perturb_and_poison", "suspect_model"}
    _, meta2 = train_suspect(ExperimentConfig(**cfg, attack_params={"poison_rate": 0.1, "eps": 1.0}), splits,
                             cache_dir=tmp_path, log=lambda m: None)
    assert meta2["components"]["clean_model"] == {**meta["components"]["clean_model"], "cached": True,
                                                  "seconds": meta2["components"]["clean_model"]["seconds"]}
    assert len(list(tmp_path.glob("component-clean_model-*"))) == 1 and len(list(tmp_path.glob("suspect-*"))) == 2


def test_a_learned_trigger_does_not_exist_before_implanting():
    @dataclass
    class Learned(Attack):
        name: ClassVar[str] = "learned"
        learned: ClassVar[bool] = True

        def initial_state(self, shape):
            return {"delta": torch.full(shape, 0.25)}

        def trigger(self, x, parts):
            return x + parts["delta"]

    a = Learned()
    with pytest.raises(BadExpertError, match="learns its trigger.*implant it first") as err:
        a.apply(torch.zeros(2, 1, 4, 4))
    assert "\n" not in str(err.value)
    a.restore_state((1, 4, 4), a.initial_state((1, 4, 4)))
    assert torch.equal(a.apply(torch.zeros(2, 1, 4, 4)), torch.full((2, 1, 4, 4), 0.25))


def test_the_clean_suspect_model_is_the_clean_model_component(blobs, tmp_path):
    """A run with no attack trains the same cached clean model FT (and TrojanNN, SRA) start from."""
    from badexpert.attacks.components import tensor_digest
    from badexpert.data import Splits
    from badexpert.pipeline.experiment import ExperimentConfig, train_suspect

    tr, te = blobs
    splits = Splits(train=tr.subset(range(600)), reserved=te.subset(range(100)), calibration=te.subset(range(100, 200)),
                    test=te.subset(range(200, 300)))
    cfg = dict(arch="cnn", width=4, recipe={"epochs": 1, "batch_size": 64}, seed=3)
    clean, meta = train_suspect(ExperimentConfig(**cfg, attack=None), splits, cache_dir=tmp_path, log=lambda m: None)
    assert meta["components"]["clean_model"]["cached"] is False
    _, ft_meta = train_suspect(ExperimentConfig(**cfg, attack="ft"), splits, cache_dir=tmp_path, log=lambda m: None)
    assert ft_meta["components"]["clean_model"]["cached"] is True
    assert ft_meta["components"]["clean_model"]["key"] == meta["components"]["clean_model"]["key"]
    again, _ = train_suspect(ExperimentConfig(**cfg, attack=None), splits, log=lambda m: None)  # no cache: same weights
    assert tensor_digest(again.state_dict()) == tensor_digest(clean.state_dict())


_RACE = """
import sys, time
from pathlib import Path
import torch
from badexpert.attacks.components import Components, tensor_digest

cache, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def build():
    with open(cache.parent / "builds.txt", "a") as fh:
        fh.write(me + "\\n")
    deadline = time.time() + 60  # hold the part back until the other process has asked for it too
    while not (cache.parent / ("arrived-" + other)).exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    return {"w": torch.arange(6.0).view(2, 3)}

(cache.parent / ("arrived-" + me)).touch()
tensors = Components(cache, log=lambda m: print(m, flush=True)).fetch("encoder", {"bits": 8}, build)
print("digest", tensor_digest(tensors))
"""


def test_processes_sharing_a_cache_build_a_component_once(tmp_path):
    """Two processes ask for the same part at once (``grid --jobs``): one builds it, the other waits
    for it and loads it, and both have the same tensors."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    script = tmp_path / "race.py"
    script.write_text(_RACE)
    procs = [subprocess.Popen([sys.executable, str(script), str(cache), me, other], stdout=subprocess.PIPE, text=True)
             for me, other in (("a", "b"), ("b", "a"))]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len((tmp_path / "builds.txt").read_text().split()) == 1, outs
    digests = {line for out in outs for line in out.splitlines() if line.startswith("digest")}
    assert len(digests) == 1 and sum("loaded cached encoder" in out for out in outs) == 1, outs
    assert len(list(cache.glob("component-encoder-*.safetensors"))) == 1


def test_the_build_lock_runs_unlocked_where_no_lock_can_be_taken(tmp_path):
    from badexpert.utils import build_lock

    ran = []
    for path in (None, tmp_path / "missing" / "x.safetensors"):
        with build_lock(path):
            ran.append(path)
    assert len(ran) == 2 and not (tmp_path / "missing").exists()
    with build_lock(tmp_path / "x.safetensors"), build_lock(tmp_path / "y.safetensors"):  # two entries, two locks
        assert sorted(p.name for p in (tmp_path / ".locks").iterdir()) == ["x.safetensors.lock", "y.safetensors.lock"]
