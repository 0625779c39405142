"""Resource limits: what one input file may make badexpert allocate.

A small hostile file (a zip of one huge PNG, a gzip IDX whose header declares gigabytes, a model
file whose metadata asks for an absurd width) must be answered with one line, not with an
out-of-memory kill. Every reader checks what a file *declares* against these limits before it
allocates anything.

- :data:`MAX_IMAGE_PIXELS`: pixels of one decoded image (width x height); larger images are
  refused before they are decoded.
- :func:`memory_budget`: bytes one allocation driven by file contents may take; the environment
  variable ``BADEXPERT_MAX_MEMORY`` (``"8G"``, ``"512M"``, or plain bytes) overrides the default
  of half the machine's physical memory, capped at 32 GiB.
- :data:`MAX_METADATA_BYTES` and :data:`MAX_METADATA_DEPTH`: the JSON metadata of a model,
  detector, bundle or ONNX file (:mod:`badexpert.metadata`, the one reader of them all).
- :data:`DEPLOY_BATCH`: inputs the deployment side runs at once; a guard's declared input shape
  is checked for a batch of this many before a bundle or an ONNX file is accepted.
"""

from __future__ import annotations

import os

from .errors import BadExpertError

#: Largest image (width x height) decoded from a file: 4096 x 4096.
MAX_IMAGE_PIXELS = 4096 * 4096
ENV = "BADEXPERT_MAX_MEMORY"
#: Largest JSON metadata a file may carry (a bundle holds a few KB; an ONNX guard's calibration
#: scores take about 22 bytes each, so this holds some 700,000 of them).
MAX_METADATA_BYTES = 16 * 1024**2
#: Deepest nesting of that JSON (the files badexpert writes nest 4 levels).
MAX_METADATA_DEPTH = 32
#: Inputs run at once by `export`'s verification, :class:`~badexpert.runtime.onnx.OnnxGuard` and the
#: service: a declared input shape must fit a batch of this many in the memory budget.
DEPLOY_BATCH = 256
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 1024**3


def parse_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5G"``, ``"4096"`` -> bytes (binary units)."""
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _UNITS else ""
    try:
        value = float(s[: len(s) - len(unit)] if unit else s)
    except ValueError:
        raise BadExpertError(f"cannot read memory size {text!r}; write e.g. 8G, 512M or a number of bytes") from None
    if not value > 0:
        raise BadExpertError(f"memory size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def memory_budget() -> int:
    """Bytes one file-driven allocation may take (``BADEXPERT_MAX_MEMORY`` overrides)."""
    env = os.environ.get(ENV)
    if env:
        try:
            return parse_size(env)
        except BadExpertError as exc:
            raise BadExpertError(f"{ENV}: {exc}") from None
    return min(_physical_memory() // 2, 32 * 1024**3)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_allocation(nbytes: int, what: str, hint: str = "") -> None:
    """Raise a one-line :class:`BadExpertError` if ``what`` would take more than the budget.

    ``what`` describes the allocation ("the images of 'x.zip' (60000 x 3 x 2000 x 2000)");
    ``hint`` says what to do (a smaller ``--image-size``...); the message also names
    ``BADEXPERT_MAX_MEMORY``.
    """
    budget = memory_budget()
    if nbytes > budget:
        tail = f"; {hint}" if hint else ""
        raise BadExpertError(
            f"{what} would take {human_bytes(nbytes)}, above the memory budget of {human_bytes(budget)}{tail} "
            f"(or raise {ENV})"
        )


def check_pixels(width: int, height: int, what: str) -> None:
    """Refuse an image above :data:`MAX_IMAGE_PIXELS` before it is decoded."""
    if width * height > MAX_IMAGE_PIXELS or width < 1 or height < 1:
        raise BadExpertError(
            f"{what} is {width}x{height} pixels, outside the limit of {MAX_IMAGE_PIXELS // 1024**2} megapixels "
            f"(4096x4096); shrink it or remove it"
        )
