"""User-facing failures.

Every error a user can cause is a ``MixqError`` subclass whose message names the bad value
and what would be valid, so that the CLI can print it without a traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class MixqError(Exception):
    """Root of every error mixq raises on purpose."""


class UnknownFormatError(MixqError, ValueError):
    """A format name that mixq does not know."""


class UnknownBackendError(MixqError, ValueError):
    """A backend name that mixq does not know."""


class UnsupportedFormatError(MixqError, ValueError):
    """A format the backend cannot realise for a given layer."""


class PlanError(MixqError, ValueError):
    """A plan that does not fit the model (missing layers, bad JSON, wrong backend)."""


class ConfigError(MixqError, ValueError):
    """An option value that is out of range or unknown (descriptor fields, CLI options)."""


class CalibrationError(MixqError, ValueError):
    """Calibration data that cannot calibrate (empty, NaN/Inf) or a quantizer used before calibration."""


class ModelError(MixqError, ValueError):
    """A model mixq cannot work with (for example: no quantizable layer)."""


class QuantNotAppliedError(MixqError, RuntimeError):
    """A quantization that does not happen: quantized units never ran, or the output equals the float output."""


class SpecError(MixqError, ValueError):
    """A ``module:function`` spec that does not resolve."""


def did_you_mean(bad: str, valid: Iterable[str], n: int = 3) -> str:
    """Return a ' Did you mean ...?' suffix naming the closest valid names, or ''."""
    close = difflib.get_close_matches(bad, list(valid), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class CheckpointError(MixqError, ValueError):
    """A saved quantized model that cannot be read (missing, corrupt, or not a mixq file)."""


class StaleCheckpointError(CheckpointError):
    """A saved quantized model made from other weights, calibration data or versions than the ones at hand."""
