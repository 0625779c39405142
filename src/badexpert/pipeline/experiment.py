"""The whole pipeline from a config: data, poisoning, suspect model, detector, evaluation, report.

Each step is one function with explicit arguments, so the CLI's ``train`` / ``defend`` /
``evaluate`` commands and :func:`run` share them:

    splits = make_splits(cfg)                       # train / reserved D_c / calibration / test
    model, meta = train_suspect(cfg, splits)        # poisons the training split, trains M
    detector = fit_detector(cfg, model, splits)     # fit on D_c, calibrate on the calibration split
    result = evaluate(model, detector, splits.test, attack)

Trained suspect models are cached by the hash of everything that produced them (dataset files,
split, attack, architecture, recipe, seed), so a benchmark grid never trains the same model twice.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated

import torch

from .. import __version__
from ..attacks import Attack, attack_from_meta, get_attack
from ..attacks.components import Components
from ..data import Splits, load_dataset, split
from ..detectors import Detector, get_detector
from ..digests import file_sha256, json_digest
from ..errors import BadExpertError
from ..evaluation.core import Evaluation, evaluate
from ..io import load_model, save_model
from ..metrics import check_reachable_fpr
from ..models import build_model
from ..training import Recipe
from ..utils import atomic_directory, build_lock, check_output_dir, resolve_device, seed_everything, to_jsonable, write_json
from ..validation import Fraction, NonNegativeInt, PositiveInt, Range, validate_fields


@dataclass
class ExperimentConfig:
    """Everything one run depends on. Serialised to ``config.json`` beside every result.

    ``noisy_clean``: also measure AUROC with the noise-augmented clean negatives of the paper's
    protocol (the test split plus a seeded Gaussian-noised copy, sigma 0.05;
    :func:`badexpert.evaluation.core.evaluate`), reported as ``defense.auroc_noisy`` and
    ``defense.auroc_noisy_filtered`` beside ``defense.auroc`` (off by default: it doubles the clean
    inputs every detector scores).

    ``extra_fprs``: further target FPRs at which each detector is also reported
    (``defense.operating_points``: the threshold its calibration scores give at each target, the
    rates and CA/ASR after filtering there), beside ``fpr``, the one it is calibrated at.
    """

    dataset: str = "fashion-mnist"
    data_path: str | None = None
    image_size: Annotated[int, Range(ge=1, le=4096)] | tuple[Annotated[int, Range(ge=1, le=4096)], ...] | None = None
    arch: str = "cnn"
    width: Annotated[int, Range(ge=1, le=4096)] | None = None
    attack: str | None = "badnet"
    attack_params: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    reserved: PositiveInt = 2000
    calibration: PositiveInt = 2000
    train_size: PositiveInt | None = None
    test_size: PositiveInt | None = None
    detector: str = "badexpert"
    detector_params: dict = field(default_factory=dict)
    fpr: Annotated[float, Range(gt=0, lt=1)] = 0.01
    asr_bar: Fraction = 0.5
    seed: NonNegativeInt = 0
    device: str | None = None
    n_boot: NonNegativeInt = 1000
    noisy_clean: bool = False
    extra_fprs: tuple[Annotated[float, Range(gt=0, lt=1)], ...] = ()

    def __post_init__(self) -> None:
        validate_fields(self, "config field")
        if isinstance(self.image_size, tuple) and len(self.image_size) != 2:
            raise BadExpertError(f"config field 'image_size' must be an integer or [height, width], got {list(self.image_size)}")

    def to_dict(self) -> dict:
        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        if not isinstance(d, dict):
            raise BadExpertError(f"a config must be a JSON object of ExperimentConfig fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise BadExpertError(f"unknown config field(s) {sorted(bad)}; valid: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> "ExperimentConfig":
        from ..utils import read_json_file

        return cls.from_dict(read_json_file(path, "config file"))

    def validate(self, *, calibrates: bool = True) -> "ExperimentConfig":
        """Check every name, type and range (fields, recipe, attack and detector parameters)
        before any data is read; one-line errors naming the field. ``calibrates``: whether the
        command calibrates a detector at ``fpr`` on ``calibration`` inputs (``train`` does not),
        so that the target must be reachable (:func:`~badexpert.metrics.check_reachable_fpr`)."""
        from ..data import NUM_CLASSES, canonical_dataset
        from ..models import canonical_arch

        validate_fields(self, "config field")
        resolve_device(self.device)
        dataset = canonical_dataset(self.dataset)
        arch = canonical_arch(self.arch)
        attack = self.make_attack()
        if attack is not None:
            attack.check_architecture(arch)
        if attack is not None and dataset in NUM_CLASSES:  # class indices, before the data is read
            attack.check(NUM_CLASSES[dataset])
        self.make_recipe()
        get_detector(self.detector, **self.detector_params)
        if calibrates:  # the target must be reachable on the calibration split, before any model is trained
            check_reachable_fpr(self.fpr, self.calibration, "calibration inputs", "the target FPR")
            for f in self.extra_fprs:
                check_reachable_fpr(f, self.calibration, "calibration inputs", "the further target FPR (extra_fprs)")
        return self

    def make_recipe(self) -> Recipe:
        """The suspect model's training recipe: the default for the dataset and architecture,
        with this config's ``recipe`` overrides."""
        from ..data import canonical_dataset
        from ..models import canonical_arch

        recipe = default_recipe(canonical_dataset(self.dataset), canonical_arch(self.arch))
        return Recipe.from_dict({**recipe.to_dict(), **self.recipe}) if self.recipe else recipe

    def make_attack(self) -> Attack | None:
        return get_attack(self.attack, **self.attack_params) if self.attack else None


def default_recipe(dataset: str, arch: str) -> Recipe:
    """Training recipe for a suspect model: SGD with momentum and a cosine schedule.

    Short on purpose for the small-image defaults; the paper's CIFAR-10 recipe (100 epochs, step
    decay at 50/75) remains reachable through ``recipe`` overrides. Fashion-MNIST trains without
    crop augmentation: in four epochs, random crops shift a corner trigger off the image often
    enough that a 1% BadNet backdoor does not implant (measured during development with a width-32
    CNN: 7% ASR with crops, 99% without).
    """
    if dataset == "fashion-mnist":
        return Recipe(optimizer="sgd", lr=0.05, epochs=4, batch_size=128, weight_decay=5e-4, schedule="cosine",
                      augment=False)
    if arch == "vit":
        return Recipe(optimizer="adamw", lr=1e-3, epochs=30, batch_size=128, weight_decay=0.05, schedule="cosine",
                      warmup_epochs=2)
    return Recipe(optimizer="sgd", lr=0.05 if arch == "cnn" else 0.1, epochs=30, batch_size=128, weight_decay=5e-4, schedule="cosine")


#: The files a run directory holds (``run``, ``demo`` and ``evaluate`` write a subset of them).
RUN_OUTPUTS = frozenset({
    "config.json", "model.safetensors", "detector.safetensors", "metrics.json", "report.md", "roc.png",
    "scatter.png", "examples.png",
})


def make_splits(cfg: ExperimentConfig) -> Splits:
    train_set, test_set = load_dataset(cfg.dataset, cfg.data_path, image_size=cfg.image_size)
    return split(train_set, test_set, seed=cfg.seed, reserved=cfg.reserved, calibration=cfg.calibration,
                 train_size=cfg.train_size, test_size=cfg.test_size)


#: Above this many bytes in all, a dataset or trigger folder is identified by its files' names and
#: sizes only: hashing it whole would cost more than the key protects.
CONTENT_HASH_LIMIT = 4 << 30
#: SHA-256 of files hashed in this process, by resolved path, size and modification time.
_CONTENT_DIGESTS: dict[tuple, str] = {}


def content_fingerprint(path: str | Path) -> list | None:
    """What the file or folder at ``path`` holds, whatever its location or copy time: one ``[name,
    size, SHA-256]`` per file (a file's own name is ``""``; a folder's files by their path relative
    to it, sorted), or ``[name, size]`` when the files exceed :data:`CONTENT_HASH_LIMIT` in all;
    ``None`` when nothing is there. A cache keyed on it survives the data being copied, re-provisioned
    with new modification times, or mounted elsewhere (another machine, a GPU worker), and misses
    when the content changes. Each digest is computed once per process (memoized by path, size and
    modification time)."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [("", p)]
    elif p.is_dir():
        files = sorted((f.relative_to(p).as_posix(), f) for f in p.rglob("*") if f.is_file())
    else:
        return None
    stats = [(name, f, f.stat()) for name, f in files]
    whole = sum(st.st_size for _, _, st in stats) <= CONTENT_HASH_LIMIT
    out = []
    for name, f, st in stats:
        entry: list = [name, st.st_size]
        if whole:
            memo = (str(f.resolve()), st.st_size, st.st_mtime_ns)
            if memo not in _CONTENT_DIGESTS:
                _CONTENT_DIGESTS[memo] = file_sha256(f)
            entry.append(_CONTENT_DIGESTS[memo])
        out.append(entry)
    return out


def _data_fingerprint(cfg: ExperimentConfig) -> list | None:
    """The dataset's files by content (:func:`content_fingerprint`), for the model cache key."""
    from ..data import DEFAULT_PATHS

    path = cfg.data_path or DEFAULT_PATHS.get(cfg.dataset.lower(), "")
    return content_fingerprint(path) if path else None


def files_fingerprint(paths: list[str]) -> list:
    """The files an attack builds its trigger from, by content (:func:`content_fingerprint`; ``None``
    for a path where nothing is)."""
    return [content_fingerprint(p) for p in paths]


def suspect_key(cfg: ExperimentConfig, recipe: Recipe) -> str:
    """Content hash of everything the suspect model depends on (with the content of the files the
    attack's trigger is built from)."""
    attack = cfg.make_attack()
    payload = {
        "data": _data_fingerprint(cfg), "dataset": cfg.dataset, "arch": cfg.arch, "width": cfg.width,
        "attack": attack.to_dict() if attack else None, "recipe": recipe.to_dict(), "seed": cfg.seed,
        "train_size": cfg.train_size, "image_size": cfg.image_size, "version": __version__,
    }
    if attack is not None and attack.source_files():
        payload["attack_files"] = files_fingerprint(attack.source_files())
    return json_digest(payload, length=16)


def suspect_file(cache_dir: str | Path, key: str) -> Path:
    """Where the suspect-model cache keeps the model of :func:`suspect_key` ``key``."""
    return Path(cache_dir) / f"suspect-{key}.safetensors"


def split_meta(cfg: ExperimentConfig) -> dict:
    """The dataset and split a model or detector was made with (recorded in its file)."""
    return {
        "dataset": {"name": cfg.dataset, "path": cfg.data_path, "image_size": cfg.image_size},
        "split": {"seed": cfg.seed, "reserved": cfg.reserved, "calibration": cfg.calibration,
                  "train_size": cfg.train_size, "test_size": cfg.test_size},
    }


def model_meta(cfg: ExperimentConfig, splits: Splits, attack: Attack | None, recipe: Recipe) -> dict:
    tr = splits.train
    return {
        "arch": cfg.arch, "width": cfg.width, "in_channels": tr.channels, "num_classes": tr.num_classes,
        "image_size": list(tr.image_size), "mean": list(tr.mean), "std": list(tr.std), "classes": list(tr.classes),
        "hflip": tr.hflip,
        **split_meta(cfg),
        "attack": attack.to_dict() if attack else None,
        "recipe": recipe.to_dict(), "seed": cfg.seed, "badexpert_version": __version__,
    }


def train_suspect(
    cfg: ExperimentConfig, splits: Splits, *, cache_dir: str | Path | None = None, log=print
) -> tuple[torch.nn.Module, dict]:
    """Poison the training split with the configured attack and train the suspect model.

    With ``cache_dir``, a model trained before from identical inputs is loaded instead, and the
    attack's trained parts (a clean host model, a trigger generator) are cached there by content
    hash (:class:`~badexpert.attacks.components.Components`). The metadata records the seconds
    each training phase took (``phase_seconds``).
    """
    recipe = cfg.make_recipe()
    cache_file = suspect_file(cache_dir, suspect_key(cfg, recipe)) if cache_dir is not None else None
    # processes sharing the cache (grid --jobs, --shard) train a model once: the others wait and load it
    with build_lock(cache_file, log=log, what="this suspect model"):
        return _train_suspect(cfg, splits, recipe, cache_file, cache_dir, log)


def _train_suspect(cfg, splits, recipe, cache_file, cache_dir, log) -> tuple[torch.nn.Module, dict]:
    device = resolve_device(cfg.device)
    attack = cfg.make_attack()
    if cache_file is not None:
        if cache_file.is_file():
            model, meta = load_model(cache_file, device=device)
            log(f"loaded cached suspect model {cache_file}")
            # the cache key leaves out what does not change the model (reserved/calibration/test
            # sizes); this run's split, not the cached one's, is what its files must record
            meta.update(split_meta(cfg))
            return model, meta
    seed_everything(cfg.seed)
    tr = splits.train

    built = []

    def make_model() -> torch.nn.Module:
        model = build_model(cfg.arch, in_channels=tr.channels, num_classes=tr.num_classes, image_size=tr.image_size,
                            mean=tr.mean, std=tr.std, width=cfg.width).to(device)
        if not built:  # one line per run, once the architecture is known to fit the data
            built.append(True)
            log(f"suspect model: {cfg.arch} trained on {len(tr)} samples ({recipe.epochs} epochs) on {device}"
                + (f" by attack {attack.name}" if attack is not None else ""))
        return model

    t0 = time.perf_counter()
    # an attack's trained parts (clean host, generator, encoder) are cached beside the models
    components = Components(cache_dir, log=log)
    if attack is None:  # the clean model attacks that start from one (FT, TrojanNN, SRA) share
        model = components.clean_model(make_model, tr, recipe, cfg.seed)
        info = {"poisoned_samples": 0, **components.info()}
    else:
        model, info = attack.implant(tr, make_model, recipe, cfg.seed, log=log, components=components)
    meta = model_meta(cfg, splits, attack, recipe)
    meta["train_seconds"] = time.perf_counter() - t0
    meta.update(info)
    if attack is not None:  # saved with the model: evaluation applies exactly this trigger
        meta["attack_state"] = attack.trigger_state((tr.channels, *tr.image_size))
    model.eval()
    if cache_file is not None:
        save_model(cache_file, model, meta)
    return model, meta


def fit_detector(cfg: ExperimentConfig, model: torch.nn.Module, splits: Splits) -> Detector:
    """Fit the configured detector on the reserved clean set and calibrate it on the calibration split."""
    params = {"seed": cfg.seed, "device": cfg.device, **cfg.detector_params}
    det = get_detector(cfg.detector, **params)  # dataset facts (flips, classes) come with splits.reserved
    seed_everything(cfg.seed)
    det.fit(model, splits.reserved)
    det.calibrate(splits.calibration, cfg.fpr)
    return det


def experiment_metrics(cfg: ExperimentConfig, meta: dict, result: Evaluation, splits: Splits) -> dict:
    """The metrics dict of a run, with config, provenance and split sizes added."""
    m = result.metrics
    return {
        "badexpert_version": __version__,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "dataset": {"name": cfg.dataset, "classes": list(splits.test.classes), "splits": splits.sizes()},
        "model": {"arch": meta["arch"], "width": meta.get("width"), "train_seconds": meta.get("train_seconds"),
                  "poisoned_samples": meta.get("poisoned_samples")},
        "attack": meta.get("attack"),
        **m,
    }


def write_outputs(out_dir: str | Path, metrics: dict, result: Evaluation, class_names: list[str]) -> list[Path]:
    """metrics.json, report.md and the plots for one evaluation (``metrics``: the record's dict,
    :func:`experiment_metrics`)."""
    from ..evaluation.records import ReportArrays
    from ..reporting.report import write_report

    return write_report(out_dir, metrics, ReportArrays.from_arrays(result.arrays), class_names=class_names)


def run(cfg: ExperimentConfig, out_dir: str | Path, *, cache_dir: str | Path | None = None, log=print,
        overwrite: bool = False) -> dict:
    """Run the whole pipeline and write config, model, detector, metrics, report and plots to ``out_dir``.

    The config and the output location are checked before any data is read. The run is built in
    a temporary sibling directory and renamed into place at the end, so an error or interrupt
    leaves either the complete run or nothing. An ``out_dir`` holding an earlier run is refused
    unless ``overwrite``, which replaces that run as a whole.
    """
    cfg.validate()
    check_output_dir(out_dir, owned=RUN_OUTPUTS, overwrite=overwrite)
    if cache_dir is not None:
        check_cache_dir(cache_dir)
    splits = make_splits(cfg)
    log(f"splits: {splits.sizes()}")
    model, meta = train_suspect(cfg, splits, cache_dir=cache_dir, log=log)
    attack = attack_from_meta(meta)
    # the attack-success gate first: no detector is fitted for a backdoor that did not implant
    result = evaluate(model, None, splits.test, attack, asr_bar=cfg.asr_bar, seed=cfg.seed)
    detector = None
    if result.metrics.get("attack_failed"):
        log(result.metrics["message"])
    else:
        log(f"fitting {cfg.detector} on {len(splits.reserved)} reserved clean samples")
        detector = fit_detector(cfg, model, splits)
        log(f"calibrated at target FPR {cfg.fpr:g} on the {detector.calibration_size_} of {len(splits.calibration)} "
            f"clean calibration samples the model classifies correctly: threshold {detector.threshold_:.4g}")
        result = evaluate(model, detector, splits.test, attack, asr_bar=cfg.asr_bar, n_boot=cfg.n_boot, seed=cfg.seed,
                          noisy_clean=cfg.noisy_clean, extra_fprs=cfg.extra_fprs)
    metrics = experiment_metrics(cfg, meta, result, splits)
    with atomic_directory(out_dir, owned=RUN_OUTPUTS, overwrite=overwrite) as out:
        save_model(out / "model.safetensors", model, meta)
        if detector is not None:
            detector.model_name_ = "model.safetensors"
            detector.save(out / "detector.safetensors", extra=split_meta(cfg))
        write_json(out / "config.json", cfg.to_dict())
        write_outputs(out, metrics, result, splits.test.classes)
    return metrics


def check_cache_dir(path: str | Path) -> Path:
    """The suspect-model cache must be a directory (or creatable as one)."""
    from ..utils import _check_creatable

    p = Path(path)
    if os.path.isfile(p):
        raise BadExpertError(f"--cache-dir '{p}' is a file; give a directory")
    _check_creatable(p / "entry")  # a directory that can be made, or an existing one files can be written in
    return p
