"""Input detectors sharing one contract (see :mod:`badexpert.detectors.base`)."""

from __future__ import annotations

from ..errors import unknown_name
from ..validation import validate_params
from .badexpert import SCORES, BaDExpert, combine
from .base import Detector, load_detector, read_detector_file

DETECTORS: dict[str, type[Detector]] = {"badexpert": BaDExpert}


def get_detector(name: str, **params) -> Detector:
    """Build a detector by name with constructor parameters."""
    key = name.lower().replace("-", "_") if isinstance(name, str) else str(name)
    if key not in DETECTORS:
        raise unknown_name("detector", str(name), DETECTORS)
    cls = DETECTORS[key]
    return cls(**validate_params(cls.__init__, params, f"detector '{key}'")).check_params()


__all__ = ["DETECTORS", "SCORES", "BaDExpert", "Detector", "combine", "get_detector", "load_detector", "read_detector_file"]
