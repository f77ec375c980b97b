"""Zero padding on the integer side of a Q/DQ pair, so that the engine fuses the padded layer.

A layer that pads its own input in ``forward`` (EfficientNet's ``Conv2dStaticSamePadding``, timm's
same-padding convolutions) exports as ``Q -> DQ -> Pad -> Conv``: mixq's input mark sits at the module's
input, before the pad. ONNX Runtime fuses ``DQ -> Conv`` into ``QLinearConv`` only when the DQ feeds the
Conv directly, so such a layer ran as a float Conv between Q/DQ pairs (measured on EfficientNet-Lite0:
17 of 49 convolutions, all-INT8 3.7x slower than FP32).

``pad_before_dequantize`` rewrites each ``DQ(q, s, zp) -> Pad(mode=constant, value=0)`` into
``Pad(q, value=zp) -> DQ(s, zp)``. It is exact: ``DQ(zp) == 0``, so padding the integer codes with the
zero point gives the same real values as padding the dequantized tensor with zeros; the simulation, which
quantizes before the pad, computes the same numbers.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _constant_value(name: str, inits: dict, producers: dict) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def is_zero_pad(node: onnx.NodeProto, inits: dict, producers: dict) -> bool:
    """Whether ``node`` is a Pad in constant mode whose value is 0 (or absent)."""
    if node.op_type != "Pad" or not node.input:
        return False
    mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"constant")
    if mode not in (b"constant", "constant"):
        return False
    if len(node.input) > 2 and node.input[2]:
        value = _constant_value(node.input[2], inits, producers)
        return value is not None and not np.any(value != 0)
    return True


def pad_before_dequantize(model: onnx.ModelProto) -> int:
    """Move zero-padding Pads in front of the DequantizeLinear that feeds them (in place); return how many.

    Only a per-tensor 8-bit integer DQ whose output feeds nothing but the Pad (and Shape nodes), and a
    constant-mode Pad whose value is 0 (or absent), are rewritten.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    moved = 0
    for pad in list(g.node):
        if not is_zero_pad(pad, inits, producers):
            continue
        dq = producers.get(pad.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        # Besides the Pad, only Shape nodes may read the DQ (a 'same' padding computes its pads from the input
        # shape); they read the codes instead, which have the same shape.
        others = [n for n in consumers.get(dq.output[0], []) if n is not pad]
        if any(n.op_type != "Shape" for n in others):
            continue
        if len(dq.input) < 3 or any(a.name == "axis" for a in dq.attribute):
            continue
        zp = _constant_value(dq.input[2], inits, producers)
        scale = _constant_value(dq.input[1], inits, producers)
        if zp is None or scale is None or zp.size != 1 or scale.size != 1 or zp.dtype not in (np.uint8, np.int8):
            continue
        # q -> Pad(value = zero point) -> DQ: the DQ now reads the padded codes and writes the Pad's output.
        padded = pad.output[0] + "_padded_codes"
        inputs = [dq.input[0], pad.input[1] if len(pad.input) > 1 else "", dq.input[2]]
        inputs += list(pad.input[3:])
        new_pad = helper.make_node("Pad", inputs, [padded], name=pad.name + "_on_codes", mode="constant")
        new_dq = helper.make_node("DequantizeLinear", [padded, dq.input[1], dq.input[2]], [pad.output[0]],
                                  name=dq.name + "_after_pad")
        for n in others:
            n.input[0] = dq.input[0]
        at = list(g.node).index(pad) - 1  # where the old Pad lands once the DQ before it is gone
        g.node.remove(dq)
        g.node.remove(pad)
        g.node.insert(at, new_pad)
        g.node.insert(at + 1, new_dq)
        moved += 1
    return moved
