"""Why a guard accepted or rejected an input: the strings and the one rule that picks them, shared
by the detectors, the guard, the service and the ONNX runtime (torch-free)."""

from __future__ import annotations

from typing import Any

import numpy as np

ACCEPTED = "accepted"
REJECT_SCORE = "score above threshold"
REJECT_NONFINITE_INPUT = "non-finite input (NaN or inf pixel)"
REJECT_NONFINITE_SCORE = "score is not a number (the models produced NaN)"


def _values(v: Any) -> list:
    return v.tolist() if hasattr(v, "tolist") else list(v)


def nonfinite_inputs(x: Any) -> np.ndarray:
    """Per input of a numpy batch ``[N, ...]``: whether it holds a NaN or inf value (a guard
    rejects such inputs unscored); all False for an integer batch."""
    x = np.asarray(x)
    if len(x) == 0 or not np.issubdtype(x.dtype, np.floating):
        return np.zeros(len(x), dtype=bool)
    return ~np.isfinite(x).reshape(len(x), -1).all(1)


def reject_reasons(reject: Any, score: Any, nonfinite_input: Any = None) -> list[str]:
    """The reason for each decision: :data:`REJECT_NONFINITE_INPUT` where ``nonfinite_input``
    (the input held a NaN or inf pixel), else :data:`REJECT_NONFINITE_SCORE` where the score is
    NaN, else :data:`REJECT_SCORE` where rejected, else :data:`ACCEPTED`.

    ``reject``, ``score`` and ``nonfinite_input`` are per-input sequences (lists, numpy arrays or
    CPU tensors); ``nonfinite_input=None``: no input was known to be non-finite."""
    flags = [bool(r) for r in _values(reject)]
    scores = [float(s) for s in _values(score)]
    bad = [False] * len(flags) if nonfinite_input is None else [bool(b) for b in _values(nonfinite_input)]
    if not len(flags) == len(scores) == len(bad):
        raise ValueError(f"reject_reasons: {len(flags)} flags, {len(scores)} scores, {len(bad)} input flags")
    return [REJECT_NONFINITE_INPUT if b else REJECT_NONFINITE_SCORE if s != s else REJECT_SCORE if r else ACCEPTED
            for r, s, b in zip(flags, scores, bad)]


__all__ = ["ACCEPTED", "REJECT_NONFINITE_INPUT", "REJECT_NONFINITE_SCORE", "REJECT_SCORE", "nonfinite_inputs",
           "reject_reasons"]
