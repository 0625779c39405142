"""The torch-free runtime: what ``serve --onnx`` runs, importable without PyTorch.

- :mod:`~badexpert.runtime.arrays`: the package's one image-conversion rule for numpy arrays;
- :mod:`~badexpert.runtime.reasons`: why an input was accepted or rejected (the one rule);
- :mod:`~badexpert.runtime.pvalues`: conformal p-values against the calibration scores;
- :mod:`~badexpert.runtime.onnx`: :class:`OnnxGuard`, an exported guard run with onnxruntime.

Nothing here imports torch; the guard (:mod:`badexpert.deploy.guard`) and the service use these same
functions, so the torch and ONNX paths cannot disagree on a rule.
"""

from .arrays import IMAGE_TOLERANCE, check_array
from .onnx import OnnxGuard
from .pvalues import conformal_p_values, sorted_calibration
from .reasons import ACCEPTED, REJECT_NONFINITE_INPUT, REJECT_NONFINITE_SCORE, REJECT_SCORE, reject_reasons

__all__ = ["ACCEPTED", "IMAGE_TOLERANCE", "OnnxGuard", "REJECT_NONFINITE_INPUT", "REJECT_NONFINITE_SCORE",
           "REJECT_SCORE", "check_array", "conformal_p_values", "reject_reasons", "sorted_calibration"]
