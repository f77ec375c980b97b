"""The float graph: the prepared model exported once, every quantization point marked.

During the export every quantizer call of every quant module emits a ``mixq::Mark`` node carrying
the module name and role (``input0``, ``output``, ``weight``); ``_collect`` turns the marks into
``Site`` records and maps each unit to the ONNX nodes that compute it.
"""
from __future__ import annotations

import inspect
import io
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from mixq.errors import MixqError, PlanError
from mixq.export.errors import ExportError, ExportWarning
from mixq.export.opset import DEFAULT_OPSET, _TORCHSCRIPT_MAX_OPSET, _upgrade_opset, check_opset
from mixq.export.qparams import _quantize_weight, _version_key, _WeightQ
from mixq.formats import get_backend
from mixq.quant.graph import QuantFollower
from mixq.quant.modules import QuantMixin, _wkey

_MARK_DOMAIN = "mixq"
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# ---------------------------------------------------------------------------------------- marks
class _Mark(torch.autograd.Function):
    """Identity in torch; a ``mixq::Mark`` node in the exported graph."""

    @staticmethod
    def forward(ctx, x, module: str, role: str):
        return x.clone()

    @staticmethod
    def symbolic(g, x, module: str, role: str):
        return g.op(f"{_MARK_DOMAIN}::Mark", x, module_s=module, role_s=role).setType(x.type())


def _marker(module: str, kind: str):
    if kind == "input":
        return lambda x, i=0: _Mark.apply(x, module, f"input{i}")
    if kind == "output":
        return lambda y: _Mark.apply(y, module, "output")
    return lambda w, name="weight": _Mark.apply(w, module, name)


class _marking:
    """Context: every quant module's quantizer calls become marks (the modules are restored after)."""

    _ATTRS = ("quant_input", "quant_output", "quant_weight")

    def __init__(self, qmodel: torch.nn.Module) -> None:
        self.mods = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QuantMixin)]

    def __enter__(self):
        for name, m in self.mods:
            m.quant_input = _marker(name, "input")
            m.quant_output = _marker(name, "output")
            m.quant_weight = _marker(name, "weight")
        return self

    def __exit__(self, *exc):
        for _, m in self.mods:
            for a in self._ATTRS:
                m.__dict__.pop(a, None)
        return False


# ---------------------------------------------------------------------------------------- float graph
@dataclass(frozen=True)
class Site:
    """One quantization point of the simulation in the float graph.

    Attributes:
        module: the quant module that owns the quantizer (a unit, or a follower of one).
        unit: the unit whose plan format decides (the owner for a follower).
        role: ``input<i>``, ``output`` or a weight parameter name.
        src / dst: the tensor entering and leaving the mark.
        node: index of the mark node in the template graph.
        perm: weights: permutation from the torch layout to the ONNX initializer layout.
    """

    module: str
    unit: str
    role: str
    src: str
    dst: str
    node: int
    perm: Optional[tuple[int, ...]] = None

    @property
    def is_weight(self) -> bool:
        return not (self.role.startswith("input") or self.role == "output")


@dataclass
class FloatGraph:
    """The model exported once in float, with its quantization points recorded.

    Attributes:
        template: the exported ModelProto, mark nodes included (not runnable as is).
        backend: the flavour (the backend the model was prepared for).
        opset: ONNX opset of the default domain.
        sites: every mark, in graph order.
        kinds: unit name -> kind (as in the model's QuantState).
        unit_nodes: unit name -> names of the ONNX nodes that compute it.
        weights: unit name -> initializer name of its (first) weight.
        unsupported: unit name -> why it can only be exported in float.
        input_names / output_names: graph inputs and outputs, in the model's order.
        weight_versions: parameter name -> torch version counter at export (to detect stale weights).
    """

    template: onnx.ModelProto
    backend: str
    opset: int
    sites: list[Site]
    kinds: dict[str, str]
    unit_nodes: dict[str, list[str]]
    weights: dict[str, str]
    unsupported: dict[str, str]
    input_names: list[str]
    output_names: list[str]
    weight_versions: dict[str, int] = field(default_factory=dict)
    _body: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def float_model(self) -> onnx.ModelProto:
        """The float graph without marks (the FP32 baseline)."""
        from mixq.export.rewrite import _Rewriter  # rewrite imports this module

        return _Rewriter(self, None, {u: "fp32" for u in self.kinds}).run()


def _model_inputs(example: Any) -> tuple:
    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(example)
    raise ExportError(f"example inputs must be a Tensor or a tuple of Tensors (one batch), but got "
                      f"{type(example).__name__}.")


def _input_names(qmodel: torch.nn.Module, n: int) -> list[str]:
    try:
        params = [p.name for p in inspect.signature(qmodel.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = params[:n] if len(params) >= n else [f"input{i}" for i in range(n)]
    return [f"{p}" for p in names]


def export_float_graph(qmodel: torch.nn.Module, example_inputs: Any, opset: Optional[int] = None,
                       input_names: Optional[Sequence[str]] = None) -> FloatGraph:
    """Export a prepared mixq model once, in float, recording every quantization point.

    Args:
        qmodel: a model returned by ``mixq.quantize`` / ``mixq.prepare`` (FX or module mode).
        example_inputs: one input batch (a Tensor or a tuple of Tensors); the batch dimension is
            exported as dynamic.
        opset: default-domain opset (default: 17 for ort-cpu, 21 for tensorrt).
        input_names: ONNX input names (default: the forward's argument names).

    Returns:
        The FloatGraph to pass to ``apply_plan`` for any number of plans.

    Raises:
        PlanError: ``qmodel`` was not prepared by mixq.
        OpsetError: an opset outside [13, 21].
        ExportError: the exporter failed, or bad example inputs.
    """
    st = getattr(qmodel, "mixq", None)
    if st is None:
        raise PlanError("this model was not prepared by mixq: call mixq.quantize(model, plan, ...) first.")
    backend = get_backend(st.backend).name
    opset = DEFAULT_OPSET[backend] if opset is None else opset
    check_opset(backend, opset)
    args = tuple(t[:1] for t in _model_inputs(example_inputs))
    names = list(input_names) if input_names else _input_names(qmodel, len(args))
    if len(names) != len(args):
        raise ExportError(f"got {len(names)} input names for {len(args)} inputs.")
    buf = io.BytesIO()
    was_training = qmodel.training
    qmodel.eval()
    try:
        with _marking(qmodel), warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            out = qmodel(*args)
            n_out = len(out) if isinstance(out, (tuple, list)) else 1
            out_names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
            axes = {n: {0: "batch"} for n in [*names, *out_names]}
            torch.onnx.export(qmodel, args, buf, dynamo=False, opset_version=min(opset, _TORCHSCRIPT_MAX_OPSET),
                              input_names=names, output_names=out_names, dynamic_axes=axes,
                              custom_opsets={_MARK_DOMAIN: 1}, do_constant_folding=True)
    except MixqError:
        raise
    except Exception as e:  # the exporter raises many types
        raise ExportError(f"torch.onnx.export failed on the prepared model: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        qmodel.train(was_training)
    torch_dir = os.path.dirname(torch.__file__)
    branchy = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) and "boolean" in str(w.message)
               and not str(w.filename).startswith(torch_dir)]  # torch's own modules check shapes harmlessly
    if branchy:
        warnings.warn(f"the model branches on tensor values ({len(branchy)} place(s)); the ONNX graph keeps the "
                      "branch the example inputs took, so other inputs may compute differently.", ExportWarning,
                      stacklevel=2)
    model = onnx.load_from_string(buf.getvalue())
    if opset > _TORCHSCRIPT_MAX_OPSET:
        model = _upgrade_opset(model, opset)
    mods = dict(qmodel.named_modules())
    versions = {n: p._version for n, p in qmodel.named_parameters()}
    graph = _collect(model, backend, opset, dict(st.kinds), mods, names, out_names, versions)
    _prequantize(graph, mods)
    return graph


def _prequantize(graph: FloatGraph, mods: dict) -> None:
    """Quantize every calibrated weight for every prepared format now (once per model), so that
    ``apply_plan`` only assembles nodes."""
    for s in graph.sites:
        if not s.is_weight or s.unit in graph.unsupported:
            continue
        m = mods[s.module]
        for fmt, qs in m.quantizers.items():
            q = qs[_wkey(s.role)] if _wkey(s.role) in qs else None
            if q is None or not q.is_calibrated:
                continue
            _cached_weight(graph, s, fmt, q, m, f"layer {s.unit!r} ({fmt})")


def _cached_weight(graph: FloatGraph, s: Site, fmt: str, q, module: torch.nn.Module, where: str) -> _WeightQ:
    """The weight of ``s`` quantized by ``q`` (format ``fmt``), cached in the graph until ``q`` is recalibrated."""
    key = ("w", s.module, fmt, s.role, s.perm, _version_key(q.amax))
    if key not in graph._cache:
        graph._cache[key] = _quantize_weight(q, module.get_parameter(s.role), s.perm, where)
    return graph._cache[key]


def _collect(model: onnx.ModelProto, backend: str, opset: int, kinds: dict, mods: dict, in_names: list,
             out_names: list, versions: dict) -> FloatGraph:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    _inline_initializer_identities(g, inits)
    consumers = _consumers(g)
    drop: set[int] = set()
    sites: list[Site] = []
    unsupported: dict[str, str] = {}
    weights: dict[str, str] = {}
    for i, n in enumerate(g.node):
        if n.domain != _MARK_DOMAIN:
            continue
        attrs = {a.name: a.s.decode() for a in n.attribute}
        module, role = attrs["module"], attrs["role"]
        m = mods.get(module)
        unit = m.owner if isinstance(m, QuantFollower) else module
        src, dst, perm = n.input[0], n.output[0], None
        is_weight = not (role.startswith("input") or role == "output")
        if is_weight:
            users = consumers.get(dst, [])
            if src not in inits:
                unsupported[unit] = f"its weight {role!r} is computed in the graph, not stored"
            elif len(users) == 1 and g.node[users[0]].op_type == "Transpose":
                # Fold the exporter's weight transpose (Linear on 3-D inputs -> MatMul) into the initializer.
                tr = g.node[users[0]]
                rank = len(inits[src].dims)
                perm = tuple(next((list(a.ints) for a in tr.attribute if a.name == "perm"), range(rank - 1, -1, -1)))
                new = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[src]).transpose(perm)),
                                              f"{src}.T")
                g.initializer.append(new)
                inits[new.name] = new
                n.input[0] = src = new.name
                n.output[0] = dst = tr.output[0]
                drop.add(users[0])
                users = consumers.get(dst, [])
            ops = {g.node[u].op_type for u in users}
            if src in inits and not ops <= set(_WEIGHT_OPS):
                unsupported[unit] = f"its weight {role!r} feeds {', '.join(sorted(ops))}, not {'/'.join(_WEIGHT_OPS)}"
            weights.setdefault(unit, src)
        sites.append(Site(module, unit, role, src, dst, i, perm))
    if drop:
        keep = [n for i, n in enumerate(g.node) if i not in drop]
        del g.node[:]
        g.node.extend(keep)
        sites = _reindex(sites, g)
    fg = FloatGraph(model, backend, opset, sites, kinds, {}, weights, unsupported, in_names, out_names, versions)
    fg._body = _unit_bodies(g, sites)
    fg.unit_nodes = {u: [g.node[i].name for i in idx] for u, idx in fg._body.items()}
    return fg


def _inline_initializer_identities(g: onnx.GraphProto, inits: dict) -> None:
    """The exporter shares equal initializers through Identity nodes (BN-folded zero biases); point the
    consumers at the initializer itself so each layer's bias and weight can be quantized in place."""
    outputs = {o.name for o in g.output}
    alias = {n.output[0]: n.input[0] for n in g.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return
    keep = [n for n in g.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        n.input[:] = [alias.get(t, t) for t in n.input]
    del g.node[:]
    g.node.extend(keep)


def _reindex(sites: list[Site], g: onnx.GraphProto) -> list[Site]:
    at = {n.output[0]: i for i, n in enumerate(g.node) if n.domain == _MARK_DOMAIN}
    return [Site(s.module, s.unit, s.role, s.src, s.dst, at[s.dst], s.perm) for s in sites]


def _consumers(g: onnx.GraphProto) -> dict[str, list[int]]:
    """Tensor name -> indices of the nodes that read it."""
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(g.node):
        for t in n.input:
            consumers[t].append(i)
    return consumers


def _unit_bodies(g: onnx.GraphProto, sites: list[Site]) -> dict[str, list[int]]:
    """Nodes computing each unit: from its input/weight marks forward to the next mark (at most 4 deep)."""
    consumers = _consumers(g)
    has_output = {s.unit for s in sites if s.role == "output" and s.module == s.unit}
    body: dict[str, list[int]] = defaultdict(list)
    for s in sites:
        if s.module != s.unit or s.role == "output":
            continue
        frontier, depth = [s.dst], 0
        while frontier and depth < 4:
            nxt = []
            for t in frontier:
                for i in consumers.get(t, []):
                    if g.node[i].domain == _MARK_DOMAIN or i in body[s.unit]:
                        continue
                    body[s.unit].append(i)
                    nxt.extend(g.node[i].output)
            # Without an output mark (max pooling) the unit is only its direct consumers.
            frontier = nxt if s.unit in has_output else []
            depth += 1
    return {u: sorted(v) for u, v in body.items()}
