"""Engines that run exported ONNX models: ``ort`` (ONNX Runtime, CPU provider).

Each engine module exposes the same narrow interface: ``build(onnx_model) -> Engine``,
``Engine.run(inputs) -> outputs`` and ``Engine.latency(batch, runs, warmup) -> dict``.
"""
from mixq.engine.ort import EngineError, KernelCounts, OrtEngine, build, kernel_counts

__all__ = ["EngineError", "KernelCounts", "OrtEngine", "build", "kernel_counts"]
