"""ONNX Runtime on the CPU provider: build a session from an exported model, run it, time it,
and count which layers became integer kernels.

The interface is deliberately narrow: ``build(onnx_model) -> OrtEngine``, ``OrtEngine.run(inputs)``,
``OrtEngine.latency(batch, runs, warmup) -> LatencyStats`` and ``OrtEngine.kernel_counts()``.
``session`` is mixq's one ONNX Runtime session builder: the engine, latency measurement
(``mixq.latency.OrtLatency``, which builds on ``build``) and the deployable file
(``mixq.engine.deploy``) all open their sessions through it.

``build`` disables two optimizers by default: ``DoubleQDQPairsRemover`` merges two consecutive Q/DQ
pairs with different numbers into one pair (which does not round like the simulation), and
``WeightBiasQuantization`` quantizes the float weights of a layer the plan keeps float when its
neighbours are quantized.

ONNX Runtime 1.31 note: ``MatMulAddFusion`` turns ``DQ -> MatMul -> Add`` without an output Q into
a float Gemm whose bias is not dequantized, which the QDQ selectors then reject (a quantized layer
silently runs in float), and partial graphs have been reported to fail to load with it. ``build``
retries a failed load with that optimizer disabled as well, and ``kernel_counts`` reports every
quantized layer that stayed float.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import onnx

from mixq.engine.kernels import INTEGER_OPS, KernelCounts, count_kernels
from mixq.errors import MixqError
from mixq.latency.stats import LatencyError, LatencyStats, MeasurementSetup, clock_name, cpu_model, time_runs

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
DEFAULT_THREADS = 1
MATMUL_ADD_FUSION = "MatMulAddFusion"
# Q1 -> DQ1 -> Q2 -> DQ2 with different numbers is merged into one pair with new numbers, which rounds
# differently from the two requantizations the simulation (and the exported graph) performs.
# WeightBiasQuantization quantizes the float weight of a Conv/Gemm sitting between a DQ and a Q: a
# layer the plan keeps float would run int8.
DEFAULT_DISABLED = ("DoubleQDQPairsRemover", "WeightBiasQuantization")


class EngineError(MixqError, RuntimeError):
    """ONNX Runtime could not load or run a model."""


def _ort():
    import onnxruntime

    return onnxruntime


def session_options(threads: int = DEFAULT_THREADS, level: str = "all", optimized_path: Optional[str] = None,
                    qdq_fusion: bool = True):
    """SessionOptions with a fixed thread count, sequential execution and an optimization level.

    ``qdq_fusion=False`` keeps Q/DQ nodes as they are (no QLinear* kernels): how a TensorRT-flavour
    model (int8 symmetric, FP8, blocked INT4) is run on the CPU to check its numbers.

    Raises:
        EngineError: an unknown level or a thread count below 1.
    """
    ort = _ort()
    if level not in LEVELS:
        raise EngineError(f"unknown optimization level {level!r}; valid levels are {', '.join(LEVELS)}.")
    if not isinstance(threads, int) or threads < 1:
        raise EngineError(f"threads must be an integer >= 1, but got {threads!r}.")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    so.log_severity_level = 3  # the layout-transform warning on every dump is noise here
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if not qdq_fusion:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


def _as_bytes(model: onnx.ModelProto | bytes | str | os.PathLike) -> bytes:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    with open(model, "rb") as f:
        return f.read()


def session(model: onnx.ModelProto | bytes | str | os.PathLike, threads: int = DEFAULT_THREADS, level: str = "all",
            disabled: Sequence[str] = DEFAULT_DISABLED, optimized_path: Optional[str] = None, qdq_fusion: bool = True):
    """An ``onnxruntime.InferenceSession`` on the CPU provider with mixq's options (see ``session_options``).

    Args:
        model: a ModelProto, its bytes, or a path.
        threads / level / optimized_path / qdq_fusion: as for ``session_options``.
        disabled: ORT graph optimizers to switch off, by name.

    Raises:
        EngineError: an unknown level or a bad thread count (ONNX Runtime's own errors pass through).
    """
    ort = _ort()
    so = session_options(threads, level, optimized_path, qdq_fusion)
    kw = {"disabled_optimizers": list(disabled)} if disabled else {}
    return ort.InferenceSession(_as_bytes(model), so, providers=["CPUExecutionProvider"], **kw)


class OrtEngine:
    """An ONNX Runtime CPU session for one exported model.

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        input_names / output_names: graph I/O in order.
        threads / level / disabled_optimizers: how it was built.
    """

    def __init__(self, data: bytes, threads: int = DEFAULT_THREADS, level: str = "all",
                 disabled_optimizers: Sequence[str] = (), example_inputs: Any = None, qdq_fusion: bool = True) -> None:
        self._data = data
        self.threads, self.level, self.qdq_fusion = threads, level, qdq_fusion
        self.disabled_optimizers = list(disabled_optimizers)
        self.session = session(data, threads, level, self.disabled_optimizers, qdq_fusion=qdq_fusion)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._example = None if example_inputs is None else self.feed(example_inputs)

    # ------------------------------------------------------------------ run
    def feed(self, inputs: Any) -> dict[str, np.ndarray]:
        """Map a batch (Tensor, array, tuple of them, or dict by name) to the session's inputs.

        Raises:
            EngineError: the number or names of the inputs do not match the model.
        """
        if isinstance(inputs, Mapping):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise EngineError(f"inputs lack {missing}; the model's inputs are {self.input_names}.")
            return {n: _numpy(inputs[n]) for n in self.input_names}
        items = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        if len(items) != len(self.input_names):
            raise EngineError(f"got {len(items)} input(s) but the model takes {len(self.input_names)} "
                              f"({', '.join(self.input_names)}).")
        return {n: _numpy(x) for n, x in zip(self.input_names, items)}

    def run(self, inputs: Any) -> list[np.ndarray]:
        """Run one batch; return the outputs as numpy arrays, in the model's output order."""
        try:
            return self.session.run(None, self.feed(inputs))
        except MixqError:
            raise
        except Exception as e:
            raise EngineError(f"ONNX Runtime failed to run the model: {e}") from e

    # ------------------------------------------------------------------ latency
    def batch_inputs(self, batch: int, inputs: Any = None) -> dict[str, np.ndarray]:
        """Inputs of batch size ``batch``: ``inputs`` or the build example tiled/sliced, else synthetic.

        Raises:
            EngineError: a non-batch dimension is symbolic and no example inputs were given.
        """
        base = self.feed(inputs) if inputs is not None else self._example
        if base is not None:
            return {n: _resize_batch(a, batch) for n, a in base.items()}
        rng = np.random.default_rng(0)
        feed = {}
        for i in self.session.get_inputs():
            shape = []
            for k, d in enumerate(i.shape):
                if isinstance(d, int):
                    shape.append(d)
                elif k == 0:
                    shape.append(batch)
                else:
                    raise EngineError(f"input {i.name!r} has a symbolic dimension {d!r}; pass example inputs to "
                                      "build() or latency() so mixq knows its size.")
            if "float" in i.type:
                feed[i.name] = rng.standard_normal(shape).astype(np.float16 if "16" in i.type else np.float32)
            elif "int64" in i.type:
                feed[i.name] = np.ones(shape, np.int64)
            elif "int32" in i.type:
                feed[i.name] = np.ones(shape, np.int32)
            else:
                raise EngineError(f"cannot make a synthetic input of type {i.type} for {i.name!r}; pass example inputs.")
        return feed

    def latency(self, batch: int = 1, runs: int = 100, warmup: int = 10, inputs: Any = None,
                clock: str = "wall") -> LatencyStats:
        """Time ``runs`` runs after ``warmup`` untimed ones (``mixq.latency.stats.time_runs``).

        Args:
            batch: batch size of the inputs (``inputs`` or the build example are tiled / sliced to it).
            runs / warmup: timed / untimed runs.
            inputs: a batch to feed instead of the build example.
            clock: "wall" (``time.perf_counter``) or "thread" (``time.thread_time``).

        Returns:
            ``LatencyStats`` with ``batch`` and ``threads`` set.

        Raises:
            EngineError: runs < 1, warmup < 0 or an unknown clock.
        """
        feed = self.batch_inputs(batch, inputs)
        run = self.session.run
        try:
            return time_runs(lambda: run(None, feed), runs, warmup, clock, batch=batch, threads=self.threads)
        except LatencyError as e:
            raise EngineError(str(e)) from None

    def setup(self, inputs: Any = None, clock: str = "wall", batch: Optional[int] = None) -> MeasurementSetup:
        """What a latency measured on this engine depends on (``MeasurementSetup``).

        Args:
            inputs: the batch timed (else the build example); its shapes are recorded.
            clock: "wall" or "thread", as passed to ``latency``.
            batch: the batch size timed, when the inputs are resized to it.
        """
        feed = self.feed(inputs) if inputs is not None else (self._example or {})
        shapes = {n: ([batch, *a.shape[1:]] if batch is not None and a.ndim else list(a.shape)) for n, a in feed.items()}
        return MeasurementSetup(engine=f"onnxruntime {_ort().__version__}", device=cpu_model(), threads=self.threads,
                                clock=clock_name(clock), level=self.level,
                                disabled_optimizers=tuple(self.disabled_optimizers), input_shapes=shapes,
                                options={"qdq_fusion": self.qdq_fusion, "provider": "CPUExecutionProvider"})

    @property
    def model_bytes(self) -> bytes:
        """The serialized model this engine was built from."""
        return self._data

    # ------------------------------------------------------------------ kernels
    def optimized_model(self) -> onnx.ModelProto:
        """The graph after ONNX Runtime's optimizations (a second session dumps it)."""
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "optimized.onnx")
            session(self._data, self.threads, self.level, self.disabled_optimizers, path, self.qdq_fusion)
            return onnx.load(path, load_external_data=False)

    def kernel_counts(self, unit_nodes: Optional[Mapping[str, Sequence[str]]] = None,
                      quantized: Sequence[str] = ()) -> KernelCounts:
        """Integer kernels vs float ops with Q/DQ around them; quantized units that stayed float."""
        return count_kernels(self.optimized_model(), unit_nodes, quantized)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x))


def _resize_batch(a: np.ndarray, batch: int) -> np.ndarray:
    if a.ndim == 0 or a.shape[0] == batch:
        return a
    reps = -(-batch // a.shape[0])
    return np.ascontiguousarray(np.concatenate([a] * reps, axis=0)[:batch])


def build(onnx_model: onnx.ModelProto | bytes | str | os.PathLike, threads: int = DEFAULT_THREADS, level: str = "all",
          disabled_optimizers: Optional[Sequence[str]] = None, example_inputs: Any = None,
          qdq_fusion: bool = True) -> OrtEngine:
    """Build an ONNX Runtime CPU engine.

    Args:
        onnx_model: a ModelProto, its bytes, or a path.
        threads: intra-op threads (default 1).
        level: graph optimization level: disable, basic, extended, layout or all (default).
        disabled_optimizers: optimizers to turn off; None = ``DEFAULT_DISABLED``, retrying once
            without ``MatMulAddFusion`` as well when the session fails to load (ORT 1.31 partial graphs).
        example_inputs: a batch used by ``latency`` to size and fill inputs.
        qdq_fusion: let ORT fuse Q/DQ into integer kernels (True for the ort-cpu flavour; False
            runs Q/DQ as written, for TensorRT-flavour models).

    Raises:
        EngineError: the session cannot be created.
    """
    data = _as_bytes(onnx_model)
    if disabled_optimizers is not None:
        tries = [list(disabled_optimizers)]
    else:
        tries = [list(DEFAULT_DISABLED), [*DEFAULT_DISABLED, MATMUL_ADD_FUSION]]
    err: Optional[Exception] = None
    for disabled in tries:
        try:
            return OrtEngine(data, threads, level, disabled, example_inputs, qdq_fusion)
        except MixqError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types
            err = e
    raise EngineError(f"ONNX Runtime could not load the model (tried disabled optimizers {tries}): "
                      f"{str(err).splitlines()[0] if err else ''}")


def kernel_counts(model: onnx.ModelProto | OrtEngine, unit_nodes: Optional[Mapping[str, Sequence[str]]] = None,
                  quantized: Sequence[str] = (), threads: int = DEFAULT_THREADS) -> KernelCounts:
    """Kernel counts of a model (built with default options) or of an engine."""
    engine = model if isinstance(model, OrtEngine) else build(model, threads)
    return engine.kernel_counts(unit_nodes, quantized)

