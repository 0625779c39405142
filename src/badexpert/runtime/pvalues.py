"""Conformal p-values of detector scores against calibration scores (torch-free; the guard, the
service and the ONNX runtime all use :func:`conformal_p_values`)."""

from __future__ import annotations

from typing import Any

import numpy as np


def sorted_calibration(calibration: Any) -> np.ndarray:
    """Calibration scores as the ascending float64 vector :func:`conformal_p_values` takes."""
    return np.sort(np.asarray(calibration, dtype=np.float64).reshape(-1))


def conformal_p_values(scores: Any, calibration_sorted: np.ndarray) -> np.ndarray:
    """``(1 + #{calibration >= s}) / (n + 1)`` per score, 0 for a NaN score (never clean), as
    float32; ``calibration_sorted``: ascending float64 (:func:`sorted_calibration`).

    For a clean input exchangeable with the calibration split the p-value is (super-)uniform:
    ``p <= alpha`` happens with probability at most ``alpha``."""
    s = np.asarray(scores, dtype=np.float64)
    n = len(calibration_sorted)
    ge = n - np.searchsorted(calibration_sorted, np.nan_to_num(s, nan=0.0), side="left")
    p = (1 + ge).astype(np.float64) / (n + 1)
    return np.where(np.isnan(s), 0.0, p).astype(np.float32)


__all__ = ["conformal_p_values", "sorted_calibration"]
