"""Which quant class stands for a float module: exact types, subclasses of them, and a user's map.

- An exact type in ``QUANT_MAP`` (``nn.Conv2d`` ...) gets its quant class.
- A subclass of a supported conv / linear / pooling layer defined outside torch (EfficientNet's
  ``Conv2dStaticSamePadding``, timm's same-padding convolutions) keeps its own ``forward``: a quant
  class is made for it that quantizes the input, runs the subclass's forward with the quantized
  weight in place of its weight, and quantizes the output, so its padding or other behaviour stays.
- ``custom_modules={UserClass: QuantClass}`` (pytorch-quantization's ``custom_quant_modules`` idea)
  maps a user's class to a quant class of the user's (a ``QuantMixin`` subclass of ``UserClass``
  with a ``kind``), or to ``None`` to keep it float.
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Optional

import torch
from torch import nn

from mixq.errors import ModelError
from mixq.formats import BACKENDS
from mixq.quant.mixin import QuantMixin
from mixq.quant.modules import QUANT_MAP

CustomModules = Optional[Mapping[type, Optional[type]]]
WRAPPABLE_KINDS = ("conv", "conv_transpose", "linear", "avgpool")
_WRAPPED: dict[type, type] = {}


def _kinds() -> set[str]:
    return {k for be in BACKENDS.values() for k in be.formats}


def check_custom_modules(custom_modules: CustomModules) -> dict[type, Optional[type]]:
    """Validate a user's ``{float class: quant class or None}`` map.

    Raises:
        ModelError: a key that is not an nn.Module class, or a value that is not None nor a
            QuantMixin subclass of its key with a kind the backends know.
    """
    out: dict[type, Optional[type]] = {}
    for fcls, qcls in dict(custom_modules or {}).items():
        if not (isinstance(fcls, type) and issubclass(fcls, nn.Module)):
            raise ModelError(f"custom_modules keys must be nn.Module classes, but got {fcls!r}.")
        if qcls is not None:
            ok = isinstance(qcls, type) and issubclass(qcls, QuantMixin) and issubclass(qcls, fcls)
            if not ok:
                raise ModelError(
                    f"custom_modules[{fcls.__name__}] must be None (keep it float) or a quant class that subclasses "
                    f"both mixq.quant.QuantMixin and {fcls.__name__}, but got {qcls!r}.")
            if qcls.kind not in _kinds():
                raise ModelError(f"{qcls.__name__}.kind is {qcls.kind!r}; valid kinds are {', '.join(sorted(_kinds()))}.")
        out[fcls] = qcls
    return out


def supported_base(cls: type) -> Optional[type]:
    """The nearest proper base class of ``cls`` that has a quant class, if any."""
    for base in cls.__mro__[1:]:
        if base in QUANT_MAP:
            return base
    return None


def wrappable(cls: type) -> bool:
    """A subclass mixq quantizes by wrapping its forward: from user code, of a conv / linear / pooling layer."""
    base = supported_base(cls)
    return (base is not None and cls not in QUANT_MAP and not issubclass(cls, QuantMixin)
            and not cls.__module__.startswith("torch.") and QUANT_MAP[base].kind in WRAPPABLE_KINDS)


def quant_class_for(cls: type, custom_modules: CustomModules = None) -> Optional[type]:
    """The quant class for float class ``cls`` (None: mixq leaves it float)."""
    if custom_modules and cls in custom_modules:
        return custom_modules[cls]
    if cls in QUANT_MAP:
        return QUANT_MAP[cls]
    if wrappable(cls):
        return wrap_subclass(cls)
    return None


@contextlib.contextmanager
def _weights_replaced(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """Inside the block ``module.<name>`` reads ``tensors[name]`` (the Parameters come back after)."""
    saved = {n: module._parameters[n] for n in tensors}
    try:
        for n, t in tensors.items():
            module._parameters[n] = t
        yield
    finally:
        module._parameters.update(saved)


class _QuantSubclass(QuantMixin):
    """Quantizes around a subclass's own forward (its padding or other behaviour stays)."""

    _float_cls: type = nn.Module

    def forward(self, input: torch.Tensor, *args, **kwargs):
        x = self.quant_input(input)
        weights = {n: self.quant_weight(self._parameters[n], n) for n in self.weight_names
                   if self._parameters.get(n) is not None}
        with _weights_replaced(self, weights):
            y = self._float_cls.forward(self, x, *args, **kwargs)
        return self.quant_output(y) if isinstance(y, torch.Tensor) else y


def wrap_subclass(cls: type) -> type:
    """The quant class of a subclass of a supported layer (made once per class)."""
    if cls not in _WRAPPED:
        if not wrappable(cls):
            raise ModelError(f"{cls.__name__} is not a subclass of a conv, linear or pooling layer from user code.")
        qbase = QUANT_MAP[supported_base(cls)]
        attrs = {"kind": qbase.kind, "weight_axis": qbase.weight_axis, "weight_names": qbase.weight_names,
                 "num_inputs": 1, "_float_cls": cls, "__module__": __name__,
                 "__doc__": f"{cls.__name__} with quantized input, weight and output around its own forward."}
        _WRAPPED[cls] = type(f"Quant{cls.__name__}", (_QuantSubclass, cls), attrs)
    return _WRAPPED[cls]
