import pytest
import torch

from badexpert.errors import BadExpertError
from badexpert.io import load_model, load_state_dict_file, read_model_meta, save_model
from badexpert.models import build_model

META = {"arch": "cnn", "width": 4, "in_channels": 1, "num_classes": 3, "image_size": [12, 12], "mean": [0.3],
        "std": [0.2], "seed": 7}


def _model():
    torch.manual_seed(0)
    return build_model("cnn", in_channels=1, num_classes=3, image_size=12, mean=[0.3], std=[0.2], width=4)


def test_model_round_trip_is_exact(tmp_path):
    m = _model().eval()
    path = save_model(tmp_path / "m.safetensors", m, META)
    loaded, meta = load_model(path)
    assert meta["seed"] == 7 and meta["format"] == "badexpert-model/1"
    x = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    assert read_model_meta(path)["arch"] == "cnn"


def test_no_pickle_anywhere(tmp_path):
    path = save_model(tmp_path / "m.safetensors", _model(), META)
    assert b"\x80\x04" not in path.read_bytes()[:16]  # not a pickle stream
    import json

    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert "badexpert" in header["__metadata__"]


def test_metadata_is_required():
    with pytest.raises(BadExpertError, match="lacks 'arch'"):
        save_model("unused.safetensors", _model(), {"width": 4})


def test_users_state_dict_files(tmp_path):
    m = _model()
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "w.pt")
    state = load_state_dict_file(tmp_path / "w.pt")
    assert set(state) == set(m.state_dict())
    torch.save({"model": m}, tmp_path / "pickled.pt")  # a whole pickled module: refused
    with pytest.raises(BadExpertError, match="refusing to unpickle"):
        load_state_dict_file(tmp_path / "pickled.pt")
    with pytest.raises(BadExpertError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.pt")
