"""Command-line interface: thin argument parsing over the library.

Commands: ``demo``, ``run`` (from a JSON config), ``train``, ``defend``, ``evaluate``, ``bundle``, ``serve``,
``export``, ``info``.
Every user mistake ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from .errors import BadExpertError

EPILOG = "Documentation: see README.md. Every command accepts --help."

#: ``grid --jobs``: how often (seconds) the parent looks for cells its processes finished, to
#: collect them into ``--out`` at once.
JOBS_POLL_S = 2.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _kv(items: list[str] | None) -> dict:
    """Parse repeated ``key=value`` options; values are read as JSON when they parse, else strings."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise BadExpertError(f"expected key=value, got '{item}'")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if k in out:
            raise BadExpertError(f"'{k}' is given twice ({k}={out[k]!r} and {item!r}); give each parameter once")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# --- shared option groups ---------------------------------------------------------------------
class _RegistryHelp(str):
    """A help text naming a registry's entries (``{choices}`` in ``template``), read from the
    registry only when help is printed: building the parser imports nothing heavy, so a command
    that needs no torch (``serve --onnx``) never loads it, and the help never lists stale names."""

    def __new__(cls, template: str, registry: Callable[[], Any]):
        obj = super().__new__(cls, template)
        obj._template, obj._registry = template, registry
        return obj

    def __mod__(self, params):  # argparse expands help texts with ``help % params``
        return self._template.replace("{choices}", self._registry().choices().replace("%", "%%")) % params


def _attacks():
    from .attacks import ATTACKS

    return ATTACKS


def _datasets():
    from .data import DATASETS

    return DATASETS


def _architectures():
    from .models import ARCHITECTURES

    return ARCHITECTURES


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="the one seed for every random choice (default 0)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N (default auto)")


def _add_data(p: argparse.ArgumentParser, *, command: str) -> None:
    """Data options; each command gets only the ones it uses."""
    g = p.add_argument_group("data")
    recorded = " (default: the one recorded in the model file)" if command != "train" else " (default fashion-mnist)"
    g.add_argument("--dataset", default="fashion-mnist" if command == "train" else None,
                   help=_RegistryHelp(f"{{choices}}{recorded}", _datasets))
    g.add_argument("--data-path", default=None,
                   help="local dataset files (fashion-mnist defaults to /usr/share/datasets/fashion-mnist)")
    if command in ("train", "defend"):
        g.add_argument("--image-size", type=_image_size, default=None, metavar="N or HxW",
                       help="resize ImageFolder images to this size (default: the most common size in the data); "
                            "with defend --clean: the model's input size, where its source does not declare it")
    if command == "train":
        g.add_argument("--reserved", type=int, default=2000,
                       help="size of the defender's reserved clean set, recorded for `defend` (default 2000)")
        g.add_argument("--calibration", type=int, default=2000,
                       help="size of the clean calibration split, recorded for `defend` (default 2000)")
        g.add_argument("--train-size", type=int, default=None, help="train on a random subset of this many images")
    if command == "defend":
        g.add_argument("--reserved", type=int, default=None,
                       help="size of the reserved clean set the detector is fitted on (default: the model's record; "
                            "with --clean, half of the clean images)")
        g.add_argument("--calibration", type=int, default=None,
                       help="size of the clean calibration split (default: the model's record; with --clean, the rest)")
        g.add_argument("--clean", default=None, metavar="PATH",
                       help="your own clean, labelled images instead of the model's recorded dataset: a <class>/<image> "
                            "folder or zip, or a CSV with a path,label header (class names or indices of the model)")
        g.add_argument("--holdout", type=int, default=0, metavar="N",
                       help="with --clean: set N clean images aside and report the detector's false-positive rate on "
                            "them (default 0)")
        g.add_argument("--min-accuracy", type=float, default=None, metavar="F",
                       help="with --clean: stop unless the model classifies at least this share of the clean images "
                            "correctly (default: chance + 0.1, at least twice chance; 0 disables)")
        g.add_argument("--allow-missing-classes", action="store_true",
                       help="with --clean: accept a clean set without images of some of the model's classes")
    if command in ("train", "evaluate"):
        g.add_argument("--test-size", type=int, default=None, help="evaluate on at most this many test images")


def _image_size(text: str):
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got '{text}'") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or HxW, got '{text}'")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output at --out (by default an existing output is refused)")


def _add_noisy_clean(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--noisy-clean", action="store_true",
                   help="also measure AUROC the paper's way: the clean test inputs plus a Gaussian-noised copy of each "
                        "(sigma 0.05, seeded) as negatives, reported as auroc_noisy beside auroc (scores twice the "
                        f"clean inputs){what}")


def _add_extra_fpr(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extra-fpr", type=float, action="append", default=None, metavar="FPR",
                   help="also report every detector at this target FPR (repeatable; e.g. 0.001, the paper's rate "
                        "for GTSRB): the threshold its calibration scores give there, the rates and CA/ASR after "
                        "filtering, as operating_points; nothing is fitted or calibrated again")


def _add_attack(p: argparse.ArgumentParser, default: str | None) -> None:
    g = p.add_argument_group("attack")
    g.add_argument("--attack", default=default,
                   help=_RegistryHelp(f"{{choices}}, or none for a clean model (default {default}); their "
                                      "parameters: `badexpert list attacks`", _attacks))
    g.add_argument("--target", type=int, default=None, help="attack target class (default 0)")
    g.add_argument("--poison-rate", type=float, default=None,
                   help="fraction of the training set poisoned (default: the attack's reference rate, see "
                        "`badexpert list attacks`; the demo uses 0.01)")
    g.add_argument("--attack-param", action="append", metavar="KEY=VALUE",
                   help="any other attack parameter, e.g. alpha=0.1 or trigger_image=patch.png (repeatable)")


def _add_detector(p: "Parser") -> None:
    """``defend``'s detector options: the method, the target FPR, any parameter, and each
    registered detector's own options (:func:`_add_detector_options`)."""
    g = p.add_argument_group("detector")
    g.add_argument("--method", default="badexpert",
                   help=_RegistryHelp("the detector to build: {choices} (default badexpert)", _detectors_registry))
    g.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate on clean inputs (default 0.01)")
    g.add_argument("--detector-param", action="append", metavar="KEY=VALUE",
                   help="any parameter of the detector, e.g. n=50 for strip (see `badexpert list detectors`)")
    p.defer(lambda parser: _add_detector_options(parser, "with --method {name}"))


def _option_dest(detector: str, param: str) -> str:
    return f"detector_option:{detector}:{param}"


def _add_detector_options(p: argparse.ArgumentParser, given: str) -> None:
    """Every registered detector's own options (:attr:`Detector.cli_options`), one group per
    detector (``given``: how the group's heading says they apply, ``{name}`` the detector). Added
    only when the command's arguments are parsed or its help printed: the registry imports torch,
    which a command that needs none (``serve --onnx``) must never load."""
    from .detectors import DETECTORS

    owner: dict[str, str] = {}
    for name, cls in DETECTORS.items():
        if not cls.cli_options:
            continue
        g = p.add_argument_group(f"{name} options", f"{cls.__name__}'s own options, {given.format(name=name)}")
        for opt in cls.cli_options:
            if opt.flag in owner:
                raise BadExpertError(f"detectors '{owner[opt.flag]}' and '{name}' both declare the option {opt.flag}; "
                                     "give one of them another flag")
            owner[opt.flag] = name
            extra = {"choices": opt.choices} if opt.choices is not None else {"metavar": opt.param.upper()}
            if opt.metavar is not None:
                extra["metavar"] = opt.metavar
            try:
                g.add_argument(opt.flag, dest=_option_dest(name, opt.param), type=opt.type, default=None,
                               help=opt.help.replace("%", "%%"), **extra)
            except argparse.ArgumentError as exc:
                raise BadExpertError(f"detector '{name}' declares the option {opt.flag}, which `{p.prog}` already "
                                     "has; give it another flag") from exc


def _given_detector_options(args):
    """``(detector name, detector class, option, value)`` of each detector option given."""
    from .detectors import DETECTORS

    for name, cls in DETECTORS.items():
        for opt in cls.cli_options:
            value = getattr(args, _option_dest(name, opt.param), None)
            if value is not None:
                yield name, cls, opt, value


def _with_detector_options(args, params: dict[str, dict], refuse: Callable[[str, type, Any], str]) -> dict[str, dict]:
    """``params`` (by name, the parameters of each detector being built) with the detector options
    given on the command line, and the defaults the detectors declare for them; an option of a
    detector not being built is a one-line error (``refuse(name, cls, option)``: its message)."""
    from .detectors import DETECTORS

    for name, cls, opt, value in _given_detector_options(args):
        if name not in params:
            raise BadExpertError(refuse(name, cls, opt))
        params[name][opt.param] = value
    for name, values in params.items():
        for opt in DETECTORS[name].cli_options:
            if opt.default is not None:
                values.setdefault(opt.param, opt.default)
    return params


def _attack_params(args) -> dict:
    """The attack's parameters from ``--attack-param`` and its own options; names are checked
    against the attack by ``get_attack`` (the attack's name is not a parameter: ``--attack``)."""
    params = _kv(args.attack_param)
    for key in ("target", "poison_rate"):
        value = getattr(args, key)
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key in params:
            raise BadExpertError(f"the attack's {key} is given twice (--attack-param {key}={params[key]!r} and "
                                 f"{flag} {value}); give it once, with {flag}")
        params[key] = value
    return params


def _detector_params(args, method: str) -> dict:
    """``defend``'s detector parameters from ``--detector-param`` and the detector's own options
    (another detector's options are a one-line error naming the detector they belong to)."""
    def refuse(name, cls, opt) -> str:
        return (f"{opt.flag} is a {cls.__name__} option (--method {name}), not one of detector '{method}'; "
                f"pass {method}'s parameters with --detector-param KEY=VALUE")

    return _with_detector_options(args, {method: _kv(args.detector_param)}, refuse)[method]


def _check_options(*, calibrates: bool = True, **fields) -> None:
    """Check a command's option values through the one validation layer (the ExperimentConfig
    fields they map to) before any file or data is read. ``calibrates=False`` where the
    calibration split's size is only known from the model file: the target FPR's reachability
    is then checked by :func:`_splits_for`, after the file is read and before any data is."""
    from .pipeline.experiment import ExperimentConfig

    ExperimentConfig(**{"attack": None, **fields}).validate(calibrates=calibrates)


def _add_source(p: argparse.ArgumentParser) -> None:
    """Options of a model that did not come from `badexpert train` (see `badexpert.io.load_model`):
    what the source does not carry is declared here; what contradicts it is an error."""
    g = p.add_argument_group("model source (a model from elsewhere: Hugging Face folder, ONNX file, "
                             "package.module:factory)")
    g.add_argument("--source", default=None, metavar="KIND",
                   help="badexpert, huggingface, onnx or factory (default: told from --model)")
    g.add_argument("--mean", default=None, metavar="M[,M,M]", help="per-channel mean of the model's normalisation, "
                   "for [0, 1] inputs (when the source does not carry it)")
    g.add_argument("--std", default=None, metavar="S[,S,S]", help="per-channel standard deviation, likewise")
    g.add_argument("--classes", default=None, metavar="FILE or A,B,...",
                   help="class names in label order: a comma list, or a text file with one name per line")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="weights of a package.module:factory model (safetensors, or a state dict .pt)")
    g.add_argument("--factory-kwargs", default=None, metavar="JSON",
                   help="keyword arguments of a package.module:factory model, as a JSON object")


def _add_allow_factory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-factory", action="append", default=[], metavar="package.module:factory",
                   help="import this factory to rebuild a bundle's model of your own (repeatable); a bundle never "
                        "imports code you did not name")


def _classes_option(text: str | None):
    if text is None:
        return None
    p = Path(text)
    if p.is_file():
        names = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="strict").splitlines() if ln.strip()]
        if not names:
            raise BadExpertError(f"--classes file '{p}' names no class; write one class name per line")
        return names
    return text


def _load_source(args, *, image_size=None):
    """``--model`` with the source options, through the one loader of every model source."""
    from .io import load_model

    model, meta = load_model(args.model, device=args.device, kind=args.source, mean=args.mean, std=args.std,
                             image_size=image_size, classes=_classes_option(args.classes), weights=args.weights,
                             kwargs=args.factory_kwargs)
    activation = (meta.get("source") or {}).get("final_activation")
    if activation:  # said once per command: the file's outputs are probabilities, the guard uses the logits
        _log(f"'{args.model}' ends in {activation}: its input is taken as the logits (the file's output is their "
             f"{'softmax' if activation == 'Softmax' else 'log-softmax'})")
    return model, meta


def _attack_name(value: str | None) -> str | None:
    return None if value is None or value.lower() in ("none", "clean", "") else value


# --- commands -----------------------------------------------------------------------------------
#: The demo's attack, at 1% poisoning (the reference's 0.3% does not implant in its 4 epochs).
DEMO_ATTACK, DEMO_ATTACK_PARAMS = "badnet", {"poison_rate": 0.01}


def cmd_demo(args) -> int:
    from .attacks import ATTACKS
    from .pipeline.experiment import ExperimentConfig, run
    from .reporting.report import format_table

    attack = _attack_name(args.attack)
    # the demo's own attack at the demo's rate; any other attack at its own reference defaults
    demo = DEMO_ATTACK_PARAMS if attack and ATTACKS.canonical(attack) == DEMO_ATTACK else {}
    cfg = ExperimentConfig(
        dataset="fashion-mnist", data_path=args.data_path, arch="cnn", attack=attack,
        attack_params={**demo, **_attack_params(args)} if attack else {}, train_size=args.train_size,
        fpr=args.fpr, seed=args.seed, device=args.device,
    )
    metrics = run(cfg, args.out, cache_dir=args.cache_dir, log=_log, overwrite=args.overwrite)
    print(format_table(metrics))
    print(f"\nwrote {Path(args.out) / 'metrics.json'}, report.md and plots")
    return 0


def cmd_run(args) -> int:
    from .pipeline.experiment import ExperimentConfig, run
    from .reporting.report import format_table

    cfg = ExperimentConfig.from_file(args.config)
    overrides = {k: v for k, v in (("seed", args.seed), ("device", args.device)) if v is not None}
    if overrides:
        cfg = ExperimentConfig.from_dict({**cfg.to_dict(), **overrides})
    metrics = run(cfg, args.out, cache_dir=args.cache_dir, log=_log, overwrite=args.overwrite)
    print(format_table(metrics))
    return 0


def cmd_train(args) -> int:
    from .attacks import attack_from_meta
    from .evaluation.core import evaluate
    from .pipeline.experiment import ExperimentConfig, make_splits, train_suspect
    from .io import save_model
    from .utils import check_output_file

    recipe = _kv(args.recipe)
    for key in ("epochs", "lr", "batch_size", "optimizer"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    attack = _attack_name(args.attack)
    cfg = ExperimentConfig(
        dataset=args.dataset, data_path=args.data_path, arch=args.arch, width=args.width, attack=attack,
        attack_params=_attack_params(args) if attack else {}, recipe=recipe, reserved=args.reserved,
        calibration=args.calibration, train_size=args.train_size, test_size=args.test_size, seed=args.seed,
        device=args.device, image_size=args.image_size,
    )
    cfg.validate(calibrates=False)  # names, types and ranges, before any data is read
    check_output_file(args.out, suffix=".safetensors", overwrite=args.overwrite)
    splits = make_splits(cfg)
    model, meta = train_suspect(cfg, splits, log=_log)
    measured = evaluate(model, None, splits.test, attack_from_meta(meta)).metrics
    meta["clean_accuracy"] = measured["clean_accuracy"]
    line = f"clean accuracy {meta['clean_accuracy']:.2%}"
    if attack:
        meta["attack_success_rate"] = measured["attack_success_rate"]
        line += f", attack success rate {meta['attack_success_rate']:.2%}"
    save_model(args.out, model, meta)
    print(f"{line}\nwrote {args.out}")
    return 0


def _splits_for(meta: dict, record: dict, args, **overrides):
    """The splits a model or detector file records (``record``: its ``dataset`` and ``split``),
    with the command's data options and ``overrides`` applied; checked against the model."""
    from .pipeline.experiment import ExperimentConfig, make_splits

    ds = record.get("dataset")
    sp = record.get("split")
    if not isinstance(ds, dict) or not isinstance(sp, dict) or not isinstance(ds.get("name"), str):
        raise BadExpertError("the model does not record the dataset and split it was made with; give your own clean "
                             "images with --clean FOLDER (or --dataset and --data-path), or make it with `badexpert "
                             "train` / `badexpert defend`")
    image_size = getattr(args, "image_size", None) or ds.get("image_size")
    values = dict(
        dataset=args.dataset or ds["name"], data_path=args.data_path or ds.get("path"), arch=meta["arch"],
        reserved=sp.get("reserved"), calibration=sp.get("calibration"), train_size=sp.get("train_size"),
        test_size=sp.get("test_size"), seed=sp.get("seed"),
        image_size=tuple(image_size) if isinstance(image_size, list) else image_size,
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = ExperimentConfig(**values)
    cfg.validate()
    splits = make_splits(cfg)
    if splits.test.num_classes != meta["num_classes"] or list(splits.test.image_size) != list(meta["image_size"]):
        raise BadExpertError(
            f"the dataset ({splits.test.num_classes} classes, {splits.test.image_size}) does not match the model "
            f"({meta['num_classes']} classes, {tuple(meta['image_size'])})"
        )
    return cfg, splits


def cmd_defend(args) -> int:
    from .detectors import DETECTORS
    from .pipeline.experiment import fit_detector, split_meta
    from .utils import check_output_file

    check_output_file(args.out, suffix=".safetensors", overwrite=args.overwrite)
    method = DETECTORS.canonical(args.method)
    params = {**_detector_params(args, method), "seed": args.seed}  # the split's seed stays the model's
    _check_options(detector=method, detector_params=params, fpr=args.fpr, device=args.device, seed=args.seed,
                   calibrates=False, **{k: v for k, v in (("reserved", args.reserved), ("calibration", args.calibration))
                                        if v is not None})
    if args.clean is not None:
        return _defend_on_clean(args, method, params)
    for flag, given in (("--holdout", args.holdout), ("--min-accuracy", args.min_accuracy is not None),
                        ("--allow-missing-classes", args.allow_missing_classes)):
        if given:
            raise BadExpertError(f"{flag} goes with --clean (your own clean images); without --clean the detector "
                                 "uses the model's recorded dataset")
    model, meta = _load_source(args)
    cfg, splits = _splits_for(meta, meta, args, reserved=args.reserved, calibration=args.calibration, fpr=args.fpr)
    cfg.detector, cfg.detector_params, cfg.fpr, cfg.device = method, params, args.fpr, args.device
    cfg.validate()
    # the values of the options the detector gives a default (BaDExpert: its preset)
    chosen = ", ".join(str(params[o.param]) for o in DETECTORS[method].cli_options if o.default is not None)
    _log(f"fitting {method}{' (' + chosen + ')' if chosen else ''} on {len(splits.reserved)} reserved clean samples")
    det = fit_detector(cfg, model, splits)
    det.model_name_ = str(args.model)
    det.save(args.out, extra=split_meta(cfg))
    chose = det.fit_summary()
    print(f"fitted {method} in {det.fit_seconds_:.1f}s{' (' + chose + ')' if chose else ''}; "
          f"threshold {det.threshold_:.4g} at target FPR {args.fpr:g} from the {det.calibration_size_} of "
          f"{len(splits.calibration)} calibration samples the model classifies correctly")
    print(f"wrote {args.out}")
    return 0


def _defend_on_clean(args, method: str, params: dict) -> int:
    """``defend --clean``: fit and calibrate on the user's own clean images (split seeded), after
    the sanity gate on the model's accuracy; the held-out part's false-positive rate is reported."""
    from .data.clean import check_accuracy, clean_splits, read_clean_set
    from .detectors import DETECTORS, get_detector
    from .metrics import check_reachable_fpr
    from .utils import seed_everything

    for flag, value in (("--dataset", args.dataset), ("--data-path", args.data_path)):
        if value is not None:
            raise BadExpertError(f"{flag} and --clean both say where the clean images are; give one")
    model, meta = _load_source(args, image_size=args.image_size)
    data = read_clean_set(args.clean, num_classes=meta["num_classes"], image_size=meta["image_size"],
                          in_channels=meta["in_channels"], classes=meta.get("classes"),
                          allow_missing=args.allow_missing_classes)
    splits = clean_splits(data, seed=args.seed, reserved=args.reserved, calibration=args.calibration,
                          holdout=args.holdout)
    check_reachable_fpr(args.fpr, len(splits.calibration), "calibration images", "--fpr")  # before anything is fitted
    acc = check_accuracy(model, data, bar=args.min_accuracy)
    _log(f"the model classifies {acc:.1%} of the {len(data)} clean images correctly")
    chosen = ", ".join(str(params[o.param]) for o in DETECTORS[method].cli_options if o.default is not None)
    _log(f"fitting {method}{' (' + chosen + ')' if chosen else ''} on {len(splits.reserved)} of your clean images")
    det = get_detector(method, **{"device": args.device, **params})
    seed_everything(args.seed)
    det.fit(model, splits.reserved).calibrate(splits.calibration, args.fpr)
    det.model_name_ = str(args.model)
    record = {"clean": {"path": str(args.clean), "seed": args.seed, "reserved": len(splits.reserved),
                        "calibration": len(splits.calibration), "holdout": len(splits.test),
                        "model_accuracy": acc}}
    line = (f"fitted {method} in {det.fit_seconds_:.1f}s; threshold {det.threshold_:.4g} at target FPR {args.fpr:g} "
            f"from the {det.calibration_size_} of {len(splits.calibration)} calibration images the model classifies "
            "correctly")
    if len(splits.test):
        from .metrics import clean_rejection
        from .training import predict_logits

        rejected = det.predict(splits.test.images).numpy()
        correct = (predict_logits(model, splits.test.images).argmax(1) == splits.test.labels).numpy()
        held = clean_rejection(rejected, correct, det.calibration_population_)
        record["clean"]["holdout_rejection"] = held
        from .reporting.formats import pct  # 'n/a' where no image is right: no rate

        line += (f"; on the {len(splits.test)} held-out images it rejects {pct(held['realized_fpr'], 2)} of those the "
                 f"model gets right ({pct(held['fpr'], 2)} of all)")
    det.save(args.out, extra=record)
    print(line)
    print(f"wrote {args.out}")
    return 0


def _detectors_registry():
    from .detectors import DETECTORS

    return DETECTORS


def cmd_compare(args) -> int:
    from .attacks import attack_from_meta
    from .evaluation.compare import compare
    from .reporting.compare import COMPARE_OUTPUTS, format_comparison, write_comparison
    from .detectors import DETECTORS, get_detector
    from .io import load_model
    from .utils import check_output_dir

    check_output_dir(args.out, owned=COMPARE_OUTPUTS, overwrite=args.overwrite)
    names = [DETECTORS.canonical(n.strip()) for n in args.detectors.split(",") if n.strip()]
    if not names:
        raise BadExpertError("--detectors names no detector; e.g. --detectors badexpert,strip")
    params: dict[str, dict] = {n: {} for n in names}
    for item in args.detector_param or []:
        scope, sep, rest = item.partition(":")
        if not sep or "=" in scope:
            raise BadExpertError(f"--detector-param takes DETECTOR:KEY=VALUE (e.g. strip:n=50), got '{item}'")
        name = DETECTORS.canonical(scope.strip())
        if name not in params:
            raise BadExpertError(f"--detector-param names detector '{name}', which is not in --detectors")
        params[name].update(_kv([rest]))

    def refuse(name, cls, opt) -> str:
        return (f"{opt.flag} is a {cls.__name__} option, and detector '{name}' is not in --detectors "
                f"({', '.join(names)})")

    params = _with_detector_options(args, params, refuse)
    for name in names:  # every detector's parameters checked before any data is read
        _check_options(detector=name, detector_params={**params[name], "seed": args.seed}, fpr=args.fpr,
                       device=args.device, seed=args.seed, calibrates=False, extra_fprs=tuple(args.extra_fpr or ()),
                       **{k: v for k, v in (("reserved", args.reserved), ("calibration", args.calibration),
                                            ("test_size", args.test_size)) if v is not None})
    model, meta = load_model(args.model, device=args.device)
    _, splits = _splits_for(meta, meta, args, reserved=args.reserved, calibration=args.calibration, fpr=args.fpr,
                            test_size=args.test_size)
    attack = attack_from_meta(meta, source=f"'{args.model}'")
    dets = [get_detector(n, **{"seed": args.seed, "device": args.device, **params[n]}) for n in names]
    result = compare(model, dets, splits, attack, fpr=args.fpr, seed=args.seed, device=args.device,
                     noisy_clean=args.noisy_clean, extra_fprs=tuple(args.extra_fpr or ()), log=_log)
    write_comparison(args.out, result, overwrite=args.overwrite)
    print(format_comparison(result.metrics))
    print(f"wrote {args.out}")
    return 0


def _shard(text: str) -> tuple[int, int]:
    """``--shard I/N``."""
    i, sep, n = text.partition("/")
    try:
        shard = (int(i), int(n))
    except ValueError:
        shard = None
    if not sep or shard is None or not 1 <= shard[0] <= shard[1]:
        raise argparse.ArgumentTypeError(f"takes I/N with 1 <= I <= N (e.g. 1/2), got '{text}'")
    return shard


def cmd_grid(args) -> int:
    from .pipeline.grid import check_grid_dirs, run_grid

    if args.status:  # what is done and what is left; nothing runs, nothing is written
        from .pipeline.grid import format_status, grid_status

        print(format_status(grid_status(args.config, args.out, cache_dir=args.cache_dir, shard=args.shard)), end="")
        return 0

    if args.jobs is not None and args.jobs != 1:
        return _grid_jobs(args)
    if args.claim and args.ray is not None:
        raise BadExpertError("--claim runs the cells it claims here, one after another; leave out --ray")
    # run_grid checks --out, --cache-dir, the config and every cell (with every detector) before any data is read
    runner = None
    _check_time_budget(args)
    if args.time_budget is not None:
        if args.ray is not None:
            raise BadExpertError("--time-budget runs the cells here, one after another; leave out --ray")
        if args.cache_dir is None:
            raise BadExpertError("--time-budget needs --cache-dir: a training stopped at the budget keeps its state "
                                 "there for the next run")
        from .pipeline.grid import budget_runner

        check_grid_dirs(args.out, args.cache_dir)
        runner = budget_runner(args.time_budget, args.cache_dir, log=_log)
    if args.ray is not None:
        from .pipeline.grid import ray_runner

        if args.cpus_per_cell <= 0 or args.gpus_per_cell < 0:
            raise BadExpertError("--cpus-per-cell must be > 0 and --gpus-per-cell >= 0")
        check_grid_dirs(args.out, args.cache_dir)  # a bad --out is told at once, not after the Ray wait
        # Ray installed and the address answering (a bounded wait), before anything is written
        runner = ray_runner(args.ray, cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell,
                            connect_timeout=args.ray_timeout)
    config = _grid_config(args)
    run_grid(config, args.out, cache_dir=args.cache_dir, log=_log, runner=runner, shard=args.shard, claim=args.claim)
    return _grid_done(args.out, stopped=getattr(runner, "stopped", False))


def _check_time_budget(args) -> None:
    if args.time_budget is not None and not args.time_budget > 0:
        raise BadExpertError(f"--time-budget must be a positive number of seconds, not {args.time_budget:g}")


def _grid_done(out, *, stopped: bool) -> int:
    """Print the grid's summary and what was written; exit status 3 when the time budget stopped it."""
    print((Path(out) / "summary.md").read_text(encoding="utf-8"))
    if stopped:
        print(f"stopped at the time budget; wrote what is done to {out}: run the same command again to resume")
        return 3
    print(f"wrote {out}: results.jsonl, summary.md, summary.csv, heatmap.png")
    return 0


def _grid_config(args):
    """The grid config ``grid`` runs: the file, with ``--noisy-clean`` setting its own field."""
    if not args.noisy_clean:
        return args.config
    from .pipeline.grid import read_grid_file

    return {**read_grid_file(args.config), "noisy_clean": True}


def _grid_jobs(args) -> int:
    """``grid --jobs N``: the grid in N processes here (``--claim`` each: a process takes the next
    cell no other one holds, sharing the cache, with the same time budget); each cell a process
    finishes is collected from the cache's rows into ``--out`` within seconds, and the whole grid
    when they stop (nothing computed in this process)."""
    import os
    import subprocess
    import time

    from .digests import json_digest
    from .pipeline.grid import ROWS_DIR, cache_rows, check_grid_dirs, load_grid, plan, read_results, run_grid

    n = args.jobs
    if n < 1:
        raise BadExpertError(f"--jobs must be a positive number of processes, not {n}")
    if args.cache_dir is None:
        raise BadExpertError("--jobs needs --cache-dir: the processes' rows meet there")
    if args.ray is not None or args.shard is not None or args.claim:
        raise BadExpertError("--jobs shares the cells out itself; leave out --ray, --shard and --claim")
    _check_time_budget(args)
    check_grid_dirs(args.out, args.cache_dir)
    grid = load_grid(_grid_config(args))
    n_cells = len(plan(grid, cache_dir=args.cache_dir))  # every cell checked once here, not once per process
    where = Path(args.cache_dir) / "jobs" / json_digest({"grid": grid, "out": str(Path(args.out).absolute())},
                                                          length=16)
    # the processes read rows from the cache, not from --out: rows --out holds (a run whose cache
    # is gone, rows committed elsewhere) go to the cache first, or they would be computed again
    cache_rows(args.cache_dir, read_results(Path(args.out) / "results.jsonl", log=_log))
    where.mkdir(parents=True, exist_ok=True)
    config = where / "grid.json"
    config.write_text(json.dumps(grid), encoding="utf-8")
    env = dict(os.environ)
    # one thread per process unless the caller chose: N processes must not each take every core
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    procs = []
    for i in range(1, n + 1):
        cmd = [sys.executable, "-m", "badexpert", "grid", "--config", str(config), "--out", str(where / str(i)),
               "--cache-dir", str(args.cache_dir), "--claim"]
        if args.time_budget is not None:
            cmd += ["--time-budget", repr(args.time_budget)]
        log_file = where / f"job-{i}.log"
        with open(log_file, "wb") as fh:
            procs.append((i, log_file, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)))
    _log(f"grid: {n} processes, each taking the next cell no other one holds; their logs: {where}/job-*.log")

    def collect(fn, specs):  # every row comes from the cache; nothing is computed here
        return iter(())

    def job_rows() -> int:  # the row cache's folder changes whenever a process keeps a row there
        try:
            return (Path(args.cache_dir) / ROWS_DIR).stat().st_mtime_ns
        except OSError:
            return 0

    # while the processes run, each cell one finishes reaches --out within a few seconds: an
    # interrupted run (the session killed, the machine lost) keeps every finished cell there
    collect.stopped = True
    seen = job_rows()
    codes: dict[int, int] = {}
    while len(codes) < n:
        time.sleep(JOBS_POLL_S)
        codes.update((i, p.returncode) for i, _, p in procs if i not in codes and p.poll() is not None)
        now = job_rows()  # read before collecting: a row kept meanwhile is collected next time
        if len(codes) < n and now != seen:
            seen = now
            try:
                rows = run_grid(grid, args.out, cache_dir=args.cache_dir, log=lambda _: None, runner=collect)
            except BadExpertError:  # a row file caught mid-write: the next poll or the end collects it
                continue
            _log(f"grid: {len({r['cell'] for r in rows})} of {n_cells} cells in {args.out}")
    for i, log_file, _ in procs:
        if codes[i] not in (0, 3):
            tail = [line for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
            raise BadExpertError(f"job {i} of {n} failed (exit status {codes[i]}): {tail[-1] if tail else 'no output'} "
                                 f"(its log: {log_file})")
    stopped = any(code == 3 for code in codes.values())
    collect.stopped = stopped
    run_grid(grid, args.out, cache_dir=args.cache_dir, log=_log, runner=collect)
    return _grid_done(args.out, stopped=stopped)


def cmd_evaluate(args) -> int:
    from .attacks import attack_from_meta, get_attack
    from .detectors import load_detector
    from .evaluation.core import TriggeredImages, evaluate, extra_thresholds
    from .pipeline.experiment import RUN_OUTPUTS, experiment_metrics, write_outputs
    from .reporting.report import format_table
    from .utils import atomic_directory, check_output_dir

    check_output_dir(args.out, owned=RUN_OUTPUTS, overwrite=args.overwrite)
    name = _attack_name(args.attack) if args.attack is not None else None
    _check_evaluate_data(args)
    _check_options(attack=name, attack_params=_attack_params(args) if name else {}, asr_bar=args.asr_bar,
                   n_boot=args.n_boot, seed=args.seed, device=args.device, test_size=args.test_size,
                   extra_fprs=tuple(args.extra_fpr or ()), calibrates=False)
    model, meta = _load_source(args, image_size=args.image_size)
    detector = load_detector(args.detector, model, device=args.device, model_name=str(args.model))
    if not hasattr(detector, "threshold_"):
        raise BadExpertError(f"detector '{args.detector}' was never calibrated; rerun `badexpert defend`")
    extra_thresholds(detector, args.extra_fpr or ())  # reachable on its calibration scores, before data is read
    if args.test is not None or args.clean is not None or isinstance(detector.extra_.get("clean"), dict):
        cfg, splits, where = _own_test_data(args, meta, detector)  # the user's images, not a recorded dataset
    else:  # the detector's own record of the split it was fitted and calibrated on defines the test split
        record = detector.extra_ if "split" in detector.extra_ else meta
        if "split" not in record:
            from .data.clean import CLEAN_LAYOUT

            raise BadExpertError(f"neither the detector nor the model records data to evaluate on; give a labelled "
                                 f"test set of your own with --test PATH ({CLEAN_LAYOUT})")
        cfg, splits = _splits_for(meta, record, args, test_size=args.test_size, fpr=detector.fpr_target_)
        where = None
    if args.triggered is not None:  # the user's own triggered images, labelled with their true classes
        from .data.clean import read_clean_set

        attack = TriggeredImages(read_clean_set(args.triggered, **_model_shape(meta), allow_missing=True),
                                 args.target)
        attack.check(meta["num_classes"])
    elif args.attack is not None:
        attack = get_attack(name, **_attack_params(args)) if name else None
    else:
        attack = attack_from_meta(meta, source=f"'{args.model}'")
    cfg.detector, cfg.detector_params = detector.name, detector.get_params()
    cfg.attack = attack.name if attack else None
    cfg.attack_params = attack.params() if attack else {}
    cfg.fpr = detector.fpr_target_
    cfg.asr_bar = args.asr_bar
    cfg.noisy_clean = args.noisy_clean
    cfg.extra_fprs = tuple(args.extra_fpr or ())
    result = evaluate(model, detector, splits.test, attack, asr_bar=args.asr_bar, n_boot=args.n_boot, seed=args.seed,
                      allow_overlap=args.allow_overlap, noisy_clean=args.noisy_clean, extra_fprs=cfg.extra_fprs)
    metrics = experiment_metrics(cfg, meta, result, splits)
    metrics["attack"] = attack.to_dict() if attack else None
    if where is not None:  # the split sizes the detector records (its data is not read again for --test)
        metrics["dataset"].update(where)
    if isinstance(meta.get("source"), dict):  # a model from elsewhere: what it was (not its whole config)
        metrics["model"]["source"] = {k: v for k, v in meta["source"].items() if k not in ("config", "preprocessor")}
    with atomic_directory(args.out, owned=RUN_OUTPUTS, overwrite=args.overwrite) as out:
        write_outputs(out, metrics, result, splits.test.classes)
    print(format_table(metrics))
    print(f"\nwrote {Path(args.out) / 'metrics.json'}, report.md and plots")
    return 0


def _model_shape(meta: dict) -> dict:
    """What :func:`~badexpert.data.clean.read_clean_set` needs of a model to read images for it."""
    return {"num_classes": meta["num_classes"], "image_size": meta["image_size"], "in_channels": meta["in_channels"],
            "classes": meta.get("classes")}


def _check_evaluate_data(args) -> None:
    """``evaluate``'s data and attack options that cannot go together, before anything is read."""
    given = [(flag, v) for flag, v in (("--dataset", args.dataset), ("--data-path", args.data_path),
                                       ("--clean", args.clean), ("--test", args.test)) if v is not None]
    if len(given) > 1 and not {f for f, _ in given} <= {"--dataset", "--data-path"}:
        raise BadExpertError(f"{given[0][0]} and {given[1][0]} both say what to evaluate on; give one (--test: a "
                             "labelled test set of your own; --clean: where the clean set the detector was made from "
                             "is now, to evaluate on its held-out part)")
    if args.allow_missing_classes and args.test is None:
        raise BadExpertError("--allow-missing-classes goes with --test (a test set of your own)")
    if args.triggered is None:
        if args.attack is None and (args.target is not None or args.poison_rate is not None or args.attack_param):
            flag = "--target" if args.target is not None else "--poison-rate" if args.poison_rate is not None \
                else "--attack-param"
            raise BadExpertError(f"{flag} describes an attack: give the attack with --attack NAME (or your own "
                                 "triggered images with --triggered PATH --target CLASS)")
        return
    if args.attack is not None:
        raise BadExpertError("--triggered gives triggered images of your own and --attack makes them from a known "
                             "trigger; give one")
    if args.poison_rate is not None or args.attack_param:
        raise BadExpertError("--poison-rate and --attack-param describe an attack's trigger; --triggered images carry "
                             "their own (give --target CLASS, the class the trigger leads to)")
    if args.target is None:
        raise BadExpertError("--triggered needs --target CLASS: the class index the trigger leads to")


def _own_test_data(args, meta: dict, detector):
    """``evaluate``'s test split from the user's own images: ``--test PATH``, or else the held-out
    part of the clean set ``defend --clean`` made the detector from (its path recorded, or
    ``--clean``), split again with its recorded seed and sizes and checked to be the same split.
    Returns the config and splits for the metrics, and what the metrics' ``dataset`` says of them."""
    from .data.clean import read_clean_set, resplit, sample
    from .data.core import Splits
    from .pipeline.experiment import ExperimentConfig

    record = detector.extra_.get("clean")
    for flag, value in (("--dataset", args.dataset), ("--data-path", args.data_path)):
        if value is not None:
            raise BadExpertError(f"{flag} names a dataset, but detector '{args.detector}' was made from a clean set of "
                                 "your own: evaluate takes its held-out part, or a test set with --test PATH")
    sizes = {"train": 0, "reserved": len(detector.fit_hashes_),
             "calibration": len(getattr(detector, "calibration_hashes_", []))}
    if args.test is not None:
        test = read_clean_set(args.test, **_model_shape(meta), allow_missing=args.allow_missing_classes)
        path, role = str(args.test), "your test set"
    else:
        if not isinstance(record, dict):
            raise BadExpertError(f"detector '{args.detector}' was not made from a clean set of your own (`defend "
                                 "--clean`), so --clean has no held-out part to evaluate on; give a test set with "
                                 "--test PATH")
        if not record.get("holdout"):
            raise BadExpertError(f"detector '{args.detector}' was made with no held-out clean images (defend --clean "
                                 "without --holdout); give a labelled test set with --test PATH, or rerun defend with "
                                 "--holdout N")
        path = str(args.clean if args.clean is not None else record.get("path"))
        where = f"clean data '{path}'"
        if args.clean is None and not Path(path).exists():
            raise BadExpertError(f"the clean set detector '{args.detector}' was made from, '{path}', is not there; say "
                                 "where it is now with --clean PATH, or give a test set with --test PATH")
        data = read_clean_set(path, **_model_shape(meta), allow_missing=True)
        test = resplit(data, record, fit_hashes=detector.fit_hashes_,
                       calibration_hashes=getattr(detector, "calibration_hashes_", None), where=where).test
        role = f"the {len(test)} held-out images of the clean set the detector was made from"
    test = sample(test, args.test_size, seed=args.seed)
    cfg = ExperimentConfig(dataset="imagefolder", data_path=path, arch=meta["arch"], width=meta.get("width"),
                           attack=None, reserved=sizes["reserved"], calibration=max(1, sizes["calibration"]),
                           test_size=args.test_size, seed=args.seed, device=args.device, n_boot=args.n_boot,
                           image_size=tuple(meta["image_size"]))
    empty = test.subset([])
    splits = Splits(train=empty, reserved=empty, calibration=empty, test=test)
    return cfg, splits, {"path": path, "test_from": role, "splits": {**sizes, "test": len(test)}}


def cmd_bundle(args) -> int:
    from .detectors import load_detector
    from .deploy.guard import save_bundle
    from .utils import check_output_file

    check_output_file(args.out, suffix=".safetensors", overwrite=args.overwrite)
    model, meta = _load_source(args, image_size=args.image_size)
    detector = load_detector(args.detector, model, model_name=str(args.model))
    if not hasattr(detector, "threshold_"):
        raise BadExpertError(f"detector '{args.detector}' was never calibrated; rerun `badexpert defend`")
    save_bundle(args.out, model, detector, meta)
    print(f"wrote {args.out}: {meta['arch']} model, {detector.name} detector, threshold {detector.threshold_:.4g} "
          f"at target FPR {detector.fpr_target_:g}")
    if meta["arch"] == "factory":
        print(f"loading it imports {meta['source']['factory']}: serve and export it with --allow-factory "
              f"{meta['source']['factory']}")
    return 0


def cmd_export(args) -> int:
    from .deploy.export import export_bundle

    r = export_bundle(args.bundle, args.onnx, opset=args.opset, overwrite=args.overwrite, log=_log,
                      allow_factories=args.allow_factory)
    v = r["verification"]
    ties = v["borderline_label_flips"] + v["borderline_reject_flips"]
    same = "identical" if not ties else f"identical except {ties} tie(s) within tolerance"
    print(f"verified on {v['inputs']} inputs against the eager guard: labels and reject flags {same}, "
          f"max |score diff| {v['max_abs_score_diff']:.2g}, max |confidence diff| {v['max_confidence_diff']:.2g}")
    print(f"wrote {r['onnx']} ({r['bytes'] / 1e6:.1f} MB, opset {r['opset']}, {r['score_rule']} score, "
          f"threshold {r['threshold']:.4g})")
    return 0


def cmd_serve(args) -> int:
    from .serve import Settings, require_server_deps, serve

    require_server_deps()  # a missing extra is one line, before anything is loaded
    if (args.bundle is None) == (args.onnx is None):
        raise BadExpertError("serve needs a bundle file (`badexpert bundle`) or --onnx FILE (`badexpert export`), "
                             "not both")
    settings = Settings.from_namespace(args)  # the options add_arguments made from its fields
    if args.onnx is not None and args.allow_factory:
        raise BadExpertError("--allow-factory goes with a bundle; an ONNX guard (--onnx) runs no Python code")
    serve(args.bundle, host=args.host, port=args.port, settings=settings, onnx=args.onnx, threads=args.threads,
          log_level=args.log_level, allow_factories=args.allow_factory)
    return 0


#: What ``badexpert list`` can list (each read from its registry).
LISTS = {"attacks": _attacks, "detectors": _detectors_registry,
         "datasets": _datasets, "architectures": _architectures}


def _parameters(factory) -> list[tuple[str, Any]]:
    """``(name, default)`` of a registry entry's parameters (dataclass fields or call signature)."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(factory):
        out = []
        for f in dataclasses.fields(factory):
            if not f.init or f.name.startswith("_"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            out.append((f.name, default))
        return out
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    return [(n, "(required)" if p.default is p.empty else p.default) for n, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in ("self", "kwargs")]


def cmd_list(args) -> int:
    registry = LISTS[args.kind]()
    for name, factory in registry.items():
        para = " ".join((getattr(factory, "__doc__", None) or "").strip().split("\n\n")[0].split())
        summary = para.split(". ")[0].rstrip(".")
        print(f"{name}: {summary}" if summary else name)
        if args.kind in ("attacks", "detectors"):
            params = ", ".join(f"{k}={v!r}" for k, v in _parameters(factory))
            print(f"    parameters: {params}")
    return 0


def cmd_info(args) -> int:
    from .detectors.base import FORMAT as DETECTOR_FORMAT
    from .detectors.base import read_detector_file
    from .deploy.guard import BUNDLE_FORMATS, read_bundle
    from .io import read_meta, read_model_meta

    p = Path(args.file)
    if p.suffix == ".onnx":  # an exported guard: checked whole, as `serve --onnx` checks it
        from .runtime.onnx import OnnxGuard

        print(json.dumps(OnnxGuard(p, intra_op_threads=1).meta, indent=2))
        return 0
    kind = read_meta(p, fmt=None, what="model or detector file", hint="see `badexpert train` and `defend`").get("format")
    if kind == DETECTOR_FORMAT:
        _, meta = read_detector_file(p)
    elif kind in BUNDLE_FORMATS or (isinstance(kind, str) and kind.startswith("badexpert-bundle/")):
        meta, _ = read_bundle(p)
    else:
        meta = read_model_meta(p)
    print(json.dumps(meta, indent=2))
    return 0


# --- parser ---------------------------------------------------------------------------------------
class UsageError(BadExpertError):
    """A command-line mistake found by the argument parser."""


class Parser(argparse.ArgumentParser):
    """argparse with its mistakes reported like every other one: a single line, exit status 2;
    and options added only when a command is parsed or its help printed (:meth:`defer`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def defer(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        """Call ``add(self)`` before this parser parses or formats anything (options read from a
        registry that imports torch, which a command that needs none must not load)."""
        self._deferred.append(add)

    def _complete(self) -> None:
        while self._deferred:
            self._deferred.pop(0)(self)

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse's entry point
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:  # noqa: D102
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:  # noqa: D102
        self._complete()
        return super().format_help()

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="badexpert",
        description="Detect backdoor (trojan) inputs to an image classifier with BaDExpert.",
        epilog=EPILOG,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"badexpert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole pipeline on Fashion-MNIST with a BadNet backdoor",
                       description="Plant a backdoor in a CNN trained on Fashion-MNIST, build the BaDExpert detector "
                                   "from 2,000 reserved clean images, calibrate it at 1%% FPR on 2,000 other clean "
                                   "images, evaluate on the rest of the test split and write a report.")
    p.add_argument("--out", required=True, help="output directory (metrics.json, report.md, plots, model, detector)")
    p.add_argument("--data-path", default=None, help="Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--train-size", type=int, default=None, help="train on a random subset of this many images")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate (default 0.01)")
    p.add_argument("--cache-dir", default=None, help="reuse suspect models trained before with identical settings")
    _add_attack(p, DEMO_ATTACK)
    _add_overwrite(p)
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("list", help="list the attacks, detectors, datasets or architectures, with parameters",
                       description="Each registered attack or detector with its reference default parameters (set "
                                   "them with --attack-param / --detector-param, or in a config).")
    p.add_argument("kind", choices=sorted(LISTS), help="what to list")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="the whole pipeline from a JSON config (see configs/)",
                       description="Run data -> attack -> suspect model -> detector -> evaluation -> report from a "
                                   "JSON file holding ExperimentConfig fields.")
    p.add_argument("--config", required=True, help="JSON config file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--cache-dir", default=None, help="reuse suspect models trained before with identical settings")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--device", default=None, help="override the config's device")
    _add_overwrite(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train a (possibly backdoored) suspect model",
                       description="Train a model on a dataset, optionally poisoned by an attack, and save it as "
                                   "safetensors with JSON metadata (architecture, dataset, split, attack, recipe, seed).")
    _add_data(p, command="train")
    p.add_argument("--arch", default="cnn", help=_RegistryHelp("{choices} (default cnn)", _architectures))
    p.add_argument("--width", type=int, default=None, help="architecture width (ResNet-18: 64 in the paper)")
    _add_attack(p, "none")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--optimizer", default=None, help="sgd, adam or adamw")
    g.add_argument("--recipe", action="append", metavar="KEY=VALUE", help="any other recipe field, e.g. schedule=step")
    p.add_argument("--out", required=True, help="model file to write (.safetensors)")
    _add_overwrite(p)
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("defend", help="build a detector (BaDExpert by default) for a suspect model",
                       description="Fit a detector (--method; BaDExpert by default) on the reserved clean split of "
                                   "the model's dataset and calibrate its threshold on the disjoint calibration "
                                   "split. evaluate, bundle and serve take any detector it writes.")
    p.add_argument("--model", required=True, help="suspect model: a file written by `badexpert train`, a Hugging Face "
                   "save_pretrained folder, an .onnx file, or package.module:factory (see the model source options)")
    _add_data(p, command="defend")
    _add_source(p)
    _add_detector(p)
    p.add_argument("--out", required=True, help="detector file to write (.safetensors)")
    _add_overwrite(p)
    _add_common(p)
    p.set_defaults(func=cmd_defend)

    p = sub.add_parser("compare", help="several detectors side by side on one suspect model",
                       description="Fit every detector on the same reserved clean split of the model's dataset, "
                                   "calibrate each at the same target FPR on the same calibration split, and "
                                   "evaluate all on the same test split under the model's attack; writes one table "
                                   "(compare.md, compare.json) and one ROC figure (roc.png).")
    p.add_argument("--model", required=True, help="suspect model written by `badexpert train`")
    p.add_argument("--detectors", default="badexpert",
                   help=_RegistryHelp("comma-separated detector names: {choices} (default badexpert)",
                                      _detectors_registry))
    p.add_argument("--detector-param", action="append", metavar="DETECTOR:KEY=VALUE",
                   help="a parameter of one detector, e.g. strip:n=50 (repeatable)")
    p.defer(lambda parser: _add_detector_options(parser, "for {name} in --detectors"))
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate of every detector (default 0.01)")
    _add_data(p, command="defend")
    p.add_argument("--test-size", type=int, default=None, help="evaluate on at most this many test images")
    _add_noisy_clean(p)
    _add_extra_fpr(p)
    p.add_argument("--out", required=True, help="output directory")
    _add_overwrite(p)
    _add_common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("grid", help="a benchmark grid: datasets x architectures x attacks x seeds, every detector",
                       description="Train one suspect model per dataset, architecture, attack and seed, run every "
                                   "detector of the grid on it under one protocol (as `compare` does), and write "
                                   "results.jsonl (one line per cell and detector), summary.md / summary.csv (mean, "
                                   "std and bootstrap 95%% interval across seeds) and heatmap.png. Rerunning with the "
                                   "same --out resumes: rows already there are not computed again.")
    p.add_argument("--config", required=True, help="JSON grid config (see configs/grids/grid-example.json)")
    p.add_argument("--out", required=True, help="output directory (created, or resumed when it holds a grid run)")
    p.add_argument("--cache-dir", default=None,
                   help="reuse suspect models and fitted detectors made before with identical settings")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run each cell as a Ray task: 'local' starts Ray on this machine, else a cluster address "
                        "(workers must see the same data and cache paths; needs pip install 'badexpert[grid]')")
    p.add_argument("--cpus-per-cell", type=float, default=1.0, help="CPUs each Ray task requests (default 1)")
    p.add_argument("--gpus-per-cell", type=float, default=0.0, help="GPUs each Ray task requests (default 0)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="end within this many seconds (needs --cache-dir): a cell starts only if it fits (a cell "
                        "whose model is cached needs its detectors' time so far, one that trains the longest cell "
                        "so far), and a training stops at an epoch boundary with its state kept; "
                        "exit status 3 when work is left (the same command resumes it)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="run the grid in N processes on this machine (needs --cache-dir), each taking the next "
                        "cell no other one holds (--claim), with --time-budget if given, one thread each unless "
                        "OMP_NUM_THREADS says otherwise; each finished cell is collected into --out from the cache "
                        "as it lands")
    p.add_argument("--status", action="store_true",
                   help="print, per cell, the rows --out holds, those the cache's row store would give, whether "
                        "its suspect model is cached, being trained now by another process, or to train, and whether "
                        "a process runs the cell now (--jobs, --claim); runs and writes nothing")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="run only every N-th cell from the I-th (needs --cache-dir): start N processes or machines "
                        "on shared --cache-dir storage, each with its own --out, then run the grid without --shard "
                        "into its --out: it takes every row from the cache")
    p.add_argument("--claim", action="store_true",
                   help="take the cells as they come (needs --cache-dir): start processes or machines on shared "
                        "--cache-dir storage, each with its own --out; each runs the next cell no other one holds, "
                        "then run the grid without --claim into its --out: it takes every row from the cache")
    p.add_argument("--ray-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long to wait for a Ray cluster address to answer before giving up (default 10)")
    _add_noisy_clean(p, "; sets the config's noisy_clean field, which is part of each row's key")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("evaluate", help="measure a model and its detector on the test split under an attack",
                       description="Clean accuracy and attack success rate with and without the detector, AUROC, "
                                   "TPR/FPR at the calibrated threshold, per-class false rejections and cost. "
                                   "Writes metrics.json, report.md and plots. The test data: the model's recorded "
                                   "test split; for a detector made by `defend --clean`, the held-out part of that "
                                   "clean set (split again and checked); or --test PATH. The triggered inputs: the "
                                   "model's recorded attack, --attack NAME (a trigger you know), or your own "
                                   "triggered images (--triggered PATH --target CLASS); none: clean numbers only.")
    p.add_argument("--model", required=True, help="suspect model: a checkpoint written by `badexpert train`, a Hugging "
                   "Face save_pretrained folder, an .onnx file, or package.module:factory (see the model source options)")
    p.add_argument("--detector", required=True, help="detector written by `badexpert defend`")
    _add_data(p, command="evaluate")
    g = p.add_argument_group("your own data (folders or zips of <class>/<image>, or a CSV with a path,label header)")
    g.add_argument("--test", default=None, metavar="PATH",
                   help="evaluate on this labelled test set instead (images the detector was fitted or calibrated on "
                        "are refused unless --allow-overlap)")
    g.add_argument("--clean", default=None, metavar="PATH",
                   help="where the clean set a `defend --clean` detector was made from is now (default: the path it "
                        "records); its held-out part is the test set")
    g.add_argument("--triggered", default=None, metavar="PATH",
                   help="your own images carrying the trigger, in folders of their true classes (any classes); with "
                        "--target, the class the trigger leads to; instead of --attack")
    g.add_argument("--allow-missing-classes", action="store_true",
                   help="with --test: accept a test set without images of some of the model's classes")
    g.add_argument("--image-size", type=_image_size, default=None, metavar="N or HxW",
                   help="input size of a model whose source does not carry it (as given to defend)")
    _add_source(p)
    _add_attack(p, None)
    p.add_argument("--asr-bar", type=float, default=0.5, help="refuse detection numbers below this ASR (default 0.5)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the AUROC interval (default 1000)")
    _add_noisy_clean(p)
    _add_extra_fpr(p)
    p.add_argument("--allow-overlap", action="store_true",
                   help="measure even if the test split shares images with the detector's fitting or calibration "
                        "data (a warning, and the overlap recorded); refused by default")
    p.add_argument("--out", required=True, help="output directory")
    _add_overwrite(p)
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bundle", help="pack a model and its calibrated detector into one deployment file",
                       description="Write one checksummed safetensors file holding the suspect model, the detector, "
                                   "its calibration scores and threshold, and the preprocessing (input size, channels, "
                                   "normalisation, class names): what `badexpert serve` and `export` take.")
    p.add_argument("--model", required=True, help="suspect model: a checkpoint written by `badexpert train`, a Hugging "
                   "Face save_pretrained folder, an .onnx file, or package.module:factory (see the model source options)")
    p.add_argument("--detector", required=True, help="calibrated detector written by `badexpert defend`")
    p.add_argument("--out", required=True, help="bundle file to write (.safetensors)")
    p.add_argument("--image-size", type=_image_size, default=None, metavar="N or HxW",
                   help="input size of a model whose source does not carry it (as given to defend)")
    p.add_argument("--device", default="cpu", help="device the model is loaded on to check it (default cpu)")
    _add_source(p)
    _add_overwrite(p)
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("export", help="export a bundle to one ONNX graph (model, detector networks, score, threshold)",
                       description="Write one ONNX graph holding the bundle's suspect model and its detector's own "
                                   "networks (BaDExpert: backdoor expert and auxiliary model) with the detector's "
                                   "score and calibrated threshold (input 'images' float32 [N, C, H, W] in [0, 1]; "
                                   "outputs label, confidence, score, reject), after checking it against the eager guard with "
                                   "onnxruntime; nothing is written if they disagree. Detectors whose score needs more "
                                   "than the model's outputs and their own networks are refused. Needs the export "
                                   "extra: pip install 'badexpert[export]'.")
    p.add_argument("bundle", help="bundle written by `badexpert bundle`")
    p.add_argument("--onnx", required=True, help="ONNX file to write (.onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    _add_allow_factory(p)
    _add_overwrite(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve a bundle over HTTP: the model's answers with the detector in front",
                       description="Run an HTTP service (FastAPI + uvicorn) around a bundle: POST /v1/classify takes "
                                   "JSON arrays, image uploads or raw uint8 tensors and answers, per input, label, "
                                   "class, confidence, score, conformal p-value and accept/reject with the reason; "
                                   "/healthz, /readyz, /metrics (Prometheus) and /v1/status (with the drift alarm). "
                                   "Concurrent requests are micro-batched. Needs the serve extra: "
                                   "pip install 'badexpert[serve]'.")
    p.add_argument("bundle", nargs="?", default=None, help="bundle written by `badexpert bundle`")
    p.add_argument("--onnx", default=None, metavar="FILE",
                   help="serve an ONNX guard written by `badexpert export` (onnxruntime) instead of a bundle")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port, logged at start)")
    from .serve.settings import add_arguments as add_serve_settings

    add_serve_settings(p)  # one option per Settings field: names, types, defaults and help live there
    _add_allow_factory(p)
    p.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: PyTorch's own)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="JSON log lines on stderr from this level (default info: one line per request)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="print the metadata of a model, detector, bundle or ONNX guard file")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except BadExpertError as exc:  # a usage mistake, or a detector's options that clash
        print(f"badexpert: error: {exc}", file=sys.stderr)
        return 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return int(args.func(args) or 0)
    except BadExpertError as exc:
        print(f"badexpert: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("badexpert: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`): not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
