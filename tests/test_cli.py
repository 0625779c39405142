"""CLI behaviour: help, and one clear line with exit status 2 for every user mistake, no partial files."""

import pytest
import torch

from badexpert.cli import main
from badexpert.io import save_model
from badexpert.models import build_model


@pytest.fixture
def model_file(tmp_path):
    m = build_model("cnn", in_channels=1, num_classes=10, image_size=28, width=4)
    meta = {"arch": "cnn", "width": 4, "in_channels": 1, "num_classes": 10, "image_size": [28, 28],
            "mean": [0.5], "std": [0.5], "dataset": {"name": "fashion-mnist", "path": "/nonexistent/fmnist"},
            "split": {"seed": 0, "reserved": 100, "calibration": 100}}
    return save_model(tmp_path / "m.safetensors", m, meta)


def _commands(parser, prefix=()):
    """Every (sub)command path of the parser, read from its subparsers (a new command is covered
    without editing this test)."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


def _all_commands():
    from badexpert.cli import build_parser

    return sorted(set(_commands(build_parser())))


def test_the_command_list_is_read_from_the_parser():
    cmds = _all_commands()
    assert {("demo",), ("run",), ("train",), ("defend",), ("evaluate",), ("info",)} <= set(cmds)
    assert len(cmds) >= 10


@pytest.mark.parametrize("cmd", _all_commands(), ids=" ".join)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: badexpert " + " ".join(cmd)), out[:200]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "mnist-9", "--out", "OUT/m.safetensors"], "unknown dataset 'mnist-9'; choose one of"),
        (["train", "--attack", "sleeper", "--out", "OUT/m.safetensors"], "unknown attack 'sleeper'; choose one of"),
        (["train", "--arch", "resnet99", "--out", "OUT/m.safetensors"], "unknown architecture 'resnet99'"),
        (["train", "--dataset", "cifar10", "--data-path", "OUT/none", "--out", "OUT/m.safetensors"], "does not exist"),
        (["train", "--dataset", "cifar10", "--out", "OUT/m.safetensors"], "needs a path to its local files"),
        (["train", "--out", "OUT/model.pt"], "--out must name a .safetensors file"),
        (["defend", "--model", "OUT/missing.safetensors", "--out", "OUT/d.safetensors"], "does not exist"),
        (["evaluate", "--model", "OUT/missing.safetensors", "--detector", "OUT/d.safetensors", "--out", "OUT/e"],
         "does not exist"),
        (["run", "--config", "OUT/none.json", "--out", "OUT/r"], "config file"),
        (["info", "OUT/missing.safetensors"], "does not exist"),
    ],
)
def test_user_mistakes_exit_2_with_one_line_and_no_files(argv, message, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("badexpert: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_corrupt_checkpoint_and_mismatched_detector(model_file, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    assert main(["defend", "--model", str(bad), "--out", str(tmp_path / "d.safetensors")]) == 2
    assert "corrupt or wrong format" in capsys.readouterr().err
    # a checkpoint whose weights do not fit the architecture its metadata names
    from safetensors.torch import load_file, save_file
    import json
    from safetensors import safe_open

    state = load_file(str(model_file))
    with safe_open(str(model_file), framework="pt") as fh:
        md = fh.metadata()
    meta = json.loads(md["badexpert"])
    meta["width"] = 8
    save_file(state, str(tmp_path / "wrong.safetensors"), metadata={"badexpert": json.dumps(meta)})
    assert main(["info", str(tmp_path / "wrong.safetensors")]) == 0
    capsys.readouterr()
    assert main(["defend", "--model", str(tmp_path / "wrong.safetensors"), "--out", str(tmp_path / "d.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "do not match architecture 'cnn'" in err and not (tmp_path / "d.safetensors").exists()


def test_dataset_path_recorded_in_model_must_exist(model_file, tmp_path, capsys):
    assert main(["defend", "--model", str(model_file), "--out", str(tmp_path / "d.safetensors")]) == 2
    assert "/nonexistent/fmnist' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "d.safetensors").exists()


def test_detector_file_is_checked(model_file, tmp_path, capsys):
    fake = tmp_path / "det.safetensors"
    torch.save({}, fake)
    assert main(["evaluate", "--model", str(model_file), "--detector", str(fake), "--out", str(tmp_path / "e")]) == 2
    assert "not a badexpert detector file" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_shipped_configs_are_valid():
    from pathlib import Path

    from badexpert.pipeline.experiment import ExperimentConfig, default_recipe
    from badexpert.training import Recipe

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
    assert configs
    for path in configs:
        cfg = ExperimentConfig.from_file(path)
        cfg.make_attack()
        Recipe.from_dict({**default_recipe(cfg.dataset, cfg.arch).to_dict(), **cfg.recipe})
        build_model(cfg.arch, in_channels=3, num_classes=10, image_size=32, width=cfg.width)


def test_model_cache_key_covers_what_the_model_depends_on():
    from badexpert.pipeline.experiment import ExperimentConfig, default_recipe, suspect_key

    base = ExperimentConfig()
    r = default_recipe(base.dataset, base.arch)
    k = suspect_key(base, r)
    assert k == suspect_key(ExperimentConfig(), r)
    assert k != suspect_key(ExperimentConfig(seed=1), r)
    assert k != suspect_key(ExperimentConfig(attack="blend"), r)
    assert k != suspect_key(ExperimentConfig(attack_params={"poison_rate": 0.02}), r)
    assert k != suspect_key(base, r.replace(epochs=5))
    assert k != suspect_key(ExperimentConfig(image_size=16), r)  # another size: other data, another model
    # the detector's settings do not change the suspect model
    assert k == suspect_key(ExperimentConfig(detector_params={"preset": "paper"}, fpr=0.05), r)


def test_bad_config_field(tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"dataset": "fashion-mnist", "atack": "badnet"}')
    assert main(["run", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "o")]) == 2
    assert "unknown config field(s) ['atack']" in capsys.readouterr().err


def test_help_and_list_read_the_registries(capsys):
    """The CLI names every registered attack, dataset, architecture and detector from the registries
    (no hand-kept lists), with each attack's reference defaults."""
    from badexpert.attacks import ATTACKS
    from badexpert.data import DATASETS
    from badexpert.detectors import DETECTORS
    from badexpert.models import ARCHITECTURES

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in [*ATTACKS, *DATASETS, *ARCHITECTURES]:
        assert name in text
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    for name, cls in ATTACKS.items():
        assert f"\n{name}: " in "\n" + out
        assert f"poison_rate={cls.__dataclass_fields__['poison_rate'].default!r}" in out.split(f"{name}: ", 1)[1]
    assert main(["list", "detectors"]) == 0
    out = capsys.readouterr().out
    assert all(f"{n}: " in out for n in DETECTORS)
    assert main(["list", "nothing"]) == 2 and "invalid choice" in capsys.readouterr().err


def test_building_the_parser_imports_no_torch():
    """Help texts read the registries lazily, so `serve --onnx` stays torch-free."""
    import subprocess
    import sys

    code = "import sys; from badexpert.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_output_piped_into_a_reader_that_stops_early_is_not_an_error():
    """`badexpert list attacks | head -1`: no traceback, exit status 0 (the reader here closes the
    pipe before anything is written, so every write fails)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "badexpert.cli", "list", "attacks"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait() == 0 and "Traceback" not in err, err
