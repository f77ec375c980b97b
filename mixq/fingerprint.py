"""Content hashes of what a calibrated model depends on: its weights and its calibration data.

A hash covers names, dtypes, shapes and the raw bytes of every tensor, so two models (or two
calibration sets) hash equal only when they hold the same numbers in the same places.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


class Hasher:
    """An incremental SHA-256 over nested batches (tensors, tuples, lists, dicts, numbers, strings)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.batches = 0

    def update(self, obj: Any) -> None:
        """Add one object (for example one calibration batch)."""
        self._feed(obj)
        self.batches += 1

    def _feed(self, obj: Any) -> None:
        h = self._h
        if isinstance(obj, torch.Tensor):
            h.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
            h.update(_tensor_bytes(obj))
        elif isinstance(obj, dict):
            h.update(f"D{len(obj)}".encode())
            for k in sorted(obj, key=str):
                h.update(f"K{k!s}".encode())
                self._feed(obj[k])
        elif isinstance(obj, (tuple, list)):
            h.update(f"L{len(obj)}".encode())
            for x in obj:
                self._feed(x)
        else:
            h.update(f"V{type(obj).__name__}:{obj!r}".encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state_dict (every parameter and buffer, by name)."""
    h = Hasher()
    for name, t in sorted(model.state_dict().items()):
        h.update((name, t))
    return h.hexdigest()


def parameters_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters only, by name (quantizer parameters such as learned ranges excluded)."""
    h = Hasher()
    for name, p in sorted(model.named_parameters(remove_duplicate=False)):
        if ".quantizers." not in f".{name}":
            h.update((name, p))
    return h.hexdigest()


def data_digest(batches: Any) -> str:
    """SHA-256 of an iterable of batches, as ``calibrate`` computes it while it runs them."""
    h = Hasher()
    for b in batches:
        h.update(b)
    return h.hexdigest()
