"""Errors and warnings of the export (every one a ``MixqError`` subclass that says what to do)."""
from __future__ import annotations

from mixq.errors import MixqError


class ExportError(MixqError, ValueError):
    """The model or plan cannot be written as ONNX for its engine."""


class OpsetError(ExportError):
    """An opset the flavour (or a format of the plan) cannot run with."""


class FlavourError(ExportError):
    """The plan's backend is not the backend the float graph was exported for."""


class ExportWarning(UserWarning):
    """The exported graph may not compute what the model computes for every input."""
