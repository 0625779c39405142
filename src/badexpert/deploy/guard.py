"""A detector in front of its model, for deployment: :class:`Guard` and the bundle file.

``Guard(model, detector)`` is an ``nn.Module``: its forward takes a batch (uint8 ``[0, 255]`` or
float ``[0, 1]``, by the package's one conversion rule) and returns, per input, the model's label
and confidence, the detector's score, a conformal p-value against the calibration scores and the
reject flag, with the reason. The suspect model runs once per input and its logits are handed to
the detector (BaDExpert needs the model's label anyway), so a BaDExpert guard costs three passes;
with a shared trunk (``BaDExpert(shared_trunk=...)``) the layers before the cut run once and feed
the model's head, the expert's and the auxiliary model's (:meth:`Detector.logits_and_score`).

The p-value of a score ``s`` is ``(1 + #{calibration scores >= s}) / (n + 1)``: for a clean input
exchangeable with the calibration split it is (super-)uniform, so ``p <= alpha`` happens with
probability at most ``alpha``; rejection itself uses the calibrated threshold
(:meth:`Detector.decide`), and an input that could not be scored has p-value 0 and is rejected.

Rejected inputs are handled by ``policy``: ``"flag"`` (return everything, the caller reads
``reject``), ``"abstain"`` (their label becomes ``abstain_label``, -1 by default) or ``"raise"``
(:class:`RejectedInputError` if any input of the batch is rejected).

A **bundle** (:func:`save_bundle` / :func:`load_bundle`) is one safetensors file with everything
a deployment needs: the suspect model's weights and architecture, the detector's state, the
calibration scores and threshold, the preprocessing (input size, channels, normalisation, class
names), the model's weights fingerprint, and a SHA-256 checksum over all of it, verified before
anything is built. Nothing is pickled. A model of badexpert's own architectures is rebuilt from
its architecture fields (format ``badexpert-bundle/1``); a model from another source (format
``badexpert-bundle/2``) from its source record (:func:`badexpert.io.rebuild_model`): a Hugging
Face config, the ONNX file's bytes (tensor ``source.onnx``, SHA-256 recorded) or a factory
reference with its keyword arguments, which is imported only when the caller allows it by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..data.core import to_float
from ..detectors.base import Detector, check_detector_meta, detector_from_state
from ..digests import BUNDLE_FRAME, canonical_json, update_tensors
from ..errors import BadExpertError, NotFittedError
from ..runtime.pvalues import conformal_p_values as runtime_p_values
from ..runtime.pvalues import sorted_calibration
from ..runtime.reasons import ACCEPTED, reject_reasons
from ..utils import atomic_write_bytes, eval_mode, to_jsonable
from ..validation import check_value, expect

#: Bundles of badexpert's own architectures (rebuilt from the architecture fields).
BUNDLE_FORMAT = "badexpert-bundle/1"
#: Bundles of a model from another source (Hugging Face, ONNX, a user's factory): the model
#: section carries the source record that :func:`badexpert.io.rebuild_model` takes.
SOURCE_BUNDLE_FORMAT = "badexpert-bundle/2"
BUNDLE_FORMATS = (BUNDLE_FORMAT, SOURCE_BUNDLE_FORMAT)
#: The tensor of a bundle that holds an ONNX-sourced model's file (uint8 bytes).
ONNX_TENSOR = "source.onnx"
#: Model sources a bundle of format 2 may record.
FOREIGN_SOURCES = ("huggingface", "onnx", "factory")
POLICIES = ("flag", "abstain", "raise")


class RejectedInputError(BadExpertError):
    """Raised by a guard with ``policy="raise"`` when an input is rejected."""

    def __init__(self, message: str, output: "GuardOutput") -> None:
        super().__init__(message)
        self.output = output


class GuardOutput(NamedTuple):
    """Per-input results of a guard (tensors on the CPU, first dimension the batch)."""

    label: torch.Tensor  #: int64: the model's label (``abstain_label`` where rejected under "abstain")
    confidence: torch.Tensor  #: float32: the model's softmax probability of its label
    score: torch.Tensor  #: float32: the detector's score (NaN: could not be scored)
    p_value: torch.Tensor  #: float32: conformal p-value of the score against the calibration scores
    reject: torch.Tensor  #: bool: True = rejected
    reason: list[str]  #: why each input was accepted or rejected


def conformal_p_values(scores: torch.Tensor, calibration: torch.Tensor) -> torch.Tensor:
    """``(1 + #{calibration >= s}) / (n + 1)`` per score; 0 for a NaN score (never clean): the
    runtime's :func:`badexpert.runtime.pvalues.conformal_p_values` on tensors."""
    cal = sorted_calibration(calibration.detach().double().cpu().numpy())
    return torch.from_numpy(runtime_p_values(scores.detach().double().cpu().numpy(), cal))


class Guard(nn.Module):
    """A suspect model behind its calibrated detector (see the module docstring).

    ``detector`` must be fitted on ``model`` (checked by weights fingerprint) and calibrated.
    ``meta`` carries preprocessing facts for services (``classes``, ``image_size``...).
    """

    def __init__(self, model: nn.Module, detector: Detector, *, policy: str = "flag", abstain_label: int = -1,
                 meta: dict | None = None) -> None:
        super().__init__()
        expect(model, nn.Module, "the model")
        expect(detector, Detector, "the detector")
        if not hasattr(detector, "threshold_"):
            raise NotFittedError("a guard needs a calibrated detector: call fit() then calibrate()")
        if not isinstance(policy, str) or policy not in POLICIES:
            raise BadExpertError(f"unknown guard policy {policy!r}; choose one of: {', '.join(POLICIES)}")
        abstain_label = check_value(abstain_label, int, "abstain_label", "the guard's parameter")
        detector.check_model(model)
        self.model = model
        self.detector = detector
        self.policy = policy
        self.abstain_label = abstain_label
        self.meta = dict(meta or {})
        self._calibration = sorted_calibration(detector.calibration_scores_.detach().double().cpu().numpy())

    @property
    def classes(self) -> list[str] | None:
        return self.meta.get("classes") or (self.detector.data_info_ or {}).get("classes")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.detector.input_shape_)

    @property
    def forward_passes_per_input(self) -> int:
        d = self.detector
        return d.cost["forward"] + (0 if d.shares_model_pass else 1)

    def p_values(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runtime_p_values(scores.detach().double().cpu().numpy(), self._calibration))

    @torch.no_grad()
    def forward(self, x) -> GuardOutput:
        det = self.detector
        images, bad = det._scorable(x)  # the conversion rule; NaN/inf images zeroed and marked
        labels, confs, scores = [], [], []
        device = det.device_
        model = det.model_  # the suspect model on the detector's device (the same object when already there)
        with eval_mode(model):
            for start in range(0, len(images), det.batch_size):
                xb = to_float(images[start : start + det.batch_size]).to(device)
                logits, score = det.logits_and_score(xb)  # one model pass, shared with the detector
                prob = torch.softmax(logits.float(), 1)
                conf, label = prob.max(1)
                labels.append(label.cpu())
                confs.append(conf.cpu())
                scores.append(score.float().cpu())
        if labels:
            label, conf, score = torch.cat(labels), torch.cat(confs), torch.cat(scores)
        else:
            label, conf, score = torch.empty(0, dtype=torch.int64), torch.empty(0), torch.empty(0)
        score[bad] = float("nan")
        conf[bad] = float("nan")
        reject = det.decide(score)
        reason = reject_reasons(reject, score, bad)
        if self.policy == "abstain":
            label = torch.where(reject, torch.full_like(label, self.abstain_label), label)
        out = GuardOutput(label, conf, score, self.p_values(score), reject, reason)
        if self.policy == "raise" and bool(reject.any()):
            n = int(reject.sum())
            first = next(r for r in reason if r != ACCEPTED)
            raise RejectedInputError(f"{n} of {len(reject)} input(s) rejected by the {det.name} guard ({first})", out)
        return out


# --- bundles ---------------------------------------------------------------------------------------
def _checksum(meta: dict, tensors: dict[str, torch.Tensor]) -> str:
    """``sha256:`` over the metadata (less its checksum) as canonical JSON, then the tensors."""
    h = hashlib.sha256(canonical_json({k: v for k, v in meta.items() if k != "checksum"}, jsonable=False).encode())
    update_tensors(h, tensors, BUNDLE_FRAME)
    return "sha256:" + h.hexdigest()


def save_bundle(path: str | Path, model: nn.Module, detector: Detector, model_meta: dict, *,
                onnx_bytes: bytes | None = None) -> Path:
    """Write model, detector, calibration record and preprocessing to one checksummed file.

    ``model_meta`` is the metadata :func:`badexpert.io.load_model` returns with the model. A
    badexpert checkpoint's model is rebuilt from its architecture fields (format
    ``badexpert-bundle/1``); a model from another source (format ``badexpert-bundle/2``) from its
    ``source`` record: a Hugging Face config (JSON), an ONNX file (its bytes are stored as the
    uint8 tensor ``source.onnx``, read from the recorded path unless ``onnx_bytes`` is given, and
    must match the recorded SHA-256) or a factory reference with its keyword arguments; in every
    case with the loaded module's weights.
    """
    from safetensors.torch import save

    from ..io import check_model_meta, model_fingerprint

    expect(model, nn.Module, "the model")
    expect(detector, Detector, "the detector")
    if not hasattr(detector, "threshold_"):
        raise NotFittedError("a bundle needs a calibrated detector: call fit() then calibrate()")
    detector.check_model(model)
    expect(model_meta, dict, "the model metadata")
    mm = check_model_meta(dict(to_jsonable({k: v for k, v in model_meta.items() if k != "attack_state"})),
                          "the model metadata")
    det_tensors, det_meta = detector.to_state()
    tensors = _model_tensors(model)
    tensors.update({f"detector.{k}": v for k, v in det_tensors.items()})
    keep = ("arch", "width", "in_channels", "num_classes", "image_size", "mean", "std", "classes", "hflip",
            "dataset", "attack", "seed", "badexpert_version")
    kind = (mm.get("source") or {}).get("kind", "badexpert") if isinstance(mm.get("source"), dict) else "badexpert"
    fmt = BUNDLE_FORMAT
    model_section = {**{k: mm[k] for k in keep if k in mm}, "fingerprint": model_fingerprint(model)}
    if kind != "badexpert":
        if kind not in FOREIGN_SOURCES:
            raise BadExpertError(f"cannot bundle a model of source '{kind}'; bundles take "
                                 f"badexpert, {', '.join(FOREIGN_SOURCES)} models")
        fmt = SOURCE_BUNDLE_FORMAT
        record = dict(mm["source"])
        model_section["source"] = record
        if kind == "onnx":
            tensors[ONNX_TENSOR] = _onnx_payload(record, onnx_bytes)
        elif onnx_bytes is not None:
            raise BadExpertError(f"onnx_bytes goes with an ONNX-sourced model, not a {kind} one")
    elif onnx_bytes is not None:
        raise BadExpertError("onnx_bytes goes with an ONNX-sourced model, not a badexpert checkpoint")
    meta = {
        "format": fmt,
        "model": model_section,
        "detector": det_meta,
    }
    meta["checksum"] = _checksum(meta, tensors)
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata={"badexpert": json.dumps(meta)}))
    return path


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.``-prefixed weights, each its own storage (safetensors refuses shared tensors,
    which tied weights of a foreign model would be)."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[f"model.{k}"] = t
    return out


def _onnx_payload(record: dict, onnx_bytes: bytes | None) -> torch.Tensor:
    """The ONNX file of an ONNX-sourced model as a uint8 tensor, checked against its digest."""
    if onnx_bytes is None:
        where = record.get("path")
        if not isinstance(where, str) or not Path(where).is_file():
            raise BadExpertError(f"the ONNX file of this model ({where!r}) is gone; pass its bytes as onnx_bytes=")
        onnx_bytes = Path(where).read_bytes()
    if not isinstance(onnx_bytes, (bytes, bytearray)):
        raise BadExpertError(f"onnx_bytes must be bytes, got {type(onnx_bytes).__name__}")
    if hashlib.sha256(onnx_bytes).hexdigest() != record.get("sha256"):
        raise BadExpertError(f"the ONNX file {record.get('path')!r} changed since the model was loaded (its sha256 "
                             "differs from the model's record); load the model again")
    return torch.frombuffer(bytearray(onnx_bytes), dtype=torch.uint8).clone()


#: The remedy every refusal of a bundle's contents names.
BUNDLE_FIX = "rebuild it with `badexpert bundle`"
#: Fields of a bundle's model section beyond the architecture (:data:`badexpert.io.MODEL_META_TYPES`).
BUNDLE_MODEL_TYPES = {"fingerprint": str, "hflip": bool | None}


def read_bundle(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A bundle's metadata and tensors, checked whole before anything is built (the one check
    of a bundle, shared by :func:`load_bundle`, ``serve``, ``export`` and ``info``): metadata
    bounds (:mod:`badexpert.metadata`), checksum, the types of both sections, the class names
    against the model's classes, the detector's input shape against the model's input, the
    model's weights against its architecture and, for a batch of
    :data:`~badexpert.limits.DEPLOY_BATCH` inputs, the memory budget
    (:func:`badexpert.io.check_architecture`), and the calibration record (scores present,
    finite, as many as declared; the threshold one of them)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..detectors.base import check_record
    from ..io import check_architecture, check_model_meta, read_meta
    from ..limits import DEPLOY_BATCH
    from ..metadata import check_classes, check_fields

    source = f"bundle '{path}'"
    hint = "create one with `badexpert bundle`"
    meta = read_meta(path, fmt=None, what="bundle", hint=hint)
    if meta.get("format") not in BUNDLE_FORMATS:
        read_meta(path, fmt=BUNDLE_FORMAT, what="bundle", hint=hint)  # its one-line refusal
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BadExpertError(f"cannot read the tensors in bundle '{path}': the file is corrupt") from exc
    if not isinstance(meta.get("checksum"), str) or _checksum(meta, tensors) != meta["checksum"]:
        raise BadExpertError(f"bundle '{path}' fails its checksum: it is corrupt or was modified; {BUNDLE_FIX}")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("detector"), dict):
        raise BadExpertError(f"bundle '{path}' lacks its model or detector section; {BUNDLE_FIX}")
    model, det = meta["model"], meta["detector"]
    foreign = meta["format"] == SOURCE_BUNDLE_FORMAT
    check_model_meta(model, f"{source} (model)", BUNDLE_FIX)
    check_fields(model, {**BUNDLE_MODEL_TYPES, **({"source": dict} if foreign else {})}, f"{source} (model)",
                 BUNDLE_FIX)
    if foreign:
        _check_source_record(model, tensors, source)
    elif ONNX_TENSOR in tensors or "source" in model:
        raise BadExpertError(f"{source}: a bundle of format {BUNDLE_FORMAT!r} holds a source record; the file is "
                             f"damaged or was edited; {BUNDLE_FIX}")
    check_detector_meta(det, f"{source} (detector)", BUNDLE_FIX)
    if det["threshold"] is None:
        raise BadExpertError(f"bundle '{path}' holds an uncalibrated detector; rebuild it from a calibrated one")
    if isinstance(det["data"].get("classes"), list):
        check_classes(det["data"]["classes"], model["num_classes"], f"{source} (detector data)", BUNDLE_FIX)
    expected = (model["in_channels"], *model["image_size"])
    if tuple(det["input_shape"]) != expected:
        raise BadExpertError(f"{source}: its detector takes inputs of shape {list(det['input_shape'])} but its model "
                             f"takes {list(expected)}; the file is damaged or was edited; {BUNDLE_FIX}")
    shapes = {k[len("model."):]: tuple(v.shape) for k, v in tensors.items() if k.startswith("model.")}
    if foreign:  # no architecture to build on the meta device without its source: count the bytes
        _check_source_memory(model, tensors, source, DEPLOY_BATCH)
    else:
        check_architecture(model, shapes, source, batch=DEPLOY_BATCH)  # the weights, and a batch of the input size
    det_state = {k[len("detector."):]: v for k, v in tensors.items() if k.startswith("detector.")}
    check_record(det_state, det, f"{source} (detector)")
    return meta, tensors


def _check_source_record(model: dict, tensors: dict[str, torch.Tensor], source: str) -> None:
    """The source record of a format-2 bundle: a known kind that is the model's ``arch``, and
    what rebuilds it (a Hugging Face config without remote code, an ONNX payload matching its
    digest, a well-formed factory reference and keyword arguments)."""
    from ..io.sources import FACTORY_RE

    rec = model["source"]
    kind = rec.get("kind")
    bad = lambda what: BadExpertError(f"{source}: {what}; the file is damaged or was edited; {BUNDLE_FIX}")  # noqa: E731
    if kind not in FOREIGN_SOURCES or model["arch"] != kind or model.get("width") is not None:
        raise bad(f"its model source {kind!r} (architecture {model['arch']!r}) is not one a bundle rebuilds")
    if kind != "onnx" and ONNX_TENSOR in tensors:
        raise bad(f"it holds ONNX bytes for a {kind} model")
    if kind == "huggingface":
        cfg = rec.get("config")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
            raise bad("its Hugging Face config is missing or has no model_type")
        if "auto_map" in cfg:
            raise BadExpertError(f"{source}: its Hugging Face model needs remote code (auto_map in its config); "
                                 "badexpert never runs code shipped with a model")
    elif kind == "onnx":
        data = tensors.get(ONNX_TENSOR)
        if data is None or data.dtype != torch.uint8 or data.dim() != 1:
            raise bad(f"its ONNX model (tensor '{ONNX_TENSOR}', uint8 bytes) is missing or malformed")
        if not isinstance(rec.get("sha256"), str) or hashlib.sha256(data.numpy().tobytes()).hexdigest() != rec["sha256"]:
            raise BadExpertError(f"{source}: its ONNX model does not match the sha256 recorded with it (digest "
                                 f"mismatch); the file was modified; {BUNDLE_FIX}")
        tol = rec.get("tolerance")
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0):
            raise bad("its ONNX conversion tolerance is not a positive number")
    else:
        ref, kw = rec.get("factory"), rec.get("kwargs")
        if not isinstance(ref, str) or not FACTORY_RE.match(ref):
            raise bad(f"its factory reference {ref!r:.80} is not package.module:function")
        if kw is not None and not isinstance(kw, dict):
            raise bad("its factory keyword arguments are not a JSON object")


def _check_source_memory(model: dict, tensors: dict[str, torch.Tensor], source: str, batch: int) -> None:
    """Before a foreign model is rebuilt: a second copy of its weights (and, for ONNX, of the
    converted graph's), and a batch of inputs of the declared size, within the memory budget."""
    import math

    from ..limits import check_allocation

    weights = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("model."))
    onnx = tensors[ONNX_TENSOR].numel() if ONNX_TENSOR in tensors else 0
    shape = (model["in_channels"], *model["image_size"])
    nbytes = 2 * weights + 2 * onnx + batch * math.prod(shape) * 4 * 2
    check_allocation(nbytes, f"{source}: rebuilding its {model['arch']} model and a batch of {batch} inputs of "
                             f"shape {list(shape)}", "the file declares an absurd size: rebuild it")


def load_bundle(path: str | Path, *, device: str | None = "cpu", policy: str = "flag",
                abstain_label: int = -1, allow_factories: Any = ()) -> Guard:
    """Rebuild the guard a bundle holds: the whole file is checked (:func:`read_bundle`) and the
    model's weights fingerprint verified before it is returned.

    A bundle of a user's factory model imports that factory only when it is listed in
    ``allow_factories`` (``"package.module:function"`` strings); otherwise it is refused in one
    line that names it. Nothing else a bundle names is ever imported."""
    meta, tensors = read_bundle(path)
    return guard_from_bundle(meta, tensors, path, device=device, policy=policy, abstain_label=abstain_label,
                             allow_factories=allow_factories)


def _allowed(allow_factories: Any) -> tuple[str, ...]:
    if allow_factories is None:
        return ()
    if isinstance(allow_factories, str):
        allow_factories = [allow_factories]
    out = tuple(allow_factories)
    if not all(isinstance(a, str) for a in out):
        raise BadExpertError("allow_factories must be 'package.module:function' strings")
    return out


def guard_from_bundle(meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: str | Path, *,
                      device: str | None = "cpu", policy: str = "flag", abstain_label: int = -1,
                      allow_factories: Any = ()) -> Guard:
    """The guard of a bundle already read (and so checked) by :func:`read_bundle`."""
    from ..io import build_checked, load_weights, model_fingerprint, rebuild_model
    from ..utils import resolve_device

    source = f"bundle '{path}'"
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    det_state = {k[len("detector."):]: v for k, v in tensors.items() if k.startswith("detector.")}
    if meta.get("format") == SOURCE_BUNDLE_FORMAT:
        allowed = _allowed(allow_factories)
        rec = meta["model"]["source"]
        if rec["kind"] == "factory" and rec["factory"] not in allowed:
            ref = rec["factory"]
            raise BadExpertError(f"{source} rebuilds its model with the factory '{ref}', and badexpert imports a "
                                 f"user's code only when you name it: pass --allow-factory {ref} (Python: "
                                 f"load_bundle(..., allow_factories=['{ref}']))")
        onnx = tensors[ONNX_TENSOR].numpy().tobytes() if rec["kind"] == "onnx" else None
        try:
            model = rebuild_model(meta["model"], model_state, onnx_bytes=onnx, allow_factories=allowed)
        except BadExpertError as exc:
            raise BadExpertError(f"{source}: {exc}") from exc
    else:
        model = build_checked(meta["model"])
        load_weights(model, model_state, source=str(path), arch=meta["model"]["arch"])
    if model_fingerprint(model) != meta["model"]["fingerprint"]:
        raise BadExpertError(f"{source}: the model weights do not match the fingerprint recorded with them")
    model = model.to(resolve_device(device)).eval()
    detector = detector_from_state(det_state, meta["detector"], model, device=device, source=source)
    return Guard(model, detector, policy=policy, abstain_label=abstain_label, meta=meta["model"])


__all__ = ["BUNDLE_FORMAT", "BUNDLE_FORMATS", "SOURCE_BUNDLE_FORMAT", "Guard", "GuardOutput", "POLICIES", "RejectedInputError", "conformal_p_values",
           "guard_from_bundle", "load_bundle", "read_bundle", "save_bundle"]
