"""Latency: plan -> milliseconds, measured on an engine or predicted from measured plans.

- ``base``: the ``LatencyModel`` protocol (``model(plan) -> ms``, ``model.measure_many(plans)``),
  plan resolution and the plan-keyed cache of measured models (``MeasuredLatency``); ``RatioLatency``,
  a plan's ratio to FP32 timed next to it (what a search with a relative budget judges).
- ``stats``: ``LatencyStats`` (the one statistics type of every engine), ``time_runs``, and
  ``MeasurementSetup`` (what a measurement was made with; saved measurements are checked against it).
- ``ort``: ``OrtLatency``, measured on ONNX Runtime CPU (the embedded default).
- ``tensorrt``: engine build / serialize / time / per-layer profile / inspector precisions, and
  ``TensorRTLatency`` (needs TensorRT and a GPU; imported lazily).
- ``trtexec``: tables from ``trtexec --exportProfile`` / ``--exportTimes`` files, ``TrtexecLatency``.
- ``model``: predictors on plain lists: ``AdditiveLatency`` (per-layer deltas), ``BoundaryLatency``
  (per-layer + boundary terms, fitted and refreshed as plans are measured); ``UnitGraph``.
- ``graph_edges``: ``unit_graph(qmodel)``, the producer -> consumer edges between units.

Names are imported on first use, so ``import mixq.latency`` pulls in neither onnxruntime nor torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "LatencyModel": "base", "MeasuredLatency": "base", "RatioLatency": "base", "LatencyError": "base",
    "assignment_of": "base", "plan_key": "base",
    "LatencyStats": "stats", "MeasurementSetup": "stats", "time_runs": "stats",
    "OrtLatency": "ort",
    "TensorRTLatency": "tensorrt", "Engine": "tensorrt", "build_engine": "tensorrt",
    "TensorRTUnavailableError": "tensorrt",
    "TrtexecLatency": "trtexec", "LayerTable": "trtexec", "table_from_files": "trtexec", "load_profile": "trtexec",
    "load_times": "trtexec", "load_layer_info": "trtexec",
    "AdditiveLatency": "model", "BoundaryLatency": "model", "UnitGraph": "model", "mape": "model",
    "unit_graph": "graph_edges",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"mixq.latency.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'mixq.latency' has no attribute {name!r}")
