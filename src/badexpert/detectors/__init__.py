"""Input detectors sharing one contract (see :mod:`badexpert.detectors.base`)."""

from __future__ import annotations

from ..registry import Registry
from ..validation import validate_params
from .badexpert import SCORES, BaDExpert, combine
from .base import Detector, Option, load_detector, read_detector_file
from .cd import CognitiveDistillation
from .frequency import Frequency
from .fusion import Fusion
from .ibd_psc import IBDPSC
from .scale_up import ScaleUp
from .sentinet import SentiNet
from .strip import STRIP
from .teco import TeCo
from .ted import TED

#: Detectors by name.
DETECTORS = Registry("detector", [(cls.name, cls) for cls in (
    BaDExpert, STRIP, ScaleUp, TeCo, IBDPSC, CognitiveDistillation, SentiNet, Frequency, TED, Fusion,
)])


def get_detector(name: str, /, **params) -> Detector:
    """Build a detector by name with constructor parameters."""
    key = DETECTORS.canonical(name)
    cls = DETECTORS[key]
    return cls(**validate_params(cls.__init__, params, f"detector '{key}'")).check_params()


__all__ = [
    "DETECTORS", "SCORES", "BaDExpert", "CognitiveDistillation", "Detector", "Frequency", "Fusion", "IBDPSC", "Option", "STRIP",
    "ScaleUp", "SentiNet", "TED", "TeCo", "combine", "get_detector", "load_detector", "read_detector_file",
]
