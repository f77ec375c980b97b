"""The rewriter: one pass over the float graph's nodes that builds the ModelProto of one plan.

Each mark becomes a Q/DQ pair with the scale and zero point of the plan format's quantizer, a Cast
(fp16 / bf16), or nothing (float); quantized weights become integer initializers + DequantizeLinear.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mixq.errors import PlanError
from mixq.export.errors import ExportError
from mixq.export.collect import _consumers
from mixq.export.float_graph import _MARK_DOMAIN, FloatGraph, Site, _cached_weight
from mixq.export.pad import is_zero_pad
from mixq.export.qparams import (_FLOAT_TYPES, _TYPE_NAME, _activation_qparams, _QParams, _quantize_bias,
                                 _to_float_type, _WeightQ, bias_weight_scale)
from mixq.formats import get_format
from mixq.quant.modules import _wkey


class _Rewriter:
    """Builds the plan's ModelProto from the template in one pass over its nodes."""

    def __init__(self, graph: FloatGraph, mods: Optional[dict], resolved: dict[str, str]) -> None:
        self.fg, self.mods, self.resolved = graph, mods or {}, resolved
        self.g = graph.template.graph
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.rename: dict[str, str] = {}
        self.qdq_of: dict[str, tuple] = {}  # DQ output -> (qparams key)
        self.act_scale: dict[str, np.ndarray] = {}  # DQ output -> per-tensor scale (for int32 bias)
        self.wq_of: dict[str, _WeightQ] = {}  # weight DQ output -> weight quantization
        self.w_inits: dict[str, tuple[int, int]] = {}  # weight DQ output -> indices of its codes / scale in inits
        self.replace: dict[int, list[onnx.NodeProto]] = {}
        self.used_names: set[str] = set()
        self.outputs = {o.name for o in self.g.output}
        self.template_inits = {t.name: t for t in self.g.initializer}
        self._consumers: Optional[dict[str, list[int]]] = None
        self.half: dict[int, int] = {}  # body node -> float elem type it runs in
        self.half_units = {u: _FLOAT_TYPES[get_format(f).float_dtype] for u, f in resolved.items()
                           if get_format(f).is_float and get_format(f).float_dtype in _FLOAT_TYPES}
        for u, elem in self.half_units.items():
            for i in graph._body.get(u, []):
                self.half[i] = elem
        self.pool_qp: dict[str, _QParams] = {}  # max-pool unit -> its input's Q/DQ, kept on its output
        self.pool_node = {i: u for u, idx in graph._body.items() if graph.kinds.get(u) == "maxpool" for i in idx}

    # ------------------------------------------------------------- helpers
    def uniq(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names:
            name, k = f"{base}_{k}", k + 1
        self.used_names.add(name)
        return name

    def res(self, t: str) -> str:
        while t in self.rename:
            t = self.rename[t]
        return t

    def init(self, arr: np.ndarray, base: str) -> str:
        name = self.uniq(base)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def emit(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> None:
        """Append a new ``op`` node named ``name`` (made unique)."""
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.uniq(name), **attrs))

    def half_init(self, t: str, elem: int) -> str:
        """A copy of float initializer ``t`` in the float type ``elem`` (fp16 / bf16)."""
        a = numpy_helper.to_array(self.template_inits[t])
        return self.init(_to_float_type(a, elem), f"{t}_{_TYPE_NAME[elem]}")

    def resolve_inputs(self, node: onnx.NodeProto) -> None:
        node.input[:] = [self.res(t) if t else t for t in node.input]

    def alias(self, dst: str, src: str) -> None:
        """Make ``dst`` mean ``src`` (an Identity where ``dst`` is a graph output)."""
        if dst in self.outputs:
            self.emit("Identity", [src], [dst], f"{dst}/Identity")
        else:
            self.rename[dst] = src

    # ------------------------------------------------------------- sites
    def site_quantizer(self, s: Site):
        """Return (format, quantizer or None) as the module's forward would use it."""
        fmt = get_format(self.resolved.get(s.unit, "fp32"))
        if fmt.is_float:
            return fmt, None
        m = self.mods.get(s.module)
        if m is None or fmt.name not in m.quantizers:
            raise PlanError(f"format {fmt.name!r} was not prepared for layer {s.unit!r}; quantize the model with "
                            f"formats=[{fmt.name!r}] (or a plan that uses it) before exporting.")
        qs = m.quantizers[fmt.name]
        if s.is_weight:
            key = _wkey(s.role)
            active = key in qs
        elif s.role == "output":
            key, active = "output", bool(m.quantize_output) and "output" in qs
        else:
            key = s.role
            i = int(s.role[5:])
            active = key in qs and bool(m.input_mask[i]) if i < len(m.input_mask) else False
        if not active:
            return fmt, None
        q = qs[key]
        if not q.enabled or not getattr(q, "_if_quant", True):
            return fmt, None
        return fmt, q

    def on_mark(self, s: Site) -> None:
        src = self.res(s.src)
        fmt, q = self.site_quantizer(s)
        if s.unit in self.half_units:
            return self.on_half(s, src)
        if q is None:  # float here: the tensor (or the float weight initializer) as exported
            return self.alias(s.dst, src)
        where = f"layer {s.unit!r} ({fmt.name}, {s.role})"
        if s.is_weight:
            return self.on_weight(s, q, where)
        qp = _activation_qparams(q, where)
        if self.fg.kinds.get(s.unit) == "maxpool":
            self.pool_qp[s.unit] = qp
        if self.qdq_of.get(src) == qp.key:
            # Same grid as the Q/DQ already on this tensor: quantizing again is the identity.
            return self.alias(s.dst, src)
        self.emit_qdq(src, s.dst, qp)

    def emit_qdq(self, src: str, dst: str, qp: _QParams) -> None:
        base = dst.strip("/").replace("/", "_")
        sc = self.init(qp.scale, f"{base}_scale")
        zp = self.init(qp.zero_point, f"{base}_zero_point")
        qn = self.uniq(f"{base}_quantized")
        self.emit("QuantizeLinear", [src, sc, zp], [qn], f"{base}/QuantizeLinear")
        self.emit("DequantizeLinear", [qn, sc, zp], [dst], f"{base}/DequantizeLinear")
        self.qdq_of[dst] = qp.key
        self.act_scale[dst] = qp.scale

    def on_weight(self, s: Site, q, where: str) -> None:
        wq = _cached_weight(self.fg, s, self.resolved[s.unit], q, self.mods[s.module], where)
        if self.fg.backend == "ort-cpu" and wq.block_size is not None:
            return self.on_matmul_nbits(s, wq)
        base = s.src
        codes = self.init(wq.codes, f"{base}_quantized")
        sc = self.init(wq.scale, f"{base}_scale")
        self.w_inits[s.dst] = (len(self.inits) - 2, len(self.inits) - 1)
        inputs = [codes, sc]
        if wq.zero_point is not None:
            inputs.append(self.init(wq.zero_point, f"{base}_zero_point"))
        attrs = {}
        if wq.axis is not None:
            attrs["axis"] = wq.axis
        if wq.block_size is not None:
            attrs["block_size"] = wq.block_size
        self.emit("DequantizeLinear", inputs, [s.dst], f"{base}/DequantizeLinear", **attrs)
        self.wq_of[s.dst] = wq

    def on_matmul_nbits(self, s: Site, wq: _WeightQ) -> None:
        """ONNX Runtime's 4-bit weight-only kernel (com.microsoft MatMulNBits, fp32 compute)."""
        users = [i for i, n in enumerate(self.g.node) if s.dst in n.input]
        if len(users) != 1:
            raise ExportError(f"layer {s.unit!r}: a 4-bit weight must feed exactly one MatMul/Gemm.")
        i = users[0]
        node = self.g.node[i]
        codes, scale = wq.torch_codes, wq.torch_scale  # (N, K) codes in [-7, 7]; (N, n_blocks)
        n_out, k = codes.shape
        bs = wq.block_size
        pad = (-k) % bs
        stored = (torch.nn.functional.pad(codes.to(torch.int16) + 8, (0, pad), value=8)).to(torch.uint8)
        stored = stored.reshape(n_out, -1, bs)
        packed = (stored[..., 0::2] | (stored[..., 1::2] << 4)).numpy().astype(np.uint8)
        base = s.src
        b = self.init(packed, f"{base}_q4")
        sc = self.init(scale.numpy().astype(np.float32), f"{base}_scales")
        attrs = dict(K=k, N=n_out, bits=4, block_size=bs, accuracy_level=0)
        a_in = node.input[0]
        if node.op_type == "Gemm":
            ga = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if ga.get("transA", 0) or not ga.get("transB", 0) or ga.get("alpha", 1.0) != 1.0 or ga.get("beta", 1.0) != 1.0:
                raise ExportError(f"layer {s.unit!r}: only Gemm(transB=1, alpha=beta=1) maps to MatMulNBits.")
            bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
            inputs = [a_in, b, sc, "", ""] + bias
        else:
            inputs = [a_in, b, sc]
        new = helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name, domain="com.microsoft", **attrs)
        self.replace[i] = [new]

    def on_half(self, s: Site, src: str) -> None:
        """fp16 / bf16 unit: the unit's ops run in that type; Casts at its boundary."""
        elem = self.half_units[s.unit]
        if s.is_weight:
            self.rename[s.dst] = self.half_init(s.src, elem)
            return
        if s.module != s.unit:  # a follower behind an activation that runs in float: round through the type
            mid = self.uniq(f"{s.dst}_{_TYPE_NAME[elem]}")
            self.emit("Cast", [src], [mid], f"{mid}/Cast", to=elem)
            self.emit("Cast", [mid], [s.dst], f"{s.dst}/Cast", to=TensorProto.FLOAT)
            return
        to = TensorProto.FLOAT if s.role == "output" else elem
        self.emit("Cast", [src], [s.dst], f"{s.dst}/Cast", to=to)

    def half_node(self, i: int, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """A body node of an fp16/bf16 unit: float initializer inputs in that type; outputs cast back
        to float where they leave the unit without an output mark."""
        elem = self.half[i]
        inits = self.template_inits
        for k, t in enumerate(node.input):
            if t in inits and inits[t].data_type == TensorProto.FLOAT:
                node.input[k] = self.half_init(t, elem)
        out = [node]
        for k, t in enumerate(node.output):
            if not self.leaves_unit(i, t):
                continue
            inner = self.uniq(f"{t}_{_TYPE_NAME[elem]}")
            node.output[k] = inner
            out.append(helper.make_node("Cast", [inner], [t], to=TensorProto.FLOAT, name=self.uniq(f"{t}/Cast")))
        return out

    def leaves_unit(self, i: int, t: str) -> bool:
        """Whether tensor ``t`` of body node ``i`` goes somewhere other than its unit's own marks and body."""
        unit = next(u for u, idx in self.fg._body.items() if i in idx)
        body = set(self.fg._body.get(unit, []))
        own = {s.node for s in self.fg.sites if s.unit == unit and s.module == unit}
        if self._consumers is None:
            self._consumers = _consumers(self.g)
        users = self._consumers.get(t, [])
        return t in self.outputs or any(j not in body and j not in own for j in users)

    # ------------------------------------------------------------- main loop
    def run(self) -> onnx.ModelProto:
        g = self.g
        sites = {s.node: s for s in self.fg.sites}
        self.used_names = {n.name for n in g.node} | {t.name for t in g.initializer}
        for n in g.node:
            self.used_names.update(n.output)
        for i, node in enumerate(g.node):
            if i in sites:
                self.on_mark(sites[i])
                continue
            if i in self.replace:
                for r in self.replace[i]:
                    self.resolve_inputs(r)
                    self.nodes.append(r)
                continue
            new = onnx.NodeProto()
            new.CopyFrom(node)
            self.resolve_inputs(new)
            if self.fg.backend == "ort-cpu" and new.op_type in ("Conv", "Gemm") and len(new.input) > 2:
                self.quantize_bias(new)
            if i in self.half:
                self.nodes.extend(self.half_node(i, new))
            elif self.pool_qp.get(self.pool_node.get(i, "")) is not None:
                self.requantize_pool(new, self.pool_qp[self.pool_node[i]])
            else:
                self.nodes.append(new)
        return self.assemble()

    def requantize_pool(self, node: onnx.NodeProto, qp: _QParams) -> None:
        """Max pooling keeps its input's grid: a Q/DQ with the input's numbers on its output is exact
        and lets the engine pool integers."""
        out = node.output[0]
        inner = self.uniq(f"{out}_pooled")
        node.output[0] = inner
        self.nodes.append(node)
        self.emit_qdq(inner, out, qp)

    def through_zero_pad(self, x: str) -> str:
        """The input of the zero-padding Pad that produced ``x`` (a layer that pads itself), else ``x``.

        Padding with zeros keeps the grid of a dequantized tensor (``mixq.export.pad`` moves such Pads onto the
        integer codes), so the padded tensor has its input's scale.
        """
        pad = next((n for n in reversed(self.nodes) if x in n.output), None)
        if pad is None or not is_zero_pad(pad, self.template_inits, {o: n for n in self.nodes for o in n.output}):
            return x
        return pad.input[0]

    def quantize_bias(self, node: onnx.NodeProto) -> None:
        """int32 bias with scale s_x * s_w, as ORT's QDQ Conv / Gemm fusions expect."""
        x, w, b = node.input[0], node.input[1], node.input[2]
        x = self.through_zero_pad(x)
        if x not in self.act_scale or w not in self.wq_of or self.wq_of[w].block_size is not None:
            return
        if self.wq_of[w].codes.dtype != np.int8:
            return
        binit = self.template_inits.get(b)
        if binit is None or binit.data_type != TensorProto.FLOAT:
            return
        bias = numpy_helper.to_array(binit)
        wq = self.wq_of[w]
        if wq.axis is None or wq.scale.ndim == 1 and wq.scale.shape == bias.shape:
            w_scale = bias_weight_scale(bias, self.act_scale[x], wq.scale)
            if np.any(w_scale != wq.scale):
                wq = self.raise_weight_scale(w, wq, w_scale)
        codes, bscale = _quantize_bias(bias, self.act_scale[x], wq.scale)
        base = b
        qi = self.init(codes, f"{base}_quantized")
        sc = self.init(bscale, f"{base}_scale")
        out = self.uniq(f"{base}_dequantized")
        attrs = {"axis": 0} if bscale.ndim else {}
        self.emit("DequantizeLinear", [qi, sc], [out], f"{base}/DequantizeLinear", **attrs)
        node.input[2] = out

    def raise_weight_scale(self, w: str, wq: _WeightQ, scale: np.ndarray) -> _WeightQ:
        """Requantize a weight to a larger scale (``bias_weight_scale``) and rewrite its initializers."""
        shape = [1] * wq.codes.ndim
        if wq.axis is not None:
            shape[wq.axis] = -1
        old = wq.codes.astype(np.float64) * np.asarray(wq.scale, np.float64).reshape(shape if wq.axis is not None else ())
        codes = np.clip(np.round(old / np.asarray(scale, np.float64).reshape(shape if wq.axis is not None else ())),
                        -127, 127).astype(wq.codes.dtype)
        new = _WeightQ(codes, np.asarray(scale, np.float32), wq.zero_point, wq.axis, wq.block_size)
        ci, si = self.w_inits[w]
        self.inits[ci] = numpy_helper.from_array(codes, self.inits[ci].name)
        self.inits[si] = numpy_helper.from_array(new.scale, self.inits[si].name)
        self.wq_of[w] = new
        return new

    def assemble(self) -> onnx.ModelProto:
        src = self.fg.template
        used = {t for n in self.nodes for t in n.input}
        out = onnx.ModelProto()
        out.ir_version = src.ir_version
        out.producer_name = "mixq"
        out.producer_version = src.producer_version
        for imp in src.opset_import:
            if imp.domain != _MARK_DOMAIN:
                out.opset_import.add().CopyFrom(imp)
        if any(n.domain == "com.microsoft" for n in self.nodes):
            out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        g = out.graph
        g.name = src.graph.name
        g.input.extend(src.graph.input)
        g.output.extend(src.graph.output)
        g.node.extend(self.nodes)
        g.initializer.extend(t for t in src.graph.initializer if t.name in used)
        g.initializer.extend(t for t in self.inits if t.name in used)
        return out
