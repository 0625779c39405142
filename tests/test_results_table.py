"""bench/results_table.py: a grid's results.jsonl rendered as the block bench/RESULTS.md shows."""

import datetime as dt
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from badexpert.errors import BadExpertError
from badexpert.pipeline.grid import load_grid, plan

from .conftest import write_blobs
from .test_grid import grid_row, make_grid

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "bench" / "results_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rt = _script()

#: per (attack, seed, detector): AUROC on the paper's population, ASR after, throughput ratio
NUMBERS = {("badnet", 0, "badexpert"): (0.99, 0.02, 0.30), ("badnet", 1, "badexpert"): (0.97, 0.04, 0.36),
           ("badnet", 0, "scale_up"): (0.60, 0.90, 0.10), ("badnet", 1, "scale_up"): (0.70, 0.80, 0.20)}


def _row(spec: dict, det: dict) -> dict:
    failed = spec["attack"] == "blend"  # the blend cells' backdoor did not implant
    auroc, asr_after, ratio = NUMBERS.get((spec["attack"], spec["seed"], det["name"]), (None, None, None))
    return grid_row(**{"key": det["key"], "cell": spec["cell"], "dataset": spec["dataset"], "arch": spec["arch"],
            "attack": spec["attack"], "seed": spec["seed"], "detector": det["name"], "detector_params": det["params"],
            "status": "attack_failed" if failed else "ok", "attack_failed": failed,
            "clean_accuracy": 0.9, "attack_success_rate": 0.1 if failed else (0.99, 1.0)[spec["seed"]],
            "auroc_filtered": auroc, "asr_after": asr_after, "ca_after": None if failed else 0.88,
            "fpr": None if failed else 0.01, "out_of_scope": None,
            "forward_passes": None if failed else {"badexpert": 3, "scale_up": 6}[det["name"]],
            "backward_passes": None if failed else 0, "throughput_ratio": ratio})


@pytest.fixture
def grid_dir(tmp_path):
    """A grid output directory as `badexpert grid` leaves it part-way: grid.json, and rows for three
    of its four cells (the blend cell of seed 1 not run yet) plus one row of an earlier grid."""
    grid = load_grid(make_grid(write_blobs(tmp_path / "blobs")))
    specs = plan(grid)
    assert len(specs) == 4
    out = tmp_path / "runs" / "grid-tiny"
    out.mkdir(parents=True)
    (out / "grid.json").write_text(json.dumps(grid))
    rows = [_row(s, d) for s in specs if (s["attack"], s["seed"]) != ("blend", 1) for d in s["detectors"]]
    stale = {**rows[0], "key": "0123456789abcdef", "auroc_filtered": 0.10}  # same labels, another config
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [stale]))
    return out


def _git_head() -> str | None:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def test_renders_the_grid_rows_with_their_provenance(grid_dir):
    text = rt.render(grid_dir, cost=True, today=dt.date(2026, 12, 6))
    lines = text.splitlines()
    assert lines[0].startswith("<!-- results_table grid-tiny: begin")
    assert lines[-1] == "<!-- results_table grid-tiny: end -->"
    head = lines[2]
    assert head.startswith(f"Command: `badexpert grid --config {grid_dir / 'grid.json'} --out {grid_dir}`")
    if _git_head():
        assert f"commit `{_git_head()}`" in head
    assert f"{os.cpu_count()} CPUs, torch {torch.__version__}" in head and "rendered 2026-12-06" in head
    # three of four cells have every detector's row; the earlier grid's row is named and left out
    assert "3 of 4 cells; 1 row(s) of other grids left out (6 rows)" in head
    # means over the two seeds (the stale row's AUROC of 10% is not averaged in), a failed attack said so
    assert "| badnet | 99.5% | 98.00% / 3.0% | 65.00% / 85.0% |" in lines
    assert "| blend | 10.0% | attack failed | attack failed |" in lines
    assert "| **mean** | | 98.00% / 3.0% | 65.00% / 85.0% |" in lines
    # cost: passes of the rows with detector numbers, median throughput over the implanted cells
    assert "| badexpert | 3 | 0 | 0.330x |" in lines and "| scale_up | 6 | 0 | 0.150x |" in lines
    assert "seeds implanted" not in text  # the per-seed table only on request
    assert "| blobs | cnn-w8 | badnet | badexpert | 2/2 |" in rt.render(grid_dir, with_summary=True)


def test_command_and_machine_are_what_the_caller_says(grid_dir):
    text = rt.render(grid_dir, command="badexpert grid --config configs/grids/x.json --out runs/x",
                     machine_text="1x H100 80GB")
    assert "Command: `badexpert grid --config configs/grids/x.json --out runs/x` ·" in text
    assert "machine: 1x H100 80GB ·" in text and "CPUs" not in text


def test_a_file_being_appended_is_read_not_repaired(grid_dir):
    results = grid_dir / "results.jsonl"
    with results.open("a") as f:
        f.write('{"key": "torn-by-a-running-gr')  # a grid's append cut in the middle
    before = results.read_bytes()
    text = rt.render(grid_dir)
    assert results.read_bytes() == before and sorted(p.name for p in grid_dir.iterdir()) == ["grid.json",
                                                                                            "results.jsonl"]
    assert "| badnet | 99.5% | 98.00% / 3.0% | 65.00% / 85.0% |" in text


def test_without_a_plannable_grid_every_row_shows_and_duplicates_are_refused(grid_dir):
    grid = json.loads((grid_dir / "grid.json").read_text())
    grid["datasets"][0]["data_path"] = str(grid_dir / "moved-away")  # results fetched from another machine
    (grid_dir / "grid.json").write_text(json.dumps(grid))
    with pytest.raises(BadExpertError, match=r"holds two rows for dataset=blobs arch=cnn-w8 attack=badnet seed=0 "
                                             r"detector=badexpert"):
        rt.render(grid_dir)
    rows = (grid_dir / "results.jsonl").read_text().splitlines()[:-1]  # without the earlier grid's row
    (grid_dir / "results.jsonl").write_text("\n".join(rows) + "\n")
    assert "· 3 cells (6 rows)" in rt.render(grid_dir)


def test_a_variant_against_the_detector_it_changes_with_the_keep_rules_verdict(grid_dir, capsys):
    text = rt.render(grid_dir, versus=[("scale_up", "badexpert"), ("badexpert", "scale_up")])
    lines = text.splitlines()
    # seed means: badexpert 98.00% / 3.0%, scale_up 65.00% / 85.0% on badnet; blend did not implant
    assert "| badnet | -33.00 | +82.0 |" in lines and "| badnet | +33.00 | -82.0 |" in lines
    assert not any(line.startswith("| blend | ") and "+" in line for line in lines)
    assert ("scale_up against badexpert over 1 attacks: AUROC mean -33.00 points, worst -33.00 (badnet); ASR after "
            "mean +82.00 points: breaks the keep rule (mean AUROC -33.00 below -0.5; badnet -33.00 below -2.0; "
            "mean ASR after +82.00 above +1.0).") in lines
    assert "badexpert against scale_up over 1 attacks: AUROC mean +33.00 points, worst +33.00 (badnet); ASR after " \
           "mean -82.00 points: meets the keep rule." in lines
    for bad, message in (("scale_up", "--versus takes VARIANT=REFERENCE"),
                         ("strip=badexpert", "no detector labelled 'strip' in this grid; its labels: badexpert, scale_up")):
        assert rt.main([str(grid_dir), "--versus", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    assert rt.main([str(tmp_path / "nowhere")]) == 2
    (tmp_path / "empty").mkdir()
    assert rt.main([str(tmp_path / "empty")]) == 2
    (tmp_path / "empty" / "results.jsonl").write_text("")
    assert rt.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("results_table: error: ") for e in err), err
    assert "not a directory" in err[0] and "has no results.jsonl" in err[1] and "no rows" in err[2]


def test_the_comparison_grid_renders_as_the_grid_summarised_it(monkeypatch):
    """On the comparison grid's own output (read only), when this machine has it: the matrix is the
    one `badexpert grid` wrote. Its data need not be planned here (the plan re-reads Refool's
    reflection zip once per detector), so the render runs on every row of results.jsonl."""
    out = ROOT / "runs" / "grid-baselines-fmnist"
    if not (out / "results.jsonl").is_file():
        pytest.skip("runs/grid-baselines-fmnist is not on this machine")

    def no_plan(grid):
        raise BadExpertError("not planned in this test")

    monkeypatch.setattr(rt, "plan", no_plan)
    size = (out / "results.jsonl").stat().st_size
    text = rt.render(out, cost=True)
    matrix = (out / "matrix.md").read_text().split("\n", 2)[2].strip()  # after the grid's title line
    if (out / "results.jsonl").stat().st_size != size:
        pytest.skip("the grid appended rows during the test")
    assert matrix in text and "| badexpert | 3 | 0 |" in text


def test_the_matrix_at_a_further_target_fpr(grid_dir, capsys):
    """``--at-fpr``: the matrix again at a further target of the grid's rows, ASR after from each
    row's operating point there; a target the rows lack is one line."""
    results = grid_dir / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    for r in rows:
        if r["status"] == "ok":
            r["operating_points"] = [{"fpr_target": 0.001, "threshold": 9.0, "fpr": 0.001, "tpr": 0.5,
                                      "ca_after": 0.89, "asr_after": r["asr_after"] + 0.05}]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = rt.render(grid_dir, at_fprs=[0.001])
    head, _, tail = text.partition("At 0.1% target FPR")
    assert tail, text
    # on badnet, seed means: badexpert 98.00% AUROC and ASR after 3.0% at 1%, 8.0% at 0.1%;
    # scale_up 65.00%, 85.0% and 90.0%
    assert "| 98.00% / 3.0% | 65.00% / 85.0% |" in head and "| 98.00% / 8.0% | 65.00% / 90.0% |" in tail
    assert rt.main([str(grid_dir), "--at-fpr", "0.05"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no operating point at FPR 0.05" in err[0] and "extra_fprs" in err[0], err


def test_clean_accuracy_before_and_after_each_detector(grid_dir):
    """``--ca``: per attack, the suspect model's CA and each detector's CA after / realized FPR (seed
    means); a failed implant said so and left out of the mean row, which counts its attacks; at a
    further target FPR, from the rows' operating points there."""
    results = grid_dir / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    for r in rows:
        if r["status"] == "ok":
            r["fpr_target"] = 0.05
            r["ca_after"] = {0: 0.86, 1: 0.88}[r["seed"]] if r["detector"] == "badexpert" else 0.80
            r["operating_points"] = [{"fpr_target": 0.001, "threshold": 9.0, "fpr": 0.002, "tpr": 0.5,
                                      "ca_after": 0.895, "asr_after": r["asr_after"]}]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "CA after" not in rt.render(grid_dir)  # only on request
    text = rt.render(grid_dir, ca=True, at_fprs=[0.001])
    _, _, ca = text.partition("Clean accuracy before and after each detector, at 5% target FPR:")
    at_1pct, _, at_01pct = ca.partition("At 0.1% target FPR:\n\n### blobs / cnn-w8: clean accuracy")
    assert "| badnet | 90.0% | 87.0% / 1.0% | 80.0% / 1.0% |" in at_1pct.splitlines()
    assert "| blend | 90.0% | attack failed | attack failed |" in at_1pct.splitlines()
    assert "| **mean** (1) | 90.0% | 87.0% / 1.0% | 80.0% / 1.0% |" in at_1pct.splitlines()
    assert "| badnet | 90.0% | 89.5% / 0.2% | 89.5% / 0.2% |" in at_01pct.splitlines()
    assert rt.main([str(grid_dir), "--ca"]) == 0


def test_published_blocks_are_what_their_committed_rows_render(monkeypatch):
    """Every grid whose rows are committed (``bench/results/NAME/results.jsonl``) and whose block
    bench/RESULTS.md shows: the block's attacks x detectors matrix is the one those rows render
    to (a block pasted from other rows, or rows committed without re-rendering, fails)."""
    monkeypatch.setattr(rt, "plan", lambda grid: (_ for _ in ()).throw(BadExpertError("not planned here")))
    page = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    checked = 0
    for results in sorted((ROOT / "bench" / "results").glob("*/results.jsonl")):
        name = results.parent.name
        begin = f"<!-- results_table {name}: begin"
        if begin not in page:
            continue
        block = page[page.index(begin):page.index(f"<!-- results_table {name}: end -->")]
        text = rt.render(results.parent)
        matrix = text[text.index("### "):text.rindex("<!-- results_table")].strip()
        assert matrix in block, f"bench/RESULTS.md's block {name} is not what {results} renders to"
        checked += 1
    assert checked or not list((ROOT / "bench" / "results").glob("*/results.jsonl"))


def test_without_the_data_rows_written_out_of_order_render_in_the_grid_order(grid_dir, monkeypatch):
    """Processes finish cells in any order (``grid --jobs``); where the grid cannot be planned (its
    data absent) the rows still render in the grid's order, as where it can."""
    results = grid_dir / "results.jsonl"
    lines = results.read_text().splitlines()
    planned = rt.render(grid_dir)
    results.write_text("\n".join(lines[:-1][::-1]) + "\n")  # every row of the grid, last cell first
    monkeypatch.setattr(rt, "plan", lambda grid: (_ for _ in ()).throw(BadExpertError("not planned here")))
    unplanned = rt.render(grid_dir)

    def matrix(text):
        return text[text.index("### "):text.rindex("<!-- results_table")].strip()

    assert matrix(unplanned) == matrix(planned)
    body = [line.split(" | ")[0] for line in matrix(unplanned).splitlines() if line.startswith("| b")]
    assert body == ["| badnet", "| blend"], body
