"""A grid's results as the Markdown block bench/RESULTS.md shows: where they came from, then the tables.

    CMD="badexpert grid --config configs/grids/baselines-fmnist.json --out runs/grid-baselines-fmnist --cache-dir .cache/grid"
    python bench/results_table.py runs/grid-baselines-fmnist --cost --command "$CMD"

Reads ``DIR/results.jsonl`` (and ``DIR/grid.json``, the grid as ``badexpert grid`` normalised it)
and prints, between two HTML-comment markers that name the block (paste it over the block of the
same name in bench/RESULTS.md):

- one line of provenance: the command that regenerates the rows (``--command``; default
  ``badexpert grid --config DIR/grid.json --out DIR``), the commit the renderer runs at
  (``git rev-parse --short HEAD``, and whether ``src/`` or ``configs/`` differ from it), the
  machine (``--machine``, default this one: platform, CPU count, torch version, ``OMP_NUM_THREADS``),
  the date, when ``results.jsonl`` was last written, and how many of the grid's cells have rows;
- the attacks x detectors matrix (:func:`badexpert.pipeline.grid.format_matrix`);
- with ``--ca``: clean accuracy before and after each detector, with its realized FPR, per attack
  (:func:`ca_table`; at each ``--at-fpr`` too);
- with ``--cost``: forward and backward passes per input and the median throughput against the
  bare model, per detector; with ``--summary``: the per-seed statistics table
  (:func:`~badexpert.pipeline.grid.format_summary`);
- with ``--at-fpr F`` (a further target FPR of the grid's ``extra_fprs``, repeatable): the
  matrix again with every detector at that target (ASR after, CA after and realized FPR at the
  threshold its calibration scores give there; AUROC does not depend on it);
- with ``--versus VARIANT=REFERENCE`` (two detector labels of the grid, repeatable): a variant
  against the detector it would replace, attack by attack (the change in AUROC on the paper's
  population and in ASR after defense, in points, seed means), the mean and the worst, and the
  verdict of the rule the project keeps a variant by (:data:`KEEP_RULE`: mean AUROC at most 0.5
  points lower, no attack more than 2 points lower, mean ASR after at most 1 point higher).

Only the rows of the grid in ``grid.json`` are shown (its plan's row keys, as ``badexpert grid``
itself summarises): rows an earlier version of the grid left in ``results.jsonl`` are not averaged
in. Where the grid cannot be planned (its data is not on this machine) every row is shown, and two
rows for the same dataset, architecture, attack, seed and detector are refused. Nothing is written:
a grid still running may be appending to the file (a torn last line is skipped, not repaired).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from statistics import fmean

from badexpert.errors import BadExpertError
from badexpert.pipeline.grid import (format_matrix, format_summary, load_grid, plan, read_grid_file, read_results,
                                     summarize)

REPO = Path(__file__).resolve().parent.parent

#: When a variant may replace (or stand beside, as an option) the detector it changes, in points:
#: its mean AUROC (paper's population) at least ``mean_auroc`` from the reference's, no attack's
#: below ``worst_auroc``, its mean ASR after defense at most ``mean_asr_after`` above.
KEEP_RULE = {"mean_auroc": -0.5, "worst_auroc": -2.0, "mean_asr_after": 1.0}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> str:
    """``git rev-parse --short HEAD`` of this repository, noting uncommitted changes to the code or configs."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is None:
        return "unknown (not a git checkout)"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "src", "configs")
    return f"`{head}`" + (" (src/ or configs/ modified)" if dirty else "")


def machine() -> str:
    """This machine: platform, CPU count, torch version and the thread setting."""
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch}"
            + (f", OMP_NUM_THREADS={threads}" if threads else ""))


def read_rows(path: Path) -> list[dict]:
    """The rows of ``results.jsonl`` through :func:`read_results`, read from a private copy so that
    the file a running grid appends to is never repaired or rewritten here."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "results.jsonl"
        copy.write_bytes(path.read_bytes())
        return read_results(copy, log=lambda s: print(f"results_table: {s.replace(str(copy), str(path))}",
                                                      file=sys.stderr))


def planned_rows(out: Path, rows: list[dict]) -> tuple[list[dict], str]:
    """The rows of the grid in ``out/grid.json`` (by row key), and a note of how many of its cells
    have every detector's row. Without a plannable grid.json: every row, refusing duplicates."""
    grid_file = out / "grid.json"
    specs = None
    if grid_file.is_file():
        try:
            specs = plan(read_grid_file(grid_file))
        except BadExpertError as exc:
            print(f"results_table: the grid in '{grid_file}' cannot be planned here ({exc}); showing every row "
                  "of results.jsonl", file=sys.stderr)
    if specs is not None:
        order = {d["key"]: i for i, d in enumerate(d for s in specs for d in s["detectors"])}
        have = {r["key"] for r in rows}
        # in the grid's own order (cells, then detectors), as `badexpert grid` summarises: a column
        # added to the config later (its rows appended last) still sits where the config puts it
        kept = sorted((r for r in rows if r["key"] in order), key=lambda r: order[r["key"]])
        done = sum(all(d["key"] in have for d in s["detectors"]) for s in specs)
        left = len(rows) - len(kept)
        return kept, (f"{done} of {len(specs)} cells" + (f"; {left} row(s) of other grids left out" if left else ""))
    if grid_file.is_file():  # not plannable here (its data absent), but its order is still the grid's
        try:
            grid = load_grid(read_grid_file(grid_file))
        except BadExpertError:
            grid = None
        if grid is not None:
            # the order plan() gives: datasets x architectures x attacks x seeds, then detectors (rows
            # reach results.jsonl in the order processes finish their cells)
            axes = [("dataset", [d["label"] for d in grid["datasets"]]),
                    ("arch", [a["label"] for a in grid["architectures"]]),
                    ("attack", [a["label"] for a in grid["attacks"]]), ("seed", grid["seeds"]),
                    ("detector", [d["label"] for d in grid["detectors"]])]
            rank = [({v: i for i, v in enumerate(values)}, field) for field, values in axes]
            rows = sorted(rows, key=lambda r: tuple(pos.get(r.get(field), len(pos)) for pos, field in rank))
    seen: dict[tuple, str] = {}
    for r in rows:
        k = (r.get("dataset"), r.get("arch"), r.get("attack"), r.get("seed"), r.get("detector"))
        if seen.setdefault(k, r["key"]) != r["key"]:
            raise BadExpertError(
                f"'{out / 'results.jsonl'}' holds two rows for dataset={k[0]} arch={k[1]} attack={k[2]} seed={k[3]} "
                f"detector={k[4]} (an earlier version of the grid); render it where its grid.json can be planned "
                "(its data present), so that only the grid's own rows are shown")
    return rows, f"{len({r.get('cell') for r in rows})} cells"


def cost_table(rows: list[dict]) -> str:
    """Per detector, over the rows with detector numbers: passes per input (the most common value)
    and the median throughput against the bare model."""
    lines = ["| detector | forward passes per input | backward passes per input | "
             "throughput vs bare model (median over cells) |", "|---|---|---|---|"]
    for det in dict.fromkeys(r["detector"] for r in rows):
        mine = [r for r in rows if r["detector"] == det and r.get("forward_passes") is not None]
        if not mine:
            continue
        fwd = [r["forward_passes"] for r in mine]
        bwd = [r.get("backward_passes") or 0 for r in mine]
        ratios = sorted(r["throughput_ratio"] for r in mine if r.get("throughput_ratio") is not None)
        med = None
        if ratios:
            n = len(ratios)
            med = ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2
        lines.append(f"| {det} | {max(set(fwd), key=fwd.count)} | {max(set(bwd), key=bwd.count)} | "
                     + ("n/a" if med is None else f"{med:.3f}x") + " |")
    return "\n".join(lines) + "\n"


def versus_table(summary: list[dict], variant: str, reference: str) -> str:
    """``variant`` against ``reference`` (detector labels of the summarised grid), per attack with
    numbers for both: the change in AUROC (paper's population) and in ASR after defense, in points;
    then the mean, the worst and the :data:`KEEP_RULE` verdict."""
    labels = list(dict.fromkeys(s["detector"] for s in summary))
    for label in (variant, reference):
        if label not in labels:
            raise BadExpertError(f"--versus: no detector labelled '{label}' in this grid; its labels: {', '.join(labels)}")
    by = {(s["dataset"], s["arch"], s["attack"], s["detector"]): s for s in summary}
    places = {(s["dataset"], s["arch"]) for s in summary}
    pairs = []
    for (ds, arch, attack, det), v in by.items():
        r = by.get((ds, arch, attack, reference))
        if det != variant or r is None or v["auroc_mean"] is None or r["auroc_mean"] is None:
            continue
        name = attack if len(places) == 1 else f"{ds} / {arch} / {attack}"
        pairs.append((name, 100 * (v["auroc_mean"] - r["auroc_mean"]), 100 * (v["asr_after_mean"] - r["asr_after_mean"])))
    if not pairs:
        raise BadExpertError(f"--versus {variant}={reference}: no attack has numbers for both detectors yet")
    lines = [f"| attack | {variant} - {reference}: AUROC (points) | ASR after (points) |", "|---|---|---|"]
    lines += [f"| {name} | {da:+.2f} | {dr:+.1f} |" for name, da, dr in pairs]
    da = [p[1] for p in pairs]
    dr = [p[2] for p in pairs]
    mean_a, mean_r = sum(da) / len(da), sum(dr) / len(dr)
    worst = min(pairs, key=lambda p: p[1])
    rule = KEEP_RULE
    broken = [text for ok, text in (
        (mean_a >= rule["mean_auroc"], f"mean AUROC {mean_a:+.2f} below {rule['mean_auroc']:+.1f}"),
        (worst[1] >= rule["worst_auroc"], f"{worst[0]} {worst[1]:+.2f} below {rule['worst_auroc']:+.1f}"),
        (mean_r <= rule["mean_asr_after"], f"mean ASR after {mean_r:+.2f} above {rule['mean_asr_after']:+.1f}"),
    ) if not ok]
    verdict = "meets the keep rule" if not broken else "breaks the keep rule (" + "; ".join(broken) + ")"
    lines += ["", f"{variant} against {reference} over {len(pairs)} attacks: AUROC mean {mean_a:+.2f} points, "
                  f"worst {worst[1]:+.2f} ({worst[0]}); ASR after mean {mean_r:+.2f} points: {verdict}."]
    return "\n".join(lines) + "\n"


def _targets(rows: list[dict]) -> str:
    """The target FPR(s) the rows' detectors were calibrated at, as text ("1%")."""
    targets = sorted({r["fpr_target"] for r in rows if r.get("fpr_target") is not None})
    return " / ".join(f"{100 * t:g}%" for t in targets) or "its"


def ca_table(summary: list[dict]) -> str:
    """Per dataset and architecture, one row per attack: the suspect model's clean accuracy (seed
    mean) and, per detector, its clean accuracy after defense / realized FPR (seed means over the
    seeds that implanted); a mean row over the attacks every detector has numbers for. What each
    detector costs clean users, beside what it stops."""
    from badexpert.reporting.formats import pct

    dets = list(dict.fromkeys(s["detector"] for s in summary))
    by = {(s["dataset"], s["arch"], s["attack"], s["detector"]): s for s in summary}
    parts = []
    for ds, arch in dict.fromkeys((s["dataset"], s["arch"]) for s in summary):
        attacks = list(dict.fromkeys(s["attack"] for s in summary if (s["dataset"], s["arch"]) == (ds, arch)))
        lines = [f"### {ds} / {arch}: clean accuracy", "",
                 "| attack | CA (no defense) | " + " | ".join(f"{d} CA after / realized FPR" for d in dets) + " |",
                 "|---|---|" + "---|" * len(dets)]
        full = []  # attacks with numbers for every detector: the mean row's
        for a in attacks:
            mine = [by.get((ds, arch, a, d)) for d in dets]
            before = next((s["clean_accuracy_mean"] for s in mine if s is not None), None)
            cells = ["" if s is None else "attack failed" if not s["implanted"]
                     else f"{pct(s['ca_after_mean'])} / {pct(s['fpr_mean'])}" for s in mine]
            lines.append(f"| {a} | {pct(before)} | " + " | ".join(cells) + " |")
            if all(s is not None and s["implanted"] and s["ca_after_mean"] is not None for s in mine):
                full.append((before, mine))
        if full:
            cells = [f"{pct(fmean(m[i]['ca_after_mean'] for _, m in full))} / "
                     f"{pct(fmean(m[i]['fpr_mean'] for _, m in full))}" for i in range(len(dets))]
            lines.append(f"| **mean** ({len(full)}) | {pct(fmean(b for b, _ in full))} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def at_fpr_rows(rows: list[dict], fpr: float) -> list[dict]:
    """The rows with each detector's numbers at the further target ``fpr`` (its ``operating_points``
    entry) in place of those at the target it was calibrated at; rows without detector numbers (a
    backdoor that did not implant) pass unchanged. One line if a row lacks that target."""
    out = []
    for r in rows:
        if r.get("status") != "ok":
            out.append(r)
            continue
        point = next((p for p in r.get("operating_points") or () if abs(p["fpr_target"] - fpr) < 1e-12), None)
        if point is None:
            have = sorted(p["fpr_target"] for p in r.get("operating_points") or ())
            raise BadExpertError(f"the rows have no operating point at FPR {fpr:g} (attack={r['attack']} "
                                 f"detector={r['detector']} has {have or 'none'}); add it to the grid's extra_fprs")
        out.append({**r, "fpr_target": point["fpr_target"], "threshold": point["threshold"], "fpr": point["fpr"],
                    "ca_after": point["ca_after"], "asr_after": point["asr_after"]})
    return out


def render(out_dir: str | Path, *, command: str | None = None, machine_text: str | None = None,
           cost: bool = False, ca: bool = False, with_summary: bool = False, versus: list[tuple[str, str]] = (),
           at_fprs: list[float] = (), today: dt.date | None = None) -> str:
    """The Markdown block for the grid output directory ``out_dir`` (see the module docs)."""
    out = Path(out_dir)
    results = out / "results.jsonl"
    if not out.is_dir():
        raise BadExpertError(f"'{out}' is not a directory; give a grid's --out directory")
    if not results.is_file():
        raise BadExpertError(f"'{out}' has no results.jsonl; run `badexpert grid --config CONFIG --out {out}` first")
    rows, cells = planned_rows(out, read_rows(results))
    if not rows:
        raise BadExpertError(f"'{results}' holds no rows of this grid yet; nothing to render")
    n_boot = 1000
    if (out / "grid.json").is_file():
        n_boot = int(read_grid_file(out / "grid.json").get("n_boot", 1000))
    summary = summarize(rows, n_boot=n_boot, seed=0)  # as `badexpert grid` summarises
    command = command or f"badexpert grid --config {shlex.quote(str(out / 'grid.json'))} --out {shlex.quote(str(out))}"
    written = dt.datetime.fromtimestamp(results.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    today = today or dt.date.today()
    name = out.name
    parts = [f"<!-- results_table {name}: begin (python bench/results_table.py; paste over this block) -->", "",
             f"Command: `{command}` · commit {commit()} · machine: {machine_text or machine()} · "
             f"rendered {today.isoformat()}, rows written up to {written} · {cells} ({len(rows)} rows)", "",
             format_matrix(summary).rstrip("\n")]
    for f in at_fprs:
        parts += ["", f"At {100 * f:g}% target FPR (each detector's threshold from its own calibration scores at "
                  "that target; AUROC as above):", "",
                  format_matrix(summarize(at_fpr_rows(rows, f), n_boot=n_boot, seed=0)).rstrip("\n")]
    if ca:
        parts += ["", f"Clean accuracy before and after each detector, at {_targets(rows)} target FPR:", "",
                  ca_table(summary).rstrip("\n")]
        for f in at_fprs:
            parts += ["", f"At {100 * f:g}% target FPR:", "",
                      ca_table(summarize(at_fpr_rows(rows, f), n_boot=n_boot, seed=0)).rstrip("\n")]
    if cost:
        parts += ["", "Cost per detector, from the same rows (throughput measured on each cell's test inputs):", "",
                  cost_table(rows).rstrip("\n")]
    if with_summary:
        parts += ["", format_summary(summary).rstrip("\n")]
    for variant, reference in versus:
        parts += ["", versus_table(summary, variant, reference).rstrip("\n")]
    parts += ["", f"<!-- results_table {name}: end -->"]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a grid's --out directory (holds results.jsonl and grid.json)")
    p.add_argument("--command", help="the command that regenerates the rows (default: badexpert grid on DIR/grid.json)")
    p.add_argument("--machine", help="the machine the grid ran on, when not this one (e.g. '1x H100 80GB')")
    p.add_argument("--cost", action="store_true", help="add the passes per input and median throughput per detector")
    p.add_argument("--ca", action="store_true",
                   help="add clean accuracy before and after each detector, with its realized FPR (and at each --at-fpr)")
    p.add_argument("--summary", action="store_true", help="add the per-seed statistics table (mean, std, 95%% CI)")
    p.add_argument("--versus", action="append", default=[], metavar="VARIANT=REFERENCE",
                   help="add a variant against the detector it changes (two detector labels), with the keep rule's "
                        "verdict; repeatable")
    p.add_argument("--at-fpr", action="append", type=float, default=[], metavar="FPR",
                   help="add the matrix at a further target FPR of the grid (its extra_fprs); repeatable")
    args = p.parse_args(argv)
    try:
        versus = []
        for item in args.versus:
            variant, sep, reference = item.partition("=")
            if not sep or not variant or not reference:
                raise BadExpertError(f"--versus takes VARIANT=REFERENCE (two detector labels), got '{item}'")
            versus.append((variant, reference))
        text = render(args.out, command=args.command, machine_text=args.machine, cost=args.cost, ca=args.ca,
                      with_summary=args.summary, versus=versus, at_fprs=args.at_fpr)
    except BadExpertError as exc:
        print(f"results_table: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
