"""export: a calibrated mixq model + a plan -> ONNX with Q/DQ exactly where the simulation quantizes.

Two steps, so that a new plan costs milliseconds rather than a torch export:

1. ``export_float_graph`` exports the FX-prepared model once (TorchScript exporter). During that
   export every quantizer call of every quant module emits a ``mixq::Mark`` node carrying the
   module name and role (``input0``, ``output``, ``weight``), so the float graph knows the exact
   tensor edge of every quantization point: inputs per consumer, outputs, outputs moved behind a
   ReLU (``QuantFollower``), masked residual inputs, weight initializers.
2. ``apply_plan`` rewrites a copy of that graph for one plan: each mark becomes a Q/DQ pair with
   the scale and zero point of the plan format's quantizer (mixq's own numbers), a Cast (fp16 /
   bf16), or nothing (float). Quantized weights become integer initializers + DequantizeLinear.

Flavours follow the model's backend: ``ort-cpu`` (uint8 asymmetric activations, int8 per-channel
weights, int32 bias, the QDQ layout ONNX Runtime fuses into QLinearConv / QGemm / QLinearMatMul /
QLinearAdd / QLinearConcat / QLinearGlobalAveragePool; int4 weight-only -> ``com.microsoft``
MatMulNBits) and ``tensorrt`` (int8 symmetric, zero point 0, float bias; FP8 E4M3 Q/DQ at opset
>= 19; int4 weight-only as a blocked INT4 DequantizeLinear at opset 21; fp16/bf16 layers typed
in the graph for strongly typed engines).
"""
from __future__ import annotations

import inspect
import io
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mixq.artifacts import write_atomic
from mixq.errors import CalibrationError, MixqError, PlanError
from mixq.formats import get_backend, get_format
from mixq.plan import QuantPlan
from mixq.quant import tensor_quant as tq
from mixq.quant.graph import QuantFollower
from mixq.quant.modules import QuantMixin, _wkey


class ExportError(MixqError, ValueError):
    """The model or plan cannot be written as ONNX for its engine."""


class OpsetError(ExportError):
    """An opset the flavour (or a format of the plan) cannot run with."""


class FlavourError(ExportError):
    """The plan's backend is not the backend the float graph was exported for."""


class ExportWarning(UserWarning):
    """The exported graph may not compute what the model computes for every input."""


MIN_OPSET = 13  # per-channel Q/DQ (axis)
MAX_OPSET = 21  # the TorchScript exporter stops at 20; 21 is reached by the ONNX version converter
DEFAULT_OPSET = {"ort-cpu": 17, "tensorrt": 21}
_TORCHSCRIPT_MAX_OPSET = 20
_FORMAT_MIN_OPSET = {("tensorrt", "fp8_e4m3"): 19, ("tensorrt", "int4_wo"): 21}
_MARK_DOMAIN = "mixq"
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_F8 = TensorProto.FLOAT8E4M3FN
_FLOAT_TYPES = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


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


def check_opset(backend: str, opset: int) -> None:
    """Raise OpsetError unless the flavour can be exported at ``opset``."""
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise OpsetError(f"opset {opset!r} cannot be exported for {backend!r}: per-channel Q/DQ needs opset >= "
                         f"{MIN_OPSET} and mixq exports up to {MAX_OPSET}; use {DEFAULT_OPSET[backend]} "
                         f"(the default for {backend}).")


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


def _prequantize(graph: "FloatGraph", mods: dict) -> None:
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
            key = ("w", s.module, fmt, s.role, s.perm, _version_key(q.amax))
            if key not in graph._cache:
                graph._cache[key] = _quantize_weight(q, m.get_parameter(s.role), s.perm, f"layer {s.unit!r} ({fmt})")


def _upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Raise the default-domain opset. From 20 to 21 only GroupNormalization changed meaning (the
    other changes add types), so the import is bumped unless the converter has work to do."""
    if any(n.op_type == "GroupNormalization" for n in model.graph.node):
        from onnx import version_converter

        return version_converter.convert_version(model, opset)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    model.ir_version = max(model.ir_version, 10)
    return model


def _collect(model: onnx.ModelProto, backend: str, opset: int, kinds: dict, mods: dict, in_names: list,
             out_names: list, versions: dict) -> FloatGraph:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    _inline_initializer_identities(g, inits)
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(g.node):
        for t in n.input:
            consumers[t].append(i)
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


def _unit_bodies(g: onnx.GraphProto, sites: list[Site]) -> dict[str, list[int]]:
    """Nodes computing each unit: from its input/weight marks forward to the next mark (at most 4 deep)."""
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(g.node):
        for t in n.input:
            consumers[t].append(i)
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


# ---------------------------------------------------------------------------------------- plan -> ONNX
def _as_plan(plan: QuantPlan | Mapping | str, backend: str) -> QuantPlan:
    if isinstance(plan, QuantPlan):
        return plan
    if isinstance(plan, Mapping):
        return QuantPlan.from_dict(plan)
    if isinstance(plan, (str, os.PathLike)) and str(plan).endswith(".json"):
        return QuantPlan.load(plan)
    return QuantPlan.uniform(str(plan), backend)


def resolve_plan(graph: FloatGraph, plan: QuantPlan | Mapping | str) -> dict[str, str]:
    """Check a plan against the float graph and return its {unit: format}.

    Raises:
        FlavourError: the plan's backend is not the graph's.
        PlanError / UnsupportedFormatError: layer names or formats that do not fit the model.
        OpsetError: a format the graph's opset cannot express (fp8 < 19, TensorRT int4 < 21).
        ExportError: a layer the exporter can only keep float is quantized by the plan.
    """
    plan = _as_plan(plan, graph.backend)
    if plan.backend != graph.backend:
        raise FlavourError(f"the plan is for backend {plan.backend!r} but the float graph was exported for "
                           f"{graph.backend!r}; quantize and export the model with backend={plan.backend!r}.")
    resolved = plan.resolve(graph.kinds)
    for unit, fmt in resolved.items():
        need = _FORMAT_MIN_OPSET.get((graph.backend, fmt))
        if need and graph.opset < need:
            raise OpsetError(f"format {fmt!r} (layer {unit!r}) needs opset >= {need} on {graph.backend}, but the "
                             f"float graph has opset {graph.opset}; export it with opset={max(need, DEFAULT_OPSET[graph.backend])}.")
        if fmt != "fp32" and unit in graph.unsupported:
            raise ExportError(f"layer {unit!r} cannot be exported in {fmt}: {graph.unsupported[unit]}. "
                              f"Keep it fp32 in the plan (layers: {{{unit!r}: 'fp32'}}).")
    return resolved


def apply_plan(graph: FloatGraph, qmodel: torch.nn.Module, plan: QuantPlan | Mapping | str) -> onnx.ModelProto:
    """Return the ONNX model of ``plan``: the float graph with mixq's Q/DQ where the plan quantizes.

    Scales and zero points are read from the quantizers of each unit's plan format; integer
    weights are quantized with mixq's own rounding, so the engine and the simulation share every number.

    Args:
        graph: from ``export_float_graph`` on the same model.
        qmodel: the calibrated model (its quantizers and weights are read, nothing is changed).
        plan: a QuantPlan, its dict form, a plan JSON path, or a format name for every layer.

    Raises:
        FlavourError, PlanError, OpsetError, ExportError (see ``resolve_plan``);
        CalibrationError: a quantizer the plan needs was never calibrated;
        ExportError: the weights changed since the float graph was exported.
    """
    resolved = resolve_plan(graph, plan)
    mods = dict(qmodel.named_modules())
    params = dict(qmodel.named_parameters())
    stale = [n for n, v in graph.weight_versions.items() if n in params and params[n]._version != v]
    if stale:
        raise ExportError(f"the model's weights changed since the float graph was exported ({stale[0]!r} and "
                          f"{len(stale) - 1} more); export the float graph again (export_float_graph).")
    return _Rewriter(graph, mods, resolved).run()


def export(qmodel: torch.nn.Module, plan: QuantPlan | Mapping | str, example_inputs: Any = None,
           graph: Optional[FloatGraph] = None, opset: Optional[int] = None) -> onnx.ModelProto:
    """Export ``qmodel`` under ``plan`` (one call: float graph + plan).

    Args:
        qmodel: a calibrated model from ``mixq.quantize``.
        plan: as for ``apply_plan``.
        example_inputs: one batch; needed when ``graph`` is not given.
        graph: a float graph to reuse (faster for many plans).
        opset: opset of a new float graph.

    Raises:
        ExportError: neither ``graph`` nor ``example_inputs`` given; and see ``apply_plan``.
    """
    if graph is None:
        if example_inputs is None:
            raise ExportError("export needs example_inputs (one batch) or a FloatGraph from export_float_graph.")
        graph = export_float_graph(qmodel, example_inputs, opset)
    return apply_plan(graph, qmodel, plan)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` atomically (nothing half-written is left on failure).

    Raises:
        ExportError: the folder cannot be created or written.
    """
    try:
        return write_atomic(path, model.SerializeToString())
    except OSError as e:
        raise ExportError(f"cannot write the ONNX model to {str(path)!r}: {e.strerror or e}; choose a writable "
                          "output path.") from None


# ---------------------------------------------------------------------------------------- rewriting
@dataclass(frozen=True)
class _QParams:
    """Per-tensor activation quantization as ONNX writes it."""

    elem: int
    scale: np.ndarray  # float32 scalar
    zero_point: np.ndarray  # scalar of the quantized type

    @property
    def key(self) -> tuple:
        return (self.elem, self.scale.tobytes(), self.zero_point.tobytes())


def _activation_qparams(q, where: str) -> _QParams:
    d = q.desc
    if not q.is_calibrated:
        raise CalibrationError(f"{where}: the quantizer was never calibrated; calibrate the model "
                               "(mixq.quantize(..., calib_data=...) or mixq.calibrate) before exporting.")
    if d.axis is not None:
        raise ExportError(f"{where}: per-channel activation quantization cannot be exported (axis={d.axis}).")
    scale = q.scale.detach().float().reshape(-1)
    if scale.numel() != 1:
        raise ExportError(f"{where}: expected one activation scale, got {scale.numel()}.")
    s = np.float32(max(float(scale[0]), 2.0**-24) if float(scale[0]) > 0 else 1.0)
    if d.fp8:
        return _QParams(_F8, np.array(s, np.float32), np.zeros((), _ml_dtypes().float8_e4m3fn))
    if d.num_bits != 8:
        raise ExportError(f"{where}: {d.num_bits}-bit activations cannot be exported (8-bit only).")
    if d.asymmetric:
        zp = np.array(int(q.zero_point.reshape(-1)[0]), np.uint8)
        return _QParams(TensorProto.UINT8, np.array(s, np.float32), zp)
    if d.unsigned:
        return _QParams(TensorProto.UINT8, np.array(s, np.float32), np.zeros((), np.uint8))
    return _QParams(TensorProto.INT8, np.array(s, np.float32), np.zeros((), np.int8))


def _ml_dtypes():
    import ml_dtypes

    return ml_dtypes


@dataclass
class _WeightQ:
    """A quantized weight in the ONNX layout."""

    codes: np.ndarray  # int8 / ml_dtypes int4 / float8
    scale: np.ndarray  # float32: scalar, per-channel 1-D, or blocked (same rank as codes)
    zero_point: Optional[np.ndarray]
    axis: Optional[int]
    block_size: Optional[int]
    torch_codes: Optional[torch.Tensor] = None  # int4: codes in the torch layout (for MatMulNBits)
    torch_scale: Optional[torch.Tensor] = None


def _quantize_weight(q, w: torch.Tensor, perm: Optional[tuple], where: str) -> _WeightQ:
    """Quantize ``w`` exactly as the simulation does; return codes and scales in the ONNX layout."""
    d = q.desc
    w = w.detach().float()
    ml = _ml_dtypes()

    def onnx_layout(t: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(t.transpose(perm)) if perm else t

    if d.block_size is not None:
        amax = tq.block_amax(w, d.block_size)  # (out, n_blocks)
        shape = w.shape
        wf = w.reshape(shape[0], -1)
        n = wf.shape[1]
        pad = (-n) % d.block_size
        wp = torch.nn.functional.pad(wf, (0, pad)).reshape(shape[0], -1, d.block_size)
        codes, _ = tq.quant_codes(wp, amax.unsqueeze(-1), d.num_bits, False, True)
        _, hi = tq.int_bounds(d.num_bits, False, True)
        safe = torch.where(amax < 2.0**-24, torch.ones_like(amax), amax)
        scale = (safe / hi).float()
        codes2d = codes.reshape(shape[0], -1)[:, :n]
        if len(shape) != 2:
            raise ExportError(f"{where}: block-wise weights must be 2-D, got shape {tuple(shape)}.")
        c = codes2d.to(torch.int8).numpy()
        if perm:
            return _WeightQ(onnx_layout(c).astype(ml.int4), onnx_layout(scale.numpy()), None, 0, d.block_size,
                            codes2d.to(torch.int8), scale)
        return _WeightQ(c.astype(ml.int4), scale.numpy(), None, 1, d.block_size, codes2d.to(torch.int8), scale)
    if not q.is_calibrated:
        raise CalibrationError(f"{where}: the weight quantizer was never calibrated; calibrate the model first.")
    amax = q.amax.detach().float()
    if d.fp8:
        safe = torch.where(amax < 2.0**-24, torch.ones_like(amax), amax)
        scaled = torch.clamp(w * (tq.FP8_E4M3_MAX / safe), -tq.FP8_E4M3_MAX, tq.FP8_E4M3_MAX)
        codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8).numpy().view(ml.float8_e4m3fn)
        s = (safe / tq.FP8_E4M3_MAX).reshape(-1).numpy().astype(np.float32)
        if s.size != 1:
            raise ExportError(f"{where}: fp8 weights must have one per-tensor scale.")
        return _WeightQ(onnx_layout(codes), s.reshape(()), np.zeros((), ml.float8_e4m3fn), None, None)
    if d.num_bits != 8 or d.asymmetric:
        raise ExportError(f"{where}: only 8-bit symmetric weights (or int4 block-wise) can be exported.")
    codes, _ = tq.quant_codes(w, amax, d.num_bits, d.unsigned, d.narrow_range)
    _, hi = tq.int_bounds(d.num_bits, d.unsigned, d.narrow_range)
    safe = torch.where(amax.abs() < 2.0**-24, torch.ones_like(amax), amax.abs())
    scale = (safe / hi).float().reshape(-1).numpy()
    dtype = np.uint8 if d.unsigned else np.int8
    c = onnx_layout(codes.numpy().astype(dtype))
    if d.axis is None or scale.size == 1 and w.dim() == 0:
        return _WeightQ(c, scale.reshape(()).astype(np.float32), np.zeros((), dtype), None, None)
    axis = perm.index(d.axis % w.dim()) if perm else d.axis % w.dim()
    return _WeightQ(c, scale.astype(np.float32), np.zeros(scale.shape, dtype), axis, None)


def _version_key(t: Optional[torch.Tensor]) -> tuple:
    """Identity of a tensor's current contents (recalibration replaces or edits it)."""
    return (None,) if t is None else (id(t), t._version)


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

    def alias(self, dst: str, src: str) -> None:
        """Make ``dst`` mean ``src`` (an Identity where ``dst`` is a graph output)."""
        if dst in self.outputs:
            self.nodes.append(helper.make_node("Identity", [src], [dst], name=self.uniq(f"{dst}/Identity")))
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
        self.nodes.append(helper.make_node("QuantizeLinear", [src, sc, zp], [qn], name=self.uniq(f"{base}/QuantizeLinear")))
        self.nodes.append(helper.make_node("DequantizeLinear", [qn, sc, zp], [dst], name=self.uniq(f"{base}/DequantizeLinear")))
        self.qdq_of[dst] = qp.key
        self.act_scale[dst] = qp.scale

    def on_weight(self, s: Site, q, where: str) -> None:
        fmt = self.resolved[s.unit]
        key = ("w", s.module, fmt, s.role, s.perm, _version_key(q.amax))
        wq = self.fg._cache.get(key)
        if wq is None:
            w = self.mods[s.module].get_parameter(s.role)
            wq = _quantize_weight(q, w, s.perm, where)
            self.fg._cache[key] = wq
        if self.fg.backend == "ort-cpu" and wq.block_size is not None:
            return self.on_matmul_nbits(s, wq)
        base = s.src
        codes = self.init(wq.codes, f"{base}_quantized")
        sc = self.init(wq.scale, f"{base}_scale")
        inputs = [codes, sc]
        if wq.zero_point is not None:
            inputs.append(self.init(wq.zero_point, f"{base}_zero_point"))
        attrs = {}
        if wq.axis is not None:
            attrs["axis"] = wq.axis
        if wq.block_size is not None:
            attrs["block_size"] = wq.block_size
        self.nodes.append(helper.make_node("DequantizeLinear", inputs, [s.dst], name=self.uniq(f"{base}/DequantizeLinear"),
                                           **attrs))
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
            w = numpy_helper.to_array(self.template_inits[s.src])
            self.rename[s.dst] = self.init(_to_float_type(w, elem), f"{s.src}_{_TYPE_NAME[elem]}")
            return
        if s.module != s.unit:  # a follower behind an activation that runs in float: round through the type
            mid = self.uniq(f"{s.dst}_{_TYPE_NAME[elem]}")
            self.nodes.append(helper.make_node("Cast", [src], [mid], to=elem, name=self.uniq(f"{mid}/Cast")))
            self.nodes.append(helper.make_node("Cast", [mid], [s.dst], to=TensorProto.FLOAT, name=self.uniq(f"{s.dst}/Cast")))
            return
        to = TensorProto.FLOAT if s.role == "output" else elem
        self.nodes.append(helper.make_node("Cast", [src], [s.dst], to=to, name=self.uniq(f"{s.dst}/Cast")))

    def half_node(self, i: int, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """A body node of an fp16/bf16 unit: float initializer inputs in that type; outputs cast back
        to float where they leave the unit without an output mark."""
        elem = self.half[i]
        inits = self.template_inits
        for k, t in enumerate(node.input):
            if t in inits and inits[t].data_type == TensorProto.FLOAT:
                node.input[k] = self.init(_to_float_type(numpy_helper.to_array(inits[t]), elem), f"{t}_{_TYPE_NAME[elem]}")
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
            self._consumers = defaultdict(list)
            for j, n in enumerate(self.g.node):
                for name in n.input:
                    self._consumers[name].append(j)
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
                    r.input[:] = [self.res(t) if t else t for t in r.input]
                    self.nodes.append(r)
                continue
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.input[:] = [self.res(t) if t else t for t in node.input]
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

    def quantize_bias(self, node: onnx.NodeProto) -> None:
        """int32 bias with scale s_x * s_w, as ORT's QDQ Conv / Gemm fusions expect."""
        x, w, b = node.input[0], node.input[1], node.input[2]
        if x not in self.act_scale or w not in self.wq_of or self.wq_of[w].block_size is not None:
            return
        if self.wq_of[w].codes.dtype != np.int8:
            return
        binit = self.template_inits.get(b)
        if binit is None or binit.data_type != TensorProto.FLOAT:
            return
        bias = numpy_helper.to_array(binit).astype(np.float32)
        bscale = (self.act_scale[x] * self.wq_of[w].scale).astype(np.float32)
        bscale = np.broadcast_to(bscale, bias.shape).astype(np.float32) if bscale.ndim else bscale
        codes = np.clip(np.round(bias / bscale), -(2**31), 2**31 - 1).astype(np.int32)
        base = b
        qi = self.init(codes, f"{base}_quantized")
        sc = self.init(bscale, f"{base}_scale")
        out = self.uniq(f"{base}_dequantized")
        attrs = {"axis": 0} if bscale.ndim else {}
        self.nodes.append(helper.make_node("DequantizeLinear", [qi, sc], [out], name=self.uniq(f"{base}/DequantizeLinear"),
                                           **attrs))
        node.input[2] = out

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


_TYPE_NAME = {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}


def _to_float_type(a: np.ndarray, elem: int) -> np.ndarray:
    if elem == TensorProto.FLOAT16:
        return a.astype(np.float16)
    return a.astype(_ml_dtypes().bfloat16)


def qdq_summary(model: onnx.ModelProto) -> dict[str, int]:
    """Count Q, DQ, Cast and MatMulNBits nodes of an exported model (what the plan inserted)."""
    counts: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast", "MatMulNBits"):
            counts[n.op_type] += 1
    return dict(counts)
