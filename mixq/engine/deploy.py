"""The file to ship: an ONNX model that gives mixq's verified numbers in a stock ONNX Runtime session.

mixq's engine (``mixq.engine.ort.build``) disables two ORT optimizers that change a partial plan's
numbers (``DEFAULT_DISABLED``): ``WeightBiasQuantization`` quantizes the float weight of a Conv /
ConvTranspose / Gemm whose input comes from a DequantizeLinear (a layer the plan keeps float runs
int8), and ``DoubleQDQPairsRemover`` merges Q1 -> DQ1 -> Q2 -> DQ2 into one pair with new numbers.
A user who opens the exported ``.onnx`` with default ``SessionOptions`` gets both, hence other
numbers than ``mixq verify`` printed.

``save_deployable`` writes instead the graph mixq's engine runs:

1. ONNX Runtime optimizes the model with mixq's settings at the ``extended`` level and saves it
   (``SessionOptions.optimized_model_filepath``). ``extended`` holds the QLinear* fusions but not
   the layout transforms, which are specific to the CPU they were made on (ORT warns about those).
2. The DequantizeLinear nodes the two optimizers match are rewritten in a form they leave alone:
   the same scale and zero point repeated per channel (``axis`` set) instead of one scalar. Both
   optimizers require scalar Q/DQ parameters; a per-axis DequantizeLinear computes
   ``(q - zp[c]) * s[c]``, bitwise the same values.
3. The written file is loaded in a default session and its outputs compared with mixq's engine on
   the given inputs: they must be bitwise equal, else nothing is written and ``EngineError`` says so.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from mixq.engine.ort import DEFAULT_THREADS, EngineError, OrtEngine, build, session

_WEIGHTED = ("Conv", "ConvTranspose", "Gemm")


def _channel_axis(node: onnx.NodeProto, weight: np.ndarray) -> tuple[int, int]:
    """(axis, size) of the input-0 dimension a weighted node reduces over, read from its weight."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return 1, int(weight.shape[1]) * int(attrs.get("group", 1))
    if node.op_type == "ConvTranspose":
        return 1, int(weight.shape[0])
    k = int(weight.shape[1] if attrs.get("transB", 0) else weight.shape[0])
    return (0 if attrs.get("transA", 0) else 1), k


def _weight(node: onnx.NodeProto, inits: dict, producer: dict) -> Optional[np.ndarray]:
    """The weight of a Conv / ConvTranspose / Gemm that ``WeightBiasQuantization`` would rewrite, else None.

    It rewrites a float weight initializer, or a float bias initializer beside a dequantized weight.
    """
    if len(node.input) < 2:
        return None
    if node.input[1] in inits:
        return numpy_helper.to_array(inits[node.input[1]])
    dq = producer.get(node.input[1])
    has_bias = len(node.input) > 2 and node.input[2] in inits
    if dq is not None and dq.op_type == "DequantizeLinear" and has_bias and dq.input[0] in inits:
        return numpy_helper.to_array(inits[dq.input[0]])
    return None


def _scalar_params(dq: onnx.NodeProto, inits: dict) -> bool:
    """Whether a DequantizeLinear has one scale (the form both optimizers match)."""
    return dq.input[1] in inits and int(np.prod(inits[dq.input[1]].dims, dtype=np.int64)) == 1


def _per_axis(model: onnx.ModelProto, dq: onnx.NodeProto, axis: int, size: int, tag: str) -> bool:
    """Rewrite ``dq`` to repeat its scalar scale / zero point ``size`` times along ``axis``."""
    inits = {i.name: i for i in model.graph.initializer}
    if size < 2 or dq.input[1] not in inits or (len(dq.input) > 2 and dq.input[2] and dq.input[2] not in inits):
        return False
    scale = numpy_helper.to_array(inits[dq.input[1]])
    if scale.size != 1:
        return False
    names = [f"{dq.input[1]}_{tag}"]
    model.graph.initializer.append(numpy_helper.from_array(np.full(size, scale.reshape(()), scale.dtype), names[0]))
    if len(dq.input) > 2 and dq.input[2]:
        zp = numpy_helper.to_array(inits[dq.input[2]])
        names.append(f"{dq.input[2]}_{tag}")
        model.graph.initializer.append(numpy_helper.from_array(np.full(size, zp.reshape(()), zp.dtype), names[1]))
    del dq.input[1:]
    dq.input.extend(names)
    del dq.attribute[:]
    dq.attribute.append(onnx.helper.make_attribute("axis", axis))
    return True


def guard_optimizers(model: onnx.ModelProto, shapes: Optional[dict] = None) -> list[str]:
    """Rewrite, in place, the DequantizeLinear nodes ``DEFAULT_DISABLED`` optimizers would match.

    Args:
        model: an ORT-optimized model (modified in place).
        shapes: tensor name -> runtime shape, for the DQ of a Q -> DQ -> Q -> DQ chain (its last axis).

    Returns:
        The names of the DequantizeLinear nodes rewritten.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    done: list[str] = []
    for k, n in enumerate(list(g.node)):
        weight = _weight(n, inits, producer) if n.op_type in _WEIGHTED and n.domain in ("", "ai.onnx") else None
        if weight is not None:
            dq = producer.get(n.input[0])
            if dq is None or dq.op_type != "DequantizeLinear" or not _scalar_params(dq, inits):
                continue
            if len(consumers.get(dq.output[0], [])) > 1:  # give this layer its own copy of the DQ
                copy = onnx.NodeProto()
                copy.CopyFrom(dq)
                copy.name, copy.output[0] = f"{dq.name}/mixq_guard{k}", f"{dq.output[0]}/mixq_guard{k}"
                g.node.insert(list(g.node).index(dq) + 1, copy)
                n.input[0] = copy.output[0]
                dq = copy
            axis, size = _channel_axis(n, weight)
            if _per_axis(model, dq, axis, size, f"guard{k}"):
                done.append(dq.name)
        elif n.op_type == "DequantizeLinear" and _scalar_params(n, inits):
            src, cs = producer.get(n.input[0]), consumers.get(n.output[0], [])
            shape = (shapes or {}).get(n.output[0])
            if src is not None and src.op_type == "QuantizeLinear" and len(cs) == 1 and cs[0].op_type == "QuantizeLinear" \
                    and shape and len(shape) > 1 and _per_axis(model, n, len(shape) - 1, int(shape[-1]), f"guard{k}"):
                done.append(n.name)
    used = {t for n in g.node for t in n.input}
    keep = [i for i in g.initializer if i.name in used or i.name in {o.name for o in g.output}]
    del g.initializer[:]
    g.initializer.extend(keep)
    return done


def _double_pair_shapes(model: onnx.ModelProto, feed: dict) -> dict:
    """Runtime shapes of the outputs of DQ nodes that sit in a Q -> DQ -> Q chain."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    names = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
             and getattr(producer.get(n.input[0]), "op_type", "") == "QuantizeLinear"
             and [c.op_type for c in consumers.get(n.output[0], [])] == ["QuantizeLinear"]]
    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(t) for t in names])
    outs = session(probe.SerializeToString(), DEFAULT_THREADS, "disable", ()).run(names, feed)
    return {t: tuple(o.shape) for t, o in zip(names, outs)}


def save_deployable(onnx_model: Any, path: str | os.PathLike, example_inputs: Any = None,
                    threads: int = DEFAULT_THREADS) -> Path:
    """Write the ONNX file to ship: in a default ``onnxruntime.InferenceSession`` it computes mixq's numbers.

    Args:
        onnx_model: the exported ort-cpu Q/DQ model (ModelProto, bytes or path).
        path: where to write it (``.onnx``).
        example_inputs: a batch to check the written file on (default: synthetic inputs of batch 1).
        threads: intra-op threads of the sessions compared.

    The file holds the graph ONNX Runtime made of the model at the ``extended`` level (QLinear* and
    ``com.microsoft`` kernels: it runs on ONNX Runtime, not on other runtimes); a default session
    adds only its CPU-specific layout transforms on load, as mixq's engine does.

    Returns:
        The path written.

    Raises:
        EngineError: ONNX Runtime cannot load the model, or the file in a default session does not
            reproduce mixq's engine bitwise (nothing is written then).
    """
    from mixq.artifacts import write_atomic

    engine = build(onnx_model, threads)
    feed = engine.feed(example_inputs) if example_inputs is not None else engine.batch_inputs(1)
    with tempfile.TemporaryDirectory(prefix="mixq-deploy-") as d:
        opt = os.path.join(d, "optimized.onnx")
        session(engine.model_bytes, threads, "extended", engine.disabled_optimizers, optimized_path=opt)
        model = onnx.load(opt)
    guard_optimizers(model, _double_pair_shapes(model, feed))
    data = model.SerializeToString()
    check_deployable(data, engine, feed)
    return write_atomic(path, data)


def check_deployable(data: bytes | str | os.PathLike, engine: OrtEngine, feed: dict) -> None:
    """Raise unless ``data`` in a default ONNX Runtime session equals ``engine`` bitwise on ``feed``.

    Raises:
        EngineError: a default session cannot load it, or an output differs (the largest gap is named).
    """
    import onnxruntime as ort

    src = data if isinstance(data, bytes) else str(data)
    so = ort.SessionOptions()  # default options; only ORT's log is kept quiet
    so.log_severity_level = 3
    try:
        got = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feed)
    except Exception as e:  # onnxruntime raises its own exception types
        raise EngineError(f"a default ONNX Runtime session cannot load the deployable model: {e}") from e
    want = engine.session.run(None, feed)
    for name, a, b in zip(engine.output_names, want, got):
        if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
            gap = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.shape == b.shape else "shape"
            raise EngineError(f"the deployable model's output {name!r} in a default ONNX Runtime session differs "
                              f"from mixq's engine (max |diff| {gap}); ship the exported model with "
                              f"disabled_optimizers={list(engine.disabled_optimizers)} instead.")
