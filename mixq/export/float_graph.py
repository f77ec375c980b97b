"""The float graph: the prepared model exported once, every quantization point marked.

During the export every quantizer call of every quant module emits a ``mixq::Mark`` node carrying
the module name and role (``input0``, ``output``, ``weight``); ``_collect`` turns the marks into
``Site`` records and maps each unit to the ONNX nodes that compute it (``mixq.export.collect``).
"""
from __future__ import annotations

import hashlib
import inspect
import io
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import onnx
import torch

from mixq.errors import MixqError, PlanError
from mixq.export.errors import ExportError, ExportWarning
from mixq.export.opset import DEFAULT_OPSET, _TORCHSCRIPT_MAX_OPSET, _upgrade_opset, check_opset
from mixq.export.qparams import _quantize_weight, _version_key, _WeightQ
from mixq.formats import get_backend
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
        unit_nodes: unit name -> names of the ONNX nodes that compute it, its main node (the one
            reading its first input) first.
        weights: unit name -> initializer name of its (first) weight.
        unsupported: unit name -> why it can only be exported in float.
        input_names / output_names: graph inputs and outputs, in the model's order.
        weight_versions: parameter name -> torch version counter at export (to detect stale weights).
        batch_axis: the inputs' axis exported as dynamic (None: static shapes, traced as given).
        example_shapes: shapes of the example inputs the graph was exported from.
        traced_shapes: shapes the model was traced on (one sample along ``batch_axis``).
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
    batch_axis: Optional[int] = 0
    example_shapes: list[tuple[int, ...]] = field(default_factory=list)
    traced_shapes: list[tuple[int, ...]] = field(default_factory=list)
    _body: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def digest(self) -> str:
        """SHA-256 of the template graph (which traced graph a result was computed on)."""
        if "digest" not in self._cache:
            self._cache["digest"] = hashlib.sha256(self.template.SerializeToString()).hexdigest()
        return self._cache["digest"]

    def describe(self) -> dict:
        """Plain data naming this graph: example and traced input shapes, batch axis, opset, digest."""
        return {"example_shapes": [list(s) for s in self.example_shapes],
                "traced_shapes": [list(s) for s in self.traced_shapes], "batch_axis": self.batch_axis,
                "input_names": list(self.input_names), "backend": self.backend, "opset": self.opset,
                "digest": self.digest}

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


def _batch_slice(args: tuple, batch_axis: Optional[int]) -> tuple:
    """The example inputs cut to one sample along ``batch_axis`` (None: as given).

    Raises:
        ExportError: ``batch_axis`` is not an axis of every input.
    """
    if batch_axis is None:
        return args
    if isinstance(batch_axis, bool) or not isinstance(batch_axis, int):
        raise ExportError(f"batch_axis must be an int or None, but got {batch_axis!r}.")
    bad = [tuple(t.shape) for t in args if not -t.dim() <= batch_axis < t.dim()]
    if bad:
        raise ExportError(f"batch_axis={batch_axis} is not an axis of the example input(s) of shape "
                          f"{', '.join(map(str, bad))}; pass the axis that indexes samples, or batch_axis=None to "
                          "trace on the example as given (static shapes).")
    return tuple(t.narrow(batch_axis, 0, 1) for t in args)


def _output_batch_axes(one: Sequence[torch.Tensor], full: Sequence[torch.Tensor], batch: int,
                       in_axis: int) -> list[Optional[int]]:
    """Per output: the axis whose size follows the batch (1 on the slice, ``batch`` on the full example)."""
    axes: list[Optional[int]] = []
    for a, b in zip(one, full):
        cand = [k for k in range(a.dim()) if a.dim() == b.dim() and a.shape[k] == 1 and b.shape[k] == batch]
        if cand:
            axes.append(cand[0])
        elif batch == 1:  # one sample cannot tell: assume the output keeps the batch where the input has it
            axes.append(in_axis % a.dim() if a.dim() and -a.dim() <= in_axis < a.dim() else None)
        else:
            axes.append(None)
    return axes


def _tensors(out: Any) -> list[torch.Tensor]:
    """The model's output tensors, flattened in the order the exporter writes them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def export_float_graph(qmodel: torch.nn.Module, example_inputs: Any, opset: Optional[int] = None,
                       input_names: Optional[Sequence[str]] = None, batch_axis: Optional[int] = 0) -> FloatGraph:
    """Export a prepared mixq model once, in float, recording every quantization point.

    Args:
        qmodel: a model returned by ``mixq.quantize`` / ``mixq.prepare`` (FX or module mode).
        example_inputs: one input batch (a Tensor or a tuple of Tensors).
        opset: default-domain opset (default: 17 for ort-cpu, 21 for tensorrt).
        input_names: ONNX input names (default: the forward's argument names).
        batch_axis: the axis of every input that indexes samples (0 by default; 1 for time-major
            recurrent models fed (time, batch, features)). The model is traced on one sample along
            it and that axis is exported as dynamic ("batch"), in the inputs and in the outputs
            where their size follows it. None traces on the example as given, with static shapes.

    Returns:
        The FloatGraph to pass to ``apply_plan`` for any number of plans.

    Raises:
        PlanError: ``qmodel`` was not prepared by mixq.
        OpsetError: an opset outside [13, 21].
        ExportError: the exporter failed (the message names the batch-axis assumption), bad example
            inputs, or a ``batch_axis`` that is not an axis of every input.
    """
    st = getattr(qmodel, "mixq", None)
    if st is None:
        raise PlanError("this model was not prepared by mixq: call mixq.quantize(model, plan, ...) first.")
    backend = get_backend(st.backend).name
    opset = DEFAULT_OPSET[backend] if opset is None else opset
    check_opset(backend, opset)
    full = _model_inputs(example_inputs)
    args = _batch_slice(full, batch_axis)
    names = list(input_names) if input_names else _input_names(qmodel, len(args))
    if len(names) != len(args):
        raise ExportError(f"got {len(names)} input names for {len(args)} inputs.")
    buf = io.BytesIO()
    was_training = qmodel.training
    qmodel.eval()
    try:
        with _marking(qmodel), warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            out = _tensors(qmodel(*args))
            out_names = ["output"] if len(out) == 1 else [f"output{i}" for i in range(len(out))]
            axes: dict[str, dict[int, str]] = {}
            out_axes: list[Optional[int]] = []
            if batch_axis is not None:
                batch = full[0].shape[batch_axis]
                out_axes = _output_batch_axes(out, _tensors(qmodel(*full)), batch, batch_axis)
                axes = {n: {batch_axis % t.dim(): "batch"} for n, t in zip(names, args)}
                axes.update({n: {k: "batch"} for n, k in zip(out_names, out_axes) if k is not None})
            torch.onnx.export(qmodel, args, buf, dynamo=False, opset_version=min(opset, _TORCHSCRIPT_MAX_OPSET),
                              input_names=names, output_names=out_names, dynamic_axes=axes or None,
                              custom_opsets={_MARK_DOMAIN: 1}, do_constant_folding=True)
    except MixqError:
        raise
    except Exception as e:  # the model or the exporter raises many types
        raise ExportError(_export_failure(e, full, args, batch_axis)) from e
    finally:
        qmodel.train(was_training)
    torch_dir = os.path.dirname(torch.__file__)
    branchy = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) and "boolean" in str(w.message)
               and not str(w.filename).startswith(torch_dir)]  # torch's own modules check shapes harmlessly
    if branchy:
        warnings.warn(f"the model branches on tensor values ({len(branchy)} place(s)); the ONNX graph keeps the "
                      "branch the example inputs took, so other inputs may compute differently.", ExportWarning,
                      stacklevel=2)
    if batch_axis is not None and full[0].shape[batch_axis] > 1 and out and all(k is None for k in out_axes):
        warnings.warn(f"no output's size follows axis {batch_axis} of the inputs, so that axis is probably not the "
                      f"batch (time-major recurrent models take (time, batch, features)); the graph only runs with "
                      f"the other input sizes of the example. Pass batch_axis=<the batch axis> to export_float_graph.",
                      ExportWarning, stacklevel=2)
    model = onnx.load_from_string(buf.getvalue())
    if opset > _TORCHSCRIPT_MAX_OPSET:
        model = _upgrade_opset(model, opset)
    mods = dict(qmodel.named_modules())
    versions = {n: p._version for n, p in qmodel.named_parameters()}
    from mixq.export.collect import _collect  # collect imports this module's types

    graph = _collect(model, backend, opset, dict(st.kinds), mods, names, out_names, versions)
    graph.batch_axis = batch_axis
    graph.example_shapes = [tuple(t.shape) for t in full]
    graph.traced_shapes = [tuple(t.shape) for t in args]
    _prequantize(graph, mods)
    return graph


def _export_failure(e: Exception, full: tuple, args: tuple, batch_axis: Optional[int]) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    msg = f"torch.onnx.export failed on the prepared model: {type(e).__name__}: {first}"
    if batch_axis is None:
        return msg + f" (traced on the example inputs as given, shape(s) {', '.join(str(tuple(t.shape)) for t in full)})."
    shapes = ", ".join(f"{tuple(a.shape)} -> {tuple(b.shape)}" for a, b in zip(full, args))
    return (msg + f". mixq traces the model on one sample along axis {batch_axis} of the example inputs ({shapes}), "
            f"assuming axis {batch_axis} is the batch; a model whose axis {batch_axis} is something else (time-major "
            "recurrent models take (time, batch, features)) fails this way. Pass batch_axis=<the batch axis> "
            "(e.g. batch_axis=1), or batch_axis=None to trace on the full example as given (static shapes).")


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
