"""The benchmark grid: datasets x architectures x attacks x seeds, every detector on every cell.

``badexpert grid --config grid.json --out DIR`` and :func:`run_grid`. A *cell* is one suspect
model: (dataset, architecture, attack, seed). Every detector of the grid runs on it through
:func:`badexpert.compare` (same reserved, calibration and test splits, the model's outputs
computed once). The whole grid is validated before anything is read or trained: every cell's
:class:`~badexpert.pipeline.experiment.ExperimentConfig` (one per detector) must pass ``validate()``.

Work is never done twice:

- suspect models go through :func:`~badexpert.pipeline.experiment.train_suspect`'s content-hash cache
  (``cache_dir``);
- fitted and calibrated detectors are cached beside them, keyed by a content hash of the suspect
  model's key, the detector's name and parameters, the split and the target FPR, and loaded
  with :func:`~badexpert.detectors.load_detector` (which checks the model's fingerprint); a
  detector that never uses the model (Frequency) is keyed on its data instead and fitted once
  for every suspect model of the same split;
- ``results.jsonl`` gets one JSON line per (cell, detector), appended as each cell finishes;
  a row already there (same row key: a hash of everything the row depends on) is not computed
  again, so an interrupted grid resumes where it stopped, and a grid extended by a seed or a
  detector runs only what is new. With a cache, every row is also kept in it
  (``CACHE/rows/<key>.json``), and another grid with the same cell and detector (the same suspect
  model, protocol and detector settings, whatever its labels) takes the row from there.

Outputs (``out_dir``): ``grid.json`` (the normalised grid), ``results.jsonl``, ``summary.md`` and
``summary.csv`` (per dataset, architecture, attack and detector across seeds: mean, standard
deviation and a seeded bootstrap 95% interval of the AUROC on the paper's population and of the
ASR after filtering) and ``heatmap.png`` (mean AUROC, attacks x detectors, one panel per dataset
and architecture). A backdoor that did not implant is recorded as such, without detector numbers.
With ``"noisy_clean": true`` (or ``grid --noisy-clean``) every detector is also ranked with the
paper's noise-augmented clean negatives: rows gain ``auroc_noisy`` / ``auroc_noisy_filtered``,
the summary and ``matrix.md`` a noisy-AUROC column on the paper's population (the heatmap keeps
the plain AUROC); the field is part of the row key only when on, so grids run without it resume.
With ``"extra_fprs": [0.001]`` every row also reports each detector at those further target FPRs
(``operating_points``: the threshold its calibration scores give there, realized FPR, CA and ASR
after filtering), without refitting; like ``noisy_clean``, part of the row key only when given.

The seam for a distributed runner: :func:`run_cell` (module level) runs one cell from a
JSON-able spec and returns its rows; :func:`run_grid`'s ``runner(fn, specs)`` maps it over the
cells and yields each cell's rows as they finish, in any order (default :func:`local_runner`).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .. import __version__
from ..digests import json_digest
from ..errors import BadExpertError
from ..evaluation.records import DefenseRecord, GridRow
from ..utils import atomic_write_text, check_output_dir, to_jsonable, write_error, write_json
from ..validation import check_label

#: What ``badexpert grid`` writes into its output directory (a rerun resumes in the same directory).
GRID_OUTPUTS = frozenset({"grid.json", "results.jsonl", "summary.md", "summary.csv", "matrix.md", "heatmap.png"})

#: ExperimentConfig fields shared by every cell (top level of the grid config).
SHARED_FIELDS = ("recipe", "reserved", "calibration", "train_size", "test_size", "image_size", "fpr", "asr_bar",
                 "device", "n_boot", "noisy_clean", "extra_fprs")
#: The axes of the grid.
AXES = ("datasets", "architectures", "attacks", "detectors", "seeds")
DATASET_FIELDS = ("name", "label", "data_path", "image_size", "reserved", "calibration", "train_size", "test_size",
                  "recipe")
ARCH_FIELDS = ("arch", "label", "width", "recipe")
ATTACK_FIELDS = ("name", "label", "params", "recipe")
DETECTOR_FIELDS = ("name", "label", "params")
#: Detector parameters the grid sets itself (the cell's seed, the grid's device).
GRID_SET_PARAMS = ("seed", "device")

#: Row fields with detector numbers (``None`` when the backdoor did not implant; the row's schema
#: is :class:`~badexpert.evaluation.records.GridRow`).
DETECTOR_NUMBERS = GridRow.DETECTOR_NUMBERS

SUMMARY_COLUMNS = ("dataset", "arch", "attack", "detector", "seeds", "implanted", "failed",
                   "auroc_mean", "auroc_std", "auroc_ci_low", "auroc_ci_high",
                   "asr_after_mean", "asr_after_std", "asr_after_ci_low", "asr_after_ci_high",
                   "ca_after_mean", "fpr_mean", "clean_accuracy_mean", "attack_success_rate_mean", "out_of_scope",
                   "auroc_noisy_mean", "auroc_noisy_std", "auroc_noisy_ci_low", "auroc_noisy_ci_high", "fpr_noisy_mean")


def _hash(obj: Any) -> str:
    return json_digest(obj, length=16)


# --------------------------------------------------------------------------------------------
# the grid config
# --------------------------------------------------------------------------------------------
def read_grid_file(path: str | Path) -> dict:
    """A grid config file as a dict; one-line errors for a missing, huge or malformed file."""
    from ..utils import read_json_file

    p = Path(path)
    d = read_json_file(p, "grid config file")
    if not isinstance(d, dict):
        raise BadExpertError(f"grid config file '{p}' must hold a JSON object, got {type(d).__name__}")
    return d


def _check_keys(d: dict, valid: tuple[str, ...], where: str) -> None:
    bad = sorted(set(d) - set(valid))
    if bad:
        raise BadExpertError(f"{where}: unknown field(s) {bad}; valid: {sorted(valid)}")


def _entries(grid: dict, axis: str) -> list:
    v = grid.get(axis)
    if not isinstance(v, list) or not v:
        got = "nothing" if v is None else type(v).__name__ if not isinstance(v, list) else "an empty list"
        raise BadExpertError(f"grid field '{axis}' must be a non-empty list, got {got}")
    return v


def _entry(item: Any, axis: str, i: int, name_field: str, fields: tuple[str, ...]) -> dict:
    where = f"grid {axis}[{i}]"
    if isinstance(item, str):
        item = {name_field: item}
    if not isinstance(item, dict):
        raise BadExpertError(f"{where} must be a name or an object with '{name_field}', got {type(item).__name__}")
    _check_keys(item, fields, where)
    if not isinstance(item.get(name_field), str):
        raise BadExpertError(f"{where} needs '{name_field}' (a name), got {item.get(name_field)!r}")
    for key in ("params", "recipe"):
        if key in item and not isinstance(item[key], dict):
            raise BadExpertError(f"{where}: '{key}' must be an object, got {type(item[key]).__name__}")
    if "label" in item:
        check_label(item["label"], where)
    return dict(item)


def _named(canonical: Callable[[str], str], name: str, where: str) -> str:
    try:
        return canonical(name)
    except BadExpertError as exc:
        raise BadExpertError(f"{where}: {exc}") from None


def _unique(entries: list[dict], axis: str) -> None:
    labels = [e["label"] for e in entries]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise BadExpertError(f"grid {axis}: {dup} listed twice; give each entry a distinct \"label\"")


def normalize_grid(config: dict) -> dict:
    """Check the grid config's structure and return it normalised: canonical names, a label for
    every dataset, architecture and attack, ``params`` / ``recipe`` objects, absolute data paths.

    Names, types and ranges of the values themselves are checked cell by cell in :func:`plan`.
    """
    from ..attacks import ATTACKS
    from ..data import canonical_dataset
    from ..detectors import DETECTORS
    from ..models import canonical_arch

    if not isinstance(config, dict):
        raise BadExpertError(f"a grid config must be a JSON object, got {type(config).__name__}")
    _check_keys(config, AXES + SHARED_FIELDS, "grid config")
    grid: dict = {k: config[k] for k in SHARED_FIELDS if k in config}
    if "recipe" in grid and not isinstance(grid["recipe"], dict):
        raise BadExpertError(f"grid field 'recipe' must be an object, got {type(grid['recipe']).__name__}")

    datasets = []
    for i, item in enumerate(_entries(config, "datasets")):
        e = _entry(item, "datasets", i, "name", DATASET_FIELDS)
        e["name"] = _named(canonical_dataset, e["name"], f"grid datasets[{i}]")
        e.setdefault("label", e["name"])
        path = e.get("data_path")
        if path is not None:
            if not isinstance(path, str) or not path:
                raise BadExpertError(f"grid datasets[{i}]: 'data_path' must be a path, got {path!r}")
            e["data_path"] = str(Path(path).expanduser().absolute())  # the same files from any working directory
        datasets.append(e)
    _unique(datasets, "datasets")

    archs = []
    for i, item in enumerate(_entries(config, "architectures")):
        e = _entry(item, "architectures", i, "arch", ARCH_FIELDS)
        e["arch"] = _named(canonical_arch, e["arch"], f"grid architectures[{i}]")
        w = e.get("width")
        e.setdefault("label", e["arch"] if w is None else f"{e['arch']}-w{w}")
        archs.append(e)
    _unique(archs, "architectures")

    attacks = []
    for i, item in enumerate(_entries(config, "attacks")):
        if item is None or (isinstance(item, str) and item.lower() in ("none", "clean", "")):
            raise BadExpertError(f"grid attacks[{i}]: the grid measures detection of backdoors and needs an attack; "
                                 "measure a clean model's false-positive rate with `badexpert run` (attack null)")
        e = _entry(item, "attacks", i, "name", ATTACK_FIELDS)
        e["name"] = _named(ATTACKS.canonical, e["name"], f"grid attacks[{i}]")
        e.setdefault("params", {})
        e.setdefault("label", e["name"])
        attacks.append(e)
    _unique(attacks, "attacks")

    detectors = []
    for i, item in enumerate(_entries(config, "detectors")):
        e = _entry(item, "detectors", i, "name", DETECTOR_FIELDS)
        e["name"] = _named(DETECTORS.canonical, e["name"], f"grid detectors[{i}]")
        e.setdefault("params", {})
        e.setdefault("label", e["name"])
        set_here = sorted(set(e["params"]) & set(GRID_SET_PARAMS))
        if set_here:
            raise BadExpertError(f"grid detectors[{i}] ({e['name']}): parameter(s) {set_here} are set by the grid "
                                 "(each cell's seed, the grid's 'device'); remove them")
        detectors.append(e)
    names = [d["label"] for d in detectors]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadExpertError(f"grid detectors: {dup} listed twice; each detector runs once per cell (two variants "
                             "of one detector need distinct 'label's)")

    seeds = _entries(config, "seeds")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise BadExpertError(f"grid field 'seeds' must hold non-negative integers, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise BadExpertError(f"grid field 'seeds' lists a seed twice: {seeds}")

    grid.update(datasets=datasets, architectures=archs, attacks=attacks, detectors=detectors, seeds=list(seeds))
    return grid


def load_grid(config: dict | str | Path) -> dict:
    """A grid config (a dict, or the path of a JSON file) checked and normalised."""
    if isinstance(config, (str, Path)):
        config = read_grid_file(config)
    return normalize_grid(config)


def _check_data_path(ds: dict, i: int) -> None:
    """The dataset's files exist (without reading them)."""
    from ..data import DEFAULT_PATHS

    path = ds.get("data_path") or DEFAULT_PATHS.get(ds["name"])
    if path is None:
        raise BadExpertError(f"grid datasets[{i}] ({ds['label']}): dataset '{ds['name']}' needs a 'data_path' to its "
                             "local files; nothing is downloaded")
    if not Path(path).exists():
        raise BadExpertError(f"grid datasets[{i}] ({ds['label']}): dataset path '{path}' does not exist")


def _cell_name(ds: dict, arch: dict, attack: dict, seed: int) -> str:
    return f"dataset={ds['label']} arch={arch['label']} attack={attack['label']} seed={seed}"


def cell_config(grid: dict, ds: dict, arch: dict, attack: dict, seed: int, detector: dict | None = None):
    """The :class:`ExperimentConfig` of one cell (and one detector), not yet validated."""
    from .experiment import ExperimentConfig

    values: dict = {k: grid[k] for k in SHARED_FIELDS if k in grid and k != "recipe"}
    values.update({k: ds[k] for k in ("data_path", "image_size", "reserved", "calibration", "train_size", "test_size")
                   if k in ds})
    recipe = {**grid.get("recipe", {}), **ds.get("recipe", {}), **arch.get("recipe", {}), **attack.get("recipe", {})}
    values.update(dataset=ds["name"], arch=arch["arch"], width=arch.get("width"), attack=attack["name"],
                  attack_params=dict(attack["params"]), recipe=recipe, seed=seed)
    if detector is not None:
        values.update(detector=detector["name"], detector_params={**detector["params"], "seed": seed})
    return ExperimentConfig(**values)


def plan(config: dict | str | Path, *, cache_dir: str | Path | None = None) -> list[dict]:
    """Validate every cell of the grid (with each detector) and return the cell specs.

    Nothing is read but the dataset paths' existence and the attacks' trigger files; nothing is
    trained. A spec is JSON-able (what :func:`run_cell` takes)::

        {"cell": key, "dataset": label, "arch": label, "attack": label, "seed": int,
         "config": ExperimentConfig dict, "suspect": suspect-model cache key,
         "cache_dir": str or None, "position": [i, n],
         "detectors": [{"name", "params", "key"}, ...]}

    ``cell`` hashes everything the suspect model and its evaluation depend on (the suspect-model
    cache key, split sizes, target FPR, ASR bar, bootstrap size); each detector's ``key`` adds its
    name and parameters: the row key of ``results.jsonl``.
    """
    from .experiment import suspect_key

    grid = load_grid(config)  # normalising is idempotent: a normalised grid passes unchanged
    for i, ds in enumerate(grid["datasets"]):
        _check_data_path(ds, i)
    specs = []
    for ds in grid["datasets"]:
        for arch in grid["architectures"]:
            for attack in grid["attacks"]:
                for seed in grid["seeds"]:
                    name = _cell_name(ds, arch, attack, seed)
                    try:
                        for det in grid["detectors"]:
                            cell_config(grid, ds, arch, attack, seed, det).validate()
                        cfg = cell_config(grid, ds, arch, attack, seed).validate()
                        skey = suspect_key(cfg, cfg.make_recipe())
                    except BadExpertError as exc:
                        raise BadExpertError(f"grid cell {name}: {exc}") from exc
                    conf = cfg.to_dict()
                    cell = _hash({"suspect": skey, **{k: conf[k] for k in ("reserved", "calibration", "test_size",
                                                                             "fpr", "asr_bar", "n_boot")},
                                  # only when on: the rows of grids run without the protocol keep their keys
                                  **({"noisy_clean": True} if conf["noisy_clean"] else {}),
                                  **({"extra_fprs": conf["extra_fprs"]} if conf["extra_fprs"] else {})})
                    dets = [{"name": d["name"], "label": d["label"], "params": d["params"],
                             # the label only where it is not the name: unlabelled rows keep their keys
                             "key": _hash({"cell": cell, "detector": d["name"], "params": d["params"],
                                           **({"label": d["label"]} if d["label"] != d["name"] else {})})}
                            for d in grid["detectors"]]
                    specs.append({"cell": cell, "dataset": ds["label"], "arch": arch["label"],
                                  "attack": attack["label"], "seed": seed, "config": conf, "suspect": skey,
                                  "cache_dir": None if cache_dir is None else str(Path(cache_dir).absolute()),
                                  "detectors": dets})
    for i, spec in enumerate(specs):
        spec["position"] = [i + 1, len(specs)]
    return specs


# --------------------------------------------------------------------------------------------
# one cell
# --------------------------------------------------------------------------------------------
def detector_cache_key(suspect: str, name: str, params: dict, cfg) -> str:
    """Content hash of what a fitted and calibrated detector depends on: the suspect model's key
    (for a detector that does not use the model, a digest of its fitting and calibration images),
    the detector's name and parameters (its seed included, its device not), the split it was
    fitted and calibrated on, and the target FPR and calibration population."""
    from ..detectors.base import DEFAULT_POPULATION

    return _hash({"suspect": suspect, "detector": name, "params": {k: v for k, v in params.items() if k != "device"},
                  "split": {"dataset": cfg.dataset, "seed": cfg.seed, "reserved": cfg.reserved,
                            "calibration": cfg.calibration},
                  "fpr": cfg.fpr, "calibration_population": DEFAULT_POPULATION, "version": __version__})


def run_cell(spec: dict, *, log: Callable[[str], Any] = print) -> list[dict]:
    """Run one cell from its JSON-able spec (see :func:`plan`): the suspect model (trained or
    loaded from ``spec["cache_dir"]``), then every detector of ``spec["detectors"]`` through
    :func:`badexpert.compare` (fitted detectors cached and reused). Returns one JSON-ready row per
    detector; with a backdoor that did not implant, the rows say so and carry no detector numbers.

    Module-level and driven by plain data only, so a remote worker (a Ray task) can call it.
    An error is one line naming the cell.
    """
    try:
        return _run_cell(spec, log)
    except BadExpertError as exc:
        raise BadExpertError(f"grid cell dataset={spec.get('dataset')} arch={spec.get('arch')} "
                             f"attack={spec.get('attack')} seed={spec.get('seed')}: {exc}") from exc


def _run_cell(spec: dict, log: Callable[[str], Any]) -> list[dict]:
    from ..attacks import attack_from_meta
    from ..attacks.components import tensor_digest
    from ..evaluation.compare import compare
    from ..detectors import get_detector, load_detector
    from .experiment import ExperimentConfig, make_splits, split_meta, suspect_file, suspect_key, train_suspect
    from ..utils import seed_everything

    t0 = time.perf_counter()
    cfg = ExperimentConfig.from_dict(spec["config"]).validate()
    pos = spec.get("position")
    where = f"[{pos[0]}/{pos[1]}] " if pos else ""
    log(f"{where}cell dataset={spec['dataset']} arch={spec['arch']} attack={spec['attack']} seed={spec['seed']}: "
        f"{', '.join(d['label'] for d in spec['detectors'])}")
    cache_dir = Path(spec["cache_dir"]) if spec.get("cache_dir") else None
    skey = suspect_key(cfg, cfg.make_recipe())
    model_cached = cache_dir is not None and suspect_file(cache_dir, skey).is_file()
    splits = make_splits(cfg)
    model, meta = train_suspect(cfg, splits, cache_dir=cache_dir, log=log)
    attack = attack_from_meta(meta)

    dets, fresh, cached = {}, [], set()
    for d in spec["detectors"]:
        det = get_detector(d["name"], **{"seed": cfg.seed, "device": cfg.device, **d["params"]})
        path = None
        if cache_dir is not None:
            # a detector that never uses the suspect model is keyed on its data alone: fitted once
            # per split, it serves every suspect model of that split
            owner = skey if det.uses_model else "data-" + tensor_digest(
                {"reserved": splits.reserved.images, "calibration": splits.calibration.images})
            dkey = detector_cache_key(owner, d["name"], det.get_params(), cfg)
            path = cache_dir / f"detector-{d['name']}-{dkey}.safetensors"
            if path.is_file():
                try:
                    loaded = load_detector(path, model, device=cfg.device, rebind=not det.uses_model)
                except BadExpertError as exc:  # e.g. the suspect model was retrained with other weights
                    log(f"cached {d['name']} detector not usable ({exc}); fitting it again")
                else:
                    # calibrated at this FPR, or (a detector moved to this model) to be calibrated for it
                    if getattr(loaded, "fpr_target_", cfg.fpr) == cfg.fpr:
                        log(f"loaded cached {d['label']} detector {path}")
                        det = loaded
                        cached.add(d["label"])
        if d["label"] not in cached:
            fresh.append((det, path))
        dets[d["label"]] = det
    seed_everything(cfg.seed)
    result = compare(model, dets, splits, attack, fpr=cfg.fpr, seed=cfg.seed, device=cfg.device,
                     asr_bar=cfg.asr_bar, n_boot=cfg.n_boot, noisy_clean=cfg.noisy_clean,
                     extra_fprs=cfg.extra_fprs, log=log)
    for det, path in fresh:
        if path is not None and hasattr(det, "threshold_"):
            det.model_name_ = suspect_file(cache_dir, skey).name
            det.save(path, extra=split_meta(cfg))

    m = result.metrics["model"]
    failed = bool(m["attack_failed"])
    by_label = {r.shown_as: r for r in (DefenseRecord.from_dict(d) for d in result.metrics["detectors"])}
    seconds = time.perf_counter() - t0
    rows = []
    for d in spec["detectors"]:
        defense = None if failed else by_label[d["label"]]
        row = GridRow(
            key=d["key"], cell=spec["cell"], dataset=spec["dataset"], arch=spec["arch"], attack=spec["attack"],
            seed=spec["seed"], detector=d["label"], detector_params=d["params"],
            status="attack_failed" if failed else "ok",
            clean_accuracy=m["clean_accuracy"], attack_success_rate=m["attack_success_rate"], attack_failed=failed,
            **GridRow.numbers(defense),
            # why the attack's trigger is outside the detector's scope (e.g. SentiNet on an image-wide trigger)
            out_of_scope=None if defense is None else defense.out_of_scope,
            # the sizes the model outputs record: triggered and noisy ones only where they were made
            n_test=m["sizes"]["test_clean"], n_triggered=m["sizes"].get("test_triggered"),
            n_noisy=m["sizes"].get("test_noisy"),
            train_seconds=meta.get("train_seconds"), cell_seconds=seconds,
            model_cached=model_cached, detector_cached=d["label"] in cached, badexpert_version=__version__,
        )
        rows.append(json.loads(json.dumps(to_jsonable(row.to_dict()))))  # exactly what results.jsonl will hold
    return rows


#: Where processes sharing a grid cache claim the cell each runs (``CLAIMS_DIR/.locks/<cell>.lock``).
CLAIMS_DIR = "cells"


def claimed_cells(fn: Callable[[dict], list[dict]], cache_dir: str | Path, *,
                  log: Callable[[str], Any] = print) -> Callable[[dict], list[dict]]:
    """``fn`` (:func:`run_cell`) for processes that share ``cache_dir`` and take cells as they come:
    a cell another process holds now is skipped (no rows: the holder keeps them in the cache),
    one this process claims runs only the detectors whose rows no other process kept meanwhile.
    A claim is a lock (:func:`badexpert.utils.claim`): a killed process leaves none behind."""
    from ..utils import claim

    folder = Path(cache_dir) / CLAIMS_DIR

    def run(spec: dict) -> list[dict]:
        with claim(folder / str(spec["cell"])) as mine:
            if not mine:
                log(f"cell dataset={spec['dataset']} arch={spec['arch']} attack={spec['attack']} seed={spec['seed']}: "
                    "another process runs it")
                return []
            # rows another process finished between this one's plan and its claim
            found = {d["key"]: cached_row(cache_dir, spec, d, log=log) for d in spec["detectors"]}
            rows = [r for r in found.values() if r is not None]
            missing = [d for d in spec["detectors"] if found[d["key"]] is None]
            return rows + (fn({**spec, "detectors": missing}) if missing else [])

    return run


def local_runner(fn: Callable[[dict], list[dict]], specs: list[dict]) -> Iterator[list[dict]]:
    """Run the cells one after the other in this process, yielding each cell's rows."""
    for spec in specs:
        yield fn(spec)


def budget_runner(seconds: float, cache_dir: str | Path, *, log: Callable[[str], Any] = print
                  ) -> Callable[[Callable[[dict], list[dict]], list[dict]], Iterator[list[dict]]]:
    """A :func:`local_runner` that ends within ``seconds``. Each cell starts only when its
    estimate still fits: a cell whose suspect model is in the cache needs its detectors (the
    longest detector time of the cells so far), one that trains needs the longest cell so far. A
    cell that does not fit is left for the rerun and a later one that fits still runs. A suspect
    model's training stops at an epoch boundary when the next epoch (and the cell's detectors)
    would not fit, keeping its state under ``cache_dir/train-checkpoints`` (see
    :func:`badexpert.training.time_budget`). The grid's rerun resumes both: finished cells from
    ``results.jsonl``, the training from its checkpoint. The runner's ``stopped`` attribute tells
    whether cells were left to run."""
    from ..errors import TimeBudgetReached
    from ..training import time_budget
    from .experiment import suspect_file

    deadline = time.monotonic() + seconds
    cache = Path(cache_dir)
    checkpoints = cache / "train-checkpoints"

    def runner(fn: Callable[[dict], list[dict]], specs: list[dict]) -> Iterator[list[dict]]:
        longest = detectors = 0.0
        ran = 0
        for spec in specs:
            left = deadline - time.monotonic()
            if left <= detectors:  # not even a cell with its model cached fits any more
                break
            cached = bool(spec.get("suspect")) and suspect_file(cache, spec["suspect"]).is_file()
            if not cached and left < longest:  # this one trains: left for the rerun
                continue
            t0 = time.monotonic()
            try:
                with time_budget(left, reserve=detectors, checkpoint_dir=checkpoints):
                    rows = fn(spec)
            except TimeBudgetReached as exc:
                log(f"time budget: {exc}; stopping with {len(specs) - ran} cell(s) to run")
                runner.stopped = True
                return
            ran += 1
            took = time.monotonic() - t0
            trained = 0.0 if not rows or rows[0]["model_cached"] else float(rows[0]["train_seconds"] or 0.0)
            longest, detectors = max(longest, took), max(detectors, took - trained)
            yield rows
        if ran < len(specs):
            left = max(0.0, deadline - time.monotonic())
            log(f"time budget: {left:.0f}s left, less than the remaining cells need (the longest cell so far "
                f"took {longest:.0f}s, its detectors {detectors:.0f}s); stopping with {len(specs) - ran} cell(s) to run")
            runner.stopped = True

    runner.stopped = False
    return runner


def _ray_cell(spec: dict) -> list[dict]:
    """:func:`run_cell` in a Ray worker (its log goes to the worker's output, which Ray forwards)."""
    return run_cell(spec)


#: Seconds :func:`ray_runner` waits for a Ray cluster address to answer (``grid --ray-timeout``).
RAY_CONNECT_TIMEOUT = 10.0


def check_ray_address(address: str, timeout: float | None = None) -> None:
    """A cluster address (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``) answers a TCP connection
    within ``timeout`` seconds (default :data:`RAY_CONNECT_TIMEOUT`), or one :class:`BadExpertError`:
    ``ray.init`` itself retries an unreachable address for many minutes. ``"local"`` (Ray started
    here) needs no check."""
    timeout = RAY_CONNECT_TIMEOUT if timeout is None else timeout
    if address == "local":
        return
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < math.inf:
        raise BadExpertError(f"the Ray connection timeout must be a positive number of seconds, got {timeout!r}")
    import socket

    client = address.startswith("ray://")
    target: str | None = address[len("ray://"):] if client else address
    if not client:
        try:  # the address ray.init connects to: 'auto' looked up, localhost mapped to this node's address
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:
            canonicalize_bootstrap_address = None
        if canonicalize_bootstrap_address is not None:
            try:
                target = canonicalize_bootstrap_address(address)
            except (ConnectionError, ValueError, RuntimeError, OSError) as exc:
                why = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
                raise BadExpertError(f"cannot reach Ray at '{address}' ({why}); start the cluster or check the --ray "
                                     "address") from None
        if target is None:  # ray.init would start Ray here
            return
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadExpertError(f"the Ray address '{address}' is not HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc) or type(exc).__name__)
        raise BadExpertError(f"cannot reach Ray at '{address}' within {timeout:g} s ({why}); start the cluster, check "
                             "the address, or allow longer with --ray-timeout") from None


def ray_runner(address: str = "local", *, cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0,
               init: dict | None = None, connect_timeout: float | None = None
               ) -> Callable[[Callable[[dict], list[dict]], list[dict]], Iterator[list[dict]]]:
    """A runner for :func:`run_grid` that runs every cell as a Ray task requesting
    ``cpus_per_cell`` CPUs and ``gpus_per_cell`` GPUs, and yields each cell's rows as it finishes.

    ``address``: ``"local"`` starts a Ray instance on this machine (stopped afterwards); anything
    else is a cluster address for ``ray.init`` (``"auto"``, ``"ray://head:10001"``). Workers must
    see the same dataset paths and cache directory (shared storage) and have badexpert installed.
    Ray is an optional dependency: ``pip install 'badexpert[grid]'``.

    Checked now, before :func:`run_grid` writes anything: Ray is installed and a cluster address
    answers within ``connect_timeout`` seconds (default :data:`RAY_CONNECT_TIMEOUT`; :func:`check_ray_address`).
    """
    try:
        import ray
    except ImportError as exc:
        raise BadExpertError("the grid's Ray runner needs Ray: pip install 'badexpert[grid]' "
                             "(or run the grid without --ray)") from exc
    if not ray.is_initialized():  # an instance started by the caller is used as it is
        check_ray_address(address, connect_timeout)

    def runner(fn: Callable[[dict], list[dict]], specs: list[dict]) -> Iterator[list[dict]]:
        import ray

        started = not ray.is_initialized()
        if started:
            # a task uses as many threads as the CPUs it requests (the thread count changes the
            # floating-point summation order, so it is part of what makes a cell reproducible)
            threads = str(max(1, int(cpus_per_cell)))
            options = {"include_dashboard": False, "logging_level": "WARNING",
                       "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}},
                       **(init or {})}
            try:
                ray.init(address=None if address == "local" else address, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BadExpertError(f"cannot start or reach Ray at '{address}' ({str(exc).splitlines()[0][:160]})") from exc
        try:
            task = ray.remote(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell)(_ray_cell)
            pending = [task.remote(spec) for spec in specs]
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                try:
                    yield ray.get(ready[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, BadExpertError):
                        raise BadExpertError(str(cause)) from exc
                    raise
        finally:
            if started:
                ray.shutdown()

    return runner


# --------------------------------------------------------------------------------------------
# results.jsonl
# --------------------------------------------------------------------------------------------
def read_results(path: str | Path, *, log: Callable[[str], Any] = print) -> list[dict]:
    """The rows of a ``results.jsonl`` (none when it does not exist). A torn last line (a write
    cut short by a crash) is dropped and the file repaired; any other damage is an error."""
    p = Path(path)
    if not p.is_file():
        return []
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadExpertError(f"'{p}' is not UTF-8 text; it is not a grid's results file (choose another --out)") from None
    lines = text.split("\n")
    rows, tail = [], lines[-1]  # ``tail`` is "" when the file ends with a newline
    for n, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise BadExpertError(f"'{p}' line {n} is not a JSON row; remove that line (its cell will run "
                                 "again)") from None
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            raise BadExpertError(f"'{p}' line {n} is not a grid row (no 'key'); remove that line")
        GridRow.from_dict(row, f"'{p}' line {n}")  # every field this build reads is there
        rows.append(row)
    if tail.strip():
        try:
            row = json.loads(tail)
            ok = isinstance(row, dict) and isinstance(row.get("key"), str)
        except json.JSONDecodeError:
            ok = False
        if ok:
            GridRow.from_dict(row, f"'{p}' line {len(lines)}")
            rows.append(row)
            atomic_write_text(p, text + "\n")
        else:
            log(f"dropping a torn last line of '{p}' (an interrupted write); its cell runs again")
            atomic_write_text(p, text[: len(text) - len(tail)])
    return rows


def append_rows(path: str | Path, rows: list[dict]) -> None:
    """Append rows to ``results.jsonl`` in one write, flushed to disk."""
    data = "".join(json.dumps(to_jsonable(r)) + "\n" for r in rows).encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:  # a partly written last row is repaired by read_results on the next run
        raise write_error(path, exc, "the rows of earlier cells are kept") from exc


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------
def mean_interval(values: Iterable[float], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                  ) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values``: :func:`scipy.stats.bootstrap`
    (``n_boot`` resamples with replacement drawn by ``numpy.random.default_rng(seed)``, percentile
    method); one value is its own interval."""
    from scipy.stats import bootstrap

    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0 or not n_boot:
        return None
    if v.size == 1:  # every resample is the value itself (scipy refuses a sample of one)
        return float(v[0]), float(v[0])
    ci = bootstrap((v,), np.mean, n_resamples=int(n_boot), confidence_level=level, method="percentile",
                   vectorized=True, axis=-1, random_state=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def _stats(values: list[float], n_boot: int, seed: int) -> dict:
    v = np.asarray(values, dtype=np.float64)
    ci = mean_interval(v, n_boot=n_boot, seed=seed)
    return {"mean": float(v.mean()) if v.size else None, "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None}


def _values(rows: list[GridRow], key: str) -> list[float]:
    out = []
    for r in rows:
        v = getattr(r, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
            out.append(float(v))
    return out


def summarize(rows: Iterable[dict | GridRow], *, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per (dataset, arch, attack, detector), across seeds: how many seeds ran and implanted,
    and mean, sample standard deviation (ddof=1; ``None`` for one seed) and seeded bootstrap 95%
    interval of the mean of the AUROC on the paper's population (``auroc_filtered``) and of the
    ASR after filtering, over the seeds whose backdoor implanted; mean CA after and realized FPR.

    ``auroc_noisy_*``: the same statistics of the AUROC with the noisy clean negatives, on the
    paper's population too (``auroc_noisy_filtered``), and ``fpr_noisy_mean`` the mean share of
    noisy copies rejected; ``None`` for rows run without the protocol.

    ``rows``: :class:`~badexpert.evaluation.records.GridRow` records or their JSON form (as
    :func:`read_results` gives them); a row that lacks a field is refused in one line."""
    groups: dict[tuple, list[GridRow]] = {}
    for i, r in enumerate(rows):
        r = r if isinstance(r, GridRow) else GridRow.from_dict(r, f"grid row {i}")
        groups.setdefault((r.dataset, r.arch, r.attack, r.detector), []).append(r)
    out = []
    for (ds, arch, attack, det), g in groups.items():
        ok = [r for r in g if r.status == "ok"]
        s = {"dataset": ds, "arch": arch, "attack": attack, "detector": det, "seeds": len(g), "implanted": len(ok),
             "failed": len(g) - len(ok)}
        for key, name in (("auroc_filtered", "auroc"), ("asr_after", "asr_after"),
                          ("auroc_noisy_filtered", "auroc_noisy")):
            for stat, v in _stats(_values(ok, key), n_boot, seed).items():
                s[f"{name}_{stat}"] = v
        for key in ("ca_after", "fpr", "fpr_noisy"):
            v = _values(ok, key)
            s[f"{key}_mean"] = float(np.mean(v)) if v else None
        for key in ("clean_accuracy", "attack_success_rate"):
            v = _values(g, key)
            s[f"{key}_mean"] = float(np.mean(v)) if v else None
        s["out_of_scope"] = next((r.out_of_scope for r in g if r.out_of_scope), None)
        out.append(s)
    return out


def _f(v: Any, fmt: str, scale: float = 1.0) -> str:
    return "n/a" if v is None else format(scale * v, fmt)


def _stat_cell(s: dict, name: str, fmt: str, scale: float, unit: str = "") -> str:
    if s[f"{name}_mean"] is None:
        return "n/a"
    text = f"{_f(s[f'{name}_mean'], fmt, scale)}{unit}"
    if s[f"{name}_std"] is not None:
        text += f" ± {_f(s[f'{name}_std'], fmt, scale)}"
    if s[f"{name}_ci_low"] is not None:
        text += f" [{_f(s[f'{name}_ci_low'], fmt, scale)}, {_f(s[f'{name}_ci_high'], fmt, scale)}]"
    return text


def format_summary(summary: list[dict]) -> str:
    """The summary as a Markdown table (one row per dataset, architecture, attack and detector).
    When any row ran with the noisy-clean protocol, a column gives the AUROC with the noisy clean
    negatives (paper's population too) and the share of noisy copies rejected."""
    noisy = _has_noisy(summary)
    lines = ["| dataset | arch | attack | detector | seeds implanted | CA / ASR, no defense "
             "| AUROC, paper's population: mean ± std [95% CI] "
             + ("| AUROC with noisy negatives, paper's population: mean ± std [95% CI] " if noisy else "")
             + "| ASR after (%): mean ± std [95% CI] | CA after | realized FPR |"
             + (" noisy copies rejected |" if noisy else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if noisy else "")]
    for s in summary:
        seeds = f"{s['implanted']}/{s['seeds']}"
        before = f"{_f(s['clean_accuracy_mean'], '.1%')} / {_f(s['attack_success_rate_mean'], '.1%')}"
        if not s["implanted"]:
            lines.append(f"| {s['dataset']} | {s['arch']} | {s['attack']} | {s['detector']} | {seeds} | {before} | "
                         "attack failed | " + ("n/a | " if noisy else "")
                         + "n/a | n/a | n/a |" + (" n/a |" if noisy else ""))
            continue
        lines.append(
            f"| {s['dataset']} | {s['arch']} | {s['attack']} | {s['detector']} | {seeds} | {before} | "
            f"{_stat_cell(s, 'auroc', '.4f', 1.0)} | "
            + (f"{_stat_cell(s, 'auroc_noisy', '.4f', 1.0)} | " if noisy else "")
            + f"{_stat_cell(s, 'asr_after', '.2f', 100.0)} | "
            f"{_f(s['ca_after_mean'], '.1%')} | {_f(s['fpr_mean'], '.2%')} |"
            + (f" {_f(s['fpr_noisy_mean'], '.2%')} |" if noisy else ""))
    failed = sum(s["failed"] for s in summary)
    note = ("\n\nCA / ASR, no defense: the suspect model's, mean over every seed. "
            "Mean over the seeds whose backdoor implanted; std is the sample standard deviation across seeds; "
            "the interval is a seeded percentile bootstrap of the mean over seeds.")
    if noisy:
        note += (" AUROC with noisy negatives: the clean test inputs plus a Gaussian-noised copy of each (sigma 0.05 in "
                 "[0, 1] pixel space, the paper's protocol) against the same triggered inputs; n/a for rows run "
                 "without it.")
    if failed:
        note += (f" {failed} (cell, detector) row(s) had a backdoor that did not implant (ASR below the bar): "
                 "no detector numbers for them.")
    return "\n".join(lines) + note + "\n"


def _has_noisy(summary: list[dict]) -> bool:
    """Whether any summary row holds an AUROC with the noisy clean negatives."""
    return any(s.get("auroc_noisy_mean") is not None for s in summary)


def format_matrix(summary: list[dict]) -> str:
    """Per dataset and architecture, a Markdown table with one row per attack and one column per
    detector: mean AUROC on the paper's population / mean ASR after filtering, and a mean row over
    the attacks that implanted. A cell whose trigger is outside the detector's scope (the
    detector's own declaration, recorded in the row) is marked and left out of that detector's
    mean, with a note saying why; an attack that never implanted is said so, and left out too.

    When any row ran with the noisy-clean protocol, each cell reads AUROC / AUROC with the noisy
    clean negatives (both on the paper's population) / ASR after, and a note says so."""
    panels = list(dict.fromkeys((s["dataset"], s["arch"]) for s in summary))
    dets = list(dict.fromkeys(s["detector"] for s in summary))
    by = {(s["dataset"], s["arch"], s["attack"], s["detector"]): s for s in summary}
    noisy = _has_noisy(summary)
    column = "AUROC / noisy AUROC / ASR after" if noisy else "AUROC / ASR after"

    from ..reporting.formats import pct

    parts = []
    for ds, arch in panels:
        attacks = list(dict.fromkeys(s["attack"] for s in summary if (s["dataset"], s["arch"]) == (ds, arch)))
        lines = [f"### {ds} / {arch}", "",
                 "| attack | ASR (no defense) | " + " | ".join(f"{d} {column}" for d in dets) + " |",
                 "|---|---|" + "---|" * len(dets)]
        totals: dict[str, list[tuple[float, float, float | None]]] = {d: [] for d in dets}
        notes: dict[str, str] = {}
        outside: dict[str, list[str]] = {}
        for a in attacks:
            cells, asr = [], None
            for d in dets:
                s = by.get((ds, arch, a, d))
                if s is None:
                    cells.append("")
                    continue
                asr = s["attack_success_rate_mean"] if asr is None else asr
                if not s["implanted"]:
                    cells.append("attack failed")
                elif s["auroc_mean"] is None or s["asr_after_mean"] is None:
                    cells.append("n/a")
                else:
                    text = " / ".join([pct(s["auroc_mean"], 2)] + ([pct(s.get("auroc_noisy_mean"), 2)] if noisy else [])
                                      + [pct(s["asr_after_mean"], 1)])
                    if s.get("out_of_scope"):
                        text += " †"
                        notes.setdefault(d, s["out_of_scope"])
                        outside.setdefault(d, []).append(a)
                    else:
                        totals[d].append((s["auroc_mean"], s["asr_after_mean"], s.get("auroc_noisy_mean")))
                    cells.append(text)
            lines.append(f"| {a} | {_f(asr, '.1%')} | " + " | ".join(cells) + " |")
        def mean_cell(t: list[tuple[float, float, float | None]]) -> str:
            vals = [pct(float(np.mean([x[0] for x in t])), 2)]
            if noisy:  # over the same attacks, or n/a when any of them ran without the protocol
                vals.append("n/a" if any(x[2] is None for x in t) else pct(float(np.mean([x[2] for x in t])), 2))
            return " / ".join(vals + [pct(float(np.mean([x[1] for x in t])), 1)])

        mean = [mean_cell(totals[d]) + (f" ({len(totals[d])})" if notes.get(d) else "") if totals[d] else "n/a"
                for d in dets]
        lines.append("| **mean** | | " + " | ".join(mean) + " |")
        if notes:
            lines.append("")
            lines += [f"† outside {d}'s scope ({', '.join(outside[d])}), left out of its mean (over the number of "
                      f"attacks in brackets); for example: {why}."
                      for d, why in notes.items()]
        parts.append("\n".join(lines))
    text = "\n\n".join(parts) + "\n"
    if noisy:
        text += ("\nnoisy AUROC: with the clean test inputs and a Gaussian-noised copy of each (sigma 0.05 in [0, 1] "
                 "pixel space, the paper's protocol) as negatives; both AUROCs on the paper's population (clean inputs "
                 "the model gets right vs triggered inputs whose attack succeeds).\n")
    return text


def summary_csv(summary: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for s in summary:
        w.writerow({k: ("" if s.get(k) is None else s[k]) for k in SUMMARY_COLUMNS})
    return buf.getvalue()


def plot_heatmap(summary: list[dict]):
    """Mean AUROC (paper's population), attacks x detectors, one panel per dataset and architecture;
    a cell whose backdoor never implanted is grey and says so."""
    from ..reporting.report import _new_figure

    panels = list(dict.fromkeys((s["dataset"], s["arch"]) for s in summary))
    attacks = list(dict.fromkeys(s["attack"] for s in summary))
    dets = list(dict.fromkeys(s["detector"] for s in summary))
    by = {(s["dataset"], s["arch"], s["attack"], s["detector"]): s for s in summary}
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    pw, ph = 1.6 + 1.2 * len(dets), 1.8 + 0.6 * len(attacks)
    fig = _new_figure(pw * ncols + 1.2, ph * nrows + 0.4)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    import matplotlib

    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        ds, arch = panels[k]
        mat = np.full((len(attacks), len(dets)), np.nan)
        for i, a in enumerate(attacks):
            for j, d in enumerate(dets):
                s = by.get((ds, arch, a, d))
                if s is not None and s["auroc_mean"] is not None:
                    mat[i, j] = s["auroc_mean"]
        image = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0.5, vmax=1.0, aspect="auto")
        for i, a in enumerate(attacks):
            for j, d in enumerate(dets):
                s = by.get((ds, arch, a, d))
                if s is None:
                    text = ""
                elif not s["implanted"]:
                    text = "attack\nfailed"
                elif s["auroc_mean"] is None:
                    text = "n/a"
                else:
                    text = f"{s['auroc_mean']:.3f}" + ("\n(out of scope)" if s.get("out_of_scope") else "")
                    if s["failed"]:
                        text += f"\n({s['implanted']}/{s['seeds']} implanted)"
                v = mat[i, j]
                dark = not np.isnan(v) and (v > 0.92 or v < 0.58)  # the colour map's dark ends
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(dets)), dets, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(attacks)), attacks, fontsize=8)
        ax.set_title(f"{ds} / {arch}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, label="mean AUROC\n(paper's population)")
    fig.suptitle("Detection AUROC across seeds (grey: backdoor did not implant)", fontsize=10)
    return fig


def write_summary(out_dir: str | Path, rows: list[dict], *, n_boot: int = 1000, seed: int = 0,
                  heatmap: bool = True) -> list[dict]:
    """``summary.md``, ``summary.csv``, ``matrix.md`` (:func:`format_matrix`) and (``heatmap``)
    ``heatmap.png`` from the rows, each atomically."""
    out = Path(out_dir)
    summary = summarize(rows, n_boot=n_boot, seed=seed)
    atomic_write_text(out / "summary.md", "# Benchmark grid\n\n" + format_summary(summary))
    atomic_write_text(out / "summary.csv", summary_csv(summary))
    atomic_write_text(out / "matrix.md", "# Benchmark grid: attacks x detectors\n\n" + format_matrix(summary))
    if heatmap and summary:
        from ..utils import atomic_write_bytes

        buf = io.BytesIO()
        plot_heatmap(summary).savefig(buf, format="png")
        atomic_write_bytes(out / "heatmap.png", buf.getvalue())
    return summary


# --------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------
def check_grid_dirs(out_dir: str | Path, cache_dir: str | Path | None) -> Path:
    """``out_dir`` holds nothing but grid outputs (an earlier run of a grid is resumed, never
    deleted); ``cache_dir`` is a directory, and not ``out_dir``."""
    from .experiment import check_cache_dir

    out = check_output_dir(out_dir, owned=GRID_OUTPUTS, overwrite=True)
    if cache_dir is not None:
        if Path(cache_dir).absolute() == out.absolute():
            raise BadExpertError("--cache-dir must not be the --out directory; give it a directory of its own")
        check_cache_dir(cache_dir)
    return out


#: Where a grid's cache keeps each computed row (``ROWS_DIR/<row key>.json``), for any grid.
ROWS_DIR = "rows"


def cached_row(cache_dir: str | Path, spec: dict, det: dict, *, log: Callable[[str], Any] = print) -> dict | None:
    """The row another grid computed for the same cell and detector (same row key: the same
    suspect model, protocol and detector settings), relabelled with this grid's labels, or ``None``.
    A damaged entry is ignored (the row is computed again)."""
    path = Path(cache_dir) / ROWS_DIR / f"{det['key']}.json"
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
        GridRow.from_dict(row, f"cached row '{path}'")
        if row.get("key") != det["key"]:
            raise BadExpertError(f"cached row '{path}' holds another key")
    except (OSError, ValueError, BadExpertError) as exc:
        log(f"ignoring a damaged cached row ({exc}); computing it again")
        path.unlink(missing_ok=True)  # the row computed again takes its place
        return None
    # the row key does not depend on the labels a grid gives its axes: this grid's are the ones to show
    return {**row, "dataset": spec["dataset"], "arch": spec["arch"], "attack": spec["attack"], "seed": spec["seed"],
            "detector": det["label"], "detector_params": det["params"]}


def cache_rows(cache_dir: str | Path, rows: Iterable[dict]) -> None:
    """Keep each row under ``cache_dir/rows`` (those already there are left as they are)."""
    folder = Path(cache_dir) / ROWS_DIR
    for r in rows:
        path = folder / f"{r['key']}.json"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(to_jsonable(r)))


def _keys_in(path: Path) -> set[str]:
    """The row keys a ``results.jsonl`` holds, read without repairing anything (a grid may be
    appending to it): unreadable lines are skipped."""
    keys = set()
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("key"), str):
                keys.add(row["key"])
    return keys


def grid_status(config: dict | str | Path, out_dir: str | Path, *, cache_dir: str | Path | None = None,
                shard: tuple[int, int] | None = None) -> list[dict]:
    """Where a grid stands, without running or writing anything: per cell, its labels, how many
    of its rows ``out_dir/results.jsonl`` holds (``done``), how many more the cache's row store
    would give (``cached_rows``), whether its suspect model is in the cache (``model_cached``),
    whether another process is training it now (``model_training``: it holds the model's build lock)
    and whether a process runs the cell now (``running``: it holds the cell's claim, ``grid --claim``
    and ``--jobs``)."""
    from ..utils import being_built
    from .experiment import suspect_file

    grid = load_grid(config)
    specs = plan(grid, cache_dir=cache_dir)
    if shard is not None:
        specs = shard_specs(specs, shard)
    have = _keys_in(Path(out_dir) / "results.jsonl")
    cache = None if cache_dir is None else Path(cache_dir)
    out = []
    for spec in specs:
        keys = [d["key"] for d in spec["detectors"]]
        done = sum(k in have for k in keys)
        cached_rows = 0 if cache is None else sum(
            k not in have and (cache / ROWS_DIR / f"{k}.json").is_file() for k in keys)
        model = None if cache is None else suspect_file(cache, spec["suspect"])
        cached = model is not None and model.is_file()
        out.append({"dataset": spec["dataset"], "arch": spec["arch"], "attack": spec["attack"], "seed": spec["seed"],
                    "rows": len(keys), "done": done, "cached_rows": cached_rows, "model_cached": cached,
                    "model_training": model is not None and not cached and being_built(model),
                    "running": cache is not None and being_built(cache / CLAIMS_DIR / str(spec["cell"]))})
    return out


def format_status(status: list[dict]) -> str:
    """:func:`grid_status` as a Markdown table and a one-line tally."""
    lines = ["| dataset | arch | attack | seed | rows done | from the row cache | suspect model | process |",
             "|---|---|---|---|---|---|---|---|"]
    for c in status:
        model = ("cached" if c["model_cached"] else "training now" if c["model_training"]
                 else "to train" if c["done"] + c["cached_rows"] < c["rows"] else "-")
        lines.append(f"| {c['dataset']} | {c['arch']} | {c['attack']} | {c['seed']} | {c['done']}/{c['rows']} | "
                     f"{c['cached_rows'] or ''} | {model} | {'running now' if c.get('running') else ''} |")
    left = [c for c in status if c["done"] + c["cached_rows"] < c["rows"]]
    train = sum(not c["model_cached"] for c in left)
    running = sum(bool(c.get("running")) for c in left)
    tally = (f"{len(status) - len(left)} of {len(status)} cells done or in the row cache; {len(left)} to run, "
             f"{train} of them training a suspect model" + (f"; {running} running now" if running else ""))
    return "\n".join(lines) + "\n\n" + tally + "\n"


def shard_specs(specs: list[dict], shard: tuple[int, int]) -> list[dict]:
    """The cells of shard ``i`` of ``n`` (1-based): every ``n``-th cell of the plan from the
    ``i``-th, so shards of a grid ordered by attack get a mix of cheap and costly cells."""
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and 1 <= i <= n):
        raise BadExpertError(f"a shard is I/N with 1 <= I <= N (e.g. 1/2), got {i}/{n}")
    return [s for j, s in enumerate(specs) if j % n == i - 1]


def run_grid(config: dict | str | Path, out_dir: str | Path, *, cache_dir: str | Path | None = None,
             log: Callable[[str], Any] = print,
             runner: Callable[[Callable[[dict], list[dict]], list[dict]], Iterable[list[dict]]] | None = None,
             shard: tuple[int, int] | None = None, claim: bool = False) -> list[dict]:
    """Run (or resume) a benchmark grid and return its rows, one per cell and detector, in grid order.

    ``config``: a grid dict or the path of a JSON file (see the module docs and
    ``configs/grids/grid-example.json``). The output and cache directories and every cell are checked
    before any data is read. Rows already in ``out_dir/results.jsonl`` are kept and not computed
    again; each finished cell's rows are appended to it at once. With ``cache_dir``, every row is
    also kept there, and a row another grid computed for the same cell and detector (same row key)
    is reused instead of computed (:func:`cached_row`). ``runner(fn, specs)`` calls
    ``fn(spec)`` (:func:`run_cell` with this ``log``) for every spec, in any order and anywhere,
    yielding each cell's rows as it finishes (default :func:`local_runner`: one after the other).

    ``shard=(i, n)`` runs only the ``i``-th of ``n`` interleaved parts of the cells
    (:func:`shard_specs`), for parallel processes or machines sharing ``cache_dir`` (required):
    give each shard its own ``out_dir``, then run the whole grid into its own ``out_dir``, which
    takes every row from the cache.

    ``claim=True`` shares the cells out as they come instead: processes sharing ``cache_dir``
    (required) each run the next cell no other one holds (:func:`claimed_cells`), so they stay busy
    until the grid is done whatever the cells cost. A process's ``out_dir`` gets the cells it ran
    (or found finished); the grid run without ``claim`` afterwards takes every row from the cache.
    """
    if shard is not None and cache_dir is None:
        raise BadExpertError("--shard needs --cache-dir: the shards' rows meet there, for the run of the whole grid")
    if claim and (cache_dir is None or shard is not None):
        raise BadExpertError("--claim needs --cache-dir (the processes' claims and rows meet there) and no --shard")
    out = check_grid_dirs(out_dir, cache_dir)
    grid = load_grid(config)
    specs = plan(grid, cache_dir=cache_dir)
    if shard is not None:
        n_all = len(specs)
        specs = shard_specs(specs, shard)
        log(f"shard {shard[0]}/{shard[1]}: {len(specs)} of the grid's {n_all} cells")
    n_boot = int(grid.get("n_boot", 1000))
    results = out / "results.jsonl"
    done = {r["key"]: r for r in read_results(results, log=log)}
    wanted = {d["key"] for spec in specs for d in spec["detectors"]}
    other = sum(1 for k in done if k not in wanted)
    reused = []
    if cache_dir is not None:
        cache_rows(cache_dir, (r for k, r in done.items() if k in wanted))  # rows of runs made before the row cache
        reused = [row for spec in specs for d in spec["detectors"] if d["key"] not in done
                  for row in [cached_row(cache_dir, spec, d, log=log)] if row is not None]
        done.update((r["key"], r) for r in reused)
    todo = []
    for spec in specs:
        missing = [d for d in spec["detectors"] if d["key"] not in done]
        if missing:
            todo.append({**spec, "detectors": missing})
    n_det = len(grid["detectors"])
    log(f"grid: {len(specs)} cell(s) x {n_det} detector(s); {len(specs) - len(todo)} cell(s) already in "
        f"{results}" + (f" or the cache ({len(reused)} row(s) other grids computed)" if reused else "")
        + f", {len(todo)} to run" + (f"; {other} row(s) there from other grids are left out" if other else ""))
    started = False

    def start() -> None:
        """The output folder is made when the first cell's rows arrive (or at the end): a runner
        that fails before any cell finished (Ray not starting) leaves nothing behind."""
        nonlocal started
        if not started:
            write_json(out / "grid.json", grid)  # makes the folder (an OSError: one BadExpertError)
            started = True

    def current() -> list[dict]:
        return [done[d["key"]] for spec in specs for d in spec["detectors"] if d["key"] in done]

    if reused:
        start()
        append_rows(results, reused)
    fn = functools.partial(run_cell, log=log)
    if claim:
        fn = claimed_cells(fn, cache_dir, log=log)
    for rows in (runner or local_runner)(fn, todo):
        start()
        append_rows(results, rows)
        if cache_dir is not None:
            cache_rows(cache_dir, rows)
        done.update((r["key"], r) for r in rows)
        write_summary(out, current(), n_boot=n_boot, heatmap=False)
    rows = current()
    if getattr(runner, "stopped", False):  # a time budget ran out: what is done is kept and summarised
        start()
        write_summary(out, rows, n_boot=n_boot)
        return rows
    if claim and len(rows) < len(wanted):  # the cells other processes hold: theirs to finish
        held = len(specs) - len({r["cell"] for r in rows})
        log(f"grid: {held} of {len(specs)} cells held by other processes sharing the cache")
    elif len(rows) < len(wanted):
        raise BadExpertError(f"the runner returned no rows for {len(wanted) - len(rows)} (cell, detector) pair(s); "
                             "run the grid again to compute them")
    start()
    write_summary(out, rows, n_boot=n_boot)
    return rows


__all__ = ["CLAIMS_DIR", "cache_rows", "cached_row", "claimed_cells", "format_status", "grid_status", "shard_specs", "format_matrix", "GRID_OUTPUTS", "RAY_CONNECT_TIMEOUT", "append_rows", "budget_runner", "check_ray_address", "format_summary", "load_grid",
           "local_runner", "mean_interval", "normalize_grid", "plan", "plot_heatmap", "ray_runner", "read_results",
           "run_cell", "run_grid", "summarize", "write_summary"]
