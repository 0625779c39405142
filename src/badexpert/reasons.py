"""Why a guard accepted or rejected an input: :mod:`badexpert.runtime.reasons` (torch-free),
re-exported here."""

from .runtime.reasons import ACCEPTED, REJECT_NONFINITE_INPUT, REJECT_NONFINITE_SCORE, REJECT_SCORE, reject_reasons

__all__ = ["ACCEPTED", "REJECT_NONFINITE_INPUT", "REJECT_NONFINITE_SCORE", "REJECT_SCORE", "reject_reasons"]
