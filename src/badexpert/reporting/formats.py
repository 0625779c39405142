"""Number formats shared by every table and report (light: no torch, matplotlib or sklearn)."""
from __future__ import annotations

import math
from typing import Any


def number(v: Any) -> float | None:
    """A float, or ``None`` for a missing value, NaN, a bool, a non-number or an array or tensor
    that does not hold exactly one value."""
    if isinstance(v, bool) or v is None:
        return None
    item = getattr(v, "item", None)  # a one-value tensor or array, a numpy scalar
    if callable(item) and not isinstance(v, (int, float)):
        try:
            v = item()
        except (ValueError, RuntimeError):  # more or fewer than one value
            return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def pct(v: Any, digits: int = 1) -> str:
    """A rate as a percentage with ``digits`` decimals (0.1234 -> '12.3%'); 'n/a' for a missing or
    NaN value. The one percentage format of every table and report."""
    f = number(v)
    return "n/a" if f is None else f"{100.0 * f:.{digits}f}%"


__all__ = ["number", "pct"]
