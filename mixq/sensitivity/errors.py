"""Errors of the sensitivity scan (MixqError subclasses, printed by the CLI without a traceback)."""
from __future__ import annotations

from mixq.errors import MixqError


class ScanError(MixqError, ValueError):
    """Scan input that cannot be scanned: no evaluation data, unknown layer, bad mode or format."""


class StaleScanError(ScanError):
    """A results file made for a different model, data, metric or settings."""
