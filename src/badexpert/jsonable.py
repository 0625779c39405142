"""The package's one JSON policy for values that are not JSON (torch-free).

Tensors and numpy arrays become nested lists, numpy scalars Python numbers, paths strings, tuples
lists, mapping keys strings; **a non-finite float (NaN, inf, -inf) becomes ``null``**: JSON has no
such numbers, and a stand-in such as ``1e308`` would read back as a real (if huge) value. Every
file badexpert writes, the service's answers and its log lines follow this one policy.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np


def finite_or_none(v: Any) -> float | None:
    """``float(v)``, or ``None`` where it is NaN or infinite."""
    v = float(v)
    return v if math.isfinite(v) else None


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # never imported here: a tensor exists only where torch is loaded
    return torch is not None and isinstance(obj, torch.Tensor)


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, paths and tuples to plain JSON types; non-finite floats to ``None``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray) or _is_tensor(obj):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.floating):
        obj = float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float):
        return finite_or_none(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


__all__ = ["finite_or_none", "to_jsonable"]
