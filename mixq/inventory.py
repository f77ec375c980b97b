"""inventory(): every quantizable unit of a model with its name, kind, shapes, parameters and MACs.

The names are the ones plans use; they come from the same preparation ``quantize`` does, so an
inventory and a plan always agree on what a layer is called.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from mixq.formats import DEFAULT_BACKEND, get_backend
from mixq.leftfloat import LeftFloat, ParamCoverage, left_float_summary
from mixq.quant.custom import CustomModules
from mixq.quant.graph import units
from mixq.quant.modules import _QuantFunctional
from mixq.quantize import call_model, prepare


@dataclass
class LayerInfo:
    """One quantizable unit.

    Attributes:
        name: stable name used in plans.
        kind: "conv", "linear", "add", "matmul" ...
        module_type: the float class (or the functional op) it stands for.
        input_shapes / output_shape: shapes seen on the example inputs (first call).
        params: parameters of the float module the unit stands for (0 for functional ops; a
            convolution keeps its own count when BatchNorm is folded into it: the BatchNorm's
            parameters are listed as folded in ``Inventory.left_float``).
        macs: multiply-accumulates per example forward (all calls).
        calls: how many times the unit runs per forward (a reused module counts twice).
        formats: formats the backend can realise for it.
    """

    name: str
    kind: str
    module_type: str
    input_shapes: list = field(default_factory=list)
    output_shape: list = field(default_factory=list)
    params: int = 0
    macs: int = 0
    calls: int = 0
    formats: list = field(default_factory=list)


class Inventory(list):
    """The units (a list of ``LayerInfo``, as before) plus what the model leaves float.

    Attributes:
        left_float: every module with parameters of its own that no unit quantizes, with the reason.
        coverage: parameter totals (model = quantized units + left float).
    """

    def __init__(self, layers: Sequence[LayerInfo] = (), left_float: Sequence[LeftFloat] = (),
                 coverage: Optional[ParamCoverage] = None) -> None:
        super().__init__(layers)
        self.left_float = list(left_float)
        self.coverage = coverage


def _shape(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return list(x.shape)
    if isinstance(x, (tuple, list)):
        return [_shape(t) for t in x]
    return []


def _first_tensor(x: Any) -> Optional[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x:
        return _first_tensor(x[0])
    return None


def macs_of(m: nn.Module, inputs: tuple, output: Any) -> int:
    """Multiply-accumulates of one call of a quant unit."""
    out = _first_tensor(output)
    kind = getattr(m, "kind", "")
    if out is None:
        return 0
    if kind == "conv":
        return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if kind == "conv_transpose":
        return inputs[0].numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)
    if kind == "linear":
        return out.numel() * m.in_features
    if kind == "matmul":
        return out.numel() * inputs[0].shape[-1]
    if kind in ("lstm", "lstm_cell"):
        x = inputs[0]
        steps = x.numel() // x.shape[-1]
        dirs = 2 if getattr(m, "bidirectional", False) else 1
        layers = getattr(m, "num_layers", 1)
        h = m.hidden_size
        return steps * dirs * layers * 4 * h * (m.input_size + h)
    return 0


def inventory(model: nn.Module, example_inputs: Any, backend: str = DEFAULT_BACKEND, mode: str = "auto",
              concrete_args: Optional[dict] = None, custom_modules: CustomModules = None) -> Inventory:
    """List every quantizable unit of ``model``, measured on ``example_inputs``.

    Args:
        model: float model (not modified).
        example_inputs: one batch (Tensor, tuple of Tensors, or dict of kwargs).
        backend: decides the ``formats`` column and the unit placement rules.
        mode: "auto", "fx" or "module", as for ``quantize``.
        concrete_args / custom_modules: as for ``quantize``.

    Returns:
        An ``Inventory``: LayerInfo per unit, in execution order (units never called come last), with
        ``left_float`` and ``coverage`` attributes.
    """
    be = get_backend(backend)
    qmodel = prepare(model, be.name, mode, concrete_args, custom_modules=custom_modules, example_inputs=example_inputs)
    found = units(qmodel)
    infos = {n: LayerInfo(name=n, kind=m.kind, module_type=_type_name(m), formats=list(be.supported(m.kind)),
                          params=_float_params(model, n, m))
             for n, m in found.items()}
    order: list[str] = []
    hooks = []
    for name, m in found.items():
        def hook(mod, inputs, output, name=name):
            info = infos[name]
            if info.calls == 0:
                info.input_shapes = _shape(tuple(inputs))
                info.output_shape = _shape(output)
                order.append(name)
            info.calls += 1
            info.macs += int(macs_of(mod, inputs, output))
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call_model(qmodel.eval() if not model.training else qmodel, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    rest = [n for n in infos if n not in order]
    st = qmodel.mixq
    return Inventory([infos[n] for n in order + rest], st.left_float, st.coverage)


def _float_params(model: nn.Module, name: str, unit: nn.Module) -> int:
    if isinstance(unit, _QuantFunctional):
        return 0
    try:
        return sum(p.numel() for p in model.get_submodule(name).parameters(recurse=False))
    except AttributeError:
        return sum(p.numel() for p in unit.parameters(recurse=False))


def _type_name(m: nn.Module) -> str:
    if isinstance(m, _QuantFunctional):
        return f"functional.{m.kind}"
    if getattr(type(m), "_float_cls", None) is not None:  # a wrapped subclass: its own class name
        return type(m)._float_cls.__name__
    for base in type(m).__mro__[1:]:
        if base.__module__.startswith("torch.nn"):
            return base.__name__
    return type(m).__name__.replace("Quant", "").lower()


def inventory_table(layers: Sequence[LayerInfo]) -> str:
    """A plain-text table for terminals."""
    rows = [("name", "kind", "type", "input", "output", "params", "MACs", "calls")]
    for l in layers:
        rows.append((l.name, l.kind, l.module_type, "x".join(map(str, l.input_shapes[0])) if l.input_shapes and
                     isinstance(l.input_shapes[0], list) and all(isinstance(d, int) for d in l.input_shapes[0]) else "-",
                     "x".join(map(str, l.output_shape)) if l.output_shape and all(isinstance(d, int) for d in l.output_shape)
                     else "-", f"{l.params:,}", f"{l.macs:,}", str(l.calls)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    total_p, total_m = sum(l.params for l in layers), sum(l.macs for l in layers)
    lines.append(f"{len(layers)} units, {total_p:,} params, {total_m:,} MACs")
    left = getattr(layers, "left_float", None)
    if left is not None:
        lines.append(left_float_summary(left, getattr(layers, "coverage", None)))
    return "\n".join(lines)


def inventory_json(layers: Sequence[LayerInfo]) -> str:
    """JSON object: ``units`` (LayerInfo dicts), ``left_float`` (module, type, params, reason, by_design), ``params``."""
    cov = getattr(layers, "coverage", None)
    return json.dumps({"units": [asdict(l) for l in layers],
                       "left_float": [asdict(l) for l in getattr(layers, "left_float", [])],
                       "params": asdict(cov) if cov is not None else None}, indent=1)
