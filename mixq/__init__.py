"""mixq: per-layer mixed-precision quantization, searched against measured engine latency.

The public names load on first use (PEP 562), so ``import mixq.report`` or ``mixq.artifacts``
stays free of torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MixqError": "mixq.errors",
    "BACKENDS": "mixq.formats", "FORMATS": "mixq.formats", "get_backend": "mixq.formats", "get_format": "mixq.formats",
    "LayerInfo": "mixq.inventory", "inventory": "mixq.inventory",
    "QuantPlan": "mixq.plan",
    "add_formats": "mixq.quantize", "calibrate": "mixq.quantize", "prepare": "mixq.quantize",
    "quantize": "mixq.quantize", "set_plan": "mixq.quantize",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
