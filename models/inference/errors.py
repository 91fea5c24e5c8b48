"""Errors the command line reports as one plain line (no traceback), importable without torch: ``dmfnet serve``
catches them in the HTTP process, which never loads torch when the model runs in its own process."""

from __future__ import annotations


class WeightsError(RuntimeError):
    """Weights file missing, corrupt, checksum mismatch or not matching its configuration."""


class RuntimeUnavailable(RuntimeError):
    """The runtime asked for is not installed (or cannot run this model)."""
