"""Input detectors sharing one contract (see :mod:`badexpert.detectors.base`)."""

from __future__ import annotations

from ..errors import BadExpertError, unknown_name
from .badexpert import SCORES, BaDExpert, combine
from .base import Detector, load_detector, read_detector_file

DETECTORS: dict[str, type[Detector]] = {"badexpert": BaDExpert}


def get_detector(name: str, **params) -> Detector:
    """Build a detector by name with constructor parameters."""
    key = name.lower().replace("-", "_")
    if key not in DETECTORS:
        raise unknown_name("detector", name, DETECTORS)
    try:
        return DETECTORS[key](**params)
    except TypeError as exc:
        raise BadExpertError(f"detector '{key}': {exc}") from exc


__all__ = ["DETECTORS", "SCORES", "BaDExpert", "Detector", "combine", "get_detector", "load_detector", "read_detector_file"]
