"""A deployment bundle as one ONNX graph, and :class:`OnnxGuard` to run it without PyTorch.

:func:`export_bundle` (CLI ``badexpert export BUNDLE --onnx FILE``) rebuilds the guard a bundle
holds and writes one ONNX graph with the suspect model, the detector's own networks (BaDExpert:
the backdoor expert and the auxiliary model; with a shared trunk, the layers before the cut appear
once in the graph and feed the model's head and the two finetuned heads), its score and the
calibrated threshold. Any detector
that declares the capability (:attr:`~badexpert.detectors.Detector.exportable`) is exported; the
others are refused in one line:

- input ``images``: float32 ``[N, C, H, W]`` in ``[0, 1]``, dynamic batch;
- outputs ``label`` (int64, the model's label), ``confidence`` (float32, its softmax probability),
  ``score`` (float32, the detector's score, computed from the model's logits and the detector's
  networks by the very code the eager detector runs, its ``score_given_logits``, through
  :meth:`~badexpert.detectors.Detector.export_scorer`) and ``reject`` (bool,
  ``not (score <= threshold)``, so a NaN score is rejected);
- an image holding a NaN or inf pixel is zeroed before the models see it and comes out with
  ``score = confidence = NaN`` and ``reject = True``, as in the eager :class:`~badexpert.deploy.guard.Guard`;
- the model's metadata (``metadata_props``, key ``"badexpert"``, JSON) holds the class names,
  input shape, threshold, target FPR, the calibration scores (for conformal p-values), the score
  rule (the detector's :attr:`~badexpert.detectors.Detector.score_kind`) and the suspect model's
  weights fingerprint.

Before anything is written, the graph is run with onnxruntime on a fixed, seeded verification
batch (float and uint8 images, smooth and noisy, with corner patches, plus non-finite and
edge-of-range ones) and compared with the eager guard: labels, reject flags and NaN pattern must
agree and scores lie within ``1e-3 + 1e-4 |score|``; otherwise nothing is written. The file is
written atomically.

:class:`~badexpert.runtime.onnx.OnnxGuard` (in :mod:`badexpert.runtime.onnx`) loads such a file with
onnxruntime alone: this module imports neither torch nor any badexpert module that does at import
time (the torch-free :mod:`badexpert.runtime` only), and the PyTorch-side code below imports it
inside the functions that need it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadExpertError
# the torch-free runtime (badexpert.runtime) defines the file: its names, and OnnxGuard that runs it
from ..runtime.arrays import IMAGE_TOLERANCE
from ..runtime.onnx import INPUT_NAME, META_KEY, ONNX_FORMAT, OUTPUT_NAMES, OnnxGuard, _first_line, _require

DEFAULT_OPSET = 17
MIN_OPSET = 13  # Softmax over one axis, ReduceSum with axes as an input: what the graph is written for
#: Verification tolerance on scores: ``|onnx - eager| <= SCORE_ATOL + SCORE_RTOL * |eager|``.
SCORE_RTOL, SCORE_ATOL = 1e-4, 1e-3
#: An eager label whose top-two probabilities are closer than this may legitimately differ.
LABEL_TIE = 1e-5


# --- building the graph (PyTorch side) ------------------------------------------------------------
def _exportable(model, input_shape: tuple[int, int, int]):
    """A copy of ``model`` (eval mode) whose ``nn.AdaptiveAvgPool2d`` layers are replaced by
    equivalent fixed-size pooling for the input shape the guard takes.

    The TorchScript ONNX exporter refuses adaptive average pooling whose output size does not
    divide its input size (the small CNN pools 7x7 to 3x3 on 28x28 images). With the spatial size
    fixed, each such layer is a fixed linear map: an ``AvgPool2d`` when the bins are regular
    (7 -> 3: kernel 3, stride 2), else two pooling matrices.
    """
    import copy

    import torch
    from torch import nn

    class MatrixPool(nn.Module):
        """Adaptive average pooling for one input size, as ``P_h @ x @ P_w^T``."""

        def __init__(self, ph: torch.Tensor, pw: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("ph", ph)
            self.register_buffer("pwt", pw.t().contiguous())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.matmul(torch.matmul(self.ph, x), self.pwt)

    def bins(n_in: int, n_out: int) -> list[tuple[int, int]]:
        return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]

    def regular(b: list[tuple[int, int]]) -> tuple[int, int] | None:
        sizes = {e - s for s, e in b}
        strides = {b[i + 1][0] - b[i][0] for i in range(len(b) - 1)}
        if len(sizes) == 1 and len(strides) <= 1:
            return sizes.pop(), (strides.pop() if strides else 1)
        return None

    def matrix(b: list[tuple[int, int]], n_in: int) -> torch.Tensor:
        m = torch.zeros(len(b), n_in)
        for i, (s, e) in enumerate(b):
            m[i, s:e] = 1.0 / (e - s)
        return m

    model = copy.deepcopy(model).cpu().eval()
    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:]))))
    if not hooks:
        return model
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    for name, (h, w) in sizes.items():
        mod = model.get_submodule(name)
        out = mod.output_size if isinstance(mod.output_size, (tuple, list)) else (mod.output_size, mod.output_size)
        oh = h if out[0] is None else int(out[0])
        ow = w if out[1] is None else int(out[1])
        if h % oh == 0 and w % ow == 0:
            continue  # the exporter handles these (global pooling included)
        bh, bw = bins(h, oh), bins(w, ow)
        rh, rw = regular(bh), regular(bw)
        if rh and rw:
            new = nn.AvgPool2d((rh[0], rw[0]), stride=(rh[1], rw[1]))
        else:
            new = MatrixPool(matrix(bh, h), matrix(bw, w))
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def _guard_graph(guard):
    """The ``nn.Module`` that is traced into the ONNX graph (see the module docstring): the
    detector's own scorer (:meth:`~badexpert.detectors.Detector.export_scorer`: the model's logits
    and the score, on exportable copies of the model and the detector's networks) between the
    non-finite screen and the threshold."""
    import torch
    from torch import nn

    det = _check_exportable(guard.detector)
    shape = tuple(guard.input_shape)

    class GuardGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scorer = det.export_scorer(lambda m: _exportable(m, shape))
            self.register_buffer("threshold", torch.tensor(float(det.threshold_), dtype=torch.float32))

        def forward(self, images: torch.Tensor):
            bad = ~torch.isfinite(images).flatten(1).all(1)  # IsNaN / IsInf, reduced per image
            x = torch.where(bad[:, None, None, None], torch.zeros_like(images), images).clamp(0, 1)
            logits, score = self.scorer(x)
            confidence, label = torch.softmax(logits, 1).max(1)  # as Guard.forward
            nan = torch.full_like(score, float("nan"))
            score = torch.where(bad, nan, score)
            confidence = torch.where(bad, nan, confidence)
            reject = ~(score <= self.threshold)  # Detector.decide: a NaN score is rejected
            return label, confidence, score, reject

    return GuardGraph().eval()


def _torch_to_onnx(module, example, output_names: tuple[str, ...], opset: int) -> bytes:
    """Trace ``module`` with the TorchScript exporter (``dynamo=False``: it needs no onnxscript)
    into ONNX bytes with a dynamic batch axis; any failure is a one-line error. The exporter's C++
    dump of the graph on failure (written straight to file descriptor 1) is captured and dropped,
    and ``nn.MultiheadAttention``'s fused fast path, which has no ONNX form, is off meanwhile."""
    import contextlib
    import io
    import os
    import sys
    import tempfile
    import warnings

    import torch

    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)}
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            try:
                if mha is not None:
                    mha.set_fastpath_enabled(False)
                torch.onnx.export(module, (example,), buf, dynamo=False, input_names=[INPUT_NAME],
                                  output_names=list(output_names), dynamic_axes=axes, opset_version=opset,
                                  do_constant_folding=True)
            finally:
                if mha is not None:
                    mha.set_fastpath_enabled(fastpath)
                for fd, orig in saved.items():
                    with contextlib.suppress(OSError):
                        os.dup2(orig, fd)
    except BadExpertError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; all mean "cannot export"
        raise BadExpertError(f"cannot export the model to ONNX (opset {opset}): {_first_line(exc)}") from exc
    finally:
        for orig in saved.values():
            os.close(orig)
    return buf.getvalue()


def _check_opset(opset) -> int:
    try:  # the highest opset the TorchScript exporter writes (20 in torch 2.13)
        from torch.onnx import _constants

        top = int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    except ImportError:
        top = 20
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise BadExpertError(f"--opset must be an integer from {MIN_OPSET} to {top}, got {opset!r}")
    return opset


def _example(input_shape, n: int = 2):
    import torch

    return torch.rand(n, *input_shape, generator=torch.Generator().manual_seed(0))


def export_model_onnx(model, input_shape: tuple[int, int, int], *, opset: int = DEFAULT_OPSET) -> bytes:
    """The bare classifier ``model`` (float images in ``[0, 1]`` -> ``logits``) as ONNX bytes,
    without the detector: the baseline of bench/onnx_speed.py."""
    opset = _check_opset(opset)
    _require("onnx")
    return _torch_to_onnx(_exportable(model, tuple(input_shape)), _example(input_shape), ("logits",), opset)


def onnx_metadata(guard, *, source: str | None = None, checksum: str | None = None) -> dict[str, Any]:
    """What the ONNX file records about its guard (stored as JSON in ``metadata_props``)."""
    from .. import __version__

    det = guard.detector
    scores = det.calibration_scores_.double().flatten().tolist()
    return {
        "format": ONNX_FORMAT,
        "badexpert_version": __version__,
        "detector": det.name,
        "score_rule": det.score_kind,
        "classes": list(guard.classes) if guard.classes is not None else None,
        "num_classes": guard.meta.get("num_classes"),
        "input_shape": list(guard.input_shape),
        "threshold": float(det.threshold_),
        "fpr_target": float(det.fpr_target_),
        "clean_rejection_rate": float(det.clean_rejection_rate_),
        "calibration_size": len(scores),
        "calibration_scores": scores,
        "model_fingerprint": det.model_fingerprint_,
        "arch": guard.meta.get("arch"),
        "bundle": source,
        "bundle_checksum": checksum,
        "inputs": {INPUT_NAME: "float32 [N, C, H, W] in [0, 1]"},
        "outputs": {"label": "int64", "confidence": "float32", "score": "float32", "reject": "bool"},
    }


def _check_exportable(det):
    """The detector, if it declares the capability to be exported
    (:attr:`~badexpert.detectors.Detector.exportable`); otherwise a one-line error."""
    from ..detectors.base import check_exportable

    return check_exportable(det)


def build_onnx(guard, *, opset: int = DEFAULT_OPSET, source: str | None = None, checksum: str | None = None) -> bytes:
    """The serialized ONNX graph of a :class:`~badexpert.deploy.guard.Guard` whose detector is exportable
    (module docstring), with its metadata; nothing is written."""
    opset = _check_opset(opset)
    onnx = _require("onnx")
    det = _check_exportable(guard.detector)
    raw = _torch_to_onnx(_guard_graph(guard), _example(guard.input_shape), OUTPUT_NAMES, opset)
    try:
        proto = onnx.load_from_string(raw)
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001
        raise BadExpertError(f"the exported ONNX graph is invalid: {_first_line(exc)}") from exc
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key = META_KEY
    entry.value = json.dumps(onnx_metadata(guard, source=source, checksum=checksum))
    proto.doc_string = (f"badexpert guard: suspect model and its {det.name} detector with the '{det.score_kind}' "
                        f"score and threshold {det.threshold_:.6g}")
    proto.producer_name = "badexpert"
    return proto.SerializeToString()


# --- verification -------------------------------------------------------------------------------
def verification_inputs(input_shape, *, n: int = 256, seed: int = 0) -> list[np.ndarray]:
    """A fixed, seeded set of batches that exercises the graph: float32 images (uniform noise,
    smooth random images, some with a bright or dark corner patch), the same kinds as uint8, and
    a batch of special images (all zeros, all ones, values just outside ``[0, 1]`` within the
    tolerance, a NaN / +inf / -inf pixel)."""
    c, h, w = (int(v) for v in input_shape)
    rng = np.random.default_rng(seed)

    def smooth(k: int) -> np.ndarray:
        gh, gw = max(1, h // 4), max(1, w // 4)
        grid = rng.random((k, c, gh, gw), dtype=np.float32)
        up = np.repeat(np.repeat(grid, -(-h // gh), axis=2), -(-w // gw), axis=3)[:, :, :h, :w]
        return np.ascontiguousarray(up)

    def patched(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        ph, pw = max(1, h // 8), max(1, w // 8)
        for i in range(len(x)):
            value = float(rng.integers(0, 2))
            r = int(rng.integers(0, 2)) * (h - ph)
            q = int(rng.integers(0, 2)) * (w - pw)
            x[i, :, r : r + ph, q : q + pw] = value
        return x

    q = n // 8
    floats = np.concatenate([
        rng.random((2 * q, c, h, w), dtype=np.float32),
        smooth(3 * q),
        patched(smooth(3 * q)),
    ]).astype(np.float32)
    as_u8 = np.concatenate([
        rng.integers(0, 256, (q, c, h, w), dtype=np.uint8),
        (patched(smooth(q)) * 255).round().astype(np.uint8),
    ])
    special = np.stack([
        np.zeros((c, h, w), np.float32), np.ones((c, h, w), np.float32),
        np.clip(smooth(1)[0] * 1.002 - 0.001, -IMAGE_TOLERANCE, 1 + IMAGE_TOLERANCE),
        smooth(1)[0], smooth(1)[0], smooth(1)[0], smooth(1)[0],
    ]).astype(np.float32)
    special[3, 0, 0, 0] = np.nan
    special[4, -1, h // 2, w // 2] = np.inf
    special[5, 0, -1, -1] = -np.inf
    special[6, :, :, :] = np.nan
    return [floats, as_u8, special]


def compare_with_guard(onnx_guard: "OnnxGuard", guard, batches: list[np.ndarray]) -> dict[str, Any]:
    """Run both guards on ``batches`` and measure how far apart they are (no decision)."""
    import torch

    n = mism_label = mism_reject = mism_nan = border_label = border_reject = 0
    max_abs = max_rel = max_conf = max_p = 0.0
    bad_scores = 0
    thr = np.float32(guard.detector.threshold_)
    for batch in batches:
        ours = onnx_guard(batch)
        eager = guard(torch.from_numpy(batch))
        e_label, e_conf = eager.label.numpy(), eager.confidence.numpy()
        e_score, e_p, e_reject = eager.score.numpy(), eager.p_value.numpy(), eager.reject.numpy()
        n += len(batch)
        nan_e, nan_o = np.isnan(e_score), np.isnan(ours["score"])
        mism_nan += int((nan_e != nan_o).sum())
        both = ~nan_e & ~nan_o
        diff = np.abs(ours["score"][both].astype(np.float64) - e_score[both].astype(np.float64))
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float((diff / np.maximum(np.abs(e_score[both]), 1e-12)).max()))
            bad_scores += int((diff > SCORE_ATOL + SCORE_RTOL * np.abs(e_score[both])).sum())
        conf_ok = ~np.isnan(e_conf) & ~np.isnan(ours["confidence"])
        if conf_ok.any():
            max_conf = max(max_conf, float(np.abs(ours["confidence"][conf_ok] - e_conf[conf_ok]).max()))
        max_p = max(max_p, float(np.abs(ours["p_value"] - e_p).max()) if len(e_p) else 0.0)
        # labels: a tie between the eager top-two probabilities may break either way
        with torch.no_grad():
            probs = _eager_probabilities(guard, batch)
        top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else np.zeros((len(probs), 2))
        tie = (top2[:, 1] - top2[:, 0]) <= LABEL_TIE
        wrong = ours["label"] != e_label
        mism_label += int((wrong & ~tie).sum())
        border_label += int((wrong & tie).sum())
        # reject flags: a score within the tolerance of the threshold may fall either side
        near = np.abs(e_score.astype(np.float64) - float(thr)) <= SCORE_ATOL + SCORE_RTOL * abs(float(thr))
        flip = ours["reject"] != e_reject
        mism_reject += int((flip & ~near).sum())
        border_reject += int((flip & near).sum())
    return {
        "inputs": n, "label_mismatches": mism_label, "reject_mismatches": mism_reject, "nan_mismatches": mism_nan,
        "scores_out_of_tolerance": bad_scores, "borderline_label_flips": border_label,
        "borderline_reject_flips": border_reject, "max_abs_score_diff": max_abs, "max_rel_score_diff": max_rel,
        "max_confidence_diff": max_conf, "max_p_value_diff": max_p,
        "tolerance": {"score_rtol": SCORE_RTOL, "score_atol": SCORE_ATOL},
    }


def _eager_probabilities(guard, batch: np.ndarray) -> np.ndarray:
    import torch

    from ..data.core import to_float

    det = guard.detector
    images, bad = det._scorable(torch.from_numpy(batch))
    with torch.no_grad():
        det.model_.eval()
        probs = torch.softmax(det.model_(to_float(images).to(det.device_)).float(), 1).cpu()
    probs[bad] = 0.0
    return probs.numpy()


def verify_onnx(onnx_model, guard, *, batches: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Compare an ONNX guard (path or bytes) with the eager ``guard`` on ``batches`` (default:
    :func:`verification_inputs`); a one-line :class:`BadExpertError` if they disagree."""
    if batches is None:
        batches = verification_inputs(guard.input_shape)
    report = compare_with_guard(OnnxGuard(onnx_model, intra_op_threads=1), guard, batches)
    problems = [f"{report[k]} {what}" for k, what in (
        ("label_mismatches", "label(s)"), ("reject_mismatches", "reject flag(s)"),
        ("nan_mismatches", "NaN score(s)"), ("scores_out_of_tolerance", "score(s) beyond tolerance"),
    ) if report[k]]
    if problems:
        raise BadExpertError(
            f"the ONNX graph disagrees with the eager guard on {report['inputs']} verification inputs: "
            f"{', '.join(problems)} differ (max |score diff| {report['max_abs_score_diff']:.3g}); nothing was written"
        )
    return report


# --- the command --------------------------------------------------------------------------------
def check_onnx_output(path: str | Path, *, overwrite: bool = False) -> Path:
    """Before any work: ``path`` names a ``.onnx`` file that may be written (``--overwrite``
    needed to replace one)."""
    from ..utils import check_output_file

    return check_output_file(path, suffix=".onnx", overwrite=overwrite, option="--onnx")


def export_bundle(bundle: str | Path, onnx_path: str | Path, *, opset: int = DEFAULT_OPSET, overwrite: bool = False,
                  log=None, allow_factories=()) -> dict[str, Any]:
    """``badexpert export``: bundle -> verified ONNX file, written atomically. Returns a report
    (the verification's numbers, the file, its size, opset and score rule). A bundle of a
    model from another source exports when torch can trace its guard and onnxruntime agrees
    with the eager guard; otherwise it is one line and nothing is written (serve the bundle).
    ``allow_factories`` as in :func:`badexpert.deploy.guard.load_bundle`."""
    from .guard import guard_from_bundle, read_bundle
    from ..utils import atomic_write_bytes

    out = check_onnx_output(onnx_path, overwrite=overwrite)
    _require("onnx")
    _require("onnxruntime")
    opset = _check_opset(opset)
    meta, tensors = read_bundle(bundle)  # the whole file checked, once: bounds, checksum, sizes, calibration
    guard = guard_from_bundle(meta, tensors, bundle, device="cpu",  # and the model's fingerprint
                              allow_factories=allow_factories)
    del tensors
    _check_exportable(guard.detector)
    checksum = meta["checksum"]
    kind = (guard.meta.get("source") or {}).get("kind")
    if log:
        log(f"exporting {guard.meta.get('arch')} guard ({guard.detector.score_kind} score) from '{bundle}' at opset "
            f"{opset}")
    try:
        data = build_onnx(guard, opset=opset, source=Path(bundle).name, checksum=checksum)
        report = verify_onnx(data, guard)
    except Exception as exc:  # noqa: BLE001 - a converted graph may also fail inside onnxruntime
        if kind is None:
            raise
        why = str(exc) if isinstance(exc, BadExpertError) else f"onnxruntime cannot run it: {_first_line(exc)}"
        raise BadExpertError(f"the guard of this {kind} model does not export to one verified ONNX graph ({why}); "
                             "nothing was written: serve the bundle with `badexpert serve` instead") from exc
    check_onnx_output(out, overwrite=overwrite)  # still safe to write?
    atomic_write_bytes(out, data)
    return {"onnx": str(out), "bytes": len(data), "opset": opset, "score_rule": guard.detector.score_kind,
            "threshold": float(guard.detector.threshold_), "verification": report}


__all__ = ["DEFAULT_OPSET", "build_onnx", "check_onnx_output", "export_bundle", "export_model_onnx", "verification_inputs", "verify_onnx"]
