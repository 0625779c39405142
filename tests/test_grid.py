"""`run_grid` / `badexpert grid`: a benchmark grid on a tiny ImageFolder task, resumed, summarised."""

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import badexpert.pipeline.experiment as experiment
from badexpert.cli import main
from badexpert.detectors import get_detector
from badexpert.errors import BadExpertError
from badexpert.pipeline.grid import DETECTOR_NUMBERS, GRID_OUTPUTS, format_matrix, plan, read_results, run_grid, summarize

from .conftest import write_blobs

#: fields a cached model and cached detectors reproduce exactly (timings and throughput do not)
MEASURED = ("clean_accuracy", "attack_success_rate", "attack_failed", "status", "auroc", "auroc_ci", "auroc_filtered",
            "tpr_at_1pct_fpr", "tpr", "fpr", "threshold", "ca_after", "asr_after", "forward_passes", "n_triggered")


def make_grid(data: Path) -> dict:
    return {
        "datasets": [{"name": "imagefolder", "label": "blobs", "data_path": str(data)}],
        "architectures": [{"arch": "cnn", "width": 8}],
        "attacks": [{"name": "badnet", "params": {"poison_rate": 0.1}},  # implants
                    {"name": "blend", "params": {"poison_rate": 0.003, "alpha": 0.05}}],  # one poisoned image: fails
        "detectors": [{"name": "badexpert", "params": {"expert_lr": 0.01, "aux_lr": 0.1, "aux_epochs": 4,
                                                       "hflip": False, "expert_batch_size": 32, "aux_batch_size": 32}},
                      "scale_up"],
        "seeds": [0, 1],
        "recipe": {"optimizer": "adam", "lr": 0.003, "epochs": 8, "batch_size": 64, "weight_decay": 0,
                   "augment": False},
        "reserved": 100, "calibration": 100, "fpr": 0.05, "n_boot": 200, "device": "cpu",
    }


class Counter:
    """Counts suspect-model trainings (models built by train_suspect) and train_suspect calls."""

    def __init__(self, monkeypatch):
        self.trained = self.calls = 0
        real_build, real_suspect = experiment.build_model, experiment.train_suspect

        def build(*a, **k):
            self.trained += 1
            return real_build(*a, **k)

        def suspect(*a, **k):
            self.calls += 1
            return real_suspect(*a, **k)

        monkeypatch.setattr(experiment, "build_model", build)
        monkeypatch.setattr(experiment, "train_suspect", suspect)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """The grid run once: (root, grid, rows, log lines, trainings)."""
    root = tmp_path_factory.mktemp("grid")
    grid = make_grid(write_blobs(root / "data"))
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        count = Counter(mp)
        rows = run_grid(grid, root / "out", cache_dir=root / "cache", log=logs.append)
    return root, grid, rows, logs, count.trained


def test_one_row_per_cell_and_detector_with_failed_implants_marked(first):
    root, grid, rows, logs, trained = first
    assert trained == 4  # 2 attacks x 2 seeds, one suspect model each
    assert [(r["attack"], r["seed"], r["detector"]) for r in rows] == [
        (a, s, d) for a in ("badnet", "blend") for s in (0, 1) for d in ("badexpert", "scale_up")]
    assert len({r["key"] for r in rows}) == 8 and len({r["cell"] for r in rows}) == 4
    for r in rows:
        assert r["dataset"] == "blobs" and r["arch"] == "cnn-w8" and r["fpr_target"] in (0.05, None)
        if r["attack"] == "blend":  # did not implant: recorded, no detector numbers
            assert r["status"] == "attack_failed" and r["attack_failed"] and r["attack_success_rate"] < 0.5
            assert all(r[k] is None for k in DETECTOR_NUMBERS)
        else:
            assert r["status"] == "ok" and not r["attack_failed"] and r["attack_success_rate"] >= 0.9
            assert r["clean_accuracy"] > 0.9 and 0 <= r["auroc"] <= 1 and 0 <= r["auroc_filtered"] <= 1
            assert r["forward_passes"] == get_detector(r["detector"]).cost["forward"]
            # measured (not None) and finite; a ratio of two timings is positive by construction
            assert isinstance(r["throughput_ratio"], float) and math.isfinite(r["throughput_ratio"])
            assert r["seconds"] > 0 and r["fpr"] <= 0.2
            assert not r["model_cached"] and not r["detector_cached"]
    by = {(r["attack"], r["seed"], r["detector"]): r for r in rows}
    assert by["badnet", 0, "badexpert"]["auroc_filtered"] > 0.95  # BaDExpert separates a real backdoor
    assert by["badnet", 0, "badexpert"]["asr_after"] < 0.2
    # what fitting chose travels with the row (the expert's learning rate, given here)
    assert by["badnet", 0, "badexpert"]["fit_report"]["expert"]["lr"] == 0.01
    assert by["badnet", 1, "badexpert"]["fit_report"]["clean_size"] > 0
    # results.jsonl holds exactly these rows, one line each
    lines = (root / "out" / "results.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == rows
    assert {p.name for p in (root / "out").iterdir()} == GRID_OUTPUTS
    assert (root / "out" / "heatmap.png").stat().st_size > 5000
    md = (root / "out" / "summary.md").read_text()
    assert re.search(r"\| blobs \| cnn-w8 \| blend \| badexpert \| 0/2 \| [\d.]+% / [\d.]+% \| attack failed", md)
    assert "| blobs | cnn-w8 | badnet | badexpert | 2/2 |" in md
    cached = sorted(p.name.split("-")[0] for p in (root / "cache").iterdir() if p.name != ".locks")
    assert cached == ["detector"] * 4 + ["rows"] + ["suspect"] * 4  # failed implants fit no detector
    # a training lock per suspect model trained once the cache existed (a second process waits for the
    # first instead of training the same model twice): the first cell made the cache directory
    locks = {p.name.removesuffix(".lock") for p in (root / "cache" / ".locks").glob("suspect-*.lock")}
    assert len(locks) == 3 and locks < {p.name for p in (root / "cache").glob("suspect-*.safetensors")}
    assert len(list((root / "cache" / "rows").glob("*.json"))) == len(rows)  # every row, failed implants too


def test_rows_are_grid_records_and_rows_written_before_the_noisy_protocol_still_read(first):
    from badexpert.evaluation.records import GridRow

    _, _, rows, _, _ = first
    for r in rows:
        row = GridRow.from_dict(r)
        assert row.to_dict() == r and list(row.to_dict()) == list(r)
        assert row.auroc_noisy is None and row.n_noisy is None  # the grid ran without noisy_clean
    # a row of an earlier build (no noisy fields): the same dict back, the noisy numbers None
    old = {k: v for k, v in rows[0].items() if "noisy" not in k}
    row = GridRow.from_dict(old)
    assert row.to_dict() == old and row.auroc_noisy_filtered is None and row.auroc == rows[0]["auroc"]
    assert set(GridRow.required()) < set(old) and set(DETECTOR_NUMBERS) < set(rows[0])
    with pytest.raises(BadExpertError, match="a grid row lacks 'auroc'"):
        GridRow.from_dict({k: v for k, v in rows[0].items() if k != "auroc"})


def test_resume_in_the_same_directory_runs_nothing(first, monkeypatch):
    root, grid, rows, _, _ = first
    count, logs = Counter(monkeypatch), []
    again = run_grid(grid, root / "out", cache_dir=root / "cache", log=logs.append)
    assert again == rows and count.calls == 0 and count.trained == 0
    assert "4 cell(s) already in" in logs[0] and "0 to run" in logs[0]
    assert len((root / "out" / "results.jsonl").read_text().splitlines()) == 8


def test_interrupted_grid_resumes_with_cached_models_and_detectors_and_a_remote_style_runner(first, monkeypatch):
    """A results.jsonl missing one row and ending in a torn line: only that row is computed,
    from the cached suspect model and cached detector, by a runner that sees only JSON."""
    root, grid, rows, _, _ = first
    out = root / "resumed"
    out.mkdir()
    lines = (root / "out" / "results.jsonl").read_text().splitlines(keepends=True)
    missing = rows[3]  # badnet, seed 1, scale_up
    (out / "results.jsonl").write_text("".join(lines[:3] + lines[4:]) + '{"key": "a torn wri')
    (root / "cache" / "rows" / f"{missing['key']}.json").unlink()  # computed again, not taken from the row cache
    seen = []

    def runner(fn, specs):
        for spec in reversed(specs):
            spec = json.loads(json.dumps(spec))  # what a remote worker receives
            seen.append(spec)
            from badexpert.pipeline.grid import run_cell  # importable at module top level
            yield run_cell(spec, log=lambda m: None)

    count, logs = Counter(monkeypatch), []
    again = run_grid(grid, out, cache_dir=root / "cache", log=logs.append, runner=runner)
    assert [s["detectors"][0]["name"] for s in seen] == ["scale_up"] and len(seen[0]["detectors"]) == 1
    assert count.calls == 1 and count.trained == 0  # loaded from the cache, not trained
    assert any("dropping a torn last line" in m for m in logs)
    new = again[3]
    assert new["key"] == missing["key"] and new["model_cached"] and new["detector_cached"]
    assert {k: new[k] for k in MEASURED} == {k: missing[k] for k in MEASURED}
    assert again[:3] + again[4:] == rows[:3] + rows[4:]
    assert [json.loads(x)["key"] for x in (out / "results.jsonl").read_text().splitlines()] == \
        [r["key"] for r in rows[:3] + rows[4:]] + [missing["key"]]


def test_summary_matches_numpy_on_the_rows(first):
    root, grid, rows, _, _ = first
    with open(root / "out" / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert len(summary) == 4
    for s in summary:
        group = [r for r in rows if (r["attack"], r["detector"]) == (s["attack"], s["detector"])]
        ok = [r for r in group if r["status"] == "ok"]
        assert (int(s["seeds"]), int(s["implanted"]), int(s["failed"])) == (2, len(ok), 2 - len(ok))
        for col, key in (("auroc", "auroc_filtered"), ("asr_after", "asr_after")):
            if not ok:
                assert s[f"{col}_mean"] == s[f"{col}_std"] == s[f"{col}_ci_low"] == ""
                continue
            v = np.array([r[key] for r in ok])
            idx = np.random.default_rng(0).integers(0, len(v), size=(grid["n_boot"], len(v)))
            lo, hi = np.percentile(v[idx].mean(1), [2.5, 97.5])
            assert float(s[f"{col}_mean"]) == pytest.approx(v.mean(), abs=1e-12)
            assert float(s[f"{col}_std"]) == pytest.approx(v.std(ddof=1), abs=1e-12)
            assert (float(s[f"{col}_ci_low"]), float(s[f"{col}_ci_high"])) == pytest.approx((lo, hi), abs=1e-12)
    # the Markdown summary gives the suspect model's own CA / ASR beside the detector's numbers
    md = (root / "out" / "summary.md").read_text()
    for s in summary:
        group = [r for r in rows if (r["attack"], r["detector"]) == (s["attack"], s["detector"])]
        ca, asr = (np.mean([r[k] for r in group]) for k in ("clean_accuracy", "attack_success_rate"))
        assert f"| {s['attack']} | {s['detector']} | {s['implanted']}/2 | {ca:.1%} / {asr:.1%} |" in md


def grid_row(**values) -> dict:
    """A complete grid row (the JSON form of a GridRow) with ``values`` over neutral defaults."""
    from badexpert.evaluation.records import GridRow

    row = dict.fromkeys(GridRow.required())
    row.update(key="k", cell="c", detector_params={}, attack_failed=False, n_test=100, cell_seconds=1.0,
               model_cached=False, detector_cached=False, badexpert_version="test")
    row.update(values)
    row["attack_failed"] = row["status"] != "ok"
    return row


def test_summarize_uses_implanted_seeds_only():
    from badexpert.evaluation.records import GridRow

    rng = np.random.default_rng(3)
    vals = rng.uniform(0.6, 1.0, 7)
    rows = [grid_row(dataset="d", arch="a", attack="x", detector="k", seed=i, status="ok",
                     auroc_filtered=float(v), asr_after=float(v) / 10, ca_after=0.9, fpr=0.01,
                     clean_accuracy=0.9, attack_success_rate=1.0) for i, v in enumerate(vals)]
    rows += [grid_row(dataset="d", arch="a", attack="x", detector="k", seed=9, status="attack_failed",
                      auroc_filtered=None, asr_after=None, clean_accuracy=0.9, attack_success_rate=0.1)]
    rows[0]["auroc_filtered"] = None  # an undefined AUROC (no successful triggered input) is left out
    (s,) = summarize(rows, n_boot=500, seed=0)
    assert (s["seeds"], s["implanted"], s["failed"]) == (8, 7, 1)
    assert summarize([GridRow.from_dict(r) for r in rows], n_boot=500, seed=0) == [s]  # records or their JSON form
    with pytest.raises(BadExpertError, match=r"grid row 2 lacks 'asr_after'"):
        summarize([r if i != 2 else {k: v for k, v in r.items() if k != "asr_after"} for i, r in enumerate(rows)])
    v = vals[1:]
    idx = np.random.default_rng(0).integers(0, len(v), size=(500, len(v)))
    assert s["auroc_mean"] == pytest.approx(v.mean()) and s["auroc_std"] == pytest.approx(v.std(ddof=1))
    assert (s["auroc_ci_low"], s["auroc_ci_high"]) == pytest.approx(tuple(np.percentile(v[idx].mean(1), [2.5, 97.5])))
    assert s["auroc_ci_low"] < v.mean() < s["auroc_ci_high"]
    assert s["asr_after_mean"] == pytest.approx(vals.mean() / 10)
    assert s["attack_success_rate_mean"] == pytest.approx((7 * 1.0 + 0.1) / 8)


def test_matrix_leaves_out_of_scope_and_failed_cells_out_of_the_means():
    def row(attack, det, auroc, asr, status="ok", scope=None):
        return grid_row(dataset="d", arch="a", attack=attack, detector=det, seed=0, status=status,
                        auroc_filtered=auroc, asr_after=asr, ca_after=0.9, fpr=0.01, clean_accuracy=0.9,
                        attack_success_rate=0.99 if status == "ok" else 0.1, out_of_scope=scope)
    rows = [row("badnet", "k", 0.90, 0.10), row("badnet", "s", 0.80, 0.20),
            row("blend", "k", 0.70, 0.30), row("blend", "s", 0.20, 0.90, scope="image-wide trigger"),
            row("wanet", "k", None, None, status="attack_failed"), row("wanet", "s", None, None, status="attack_failed")]
    text = format_matrix(summarize(rows, n_boot=0))
    lines = text.splitlines()
    assert "| blend | 99.0% | 70.00% / 30.0% | 20.00% / 90.0% † |" in lines
    assert "| wanet | 10.0% | attack failed | attack failed |" in lines
    # k: mean of badnet and blend; s: badnet only (blend out of scope), with the count said
    assert "| **mean** | | 80.00% / 20.0% | 80.00% / 20.0% (1) |" in lines
    assert any(ln.startswith("† outside s's scope (blend)") and "image-wide trigger" in ln for ln in lines)


@pytest.mark.parametrize("change, match", [
    (lambda g: g["attacks"].append("sleeper"), "unknown attack 'sleeper'"),
    (lambda g: g["detectors"][0]["params"].update(bogus=1), "bogus"),
    (lambda g: g["detectors"].append({"name": "strip", "params": {"n": 0}}), "grid cell dataset=blobs arch=cnn-w8"),
    (lambda g: g["attacks"][0]["params"].update(poison_rate=2.0), "grid cell dataset=blobs arch=cnn-w8 attack=badnet"),
    (lambda g: g.update(epochs=3), "unknown field(s) ['epochs']"),
    (lambda g: g["datasets"][0].update(colour=True), "grid datasets[0]: unknown field(s) ['colour']"),
    (lambda g: g["detectors"].append({"name": "strip", "params": {"seed": 3}}), "set by the grid"),
    (lambda g: g["detectors"].append("badexpert"), "listed twice"),
    (lambda g: g.update(seeds=[0, "1"]), "non-negative integers"),
    (lambda g: g.update(seeds=[]), "non-empty list"),
    (lambda g: g["datasets"][0].update(data_path="/nonexistent/blobs"), "does not exist"),
    (lambda g: g["recipe"].update(lr=-1), "lr"),
    (lambda g: g.update(fpr=1.5), "fpr"),
])
def test_an_invalid_grid_is_refused_before_anything_is_read_or_trained(change, match, first, monkeypatch, tmp_path):
    root, grid, _, _, _ = first
    bad = json.loads(json.dumps(grid))
    change(bad)
    count = Counter(monkeypatch)
    monkeypatch.setattr(experiment, "load_dataset", lambda *a, **k: pytest.fail("data read"))
    with pytest.raises(BadExpertError, match=re.escape(match)) as e:
        run_grid(bad, tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None)
    assert "\n" not in str(e.value)
    assert count.calls == count.trained == 0 and not (tmp_path / "out").exists()


def test_plan_gives_json_specs_keyed_by_everything_a_row_depends_on(first):
    root, grid, rows, _, _ = first
    specs = plan(grid, cache_dir=root / "cache")
    assert json.loads(json.dumps(specs)) == specs
    assert [d["key"] for s in specs for d in s["detectors"]] == [r["key"] for r in rows]
    other = json.loads(json.dumps(grid))
    other["fpr"] = 0.1
    other["detectors"][1] = {"name": "scale_up", "params": {"scales": [3.0, 5.0]}}
    changed = plan(other)
    assert not {d["key"] for s in changed for d in s["detectors"]} & {r["key"] for r in rows}
    other = json.loads(json.dumps(grid))
    other["seeds"] = [1, 2]  # extending a grid keeps the keys of the cells it shares
    shared = {s["cell"] for s in plan(other)} & {r["cell"] for r in rows}
    assert shared == {r["cell"] for r in rows if r["seed"] == 1}


def test_an_attack_entry_overrides_the_recipe_for_its_cells_only(first):
    root, grid, rows, _, _ = first
    other = json.loads(json.dumps(grid))
    other["architectures"][0]["recipe"] = {"epochs": 5}
    other["attacks"].append({"name": "badnet", "label": "badnet-short", "params": {"poison_rate": 0.1},
                             "recipe": {"epochs": 2, "lr": 0.01}})
    specs = plan(other)
    recipes = {s["attack"]: s["config"]["recipe"] for s in specs}
    assert recipes["badnet-short"]["epochs"] == 2 and recipes["badnet-short"]["lr"] == 0.01
    assert recipes["badnet"]["epochs"] == 5 and recipes["badnet"]["lr"] == grid["recipe"]["lr"]
    short = {s["cell"] for s in specs if s["attack"] == "badnet-short"}
    assert not short & {s["cell"] for s in specs if s["attack"] == "badnet"}  # a different suspect model
    other["attacks"][-1]["recipe"] = {"lr": -1}
    with pytest.raises(BadExpertError, match="lr"):
        plan(other)


def test_two_labelled_variants_of_one_detector_run_side_by_side(first, tmp_path):
    """Two BaDExpert entries with distinct labels: one row each per cell, keyed and named by the
    label; an unlabelled entry keeps the key it had before labels existed."""
    from badexpert.pipeline.grid import _hash

    root, grid, rows, _, _ = first
    other = json.loads(json.dumps(grid))
    other["attacks"], other["seeds"] = other["attacks"][:1], [0]
    base = other["detectors"][0]
    other["detectors"] = [base, {**base, "label": "badexpert-lr3", "params": {**base["params"], "aux_lr": 0.3}}]
    specs = plan(other)
    (spec,) = specs
    plain, variant = spec["detectors"]
    assert plain["key"] == _hash({"cell": spec["cell"], "detector": "badexpert", "params": base["params"]})
    assert plain["key"] in {r["key"] for r in rows}  # the first run's row: resumed, not recomputed
    new = run_grid(other, root / "out", cache_dir=root / "cache", log=lambda m: None)
    mine = {r["detector"]: r for r in new if r["cell"] == spec["cell"]}
    assert set(mine) == {"badexpert", "badexpert-lr3"}
    assert mine["badexpert-lr3"]["detector_params"]["aux_lr"] == 0.3 and mine["badexpert-lr3"]["key"] == variant["key"]
    assert mine["badexpert"]["auroc"] != mine["badexpert-lr3"]["auroc"] or \
        mine["badexpert"]["threshold"] != mine["badexpert-lr3"]["threshold"]
    assert "badexpert-lr3 AUROC" in (root / "out" / "matrix.md").read_text()
    dup = json.loads(json.dumps(other))
    dup["detectors"][1]["label"] = "badexpert"
    with pytest.raises(BadExpertError, match="listed twice.*distinct 'label'"):
        plan(dup)


def test_cli_grid_success_from_caches_and_exit_codes(first, tmp_path, monkeypatch, capsys):
    root, grid, rows, _, _ = first
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(grid))
    count = Counter(monkeypatch)
    argv = ["grid", "--config", str(config), "--out", str(tmp_path / "o"), "--cache-dir", str(root / "cache")]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert count.trained == 0 and "fitting" not in cap.err  # every model and detector from the cache
    assert "| blobs | cnn-w8 | badnet | scale_up | 2/2 |" in cap.out and "attack failed" in cap.out
    again = read_results(tmp_path / "o" / "results.jsonl")
    assert [{k: r[k] for k in MEASURED} for r in again] == [{k: r[k] for k in MEASURED} for r in rows]

    (tmp_path / "bad.json").write_text('{"datasets": [')
    (tmp_path / "unknown.json").write_text(json.dumps({**grid, "epoch": 1}))
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    cases = [
        (["--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "n1")], "does not exist"),
        (["--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "n2")], "not valid JSON"),
        (["--config", str(tmp_path / "unknown.json"), "--out", str(tmp_path / "n3")], "unknown field(s) ['epoch']"),
        (["--config", str(config), "--out", str(tmp_path / "file")], "is a file"),
        (["--config", str(config), "--out", str(tmp_path / "foreign")], "notes.txt"),
        (["--config", str(config), "--out", str(tmp_path / "n4"), "--cache-dir", str(tmp_path / "n4")],
         "must not be the --out"),
        (["--config", str(config)], "--out"),
    ]
    for argv, match in cases:
        assert main(["grid", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("badexpert: error: ") and match in err[0], (argv, err)
    assert not any((tmp_path / n).exists() for n in ("n1", "n2", "n3", "n4"))
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["notes.txt"]
    with pytest.raises(SystemExit) as e:
        main(["grid", "--help"])
    assert e.value.code == 0 and "usage: badexpert grid" in capsys.readouterr().out


def test_example_config_is_a_valid_grid():
    example = Path(__file__).resolve().parents[1] / "configs" / "grids" / "grid-example.json"
    if not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("the example grid uses the Fashion-MNIST files")
    specs = plan(example)
    assert len(specs) == 2 * 3 * 3 and len(specs[0]["detectors"]) == 5


@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parents[1] / "configs" / "grids").glob("*.json")),
                         ids=lambda p: p.name)
def test_every_committed_grid_config_names_known_attacks_detectors_and_fields(config):
    from badexpert.pipeline.grid import load_grid

    grid = load_grid(config)  # names, fields and parameters checked; the data files need not be here
    assert grid["attacks"] and grid["detectors"]


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "badexpert", "grid", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--time-budget" in r.stdout


def test_results_file_damage_is_one_line(tmp_path):
    p = tmp_path / "results.jsonl"
    a, b = (json.dumps(grid_row(key=k, dataset="d", arch="a", attack="x", detector="k", seed=0, status="ok"))
            for k in "ab")
    p.write_text(f'{a}\nnot json\n{b}\n')
    with pytest.raises(BadExpertError, match="line 2 is not a JSON row"):
        read_results(p)
    p.write_text(f'{a}\n{b}')  # a last line without its newline but whole is kept
    assert [r["key"] for r in read_results(p)] == ["a", "b"] and p.read_text().endswith("}\n")
    p.write_text(f'{a}\n{{"key": "b", "cell": "c"}}\n')  # a partial row (another program's) is refused by line
    with pytest.raises(BadExpertError, match=r"line 2 lacks 'dataset', .* not written by this version") as e:
        read_results(p)
    assert "\n" not in str(e.value)


def test_a_cell_failing_at_run_time_names_the_cell_and_keeps_finished_rows(first, tmp_path, monkeypatch):
    """An ImageFolder's classes are known only once it is read: target class 7 of 4 fails in its cell."""
    root, grid, rows, _, _ = first
    bad = json.loads(json.dumps(grid))
    bad["attacks"] = [grid["attacks"][1], {"name": "badnet", "params": {"poison_rate": 0.1, "target": 7}}]
    bad["seeds"] = [0]
    with pytest.raises(BadExpertError, match="grid cell dataset=blobs arch=cnn-w8 attack=badnet seed=0: .*target") as e:
        run_grid(bad, tmp_path / "out", cache_dir=root / "cache", log=lambda m: None)
    assert "\n" not in str(e.value)
    kept = read_results(tmp_path / "out" / "results.jsonl")  # the blend cell before it finished and stays
    assert [r["key"] for r in kept] == [r["key"] for r in rows if r["attack"] == "blend" and r["seed"] == 0]


def test_a_tiny_grid_on_a_local_ray_instance_gives_the_local_rows(first, tmp_path):
    """The same grid through Ray tasks (one per cell, local instance) gives the same measured rows
    as the local runner (the cache is not shared, so everything is trained again in the workers)."""
    pytest.importorskip("ray")
    from badexpert.pipeline.grid import ray_runner

    _, grid, local_rows, _, _ = first
    import torch

    threads = torch.get_num_threads()  # the workers use this process's thread count: same float sums
    rows = run_grid(grid, tmp_path / "ray", cache_dir=tmp_path / "cache", log=lambda m: None,
                    runner=ray_runner("local", cpus_per_cell=threads,
                                      init={"num_cpus": max(2, threads), "object_store_memory": 80 * 1024 * 1024}))
    assert [r["key"] for r in rows] == [r["key"] for r in local_rows]
    for a, b in zip(rows, local_rows):
        assert {k: a.get(k) for k in MEASURED} == {k: b.get(k) for k in MEASURED}


def test_cli_ray_options_are_checked(first, tmp_path, capsys):
    _, grid, _, _, _ = first
    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps(grid))
    code = main(["grid", "--config", str(cfg), "--out", str(tmp_path / "o"), "--ray", "local", "--cpus-per-cell", "0"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--cpus-per-cell" in err
    assert not (tmp_path / "o").exists()


def test_a_detector_that_does_not_use_the_model_is_fitted_once_per_split(first, tmp_path, monkeypatch):
    """Frequency never runs the suspect model: with a cache, the grid fits it once for the two
    suspect models of one split, and the reused copy gives the numbers a fresh fit gives."""
    from badexpert.detectors import Frequency

    _, grid, _, _, _ = first
    small = json.loads(json.dumps(grid))
    small["attacks"] = [{"name": "badnet", "params": {"poison_rate": 0.1}},
                        {"name": "badnet", "label": "badnet-20", "params": {"poison_rate": 0.2}}]
    small["detectors"] = [{"name": "frequency", "params": {"width": 4, "epochs": 2}}]
    small["seeds"] = [0]
    fits = []
    real_fit = Frequency._fit
    monkeypatch.setattr(Frequency, "_fit", lambda self, *a: (fits.append(1), real_fit(self, *a))[1])
    cached = run_grid(small, tmp_path / "cached", cache_dir=tmp_path / "cache", log=lambda m: None)
    assert len(fits) == 1 and [r["detector_cached"] for r in cached] == [False, True]
    assert all(r["status"] == "ok" for r in cached)  # both implanted: both cells scored
    fresh = run_grid(small, tmp_path / "fresh", cache_dir=None, log=lambda m: None)
    assert len(fits) == 3  # without a cache, once per cell
    for a, b in zip(cached, fresh):
        assert {k: a[k] for k in MEASURED} == {k: b[k] for k in MEASURED}
    # one detector, one calibration: the same threshold; and since it never looks at the model, the
    # same scores on the same (BadNet-triggered) test inputs, whichever model they were poisoned for
    assert cached[0]["threshold"] == cached[1]["threshold"] and cached[0]["auroc"] == cached[1]["auroc"]


def test_a_time_budget_stops_between_epochs_and_the_rerun_resumes_to_the_same_rows(first, tmp_path, monkeypatch,
                                                                                   capsys):
    """``grid --time-budget``: a training that would overrun stops at an epoch boundary with its
    state in the cache (exit status 3, nothing half-written); the same command resumes it, and the
    rows equal those of a run never interrupted."""
    from badexpert.training import TimeBudget

    root, grid, rows, _, _ = first
    small = {**grid, "attacks": grid["attacks"][:1], "seeds": [0]}
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(small))
    argv = ["grid", "--config", str(config), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    with monkeypatch.context() as mp:
        mp.setattr(TimeBudget, "left", lambda self: -1.0)  # every epoch overruns: stop after the first
        capsys.readouterr()
        assert main([*argv, "--time-budget", "3600"]) == 3
    out, err = capsys.readouterr()
    assert "stopped at its time budget after epoch 1 of 8" in err and "run the same command again" in out
    assert len(list((tmp_path / "cache" / "train-checkpoints").glob("train-*.safetensors"))) == 1
    assert not (tmp_path / "out" / "results.jsonl").exists()
    # no cell starts once the budget is spent
    assert main([*argv, "--time-budget", "1e-9"]) == 3 and "stopping with 1 cell(s) to run" in capsys.readouterr().err
    assert main([*argv, "--time-budget", "3600"]) == 0
    resumed = read_results(tmp_path / "out" / "results.jsonl")
    want = [r for r in rows if r["attack"] == resumed[0]["attack"] and r["seed"] == 0]
    assert [r["key"] for r in resumed] == [r["key"] for r in want]
    assert [{k: r[k] for k in MEASURED} for r in resumed] == [{k: r[k] for k in MEASURED} for r in want]
    assert not list((tmp_path / "cache" / "train-checkpoints").glob("*"))


@pytest.mark.parametrize("extra, match", [
    (["--time-budget", "0"], "positive number of seconds"),
    (["--time-budget", "nan"], "positive number of seconds"),
    (["--time-budget", "60"], "needs --cache-dir"),
    (["--time-budget", "60", "--cache-dir", "C", "--ray", "local"], "leave out --ray"),
])
def test_time_budget_mistakes_are_one_line(extra, match, first, tmp_path, capsys):
    root, grid, _, _, _ = first
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(grid))
    extra = [str(tmp_path / "cache") if x == "C" else x for x in extra]
    capsys.readouterr()
    assert main(["grid", "--config", str(config), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "out").exists()


def test_further_target_fprs_add_operating_points_without_refitting(first, tmp_path):
    """``"extra_fprs"``: every row also reports its detector at the further targets, from the cached
    models and detectors (nothing trained or fitted again, the primary numbers unchanged); the
    field joins the row key only when given, so grids without it resume."""
    root, grid, rows, _, _ = first
    small = {**grid, "attacks": grid["attacks"][:1], "seeds": [0]}
    assert plan(small)[0]["detectors"][0]["key"] == plan({**small, "extra_fprs": []})[0]["detectors"][0]["key"]
    logs: list[str] = []
    again = run_grid({**small, "extra_fprs": [0.2]}, tmp_path / "out", cache_dir=root / "cache", log=logs.append)
    assert not any(line.startswith(("fitting", "suspect model: ")) for line in logs)
    want = [r for r in rows if r["attack"] == "badnet" and r["seed"] == 0]
    assert [r["key"] for r in again] != [r["key"] for r in want]
    assert [{k: r[k] for k in MEASURED} for r in again] == [{k: r[k] for k in MEASURED} for r in want]
    for r in again:
        (p,) = r["operating_points"]
        assert p["fpr_target"] == 0.2 and p["threshold"] <= r["threshold"]
        assert p["fpr"] >= r["fpr"] and p["asr_after"] <= r["asr_after"] and p["ca_after"] <= r["ca_after"]
    assert all(r.get("operating_points") is None for r in rows)
    with pytest.raises(BadExpertError, match="further target FPR"):
        plan({**small, "extra_fprs": [0.001]})  # 100 calibration inputs cannot reach 0.1%


def test_another_grid_with_the_same_cells_takes_their_rows_from_the_cache(first, tmp_path):
    """Rows are kept in the cache: a second grid that shares cells and detectors with the first (its
    own labels) takes those rows, relabelled, and computes only what is new; a damaged entry is
    computed again."""
    from badexpert.pipeline.grid import ROWS_DIR

    root, grid, rows, _, _ = first
    run_grid(grid, root / "out", cache_dir=root / "cache", log=lambda m: None)  # a resume keeps rows in the cache
    kept = root / "cache" / ROWS_DIR
    assert {p.stem for p in kept.glob("*.json")} >= {r["key"] for r in rows}
    other = {**grid, "attacks": [{**grid["attacks"][0], "label": "patch"}], "seeds": [0]}
    logs: list[str] = []
    again = run_grid(other, tmp_path / "out", cache_dir=root / "cache", log=logs.append)
    assert "2 row(s) other grids computed" in logs[0] and not any(line.startswith("[") for line in logs)
    want = [r for r in rows if r["attack"] == "badnet" and r["seed"] == 0]
    assert [r["key"] for r in again] == [r["key"] for r in want] and {r["attack"] for r in again} == {"patch"}
    assert [{k: r[k] for k in MEASURED} for r in again] == [{k: r[k] for k in MEASURED} for r in want]
    assert "| patch |" in (tmp_path / "out" / "matrix.md").read_text()
    (kept / f"{want[1]['key']}.json").write_text("{not json")
    logs.clear()
    redone = run_grid(other, tmp_path / "out2", cache_dir=root / "cache", log=logs.append)
    assert "ignoring a damaged cached row" in logs[0]
    assert "1 row(s) other grids computed" in logs[1] and ", 1 to run" in logs[1]
    assert [{k: r[k] for k in MEASURED} for r in redone] == [{k: r[k] for k in MEASURED} for r in want]
    assert json.loads((kept / f"{want[1]['key']}.json").read_text())["key"] == want[1]["key"]  # kept anew


def test_shards_run_their_cells_and_the_whole_grid_takes_their_rows_from_the_cache(first, tmp_path, monkeypatch,
                                                                                  capsys):
    """``grid --shard I/N``: each shard runs every N-th cell (its own --out, the shared cache); the
    whole grid, run after them, computes nothing and has every row, in grid order."""
    root, grid, rows, _, _ = first
    cache = tmp_path / "cache"  # a fresh cache: the shards train and fit themselves
    two = {**grid, "seeds": [0]}  # two cells: badnet (implants) and blend (does not)
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(two))
    for i in (1, 2):
        assert main(["grid", "--config", str(config), "--out", str(tmp_path / f"s{i}"), "--cache-dir", str(cache),
                     "--shard", f"{i}/2"]) == 0
    assert "shard 2/2: 1 of the grid's 2 cells" in capsys.readouterr().err
    s1, s2 = (read_results(tmp_path / f"s{i}" / "results.jsonl") for i in (1, 2))
    assert {r["attack"] for r in s1} == {"badnet"} and {r["attack"] for r in s2} == {"blend"}
    count = Counter(monkeypatch)
    whole = run_grid(two, tmp_path / "whole", cache_dir=cache, log=lambda m: None)
    assert count.calls == 0
    want = [r for r in rows if r["seed"] == 0]
    assert [r["key"] for r in whole] == [r["key"] for r in want]
    assert [{k: r[k] for k in MEASURED} for r in whole] == [{k: r[k] for k in MEASURED} for r in want]
    for argv, match in ((["--shard", "3/2", "--cache-dir", str(cache)], "--shard: takes I/N with 1 <= I <= N"),
                        (["--shard", "x", "--cache-dir", str(cache)], "--shard: takes I/N"),
                        (["--shard", "1/2"], "--shard needs --cache-dir")):
        assert main(["grid", "--config", str(config), "--out", str(tmp_path / "bad"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
        assert not (tmp_path / "bad").exists()


def test_claim_runs_the_cells_no_other_process_holds_and_the_whole_grid_takes_their_rows(first, tmp_path, capsys):
    """``grid --claim``: a process skips the cell another one holds (its lock taken), runs the rest,
    and exits cleanly; once the claim is released the next run takes that cell, and the whole grid
    computes nothing. A claimed cell whose rows another process finished meanwhile is not run."""
    from badexpert.pipeline.grid import CLAIMS_DIR, claimed_cells, plan
    from badexpert.utils import claim

    root, grid, rows, _, _ = first
    cache = tmp_path / "cache"
    two = {**grid, "seeds": [0]}  # two cells: badnet (implants) and blend (does not)
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(two))
    badnet = next(s for s in plan(two) if s["attack"] == "badnet")
    argv = ["grid", "--config", str(config), "--cache-dir", str(cache), "--claim"]
    with claim(cache / CLAIMS_DIR / badnet["cell"]) as mine:  # another process is running badnet
        assert mine
        assert main([*argv, "--out", str(tmp_path / "p1")]) == 0
    err = capsys.readouterr().err
    assert "attack=badnet seed=0: another process runs it" in err and "1 of 2 cells held by other processes" in err
    assert {r["attack"] for r in read_results(tmp_path / "p1" / "results.jsonl")} == {"blend"}
    assert main([*argv, "--out", str(tmp_path / "p2")]) == 0  # the claim released: badnet runs here
    err = capsys.readouterr().err
    assert "1 cell(s) already in" in err and "attack=badnet seed=0: badexpert, scale_up" in err, err
    assert "held by other processes" not in err
    assert {r["attack"] for r in read_results(tmp_path / "p2" / "results.jsonl")} == {"badnet", "blend"}
    whole = run_grid(two, tmp_path / "whole", cache_dir=cache, log=lambda m: None)
    want = [r for r in rows if r["seed"] == 0]
    assert [{k: r[k] for k in MEASURED} for r in whole] == [{k: r[k] for k in MEASURED} for r in want]

    def must_not_run(spec):
        raise AssertionError(f"ran {spec['attack']}")

    # the rows a process kept after this one planned: the claimed cell takes them from the cache
    spec = next(s for s in plan(two, cache_dir=cache) if s["attack"] == "badnet")
    assert [r["key"] for r in claimed_cells(must_not_run, cache, log=lambda m: None)(spec)] == \
        [d["key"] for d in spec["detectors"]]
    for extra, match in ((["--ray", "local"], "--claim runs the cells it claims here"),
                         (["--shard", "1/2"], "--claim needs --cache-dir")):
        assert main([*argv, "--out", str(tmp_path / "bad"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
    assert main(["grid", "--config", str(config), "--out", str(tmp_path / "bad"), "--claim"]) == 2
    assert "--claim needs --cache-dir" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_status_tells_what_is_done_cached_and_left_and_writes_nothing(first, tmp_path, capsys):
    """``grid --status``: per cell, the rows --out holds, those the row cache would give and whether
    the suspect model is cached; nothing runs and nothing is written."""
    from badexpert.pipeline.grid import grid_status

    root, grid, rows, _, _ = first
    done = grid_status(grid, root / "out", cache_dir=root / "cache")
    assert [(c["attack"], c["seed"], c["done"], c["rows"]) for c in done] == [
        (a, s, 2, 2) for a in ("badnet", "blend") for s in (0, 1)]
    fresh = grid_status(grid, tmp_path / "new", cache_dir=root / "cache")
    assert all(c["done"] == 0 and c["cached_rows"] == 2 and c["model_cached"] for c in fresh)
    bare = grid_status(grid, tmp_path / "new", cache_dir=tmp_path / "empty-cache")
    assert all(c["cached_rows"] == 0 and not c["model_cached"] and not c["model_training"] for c in bare)
    # a model another process is training now (it holds the model's build lock) is told apart
    from badexpert.pipeline.experiment import suspect_file
    from badexpert.pipeline.grid import format_status, plan
    from badexpert.utils import build_lock

    busy = tmp_path / "busy-cache"
    busy.mkdir()
    with build_lock(suspect_file(busy, plan(grid)[0]["suspect"])):
        now = grid_status(grid, tmp_path / "new", cache_dir=busy)
    assert [c["model_training"] for c in now] == [True, False, False, False]
    assert "| blobs | cnn-w8 | badnet | 0 | 0/2 |  | training now |  |" in format_status(now)
    assert not any(c["model_training"] for c in grid_status(grid, tmp_path / "new", cache_dir=busy))
    # a cell a process claimed (grid --claim, --jobs) runs now
    from badexpert.pipeline.grid import CLAIMS_DIR
    from badexpert.utils import claim

    with claim(busy / CLAIMS_DIR / plan(grid)[1]["cell"]):
        now = grid_status(grid, tmp_path / "new", cache_dir=busy)
    assert [c["running"] for c in now] == [False, True, False, False]
    assert "| blobs | cnn-w8 | badnet | 1 | 0/2 |  | to train | running now |" in format_status(now)
    assert format_status(now).endswith("4 of them training a suspect model; 1 running now\n")
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(grid))
    assert main(["grid", "--config", str(config), "--out", str(tmp_path / "new"), "--cache-dir",
                 str(tmp_path / "empty-cache"), "--status"]) == 0
    out = capsys.readouterr().out
    assert "| blobs | cnn-w8 | badnet | 0 | 0/2 |  | to train |  |" in out
    assert "0 of 4 cells done or in the row cache; 4 to run, 4 of them training a suspect model" in out
    assert not (tmp_path / "new").exists() and not (tmp_path / "empty-cache").exists()


def test_noise_trigger_reads_the_grid_cells_models_on_the_grids_own_splits(first, tmp_path, capsys):
    """bench/noise_trigger.py: per cell of a grid, the cached suspect model's numbers on the grid's
    own test split and triggered copy (its ASR is the grid row's, to the bit), clean and noisy; a
    cell whose model is not cached says so; an unknown attack is one line and exit status 2."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("noise_trigger", Path(__file__).resolve().parents[1] / "bench" /
                                                  "noise_trigger.py")
    nt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nt)
    root, grid, rows, _, _ = first
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(grid))
    assert nt.main(["--grid", str(config), "--cache-dir", str(root / "cache")]) == 0
    table = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| blobs")]
    asr = {(r["attack"], r["seed"]): r["attack_success_rate"] for r in rows}
    assert [(t[2], int(t[3])) for t in table] == list(asr)
    for t in table:
        ca, got_asr, noisy_ca, clean_to_target, noisy_to_target = (float(v.strip(" |%")) / 100 for v in t[4:9])
        assert got_asr == pytest.approx(asr[(t[2], int(t[3]))], abs=5e-4)  # printed to 0.1%
        assert ca > 0.9 and noisy_ca > 0.8 and clean_to_target < 0.05 and 0 <= noisy_to_target <= 1
    assert nt.main(["--grid", str(config), "--cache-dir", str(tmp_path / "empty"), "--attacks", "blend"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| blobs")]
    assert len(lines) == 2 and all("suspect model not in the cache" in line and "| blend |" in line for line in lines)
    assert nt.main(["--grid", str(config), "--attacks", "wanet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wanet not in the grid's attacks (badnet, blend)" in err[0]


def test_jobs_runs_the_shards_in_processes_and_collects_the_whole_grid(first, tmp_path, capsys, monkeypatch):
    """``grid --jobs 2``: two processes, a shard each, on the shared cache; --out gets the whole
    grid, with the numbers of a grid run in one process with the same number of threads (the
    thread count changes floating-point summation order). A cell reaches --out as soon as its
    shard finishes it, while the other shard still runs (an interrupted run keeps it)."""
    import badexpert.cli as cli
    import badexpert.pipeline.grid as grid_module

    root, grid, rows, _, _ = first
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    monkeypatch.setattr(cli, "JOBS_POLL_S", 0.05)
    collected = []  # per collection into --out: the cells its results.jsonl holds after it
    original = grid_module.run_grid

    def run_grid(*args, **kwargs):
        out = original(*args, **kwargs)
        collected.append(len({r["cell"] for r in read_results(Path(args[1]) / "results.jsonl")}))
        return out

    monkeypatch.setattr(grid_module, "run_grid", run_grid)
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(grid))
    argv = ["grid", "--config", str(config), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--jobs", "2"]) == 0
    err = capsys.readouterr().err
    assert "2 processes, each taking the next cell no other one holds" in err and re.search(r"grid: [123] of 4 cells in ", err), err
    # each process runs cells one after the other: the first reaches --out while the last still runs
    assert min(collected) < 4 and collected[-1] == 4, collected
    got = read_results(tmp_path / "out" / "results.jsonl")
    assert sorted(r["key"] for r in got) == sorted(r["key"] for r in rows)
    by_key = {r["key"]: r for r in got}
    assert [{k: by_key[r["key"]][k] for k in MEASURED} for r in rows] == [{k: r[k] for k in MEASURED} for r in rows]
    logs = list((tmp_path / "cache" / "jobs").glob("*/job-*.log"))
    assert len(logs) == 2 and all("cell" in p.read_text() for p in logs)
    # --out's rows resume the grid without its cache (a fresh machine with the committed rows)
    shutil.rmtree(tmp_path / "cache")
    assert main([*argv, "--jobs", "2"]) == 0
    capsys.readouterr()
    logs = list((tmp_path / "cache" / "jobs").glob("*/job-*.log"))
    assert len(logs) == 2 and all(", 0 to run" in p.read_text() for p in logs), [p.read_text() for p in logs]
    assert not list((tmp_path / "cache").glob("**/*.safetensors"))  # nothing trained
    assert sorted(r["key"] for r in read_results(tmp_path / "out" / "results.jsonl")) == sorted(by_key)
    for extra, match in ((["--jobs", "0"], "--jobs must be a positive number"),
                         (["--jobs", "2", "--shard", "1/2"], "leave out --ray, --shard and --claim"),
                         (["--jobs", "2", "--claim"], "leave out --ray, --shard and --claim")):
        assert main([*argv[:4], str(tmp_path / "bad"), *argv[5:], *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
    assert main(["grid", "--config", str(config), "--out", str(tmp_path / "bad"), "--jobs", "2"]) == 2
    assert "--jobs needs --cache-dir" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # a spent budget: no shard starts a cell, the run says so (exit 3) and the same command resumes
    spent = ["grid", "--config", str(config), "--out", str(tmp_path / "later"), "--cache-dir", str(tmp_path / "c2"),
             "--jobs", "2", "--time-budget", "1e-9"]
    assert main(spent) == 3 and "run the same command again" in capsys.readouterr().out
    assert not read_results(tmp_path / "later" / "results.jsonl")
