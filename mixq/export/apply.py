"""Plan -> ONNX: check a plan against the float graph and rewrite a copy of the graph for it."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional

import onnx
import torch

from mixq.artifacts import write_atomic
from mixq.export.errors import ExportError, FlavourError, OpsetError
from mixq.export.pad import pad_before_dequantize
from mixq.export.float_graph import FloatGraph, _model_inputs, export_float_graph
from mixq.export.opset import DEFAULT_OPSET, _FORMAT_MIN_OPSET
from mixq.export.rewrite import _Rewriter
from mixq.errors import UnsupportedFormatError
from mixq.formats import get_backend
from mixq.plan import QuantPlan


def _as_plan(plan: QuantPlan | Mapping | str, backend: str, calib_method: str = "max") -> QuantPlan:
    """A plan from a QuantPlan, its dict, a plan file, or a format name (for ``backend`` and ``calib_method``)."""
    if isinstance(plan, QuantPlan):
        return plan
    if isinstance(plan, Mapping):
        return QuantPlan.from_dict(plan)
    if isinstance(plan, (str, os.PathLike)) and str(plan).endswith(".json"):
        return QuantPlan.load(plan)
    return QuantPlan.uniform(str(plan), backend, calib_method)


def resolve_plan(graph: FloatGraph, plan: QuantPlan | Mapping | str) -> dict[str, str]:
    """Check a plan against the float graph and return its {unit: format}.

    Raises:
        FlavourError: the plan's backend is not the graph's.
        PlanError / UnsupportedFormatError: layer names or formats that do not fit the model, or a
            default format (not fp32) that no unit the plan leaves to it can run on this backend.
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
    model = _Rewriter(graph, mods, resolved).run()
    pad_before_dequantize(model)
    return model


def export(qmodel: torch.nn.Module, plan: QuantPlan | Mapping | str, example_inputs: Any = None,
           graph: Optional[FloatGraph] = None, opset: Optional[int] = None,
           batch_axis: Optional[int] = 0) -> onnx.ModelProto:
    """Export ``qmodel`` under ``plan`` (one call: float graph + plan).

    Args:
        qmodel: a calibrated model from ``mixq.quantize``.
        plan: as for ``apply_plan``.
        example_inputs: one batch; needed when ``graph`` is not given.
        graph: a float graph to reuse (faster for many plans; the one ``verify`` checked). With a
            graph, ``example_inputs``, ``opset`` and ``batch_axis`` may be left out; given (for
            ``batch_axis``: other than the default 0), they must be those the graph was exported with.
        opset: opset of a new float graph.
        batch_axis: the inputs' batch axis for a new float graph (see ``export_float_graph``).

    Raises:
        ExportError: neither ``graph`` nor ``example_inputs`` given, or options that contradict
            ``graph``; and see ``export_float_graph`` / ``apply_plan``.
    """
    if graph is None:
        if example_inputs is None:
            raise ExportError("export needs example_inputs (one batch) or a FloatGraph from export_float_graph.")
        graph = export_float_graph(qmodel, example_inputs, opset, batch_axis=batch_axis)
    else:
        _check_same_graph(graph, example_inputs, opset, batch_axis)
    return apply_plan(graph, qmodel, plan)


def _check_same_graph(graph: FloatGraph, example_inputs: Any, opset: Optional[int], batch_axis: Optional[int]) -> None:
    """One traced graph per run: options given beside a graph must be the graph's own."""
    bad = []
    if opset is not None and opset != graph.opset:
        bad.append(f"opset {opset} (the graph has {graph.opset})")
    if batch_axis != graph.batch_axis and batch_axis != 0:
        bad.append(f"batch_axis {batch_axis} (the graph has {graph.batch_axis})")
    if example_inputs is not None:
        shapes = [tuple(t.shape) for t in _model_inputs(example_inputs)]
        if graph.example_shapes and shapes != graph.example_shapes:
            bad.append(f"example inputs of shape {shapes} (the graph was exported from {graph.example_shapes})")
    if bad:
        raise ExportError(f"export was given a float graph and {'; '.join(bad)}; pass the graph alone, or export a "
                          "new float graph from these inputs (export_float_graph).")


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


def qdq_summary(model: onnx.ModelProto) -> dict[str, int]:
    """Count Q, DQ, Cast and MatMulNBits nodes of an exported model (what the plan inserted)."""
    counts: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast", "MatMulNBits"):
            counts[n.op_type] += 1
    return dict(counts)
