"""Reversible monkey-patching of ``torch.nn`` (pytorch-quantization's ``quant_modules``).

After ``initialize()``, ``nn.Conv2d(...)`` builds a ``QuantConv2d`` (int8 on the default backend),
so a model definition can be quantized without editing it; ``deactivate()`` puts back every
original object. Every place a float class is reachable by its name is patched: ``torch.nn``,
``torch.nn.modules`` and the ``torch.nn.modules.*`` submodule that defines it, so
``from torch.nn.modules.conv import Conv2d`` is patched too.

The quant classes subclass the float classes, and their ``super().__init__`` goes through the MRO
fixed when the class was created, so it reaches the original float class while patched.

Example::

    from mixq.quant import quant_modules
    quant_modules.initialize()
    model = MyNet()          # its nn.Conv2d / nn.Linear layers are Quant* modules
    quant_modules.deactivate()
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Iterable, Optional, Sequence

from mixq.errors import ModelError, did_you_mean
from mixq.quant import rnn as _rnn  # noqa: F401  (registers LSTM / LSTMCell in QUANT_MAP)
from mixq.quant.modules import QUANT_MAP

_MISSING = object()
# (id(module), attribute) -> (module, original object or _MISSING), in patch order.
_originals: dict[tuple[int, str], tuple[ModuleType, object]] = {}


def _nn_modules() -> list[ModuleType]:
    """``torch.nn`` and its already imported ``torch.nn.modules*`` submodules."""
    names = sorted(n for n in list(sys.modules) if n == "torch.nn" or n == "torch.nn.modules"
                   or n.startswith("torch.nn.modules."))
    return [sys.modules[n] for n in names if isinstance(sys.modules[n], ModuleType)]


def _default_targets(float_module_list: Iterable[str]) -> list[tuple[ModuleType, str, type]]:
    skip = set(float_module_list)
    known = {cls.__name__ for cls in QUANT_MAP}
    unknown = sorted(skip - known)
    if unknown:
        raise ModelError(
            f"float_module_list names unknown class(es) {unknown}; the classes quant_modules patches are "
            f"{', '.join(sorted(known))}.{did_you_mean(unknown[0], known)}"
        )
    targets = []
    modules = _nn_modules()
    for float_cls, quant_cls in QUANT_MAP.items():
        name = float_cls.__name__
        if name in skip:
            continue
        targets += [(mod, name, quant_cls) for mod in modules if vars(mod).get(name) is float_cls]
    return targets


def _custom_targets(custom_quant_modules: Sequence) -> list[tuple[ModuleType, str, type]]:
    targets = []
    for entry in custom_quant_modules:
        ok = (isinstance(entry, (tuple, list)) and len(entry) == 3 and hasattr(entry[0], "__dict__")
              and isinstance(entry[1], str) and isinstance(entry[2], type))
        if not ok:
            raise ModelError(
                f"custom_quant_modules entries must be (module, 'ClassName', QuantClass) tuples, but got {entry!r}."
            )
        targets.append((entry[0], entry[1], entry[2]))
    return targets


def initialize(float_module_list: Optional[Iterable[str]] = None,
               custom_quant_modules: Optional[Sequence[tuple[ModuleType, str, type]]] = None) -> None:
    """Replace float ``torch.nn`` classes by their quant classes until ``deactivate()``.

    Calling it again first undoes the previous call, so originals are never lost.

    Args:
        float_module_list: class names to leave float, for example ``["Linear"]``.
        custom_quant_modules: extra ``(module, "ClassName", QuantClass)`` patches.

    Raises:
        ModelError: an unknown name in ``float_module_list`` or a malformed custom entry
            (nothing is patched then).
    """
    deactivate()
    targets = _default_targets(float_module_list or ()) + _custom_targets(custom_quant_modules or ())
    for mod, name, quant_cls in targets:
        key = (id(mod), name)
        if key not in _originals:
            _originals[key] = (mod, vars(mod).get(name, _MISSING))
        setattr(mod, name, quant_cls)


def deactivate() -> None:
    """Restore every object ``initialize()`` replaced (a no-op when nothing is patched)."""
    for (_, name), (mod, original) in reversed(list(_originals.items())):
        if original is _MISSING:
            if name in vars(mod):
                delattr(mod, name)
        else:
            setattr(mod, name, original)
    _originals.clear()


def is_active() -> bool:
    """True between ``initialize()`` and ``deactivate()``."""
    return bool(_originals)
