"""Engines that run exported ONNX models: ``ort`` (ONNX Runtime, CPU provider).

Each engine module exposes the same narrow interface: ``build(onnx_model) -> Engine``,
``Engine.run(inputs) -> outputs`` and ``Engine.latency(batch, runs, warmup) -> LatencyStats``.
``ort.session`` is mixq's one ONNX Runtime session builder; ``deploy.save_deployable`` writes the
file to ship (mixq's numbers in a default ONNX Runtime session).
"""
from mixq.engine.deploy import check_deployable, save_deployable
from mixq.engine.kernels import KernelCounts
from mixq.engine.ort import EngineError, OrtEngine, build, kernel_counts, session

__all__ = ["EngineError", "KernelCounts", "OrtEngine", "build", "check_deployable", "kernel_counts",
           "save_deployable", "session"]
