"""Model sources: every kind of model file badexpert can guard, as one ``nn.Module`` contract.

Whatever the source, :func:`load_model` returns ``(module, metadata)`` where ``module`` takes
float images in ``[0, 1]`` of shape ``[N, C, H, W]`` and returns logits ``[N, num_classes]``
(normalisation happens inside), and ``metadata`` holds the preprocessing (``in_channels``,
``image_size``, ``mean``, ``std``), ``num_classes``, ``classes`` (names or ``None``) and, for
every source but badexpert's own checkpoints, ``source``: what the model was and what rebuilds
it (see :func:`rebuild_model`).

=============== =============================================== =====================================
source          what ``SOURCE`` is                              preprocessing from
=============== =============================================== =====================================
``badexpert``   a checkpoint written by ``badexpert train``     the checkpoint
``huggingface`` a ``save_pretrained`` directory (config.json,   preprocessor_config.json, config
                model.safetensors[, preprocessor_config.json])  (``id2label`` for the class names)
``onnx``        an ``.onnx`` file with one image input          arguments (input shape: sizes)
``factory``     ``package.module:function`` (+ ``weights=``)    arguments
=============== =============================================== =====================================

An ONNX graph whose output is a final ``Softmax`` / ``LogSoftmax`` is converted up to that node's
input, the logits (recorded as ``source["final_activation"]``); see :mod:`badexpert.io.onnx_torch`.

Preprocessing is declared, never guessed: a source that does not carry ``mean``/``std``/
``image_size`` takes them as arguments, and an argument that contradicts what the source declares
is a one-line error. No source imports code the caller did not name: a Hugging Face config with
``auto_map`` (remote code) is refused, and a factory is only imported when its name is the
``SOURCE`` (or listed in ``allow_factories`` when a record is rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..errors import BadExpertError
from ..registry import Registry
from ..utils import resolve_device

#: ``package.module:attribute`` (the attribute may be dotted: ``module:Class.build``).
FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: Seeded probe inputs for the output check and the ONNX conversion check.
PROBE_SEED, PROBE_BATCH = 0, 8


# --- the wrapper ---------------------------------------------------------------------------------


class ImageClassifier(nn.Module):
    """``[0, 1]`` images -> the declared normalisation -> a foreign network -> logits.

    Hugging Face models return an output object; its ``logits`` are taken. The normalisation is
    stored as buffers (``normalize.mean``, ``normalize.std``), the network under ``net``.

    A network runs in the usual memory layout unless its module declares
    ``channels_last_safe = True`` (it reshapes no 4-D activation with ``view``): then it runs in the
    channels-last layout on a CPU, as badexpert's own architectures do
    (:func:`badexpert.models.channels_last`), faster for convolutional networks.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        from ..models import Normalize

        super().__init__()
        self.channels_last_safe = getattr(net, "channels_last_safe", False) is True
        self.normalize = Normalize(list(mean), list(std), channels_last_safe=self.channels_last_safe)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self.normalize(x))
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, dict):
            logits = out.get("logits")
        if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            logits = out[0]
        if not isinstance(logits, torch.Tensor):
            raise BadExpertError(f"the model returned {type(out).__name__}, not a logits tensor")
        return logits


# --- declared preprocessing ----------------------------------------------------------------------


def _floats(value: Any, name: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise BadExpertError(f"{name} must be a list of numbers, got {value!r:.80}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise BadExpertError(f"{name} must be a non-empty list of finite numbers, got {value!r:.80}")
    return out


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in re.split(r"[x,\s]+", value.strip()) if v]
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise BadExpertError(f"image_size must be an integer or (height, width), got {value!r:.80}") from None
    if len(out) == 1:
        out = out * 2
    if len(out) != 2 or not all(1 <= v <= 4096 for v in out):
        raise BadExpertError(f"image_size must be one or two integers from 1 to 4096, got {value!r:.80}")
    return out  # type: ignore[return-value]


def _classes(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    if isinstance(value, dict):  # {index: name}
        try:
            value = [value[k] for k in sorted(value, key=int)]
        except (TypeError, ValueError):
            raise BadExpertError("classes given as a mapping must map class indices to names") from None
    value = list(value)
    if not value or not all(isinstance(v, str) and v for v in value):
        raise BadExpertError("classes must be a non-empty list of class names")
    if len(set(value)) != len(value):
        dup = next(v for v in value if value.count(v) > 1)
        raise BadExpertError(f"classes name '{dup}' twice; each class needs its own name")
    return value


def declared(mean=None, std=None, image_size=None, classes=None, in_channels=None) -> dict[str, Any]:
    """The preprocessing a caller declares, parsed and checked (``None`` where not given)."""
    out = {"mean": _floats(mean, "mean"), "std": _floats(std, "std"), "image_size": _size(image_size),
           "classes": _classes(classes), "in_channels": None}
    if in_channels is not None:
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or not 1 <= in_channels <= 64:
            raise BadExpertError(f"in_channels must be an integer from 1 to 64, got {in_channels!r}")
        out["in_channels"] = in_channels
    if out["std"] is not None and not all(v > 0 for v in out["std"]):
        raise BadExpertError(f"std must be positive, got {out['std']}")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-7)
    return a == b


def merge(carried: dict[str, Any], decl: dict[str, Any], source: str) -> dict[str, Any]:
    """What the source carries, completed by what the caller declares; a declared value that
    contradicts the source is a one-line error (never a silent override)."""
    out = dict(carried)
    for key, value in decl.items():
        if value is None:
            continue
        have = carried.get(key)
        if have is not None and not _same(list(have) if isinstance(have, tuple) else have,
                                          list(value) if isinstance(value, tuple) else value):
            shown = have if key != "classes" else ",".join(have)
            raise BadExpertError(f"{key}={_short(value)} contradicts {source}, which declares {key}={_short(shown)}; "
                                 f"leave {key} out or load the right model")
        out[key] = value
    return out


def _short(v: Any) -> str:
    s = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _require(meta: dict[str, Any], keys: Iterable[str], source: str, why: str) -> None:
    missing = [k for k in keys if meta.get(k) is None]
    if missing:
        raise BadExpertError(f"{source} does not declare its {', '.join(missing)}{why}; pass "
                             f"{', '.join(f'{k}=...' for k in missing)} (preprocessing is never guessed)")


def channels(meta: dict[str, Any], source: str) -> int:
    """Fill ``in_channels`` (from the source, else from mean/std) and give mean/std one value per
    channel (a single value is repeated); returns the number of channels."""
    nm, ns = len(meta["mean"]), len(meta["std"])
    if meta.get("in_channels") is None and nm != ns and 1 not in (nm, ns):
        raise BadExpertError(f"mean has {nm} values and std has {ns} for {source}; give one per input channel")
    c = meta.get("in_channels") or max(nm, ns)
    meta["in_channels"] = c
    for key in ("mean", "std"):
        if len(meta[key]) == 1 and c > 1:
            meta[key] = meta[key] * c
        if len(meta[key]) != c:
            raise BadExpertError(f"{key} has {len(meta[key])} values for the {c} input channels of {source}")
    return c


def finish(module: nn.Module, meta: dict[str, Any], source: str) -> tuple[nn.Module, dict[str, Any]]:
    """Check channels against mean/std, probe the module on a seeded batch (logits must be
    ``[N, C]`` and finite), and fill ``num_classes`` (and check ``classes`` against it)."""
    c = channels(meta, source)
    h, w = meta["image_size"]
    module.eval()
    x = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(PROBE_SEED))
    try:
        with torch.no_grad():
            out = module(x.to(next((p.device for p in module.parameters()), torch.device("cpu"))))
    except BadExpertError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a user's model on a declared input is reported
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise BadExpertError(f"{source} fails on a batch of {c}x{h}x{w} images ({type(exc).__name__}: {first}); "
                             "check in_channels and image_size") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadExpertError(f"{source} returns {shape} for a batch of 2 images, not logits [N, num_classes]")
    if not torch.isfinite(out).all():
        raise BadExpertError(f"{source} returns non-finite logits on [0, 1] images; check its weights and mean/std")
    n = int(out.shape[1])
    if meta.get("num_classes") is not None and meta["num_classes"] != n:
        raise BadExpertError(f"{source} declares {meta['num_classes']} classes but returns {n} logits")
    meta["num_classes"] = n
    if meta.get("classes") is not None and len(meta["classes"]) != n:
        raise BadExpertError(f"{len(meta['classes'])} class names given for a model with {n} classes "
                             f"({source}); name every class, in the model's label order")
    meta["image_size"] = [h, w]
    return module, meta


def _meta(kind: str, carried: dict, decl: dict, source: str, record: dict) -> dict[str, Any]:
    meta = merge(carried, decl, source)
    meta.update(arch=kind, width=None, source={"kind": kind, **record})
    return meta


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


# --- the sources ---------------------------------------------------------------------------------


class ModelSource:
    """One kind of model file. ``detect`` says whether a SOURCE string is of this kind (without
    importing anything), ``load`` returns ``(module, metadata)``, ``rebuild`` makes the same
    module again from the metadata's ``source`` record and the module's state dict."""

    name = ""
    #: The optional extra this source needs, for messages.
    extra: str | None = None

    def detect(self, source: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def load(self, source: str, decl: dict[str, Any], **options) -> tuple[nn.Module, dict[str, Any]]:
        raise NotImplementedError  # pragma: no cover - interface

    def rebuild(self, meta: dict[str, Any], state: dict[str, torch.Tensor], **options) -> nn.Module:
        raise NotImplementedError  # pragma: no cover - interface


SOURCES: Registry = Registry("model source", aliases={"checkpoint": "badexpert", "hf": "huggingface",
                                                      "transformers": "huggingface", "module": "factory"})


@SOURCES.register("badexpert")
class CheckpointSource(ModelSource):
    """badexpert's own checkpoints (``badexpert train``): safetensors with JSON metadata."""

    name = "badexpert"

    def detect(self, source: str) -> bool:
        p = Path(source)
        if not p.is_file():
            return False
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as fh:
                return "badexpert" in (fh.metadata() or {})
        except Exception:  # noqa: BLE001 - not a safetensors file at all
            return False

    def load(self, source, decl, *, device="cpu", **options):
        from .checkpoints import load_model as load_checkpoint

        _no_options(options, self.name)
        model, meta = load_checkpoint(source, device=device)
        carried = {k: meta.get(k) for k in ("mean", "std", "image_size", "classes", "in_channels")}
        carried["image_size"] = tuple(carried["image_size"])
        # classes are optional in a checkpoint: a declared list fills them in (and must fit)
        merged = merge(carried, decl, f"checkpoint '{source}'")
        if merged.get("classes") is not None and len(merged["classes"]) != meta["num_classes"]:
            raise BadExpertError(f"{len(merged['classes'])} class names given for a model with {meta['num_classes']} "
                                 f"classes (checkpoint '{source}'); name every class, in the model's label order")
        if decl.get("classes") is not None:
            meta["classes"] = merged["classes"]
        return model, meta

    def rebuild(self, meta, state, **options):
        from .checkpoints import build_checked, check_architecture, load_weights

        check_architecture(meta, {k: tuple(v.shape) for k, v in state.items()}, "the model record")
        model = build_checked(meta)
        load_weights(model, state, source="the model record", arch=meta["arch"])
        return model.eval()


def _no_options(options: dict, kind: str) -> None:
    extra = [k for k, v in options.items() if v is not None]
    if extra:
        raise BadExpertError(f"{', '.join(extra)} do{'es' if len(extra) == 1 else ''} not apply to a {kind} model")


# Hugging Face ---------------------------------------------------------------------------------


def _hf_preprocessing(pre: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Mean, std (for [0, 1] inputs) and input size from a preprocessor config (and the model
    config's ``image_size`` / ``num_channels``)."""
    out: dict[str, Any] = {"in_channels": cfg.get("num_channels")}
    size = None
    if pre:
        if pre.get("do_center_crop") and pre.get("crop_size"):
            size = pre["crop_size"]
        elif pre.get("size") is not None:
            size = pre["size"]
        if isinstance(size, dict):
            if "height" in size and "width" in size:
                size = (size["height"], size["width"])
            elif "shortest_edge" in size:  # resized (and centre-cropped) to a square of that side
                size = (size["shortest_edge"],) * 2
            else:
                size = None
        # pixel p in [0, 255] = 255 x; the model sees ((p * rescale) - mean) / std
        k = 255.0 * float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 255.0
        if pre.get("do_normalize", True) and pre.get("image_mean") is not None:
            mean = _floats(pre["image_mean"], "image_mean")
            std = _floats(pre.get("image_std", [1.0] * len(mean)), "image_std")
            out["mean"], out["std"] = [m / k for m in mean], [s / k for s in std]
        elif not pre.get("do_normalize", True):
            n = out["in_channels"] or 3
            out["mean"], out["std"] = [0.0] * n, [1.0 / k] * n
    if size is None and cfg.get("image_size") is not None:
        size = cfg["image_size"]
    out["image_size"] = _size(size) if size is not None else None
    labels = cfg.get("id2label") or {}
    try:
        names = [str(labels[k]) for k in sorted(labels, key=int)]
    except (TypeError, ValueError):
        names = []
    placeholder = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    out["classes"] = None if not names or placeholder else names
    if names:
        out["num_classes"] = len(names)
    return out


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadExpertError(f"{what} '{path}' is not readable JSON ({_first_line(exc)})") from exc
    if not isinstance(data, dict):
        raise BadExpertError(f"{what} '{path}' is not a JSON object")
    return data


def _hf_config(cfg: dict[str, Any], source: str):
    """The transformers config object of a config.json (no remote code: ``auto_map`` is refused)."""
    if "auto_map" in cfg:
        raise BadExpertError(f"{source} needs remote code (its config.json has auto_map); badexpert never runs code "
                             "shipped with a model: use a model class built into transformers")
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError as exc:
        raise BadExpertError("Hugging Face models need transformers: pip install 'badexpert[hf]'") from exc
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str):
        raise BadExpertError(f"{source}: config.json has no model_type; it is not a transformers model")
    try:
        return AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k != "model_type"})
    except (ValueError, KeyError, TypeError) as exc:
        raise BadExpertError(f"{source}: transformers {transformers.__version__} does not know model type "
                             f"'{model_type}' ({_first_line(exc)})") from exc


def _not_classifier(cfg: dict[str, Any], source: str, exc: BaseException) -> BadExpertError:
    arch = ",".join(cfg.get("architectures") or [str(cfg.get("model_type"))])
    return BadExpertError(f"{source} ({arch}) is not an image classifier transformers can build ({_first_line(exc)})")


def _hf_build(cfg: dict[str, Any], source: str) -> nn.Module:
    """An untrained model of the config's architecture, built by transformers (no remote code)."""
    config = _hf_config(cfg, source)
    from transformers import AutoModelForImageClassification

    try:
        return AutoModelForImageClassification.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _not_classifier(cfg, source, exc) from exc


def _hf_pretrained(d: Path, cfg: dict[str, Any], source: str) -> nn.Module:
    """The saved model, loaded by transformers from local safetensors only; any weight that is
    missing, unexpected or misshapen is a one-line refusal (never a silently fresh layer)."""
    config = _hf_config(cfg, source)
    from transformers import AutoModelForImageClassification

    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report and progress bars: badexpert reports in one line
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForImageClassification.from_pretrained(
            str(d), config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True,
            output_loading_info=True)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, RuntimeError) as exc:
        if "Unrecognized configuration class" in str(exc):
            raise _not_classifier(cfg, source, exc) from exc
        if "mismatched_sizes" in str(exc) or "size mismatch" in str(exc):
            raise BadExpertError(f"the weights of {source} do not fit the architecture in its config.json "
                                 "(tensor shapes differ)") from exc
        raise BadExpertError(f"cannot load the weights of {source} ({_first_line(exc)})") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    wrong = list(info.get("mismatched_keys") or [])
    if missing or unexpected or wrong:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                 f"misshapen {wrong[0][0] if isinstance(wrong[0], tuple) else wrong[0]}")
        raise BadExpertError(f"the weights of {source} do not fit the architecture in its config.json "
                             f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} misshapen; "
                             f"first: {first})")
    return model.eval()


@SOURCES.register("huggingface")
class HuggingFaceSource(ModelSource):
    """A Hugging Face image classifier saved with ``save_pretrained`` (safetensors weights)."""

    name = "huggingface"
    extra = "hf"

    def detect(self, source: str) -> bool:
        return Path(source).is_dir() and (Path(source) / "config.json").is_file()

    def load(self, source, decl, *, device="cpu", **options):
        _no_options(options, self.name)
        d = Path(source)
        where = f"Hugging Face model '{d}'"
        cfg = _read_json(d / "config.json", "config")
        pre_path = d / "preprocessor_config.json"
        pre = _read_json(pre_path, "preprocessor config") if pre_path.is_file() else {}
        if not (d / "model.safetensors").is_file() and not (d / "model.safetensors.index.json").is_file():
            other = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".h5", ".msgpack")]
            raise BadExpertError(f"{where} has no model.safetensors" + (
                f" (only {', '.join(sorted(other)[:3])}, which badexpert does not unpickle); re-save it with "
                "save_pretrained(safe_serialization=True)" if other else "; save it with save_pretrained"))
        if "auto_map" in cfg:
            _hf_config(cfg, where)  # the remote-code refusal, before anything else
        carried = _hf_preprocessing(pre, cfg)
        num_classes = carried.pop("num_classes", None)
        record = {"path": str(d.resolve()), "config": cfg, "preprocessor": pre or None}
        meta = _meta(self.name, carried, decl, where, record)
        _require(meta, ("mean", "std"), where, " (no preprocessor_config.json)" if not pre else "")
        _require(meta, ("image_size",), where, "")
        meta["num_classes"] = num_classes
        channels(meta, where)
        module = _hf_pretrained(d, cfg, where)
        meta["source"]["model_class"] = type(module).__name__
        wrapped = ImageClassifier(module, meta["mean"], meta["std"]).to(resolve_device(device))
        return finish(wrapped, meta, where)

    def rebuild(self, meta, state, **options):
        net = _hf_build(meta["source"]["config"], "the model record")
        model = ImageClassifier(net, meta["mean"], meta["std"])
        _strict_load(model, state, "the model record")
        return model.eval()


def _strict_load(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), _first_line(exc))
        raise BadExpertError(f"the weights of {where} do not fit its model ({first[:160]})") from exc


# ONNX -----------------------------------------------------------------------------------------


@SOURCES.register("onnx")
class OnnxSource(ModelSource):
    """An ONNX image classifier, converted to a trainable module and checked against onnxruntime."""

    name = "onnx"
    extra = "export"

    def detect(self, source: str) -> bool:
        return Path(source).is_file() and Path(source).suffix.lower() == ".onnx"

    def load(self, source, decl, *, device="cpu", tolerance=None, **options):
        _no_options(options, self.name)
        p = Path(source)
        where = f"ONNX model '{p}'"
        if not p.is_file():
            raise BadExpertError(f"{where} does not exist")
        data = p.read_bytes()
        module, meta = self._convert(data, decl, where, tolerance)
        meta["source"].update(path=str(p.resolve()))
        return module.to(resolve_device(device)), meta

    def _convert(self, data: bytes, decl: dict, where: str, tolerance: float | None):
        try:
            import onnx
        except ImportError as exc:
            raise BadExpertError("ONNX models need onnx and onnxruntime: pip install 'badexpert[export]'") from exc
        from .onnx_torch import ATOL, graph_io, input_dims, onnx_to_torch, strip_final_activation, verify_conversion

        try:
            model = onnx.load_from_string(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise BadExpertError(f"{where} is not a readable ONNX file ({_first_line(exc)})") from exc
        inputs, outputs = graph_io(model)
        if len(inputs) != 1:
            raise BadExpertError(f"{where} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); badexpert "
                                 "guards image classifiers with one image input [N, C, H, W]")
        if len(outputs) != 1:
            raise BadExpertError(f"{where} has {len(outputs)} outputs ({', '.join(o.name for o in outputs)}); "
                                 "badexpert guards classifiers with one logits output [N, num_classes]")
        inp = inputs[0]
        elem = inp.type.tensor_type.elem_type if inp.type.HasField("tensor_type") else 0
        dims = input_dims(inp)
        if elem not in (1, 10, 11) or len(dims) != 4:
            raise BadExpertError(f"{where}: input '{inp.name}' is a {len(dims)}-D tensor of ONNX type {elem}, not a "
                                 "float image batch [N, C, H, W]")
        fixed = lambda v: v if isinstance(v, int) and v > 0 else None  # noqa: E731
        carried = {"in_channels": fixed(dims[1]),
                   "image_size": (dims[2], dims[3]) if fixed(dims[2]) and fixed(dims[3]) else None}
        meta = _meta(self.name, carried, decl, where, {})
        _require(meta, ("mean", "std"), where, " (ONNX files do not record it; mean=[0]*C, std=[1]*C if the "
                                               "graph takes [0, 1] images)")
        _require(meta, ("image_size",), where, " (its input size is dynamic)")
        channels(meta, where)
        # a graph ending in Softmax / LogSoftmax gives probabilities: its logits are that node's input
        model, activation = strip_final_activation(model)
        net = onnx_to_torch(model, where)
        module = ImageClassifier(net, meta["mean"], meta["std"])
        module, meta = finish(module, meta, where)
        # the conversion check: seeded [0, 1] images, normalised as declared, through both runtimes
        # (for a stripped graph, onnxruntime runs the same graph up to the logits)
        c, (h, w) = meta["in_channels"], meta["image_size"]
        x = torch.rand(PROBE_BATCH, c, h, w, generator=torch.Generator().manual_seed(PROBE_SEED))
        with torch.no_grad():
            xn = module.normalize(x).float()
        atol = ATOL if tolerance is None else float(tolerance)
        batch = fixed(dims[0])
        checked_bytes = data if activation is None else model.SerializeToString()
        diff = verify_conversion(checked_bytes, net, xn, where, atol=atol, batch=batch)
        meta["source"].update(sha256=hashlib.sha256(data).hexdigest(), opset=net.opset, input=inp.name,
                              fixed_batch=batch, max_logit_diff=diff, tolerance=atol, final_activation=activation)
        return module.train(False), meta

    def rebuild(self, meta, state, *, onnx_bytes: bytes | None = None, **options):
        if onnx_bytes is None:
            raise BadExpertError("rebuilding an ONNX model needs the ONNX file's bytes")
        rec = meta["source"]
        if hashlib.sha256(onnx_bytes).hexdigest() != rec.get("sha256"):
            raise BadExpertError("the ONNX bytes do not match the model record (sha256 differs)")
        decl = {k: meta.get(k) for k in ("mean", "std", "in_channels")}
        decl["image_size"] = tuple(meta["image_size"])
        module, _ = self._convert(onnx_bytes, declared(**decl), "the ONNX model record", rec.get("tolerance"))
        _strict_load(module, state, "the ONNX model record")
        return module.eval()


# A user's own nn.Module -----------------------------------------------------------------------


def _import_factory(ref: str, where: str):
    import importlib

    mod_name, _, attr = ref.partition(":")
    try:
        obj = importlib.import_module(mod_name)
    except Exception as exc:  # noqa: BLE001 - the user's module may fail in any way while importing
        raise BadExpertError(f"cannot import module '{mod_name}' of {where} ({type(exc).__name__}: "
                             f"{_first_line(exc)}); check the name and that it is on PYTHONPATH") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadExpertError(f"module '{mod_name}' has no '{attr}' ({where})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadExpertError(f"'{ref}' is not callable ({where})")
    return obj


def _kwargs(kwargs: Any) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise BadExpertError(f"the factory's keyword arguments are not valid JSON ({exc.msg})") from exc
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise BadExpertError("the factory's keyword arguments must be a JSON object")
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as exc:
        raise BadExpertError(f"the factory's keyword arguments must be JSON values ({exc})") from exc
    return kwargs


@SOURCES.register("factory")
class FactorySource(ModelSource):
    """A user's ``nn.Module``: ``package.module:factory`` called with JSON keyword arguments, then
    its weights (safetensors, or a state dict read with ``weights_only=True``) loaded strictly."""

    name = "factory"

    def detect(self, source: str) -> bool:
        return bool(FACTORY_RE.match(source)) and not Path(source).exists()

    def load(self, source, decl, *, device="cpu", weights=None, kwargs=None, **options):
        _no_options(options, self.name)
        where = f"factory '{source}'"
        kw = _kwargs(kwargs)
        meta = _meta(self.name, {}, decl, where, {"factory": source, "kwargs": kw,
                                                    "weights": str(Path(weights).resolve()) if weights else None})
        _require(meta, ("mean", "std", "image_size"), where, " (a factory carries no preprocessing; mean=[0]*C, "
                                                             "std=[1]*C if the module takes [0, 1] images)")
        channels(meta, where)
        state = None
        if weights is not None:
            from .checkpoints import load_state_dict_file

            state = load_state_dict_file(weights)
        net = self._build(source, kw, where)
        if state is not None:
            _strict_load(net, state, f"'{weights}' ({where})")
            meta["source"]["weights_sha256"] = _weights_digest(net)
        module = ImageClassifier(net.eval(), meta["mean"], meta["std"]).to(resolve_device(device))
        return finish(module, meta, where)

    @staticmethod
    def _build(ref: str, kw: dict, where: str) -> nn.Module:
        factory = _import_factory(ref, where)
        try:
            net = factory(**kw)
        except Exception as exc:  # noqa: BLE001 - the user's factory may fail in any way
            raise BadExpertError(f"{where} failed with keyword arguments {json.dumps(kw)[:80]} "
                                 f"({type(exc).__name__}: {_first_line(exc)})") from exc
        if not isinstance(net, nn.Module):
            raise BadExpertError(f"{where} returned {type(net).__name__}, not a torch.nn.Module")
        return net

    def rebuild(self, meta, state, *, allow_factories: Iterable[str] = (), **options):
        rec = meta["source"]
        ref = rec.get("factory")
        if ref not in set(allow_factories):
            raise BadExpertError(f"this model is built by the factory '{ref}'; badexpert imports it only when you "
                                 "name it (allow it explicitly)")
        net = self._build(ref, rec.get("kwargs") or {}, f"factory '{ref}'")
        model = ImageClassifier(net, meta["mean"], meta["std"])
        _strict_load(model, state, f"factory '{ref}'")
        return model.eval()


def _weights_digest(module: nn.Module) -> str:
    from .checkpoints import model_fingerprint

    return model_fingerprint(module)


# --- entry points --------------------------------------------------------------------------------


def detect_source(source: str | Path) -> str:
    """The name of the model source a SOURCE string is, without importing anything; one line
    when none fits."""
    s = str(source)
    for name, cls in SOURCES.items():
        if cls().detect(s):
            return name
    p = Path(s)
    if p.is_dir():
        raise BadExpertError(f"'{p}' is a directory but not a saved model (no config.json); give a Hugging Face "
                             "save_pretrained directory, a .onnx file, a badexpert checkpoint or module:factory")
    if p.is_file():
        if p.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
            raise BadExpertError(f"'{p}' is not a badexpert model checkpoint, a Hugging Face directory or an ONNX "
                                 "file; for a state dict of your own network, give its module:factory as the model "
                                 "and this file as weights=")
        return "badexpert"  # anything else gets the checkpoint reader's own diagnosis (corrupt, wrong format...)
    if ":" in s and not FACTORY_RE.match(s):
        raise BadExpertError(f"'{s}' is neither an existing file nor a factory reference 'package.module:function'")
    raise BadExpertError(f"model '{s}' does not exist (a file, a directory, or package.module:function)")


def load_model(source: str | Path, *, device: str | torch.device | None = "cpu", kind: str | None = None,
               mean=None, std=None, image_size=None, classes=None, in_channels: int | None = None,
               weights: str | Path | None = None, kwargs: dict | str | None = None,
               tolerance: float | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model from any source as ``(module, metadata)`` (see the module docstring).

    ``kind`` names the source (``badexpert``, ``huggingface``, ``onnx``, ``factory``) when it
    should not be detected. ``mean``, ``std`` (per channel, for ``[0, 1]`` inputs),
    ``image_size`` (``int`` or ``(h, w)``), ``classes`` (names in label order, a list or a comma
    string) and ``in_channels`` declare the preprocessing a source does not carry; they must agree
    with what it does. ``weights`` and ``kwargs`` (a dict or a JSON object) go with a
    ``module:factory``; ``tolerance`` overrides the ONNX conversion check's
    (:data:`badexpert.io.onnx_torch.ATOL`).
    """
    from ..validation import expect, expect_finite_model
    from os import PathLike

    expect(source, (str, PathLike), "the model source")
    decl = declared(mean, std, image_size, classes, in_channels)
    name = SOURCES.canonical(kind) if kind is not None else detect_source(source)
    # each source takes the options it names and refuses the others in one line (_no_options)
    options = {k: v for k, v in (("weights", weights), ("kwargs", kwargs), ("tolerance", tolerance)) if v is not None}
    model, meta = SOURCES[name]().load(str(source), decl, device=device, **options)
    expect_finite_model(model, f"the model '{source}'")
    return model, meta


def rebuild_model(meta: dict[str, Any], state: dict[str, torch.Tensor], *, onnx_bytes: bytes | None = None,
                  allow_factories: Iterable[str] = ()) -> nn.Module:
    """The module :func:`load_model` returned, made again from its metadata and state dict
    (what a bundle stores): badexpert checkpoints from their architecture fields, Hugging Face
    models from the recorded config, ONNX models from ``onnx_bytes`` (checked against the
    recorded digest and onnxruntime), factories only when listed in ``allow_factories``."""
    kind = (meta.get("source") or {}).get("kind", "badexpert")
    options = {"onnx_bytes": onnx_bytes} if kind == "onnx" else \
        {"allow_factories": allow_factories} if kind == "factory" else {}
    return SOURCES[SOURCES.canonical(kind)]().rebuild(meta, state, **options)


__all__ = ["FACTORY_RE", "ImageClassifier", "ModelSource", "SOURCES", "declared", "detect_source", "load_model",
           "merge", "rebuild_model"]
