"""Quant modules for functional calls found by FX graph mode: ``+``, ``torch.matmul``, ``torch.cat``, max pooling.

They hold no weights: only input (and output) quantizers, named after the module whose forward
made the call (``layer1.0.add``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mixq.formats import DEFAULT_BACKEND
from mixq.quant.mixin import QuantMixin

class _QuantFunctional(QuantMixin, nn.Module):
    weight_names = ()

    def __init__(self, backend: str = DEFAULT_BACKEND, formats: Sequence[str] = ("int8",),
                 calib_method: str = "max", num_inputs: Optional[int] = None) -> None:
        nn.Module.__init__(self)
        if num_inputs is not None:
            self.num_inputs = num_inputs  # instance value shadows the class default (cat of N tensors)
        self.init_quantizer(backend=backend, formats=formats, calib_method=calib_method)


class QuantAdd(_QuantFunctional):
    """``a + b`` with quantized inputs (TensorRT: only the residual input, set by ``input_mask``)."""

    kind = "add"
    num_inputs = 2

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.quant_output(self.quant_input(a, 0) + self.quant_input(b, 1))


class QuantMatMul(_QuantFunctional):
    """``torch.matmul(a, b)`` with both operands quantized (attention scores and context)."""

    kind = "matmul"
    num_inputs = 2

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.quant_output(torch.matmul(self.quant_input(a, 0), self.quant_input(b, 1)))


class QuantCat(_QuantFunctional):
    """``torch.cat(tensors, dim)`` with every input quantized."""

    kind = "cat"

    def __init__(self, dim: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dim = dim

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
            tensors = tuple(tensors[0])
        qs = [self.quant_input(t, i) for i, t in enumerate(tensors)]
        return self.quant_output(torch.cat(qs, self.dim))


class QuantMaxPool(_QuantFunctional):
    """Max pooling on a quantized input; the output keeps the input's scale, so it is not requantized."""

    kind = "maxpool"

    def __init__(self, nd: int = 2, pool_kwargs: Optional[dict] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.quantize_output = False
        self.nd = nd
        self.pool_kwargs = dict(pool_kwargs or {})

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[self.nd - 1]
        return fn(self.quant_input(input), **self.pool_kwargs)


# float class -> quant class, for module swapping and quant_modules.initialize
