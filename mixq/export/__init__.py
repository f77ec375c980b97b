"""export: a calibrated mixq model + a plan -> ONNX with Q/DQ exactly where the simulation quantizes.

Two steps, so that a new plan costs milliseconds rather than a torch export (and so that one traced
graph serves a whole run: pass the same ``FloatGraph`` to ``apply_plan`` / ``export`` and to
``mixq.verify.verify``, which records it with ``FloatGraph.describe()``):

1. ``export_float_graph`` exports the FX-prepared model once (TorchScript exporter). During that
   export every quantizer call of every quant module emits a ``mixq::Mark`` node carrying the
   module name and role (``input0``, ``output``, ``weight``), so the float graph knows the exact
   tensor edge of every quantization point: inputs per consumer, outputs, outputs moved behind a
   ReLU (``QuantFollower``), masked residual inputs, weight initializers. The model is traced on one
   sample along ``batch_axis`` (0; 1 for time-major recurrent models; None: the example as given),
   and that axis is exported as dynamic.
2. ``apply_plan`` rewrites a copy of that graph for one plan: each mark becomes a Q/DQ pair with
   the scale and zero point of the plan format's quantizer (mixq's own numbers), a Cast (fp16 /
   bf16), or nothing (float). Quantized weights become integer initializers + DequantizeLinear.

Flavours follow the model's backend: ``ort-cpu`` (uint8 asymmetric activations, int8 per-channel
weights, int32 bias, the QDQ layout ONNX Runtime fuses into QLinearConv / QGemm / QLinearMatMul /
QLinearAdd / QLinearConcat / QLinearGlobalAveragePool; int4 weight-only -> ``com.microsoft``
MatMulNBits) and ``tensorrt`` (int8 symmetric, zero point 0, float bias; FP8 E4M3 Q/DQ at opset
>= 19; int4 weight-only as a blocked INT4 DequantizeLinear at opset 21; fp16/bf16 layers typed
in the graph for strongly typed engines).

Modules: ``float_graph`` (step 1: marks, the FloatGraph), ``collect`` (marks -> sites, unit -> nodes), ``apply`` (plan checks, ``apply_plan``,
``export``, ``save_onnx``), ``rewrite`` (step 2: the one-pass rewriter), ``qparams`` (the numbers:
activation Q/DQ, int8 / fp8 / int4 weights, int32 bias), ``opset`` and ``errors``.
"""
from __future__ import annotations

from mixq.export.apply import _as_plan, apply_plan, export, qdq_summary, resolve_plan, save_onnx
from mixq.export.errors import ExportError, ExportWarning, FlavourError, OpsetError
from mixq.export.float_graph import FloatGraph, Site, export_float_graph
from mixq.export.opset import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, check_opset

__all__ = [
    "DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "ExportError", "ExportWarning", "FlavourError", "FloatGraph",
    "OpsetError", "Site", "apply_plan", "check_opset", "export", "export_float_graph", "qdq_summary",
    "resolve_plan", "save_onnx",
]
