"""Every registered attack: its trigger state is saved with the suspect model and restored from it,
so a saved model is evaluated with exactly the trigger it was trained with, even when the files
the trigger was built from are gone; a tampered state is a one-line error. Parametrised over the
registry, so a new attack is covered by registering it."""

import shutil

import pytest
import torch

from badexpert.attacks import ATTACKS, attack_from_meta, get_attack
from badexpert.errors import BadExpertError
from badexpert.io import load_model, save_model
from badexpert.models import build_model

from .conftest import attack_files, prepared

SHAPES = ((3, 32, 32), (1, 28, 28))


def _save(path, attack, shape):
    c, h, w = shape
    model = build_model("cnn", in_channels=c, num_classes=10, image_size=(h, w), mean=[0.5] * c, std=[0.25] * c,
                        width=4)
    meta = {"arch": "cnn", "width": 4, "in_channels": c, "num_classes": 10, "image_size": [h, w],
            "mean": [0.5] * c, "std": [0.25] * c, "attack": attack.to_dict(),
            "attack_state": attack.trigger_state(shape)}
    return save_model(path, model, meta)


def _triggered(attack, x):
    return attack.apply(x, torch.Generator().manual_seed(11))


@pytest.mark.parametrize("shape", SHAPES, ids=["rgb32", "gray28"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_a_saved_model_restores_its_exact_trigger_without_the_files(name, shape, tmp_path):
    params = attack_files(tmp_path / "files", ATTACKS[name])
    attack = prepared(get_attack(name, trigger_seed=4, **params), shape)
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(2))
    expected = _triggered(attack, x)
    path = _save(tmp_path / "m.safetensors", attack, shape)
    shutil.rmtree(tmp_path / "files", ignore_errors=True)  # the trigger image / reflections are gone
    model, meta = load_model(path)
    assert set(meta["attack_state"]) == set(attack.trigger_state(shape))
    restored = attack_from_meta(meta)
    assert type(restored) is type(attack) and restored.to_dict() == attack.to_dict()
    assert torch.equal(_triggered(restored, x), expected)
    # a model without state (made before trigger state was saved) rebuilds the trigger from its record
    meta.pop("attack_state")
    if ATTACKS[name].learned:  # a learned trigger cannot be rebuilt from the record: one-line error
        with pytest.raises(BadExpertError, match="learns its trigger") as err:
            _triggered(attack_from_meta(meta), x)
        assert "\n" not in str(err.value)
    elif not params:
        assert torch.equal(_triggered(attack_from_meta(meta), x), expected)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_round_trip_through_dict_and_json(name, tmp_path):
    """Every attack is re-created exactly from its JSON record (parameters and trigger)."""
    import json

    from badexpert.attacks import attack_from_dict

    a = prepared(get_attack(name, trigger_seed=5, **attack_files(tmp_path / "files", ATTACKS[name])), (3, 32, 32))
    b = prepared(attack_from_dict(json.loads(json.dumps(a.to_dict()))), (3, 32, 32))  # same seed, same start
    assert b.to_dict() == a.to_dict() and type(b) is type(a)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(a.apply(x, torch.Generator().manual_seed(1)), b.apply(x, torch.Generator().manual_seed(1)))


def test_the_state_is_what_makes_the_trigger(tmp_path):
    """Restoring really uses the saved tensors: another seed's key, saved under this record, is
    what the restored attack applies."""
    a, b = get_attack("blend", trigger_seed=1), get_attack("blend", trigger_seed=2)
    shape = (3, 16, 16)
    c, h, w = shape
    model = build_model("cnn", in_channels=c, num_classes=10, image_size=(h, w), width=4)
    meta = {"arch": "cnn", "width": 4, "in_channels": c, "num_classes": 10, "image_size": [h, w], "mean": [0.0] * 3,
            "std": [1.0] * 3, "attack": a.to_dict(), "attack_state": b.trigger_state(shape)}
    save_model(tmp_path / "m.safetensors", model, meta)
    _, loaded = load_model(tmp_path / "m.safetensors")
    x = torch.rand(2, *shape)
    assert torch.equal(attack_from_meta(loaded).apply(x), b.apply(x))
    assert not torch.equal(attack_from_meta(loaded).apply(x), a.apply(x))


@pytest.mark.parametrize("damage", ["shape", "nan", "missing"])
def test_a_tampered_state_is_a_one_line_error(damage, tmp_path):
    attack = get_attack("trojan")
    shape = (3, 32, 32)
    state = attack.trigger_state(shape)
    if damage == "shape":
        state["mask"] = torch.zeros(1, 5, 7)
    elif damage == "nan":
        state["pattern"] = state["pattern"].clone()
        state["pattern"][0, 0, 0] = float("nan")
    else:
        state.pop("pattern")
    meta = {"in_channels": 3, "image_size": [32, 32], "attack": attack.to_dict(), "attack_state": state}
    with pytest.raises(BadExpertError) as err:
        attack_from_meta(meta, source="'m.safetensors'")
    msg = str(err.value)
    assert "\n" not in msg and "trigger state in 'm.safetensors'" in msg and "damaged" in msg


def test_model_weights_and_trigger_state_do_not_mix(tmp_path):
    """The trigger tensors live beside the weights under their own prefix: the architecture check
    ignores them and the JSON metadata never holds them."""
    import json

    from safetensors import safe_open

    attack = get_attack("blend")
    path = _save(tmp_path / "m.safetensors", attack, (3, 32, 32))
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
        md = json.loads(fh.metadata()["badexpert"])
    assert "@attack/key" in keys and "attack_state" not in md
    model, meta = load_model(path)
    assert not any(k.startswith("@attack/") for k in model.state_dict())


def test_the_model_cache_keys_on_the_content_of_the_attacks_files(tmp_path):
    """Editing a trigger image or a reflections folder in place is a different suspect model."""
    from PIL import Image

    from badexpert.pipeline.experiment import ExperimentConfig, suspect_key

    params = attack_files(tmp_path / "files", ATTACKS["refool"])
    cfg = ExperimentConfig(attack="refool", attack_params=params)
    key = suspect_key(cfg, cfg.make_recipe())
    assert suspect_key(cfg, cfg.make_recipe()) == key
    Image.new("RGB", (9, 9), (1, 2, 3)).save(tmp_path / "files" / "refl" / "new.png")
    assert suspect_key(cfg, cfg.make_recipe()) != key
    img = tmp_path / "t.png"
    Image.new("RGB", (3, 3), (255, 0, 0)).save(img)
    cfg = ExperimentConfig(attack="badnet", attack_params={"trigger_image": str(img)})
    key = suspect_key(cfg, cfg.make_recipe())
    Image.new("RGB", (3, 3), (0, 255, 0)).save(img)
    assert suspect_key(cfg, cfg.make_recipe()) != key
    plain = ExperimentConfig(attack="badnet")
    assert suspect_key(plain, plain.make_recipe()) != key


def test_the_model_cache_keys_on_the_datas_content_not_its_place_or_copy_time(tmp_path):
    """A dataset copied elsewhere, or re-provisioned with new modification times (a new session's
    shared folder, a GPU worker's copy), keeps its cached suspect models; any change to a file's
    content does not. The same holds for an attack's trigger files."""
    import os
    import shutil

    from badexpert.pipeline.experiment import ExperimentConfig, content_fingerprint, suspect_key

    from .conftest import write_blobs

    data = write_blobs(tmp_path / "a")
    cfg = ExperimentConfig(dataset="imagefolder", data_path=str(data), attack="badnet")
    key = suspect_key(cfg, cfg.make_recipe())
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(data, moved)
    for f in moved.rglob("*"):
        os.utime(f, (1, 1))  # copied at another time
    other = ExperimentConfig(dataset="imagefolder", data_path=str(moved), attack="badnet")
    assert content_fingerprint(moved) == content_fingerprint(data)
    assert suspect_key(other, other.make_recipe()) == key
    victim = sorted(f for f in moved.rglob("*.png"))[0]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1  # one byte of one image, same size, same modification time
    st = victim.stat()
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    from badexpert.pipeline import experiment

    experiment._CONTENT_DIGESTS.clear()  # a new process: nothing memoized
    assert suspect_key(other, other.make_recipe()) != key
