"""User-facing errors.

Every mistake a user can make (missing file, wrong shape, unknown name, corrupt checkpoint, a
detector used before fitting) is raised as a :class:`BadExpertError` whose message is one line
saying what is wrong and what to do. The CLI prints that line and exits with status 2.
"""

from __future__ import annotations


class BadExpertError(ValueError):
    """A mistake in how badexpert was called or in the files it was given."""


class NotFittedError(BadExpertError):
    """A detector was used before ``fit`` (or ``calibrate``) was called."""


class TimeBudgetReached(Exception):
    """A run stopped at its time budget (``badexpert grid --time-budget``) with its progress saved:
    not a mistake; running the same command again resumes where it stopped."""


def unknown_name(kind: str, name: str, known) -> BadExpertError:
    """The error for a name missing from a registry, listing the valid choices."""
    return BadExpertError(f"unknown {kind} '{name}'; choose one of: {', '.join(sorted(known))}")
