"""The package's one image-conversion rule for numpy arrays: :mod:`badexpert.runtime.arrays`
(torch-free), re-exported here."""

from .runtime.arrays import IMAGE_TOLERANCE, check_array

__all__ = ["IMAGE_TOLERANCE", "check_array"]
