"""mixq: per-layer mixed-precision quantization, searched against measured engine latency.

Names are imported on first use (PEP 562), so ``import mixq`` and the plain-data modules
(``mixq.plan``, ``mixq.formats``, ``mixq.errors``, ``mixq.artifacts``, ``mixq.report``,
``mixq.latency.base`` / ``stats`` / ``model``, ``mixq.sensitivity.table``) import without torch;
``mixq.quantize(...)`` imports torch when it is first used.

Exported functions that share their name with the submodule that defines them (``mixq.quantize``,
``mixq.inventory``, ``mixq.evaluate``). Importing such a submodule makes the import system bind it as an attribute of
the package, which would shadow the function; the package's module type (``_Package``) binds the
function instead, so ``mixq.quantize(...)`` works whatever was imported before. As before this
change, the submodules themselves are reached with ``from mixq.quantize import ...`` or
``sys.modules["mixq.quantize"]``.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "MixqError": "errors",
    "BACKENDS": "formats", "FORMATS": "formats", "get_backend": "formats", "get_format": "formats",
    "LayerInfo": "inventory", "inventory": "inventory",
    "QuantPlan": "plan",
    "add_formats": "quantize", "calibrate": "quantize", "prepare": "quantize", "quantize": "quantize",
    "set_plan": "quantize", "applied": "quantize", "switched": "quantize", "LeftFloatWarning": "quantize",
    "check_applied": "quantize", "QuantNotAppliedWarning": "quantize", "fold_bn": "quantize",
    "left_float": "leftfloat",
    "save_quantized": "checkpoint", "load_quantized": "checkpoint",
    "evaluate": "evaluate", "evaluate_plan": "evaluate",
    "capture": "quant.capture", "CaptureError": "quant.capture",
}
# Exported functions named like the submodule that defines them.
_SHADOWED = frozenset(name for name, mod in _WHERE.items() if name == mod)

__all__ = sorted(_WHERE)


class _Package(types.ModuleType):
    """The ``mixq`` package: keeps ``quantize`` / ``inventory`` the functions when their submodules load."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)  # the import system binding the submodule: export its function
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name in _WHERE:
            value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
            setattr(self, name, value)
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_WHERE))


sys.modules[__name__].__class__ = _Package
