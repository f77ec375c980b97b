"""What ONNX Runtime's CPU provider made of a model: integer kernels, float ops with Q/DQ around them,
and the quantized units that silently stayed float (``count_kernels`` on the optimized graph).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import onnx

# Kernels that compute on integers (what a quantized layer should become on the CPU provider).
INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearSoftmax", "QLinearLeakyRelu", "QLinearReduceMean",
    "QLinearWhere", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulNBits",
    "QAttention", "QEmbedLayerNormalization", "QLinearConvTranspose",
})
# Ops that only move or reshape data: on a uint8 tensor they are not a loss.
_MOVE_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Identity",
                       "MaxPool", "NhwcMaxPool", "Split", "Expand", "Tile", "Resize", "Pad", "Concat",
                       "ReorderInput", "ReorderOutput"})

@dataclass
class KernelCounts:
    """What the CPU provider made of a model after its graph optimizations.

    Attributes:
        integer: op type -> count of integer kernels (QLinearConv, QGemm, MatMulIntegerToFloat ...).
        float_qdq: op type -> count of float compute nodes fed by a DequantizeLinear or feeding a
            QuantizeLinear (Q/DQ around a float op).
        quantize / dequantize: remaining QuantizeLinear / DequantizeLinear nodes.
        float_total: every other compute node.
        units_integer / units_float / units_unknown: quantized units whose main node is an
            integer kernel / stayed a float op (a silent loss) / was not found after fusion.
    """

    integer: dict[str, int] = field(default_factory=dict)
    float_qdq: dict[str, int] = field(default_factory=dict)
    quantize: int = 0
    dequantize: int = 0
    float_total: int = 0
    units_integer: list[str] = field(default_factory=list)
    units_float: list[str] = field(default_factory=list)
    units_unknown: list[str] = field(default_factory=list)

    @property
    def num_integer(self) -> int:
        return sum(self.integer.values())

    @property
    def num_float_qdq(self) -> int:
        return sum(self.float_qdq.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_integer"], d["num_float_qdq"] = self.num_integer, self.num_float_qdq
        return d

    def summary(self) -> str:
        ints = ", ".join(f"{k} {v}" for k, v in sorted(self.integer.items())) or "none"
        flt = ", ".join(f"{k} {v}" for k, v in sorted(self.float_qdq.items())) or "none"
        s = f"integer kernels: {self.num_integer} ({ints}); float ops with Q/DQ around: {self.num_float_qdq} ({flt})"
        if self.units_float:
            s += f"; QUANTIZED LAYERS THAT STAYED FLOAT: {', '.join(self.units_float)}"
        return s


def count_kernels(optimized: onnx.ModelProto, unit_nodes: Optional[Mapping[str, Sequence[str]]] = None,
                  quantized: Sequence[str] = ()) -> KernelCounts:
    """Classify the nodes of an optimized model (see ``KernelCounts``)."""
    producer = {o: n for n in optimized.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in optimized.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    kc = KernelCounts()
    integer, fqdq = Counter(), Counter()
    by_name = {}
    for n in optimized.graph.node:
        # The layout transformer renames the nodes it rewrites "<name>_token_<k>".
        by_name.setdefault(re.sub(r"(_token_\d+)+$", "", n.name), n)

    def near_qdq(n) -> bool:
        fed = any(producer.get(t) is not None and producer[t].op_type == "DequantizeLinear" for t in n.input)
        feeds = any(c.op_type == "QuantizeLinear" for t in n.output for c in consumers.get(t, []))
        return fed or feeds

    for n in optimized.graph.node:
        if n.op_type in INTEGER_OPS:
            integer[n.op_type] += 1
        elif n.op_type == "QuantizeLinear":
            kc.quantize += 1
        elif n.op_type == "DequantizeLinear":
            kc.dequantize += 1
        elif n.op_type in _MOVE_OPS or n.op_type in ("Shape", "Constant", "Cast"):
            continue
        elif near_qdq(n):
            fqdq[n.op_type] += 1
        else:
            kc.float_total += 1
    kc.integer, kc.float_qdq = dict(integer), dict(fqdq)
    for unit in quantized:
        names = list((unit_nodes or {}).get(unit, ()))
        node = by_name.get(names[0]) if names else None
        if node is None:
            kc.units_unknown.append(unit)
        elif node.op_type in INTEGER_OPS:
            kc.units_integer.append(unit)
        elif node.op_type in _MOVE_OPS and not any(
                producer.get(t) is not None and producer[t].op_type == "DequantizeLinear" for t in node.input):
            kc.units_integer.append(unit)  # e.g. MaxPool running on uint8
        else:
            kc.units_float.append(unit)
    return kc
