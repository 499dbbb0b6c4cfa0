"""Errors a user can cause. ``dlsm.launch`` prints them as one line and exits non-zero.

Programming errors are not wrapped: they stay tracebacks.
"""

from __future__ import annotations


class DlsmError(Exception):
    """Base class of user-facing errors; ``str(err)`` is the one line shown to the user."""

    exit_code = 2


class ConfigError(DlsmError):
    """A gin file, binding or value is wrong."""


class DataError(DlsmError):
    """A dataset is missing or cannot be read."""


class CheckpointError(DlsmError):
    """A checkpoint is missing, unreadable or does not match the model."""


class TrackingError(DlsmError):
    """The MLflow tracking store (``MLFLOW_TRACKING_URI``) cannot be reached, created or written."""


class LockedError(DlsmError):
    """Another process holds what this one needs alone (the experiment's checkpoint folder)."""

    exit_code = 4


class DiskFullError(DlsmError):
    """A checkpoint or sample file could not be written: no space left on the device (ENOSPC) or the disk quota is
    used up (EDQUOT). The previous file is kept; freeing space and relaunching resumes (:mod:`dlsm.files`)."""

    exit_code = 5


class NonFiniteLossError(DlsmError):
    """Training produced a NaN or Inf loss; the last good checkpoint is kept."""

    exit_code = 3


def print_error(err: DlsmError) -> int:
    """Print a user error as one line on stderr (``dlsm: error: ...``); returns its exit code."""
    import sys

    print(f"dlsm: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
    return err.exit_code
