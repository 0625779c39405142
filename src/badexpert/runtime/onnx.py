"""Running an exported guard without PyTorch: :class:`OnnxGuard` (``serve --onnx``, ``info``).

An ONNX guard (written by :func:`badexpert.deploy.export.export_bundle`) is one graph with input
``images`` (float32 ``[N, C, H, W]`` in ``[0, 1]``) and outputs ``label``, ``confidence``,
``score`` and ``reject``, plus metadata (``metadata_props`` key ``"badexpert"``, JSON): class names,
input shape, threshold, target FPR, calibration scores and the model's fingerprint.

This module imports neither torch nor any badexpert module that does; onnxruntime is imported
when a guard is loaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from ..errors import BadExpertError
from ..limits import DEPLOY_BATCH, check_allocation
from ..validation import Range
from .arrays import check_array
from .pvalues import conformal_p_values, sorted_calibration
from .reasons import nonfinite_inputs, reject_reasons

ONNX_FORMAT = "badexpert-onnx/1"
META_KEY = "badexpert"
INPUT_NAME = "images"
OUTPUT_NAMES = ("label", "confidence", "score", "reject")
EXTRA_HINT = "install the export extra: pip install 'badexpert[export]'"


def _require(name: str):
    """Import ``onnx`` or ``onnxruntime`` on demand; missing: a one-line error naming the extra."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BadExpertError(f"{name} is not installed; {EXTRA_HINT}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _meta_error(source: str, what: str) -> BadExpertError:
    return BadExpertError(f"{source} is not a badexpert ONNX guard ({what}); create one with `badexpert export`")


#: Fields of an ONNX guard's metadata (absent ones are ``None``; files exported before
#: ``clean_rejection_rate`` and ``calibration_size`` were recorded lack them).
ONNX_META_TYPES = {
    "input_shape": tuple[Annotated[int, Range(ge=1, le=64)], Annotated[int, Range(ge=1, le=4096)],
                         Annotated[int, Range(ge=1, le=4096)]],
    "classes": list[str] | None,
    "num_classes": Annotated[int, Range(ge=1, le=100_000)] | None,
    "threshold": float,
    "fpr_target": Annotated[float, Range(gt=0, lt=1)],
    "clean_rejection_rate": Annotated[float, Range(ge=0, le=1)] | None,
    "calibration_size": Annotated[int, Range(ge=1)] | None,
    "calibration_scores": list,
    "model_fingerprint": str,
    "score_rule": str | None,
}
ONNX_FIX = "re-export it with `badexpert export`"


def _check_meta(meta: dict[str, Any], source: str) -> dict[str, Any]:
    """An ONNX guard's metadata (already read by :func:`badexpert.metadata.parse_metadata`), checked
    whole: format, field types, class names against the number of classes, the calibration record
    (scores finite and as many as declared, the threshold one of them)."""
    from ..metadata import check_calibration, check_classes, check_fields

    if meta.get("format") != ONNX_FORMAT:
        raise _meta_error(source, f"format {str(meta.get('format'))[:40]!r}, expected {ONNX_FORMAT!r}")
    check_fields(meta, ONNX_META_TYPES, source, ONNX_FIX)
    meta["input_shape"] = list(meta["input_shape"])
    if meta["num_classes"] is not None:
        check_classes(meta["classes"], meta["num_classes"], source, ONNX_FIX)
    cal = meta["calibration_scores"]
    if not all(type(v) in (int, float) for v in cal):
        raise _meta_error(source, "calibration_scores holds values that are not numbers")
    check_calibration(cal, meta["threshold"], meta["calibration_size"], source, ONNX_FIX)
    return meta


class OnnxGuard:
    """A guard exported by :func:`badexpert.deploy.export.export_bundle`, run with onnxruntime (PyTorch never imported).

    ``OnnxGuard(path)(x)`` takes a batch ``[N, C, H, W]`` of uint8 images in ``[0, 255]`` or float
    images in ``[0, 1]`` (the package's one conversion rule: floats beyond a 0.001 tolerance and
    other dtypes are refused with a one-line :class:`BadExpertError`; a numpy array, or anything
    ``numpy.asarray`` accepts) and returns a dict of numpy arrays, one entry per input:
    ``label`` (int64), ``confidence`` (float32), ``score`` (float32, NaN where the input held a
    NaN or inf pixel), ``p_value`` (float32, conformal against the calibration scores, 0 for a
    NaN score) and ``reject`` (bool); :meth:`reasons` gives the reason for each decision.

    ``path`` may also be the serialized model (bytes). ``providers``: onnxruntime execution
    providers (default: CUDA when this onnxruntime has it, else the CPU). ``intra_op_threads``:
    onnxruntime's intra-op thread count (default: its own). ``batch_size``: inputs per run.

    The file is checked whole, once, before it is used (``serve --onnx`` and ``info`` load it
    through here): its metadata is found in the protocol buffer without reading the graph and
    read by the bounded reader (:mod:`badexpert.metadata`); field types, class names against
    ``num_classes``, the calibration record (scores finite and as many as declared, the
    threshold one of them), a batch of ``max(batch_size, 256)`` inputs of the declared shape
    against the memory budget, and then the declared shape against the graph's input.
    """

    def __init__(self, path: str | Path | bytes, *, providers: list | None = None, intra_op_threads: int | None = None,
                 batch_size: int = DEPLOY_BATCH) -> None:
        from os import PathLike

        from ..metadata import onnx_metadata_entry, parse_metadata
        from ..validation import expect

        expect(path, (str, PathLike, bytes, bytearray), "the ONNX guard (a path or the serialized model)")
        ort = _require("onnxruntime")
        if isinstance(path, (bytes, bytearray)):
            source, model = "the ONNX model", bytes(path)
            self.path = None
        else:
            p = Path(path)
            source, model = f"'{p}'", str(p)
            if not p.is_file():
                raise BadExpertError(f"ONNX file '{p}' does not exist; create one with `badexpert export`")
            self.path = p
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BadExpertError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        # the metadata first, from the file's bytes: bounded and checked whole before onnxruntime
        # loads the graph or anything is allocated for the input shape it declares
        raw = onnx_metadata_entry(model if self.path is not None else path, META_KEY, source, ONNX_FIX)
        if raw is None:
            raise _meta_error(source, "no badexpert metadata")
        meta = _check_meta(parse_metadata(raw, source, ONNX_FIX), source)
        shape = tuple(meta["input_shape"])
        check_allocation(max(batch_size, DEPLOY_BATCH) * math.prod(shape) * 4,
                         f"{source}: a batch of {max(batch_size, DEPLOY_BATCH)} inputs of shape {list(shape)}",
                         f"the file declares an absurd input size; {ONNX_FIX}")
        opts = ort.SessionOptions()
        if intra_op_threads is not None:
            opts.intra_op_num_threads = int(intra_op_threads)
            opts.inter_op_num_threads = 1
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BadExpertError(f"{source} cannot be loaded by onnxruntime: {_first_line(exc)}") from exc
        self.meta = meta
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= set(outputs):
            raise _meta_error(source, f"inputs {inputs}, outputs {outputs}")
        graph = self.session.get_inputs()[0]
        dims = list(graph.shape)[1:] if graph.shape else []
        fixed = [(d, s) for d, s in zip(dims, shape) if isinstance(d, int)]  # symbolic dims take any size
        if graph.type != "tensor(float)" or len(dims) != 3 or any(d != s for d, s in fixed):
            raise BadExpertError(f"{source}: its metadata declares inputs of shape {list(shape)} but its graph takes "
                                 f"{graph.type} {list(graph.shape or [])}; the file was edited; {ONNX_FIX}")
        self.classes: list[str] | None = meta.get("classes")
        self.input_shape: tuple[int, int, int] = tuple(meta["input_shape"])
        self.threshold: float = float(meta["threshold"])
        self.fpr_target: float = float(meta["fpr_target"])
        rate = meta.get("clean_rejection_rate")
        self.clean_rejection_rate: float = float(rate) if rate is not None else self.fpr_target
        self.score_rule: str | None = meta.get("score_rule")
        self.model_fingerprint: str = meta["model_fingerprint"]
        self.calibration_scores = sorted_calibration(meta["calibration_scores"])

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def p_values(self, scores) -> np.ndarray:
        return conformal_p_values(scores, self.calibration_scores)

    def to_float(self, x) -> np.ndarray:
        """Check a batch by the conversion rule and return it as float32 ``[N, C, H, W]`` (uint8 / 255;
        non-finite pixels are kept: the graph rejects those images)."""
        try:
            a = np.asarray(x)
        except Exception as exc:  # noqa: BLE001
            raise BadExpertError(f"images must be an array of images [N, C, H, W], got {type(x).__name__}") from exc
        if a.ndim != 4:
            raise BadExpertError(f"images must have shape [N, C, H, W], got {tuple(a.shape)}")
        if tuple(a.shape[1:]) != self.input_shape:
            raise BadExpertError(f"inputs of shape {tuple(a.shape[1:])} but the guard takes {self.input_shape}")
        check_array(a, nonfinite="allow")
        if a.dtype == np.uint8:
            return np.ascontiguousarray(a, dtype=np.float32) / np.float32(255.0)
        return np.ascontiguousarray(a, dtype=np.float32)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's raw outputs for float32 images (no checks), batch by batch."""
        parts: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUT_NAMES}
        for start in range(0, len(images), self.batch_size):
            res = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[start : start + self.batch_size]})
            for k, v in zip(OUTPUT_NAMES, res):
                parts[k].append(v)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def __call__(self, x) -> dict[str, np.ndarray]:
        images = self.to_float(x)
        if len(images) == 0:
            out = {"label": np.empty(0, np.int64), "confidence": np.empty(0, np.float32),
                   "score": np.empty(0, np.float32), "reject": np.empty(0, bool)}
        else:
            out = self.run(images)
        out["p_value"] = self.p_values(out["score"])
        return {k: out[k] for k in ("label", "confidence", "score", "p_value", "reject")}

    def reasons(self, x, out: dict[str, np.ndarray]) -> list[str]:
        """Why each input of ``x`` was accepted or rejected, given ``out = self(x)``: the guard's
        rule (:func:`badexpert.runtime.reasons.reject_reasons`)."""
        return reject_reasons(out["reject"], out["score"], nonfinite_inputs(np.asarray(x)))

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "<bytes>"
        return (f"OnnxGuard({where}, input_shape={self.input_shape}, rule={self.score_rule}, "
                f"threshold={self.threshold:.6g}, fpr_target={self.fpr_target:g})")


__all__ = ["INPUT_NAME", "META_KEY", "ONNX_FIX", "ONNX_FORMAT", "ONNX_META_TYPES", "OUTPUT_NAMES", "OnnxGuard",
           "conformal_p_values"]
