"""Quant modules for float layers: Conv1/2/3d, ConvTranspose1/2/3d, Linear, (Adaptive)AvgPool1/2/3d.

``QUANT_MAP`` maps each float class to its quant class (module swapping, ``quant_modules``), and
``from_float`` builds a quant module sharing a float module's parameters. The shared machinery is
``QuantMixin`` (``mixin.py``); the functional-op modules are in ``functional.py``. Both are
re-exported here, where the rest of mixq imports them from.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mixq.quant.functional import QuantAdd, QuantCat, QuantMatMul, QuantMaxPool, _QuantFunctional
from mixq.quant.mixin import QuantMixin, _quant_kwargs, _wkey

__all__ = ["QUANT_MAP", "KIND_OF", "QuantMixin", "from_float", "quant_layers", "_QuantFunctional", "_quant_kwargs",
           "_wkey", "QuantAdd", "QuantCat", "QuantMatMul", "QuantMaxPool"]


# --------------------------------------------------------------------- weighted layers
class _QuantConvNd(QuantMixin):
    kind = "conv"

    def __init__(self, *args, **kwargs) -> None:
        q = _quant_kwargs(kwargs)
        super().__init__(*args, **kwargs)
        self.init_quantizer(**q)

    def forward(self, input: torch.Tensor, *rest) -> torch.Tensor:
        x = self.quant_input(input)
        w = self.quant_weight(self.weight)
        y = self._conv_forward(x, w, self.bias) if not rest else self._conv_forward_t(x, w, *rest)
        return self.quant_output(y)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    pass


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    pass


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    pass


class _QuantConvTransposeNd(QuantMixin):
    kind = "conv_transpose"
    weight_axis = 1  # ConvTranspose weights are (in, out/groups, k...)
    _fn = None

    def __init__(self, *args, **kwargs) -> None:
        q = _quant_kwargs(kwargs)
        super().__init__(*args, **kwargs)
        self.init_quantizer(**q)

    def forward(self, input: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        nd = len(self.kernel_size)
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              nd, self.dilation)
        x = self.quant_input(input)
        w = self.quant_weight(self.weight)
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        y = fn(x, w, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation)
        return self.quant_output(y)


class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    pass


class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    pass


class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    pass


class QuantLinear(QuantMixin, nn.Linear):
    kind = "linear"

    def __init__(self, *args, **kwargs) -> None:
        q = _quant_kwargs(kwargs)
        super().__init__(*args, **kwargs)
        self.init_quantizer(**q)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.quant_input(input), self.quant_weight(self.weight), self.bias)
        return self.quant_output(y)


# --------------------------------------------------------------------- pooling
class _QuantPool(QuantMixin):
    kind = "avgpool"
    weight_names = ()

    def __init__(self, *args, **kwargs) -> None:
        q = _quant_kwargs(kwargs)
        super().__init__(*args, **kwargs)
        self.init_quantizer(**q)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.quant_output(super().forward(self.quant_input(input)))


class QuantAvgPool1d(_QuantPool, nn.AvgPool1d):
    pass


class QuantAvgPool2d(_QuantPool, nn.AvgPool2d):
    pass


class QuantAvgPool3d(_QuantPool, nn.AvgPool3d):
    pass


class QuantAdaptiveAvgPool1d(_QuantPool, nn.AdaptiveAvgPool1d):
    pass


class QuantAdaptiveAvgPool2d(_QuantPool, nn.AdaptiveAvgPool2d):
    pass


class QuantAdaptiveAvgPool3d(_QuantPool, nn.AdaptiveAvgPool3d):
    pass


QUANT_MAP: dict[type, type] = {
    nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d, nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
    nn.Linear: QuantLinear,
    nn.AvgPool1d: QuantAvgPool1d, nn.AvgPool2d: QuantAvgPool2d, nn.AvgPool3d: QuantAvgPool3d,
    nn.AdaptiveAvgPool1d: QuantAdaptiveAvgPool1d, nn.AdaptiveAvgPool2d: QuantAdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d: QuantAdaptiveAvgPool3d,
}

# float class -> inventory kind, for modules that are quantizable units
KIND_OF: dict[type, str] = {float_cls: quant_cls.kind for float_cls, quant_cls in QUANT_MAP.items()}


def from_float(module: nn.Module, quant_cls: Optional[type] = None, **quant_kwargs) -> nn.Module:
    """Return a quant module sharing ``module``'s parameters (no copy of the weights).

    Args:
        module: an instance of a float class in ``QUANT_MAP`` (or of ``quant_cls``'s float class).
        quant_cls: the quant class to build (default: ``QUANT_MAP[type(module)]``).
        quant_kwargs: passed to ``init_quantizer`` (backend, formats, calib_method).
    """
    qcls = quant_cls or QUANT_MAP[type(module)]
    q = qcls.__new__(qcls)
    # Fresh containers (parameter/buffer/module dicts, hook dicts, the non-persistent buffer set,
    # RNN weight lists) so the float module is left untouched; the tensors themselves are shared.
    q.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, list, set)) else v
                       for k, v in module.__dict__.items()})
    q._forward_hooks = type(module._forward_hooks)()
    q._forward_pre_hooks = type(module._forward_pre_hooks)()
    q.init_quantizer(**quant_kwargs)
    return q


def quant_layers(model: nn.Module):
    """Yield (name, module) for every quant module in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin):
            yield name, m
