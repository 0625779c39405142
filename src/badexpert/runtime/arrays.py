"""The package's one image-conversion rule for numpy arrays (torch-free), for the ONNX runtime
and the HTTP service; :func:`badexpert.data.core.check_images` applies the same rule to tensors.

uint8 means ``[0, 255]``; a floating dtype means ``[0, 1]`` (values beyond ``IMAGE_TOLERANCE``
outside it are an error saying how to convert); every other dtype is an error.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadExpertError

#: Floating images may overshoot [0, 1] by this much (rounding in a user's pipeline).
IMAGE_TOLERANCE = 1e-3


def check_array(a: np.ndarray, *, what: str = "images", nonfinite: str = "error") -> np.ndarray:
    """Apply the conversion rule's checks to a numpy batch ``[N, C, H, W]`` and return it.

    ``nonfinite="allow"`` leaves NaN/inf values for the caller (a guard rejects such inputs).
    """
    if a.ndim != 4:
        raise BadExpertError(f"{what} must have shape [N, C, H, W], got {tuple(a.shape)}")
    if a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise BadExpertError(
            f"{what} of dtype {a.dtype} are not accepted (their scale is ambiguous): pass uint8 in [0, 255] "
            "(x.astype(np.uint8)) or float in [0, 1] (x / 255)"
        )
    finite = np.isfinite(a)
    if not finite.all() and nonfinite != "allow":
        bad = int((~finite).reshape(len(a), -1).any(1).sum())
        raise BadExpertError(f"{what} contain non-finite values (NaN or inf) in {bad} of {len(a)} image(s); "
                             "remove or repair those images")
    if a.size and finite.any():
        vals = a[finite] if not finite.all() else a
        lo, hi = float(vals.min()), float(vals.max())
        if lo < -IMAGE_TOLERANCE or hi > 1 + IMAGE_TOLERANCE:
            hint = ("divide by 255 (x / 255) or pass uint8" if hi > 1 + IMAGE_TOLERANCE and lo >= -IMAGE_TOLERANCE
                    and hi <= 255 else "undo any normalisation and scale to [0, 1]")
            raise BadExpertError(f"float {what} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; {hint}")
    return a
