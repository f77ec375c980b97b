"""TensorRT engines from Q/DQ ONNX: build, serialize, time, profile per layer, inspect precisions.

(``trt_env``: importing TensorRT, GPU checks and CUDA memory / events; ``trt_layers``: inspector
JSON -> precisions and units, ``precision_report``.)

Explicit quantization only: the ONNX says, with QuantizeLinear / DequantizeLinear pairs (and
Casts for fp16), which layers run in INT8 / FP8 / FP16. TensorRT 10 and 11 differ here:

- TensorRT 11 is always strongly typed: ``BuilderFlag.FP16 / INT8 / FP8 / BF16`` and
  ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` no longer exist, and precision comes from the
  graph's types alone.
- TensorRT 10 builds weakly typed networks by default, where Q/DQ layers still need the INT8 flag
  and fp16 layers the FP16 flag; the ``STRONGLY_TYPED`` creation flag gives 11's behaviour.

``build_engine`` builds strongly typed wherever it can (both versions behave the same), or weakly
typed on TensorRT 10 with ``strongly_typed=False``. Everything version-dependent is checked with
``hasattr`` and the version number, never assumed. ``tensorrt`` is imported lazily: importing this
module works anywhere; using it without TensorRT or a CUDA device raises ``TensorRTUnavailableError``.

The engine inspector (built with detailed profiling verbosity) confirms, per mixq unit, which
layers actually run in INT8 / FP8 and which stayed float: see ``Engine.precision_report``.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from mixq.latency.base import Assignment, LatencyError, MeasuredLatency
from mixq.latency.stats import LatencyStats, MeasurementSetup
from mixq.latency.trt_env import (INSTALL_HINT, EngineBuildError, TensorRTUnavailableError, _Cuda, available,
                                  import_tensorrt, trt_version)
from mixq.latency.trt_layers import LOW_PRECISIONS, layer_precision, layer_units, node_units, precision_report
from mixq.latency.trtexec_files import load_layer_info

__all__ = ["INSTALL_HINT", "LOW_PRECISIONS", "Engine", "EngineBuildError", "TensorRTLatency",
           "TensorRTUnavailableError", "available", "build_engine", "import_tensorrt", "precision_report",
           "trt_version"]

# ------------------------------------------------------------------------------------------ build
def _logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_model: str | os.PathLike | bytes, *, strongly_typed: bool = True,
                 input_shapes: Optional[Mapping[str, Sequence[int]]] = None, workspace_mb: Optional[int] = None,
                 optimization_level: Optional[int] = None, timing_cache: Optional[str | os.PathLike] = None) -> bytes:
    """Build a serialized TensorRT engine from a Q/DQ ONNX model.

    Args:
        onnx_model: path to the ONNX file, or its bytes.
        strongly_typed: take every tensor type from the ONNX (always so on TensorRT 11). False is
            TensorRT 10's weak typing, with the INT8 and FP16 builder flags set so Q/DQ and fp16
            layers are honoured.
        input_shapes: name -> shape for inputs with dynamic dimensions (min = opt = max).
        workspace_mb: workspace memory pool limit.
        optimization_level: ``builder_optimization_level`` (0-5; TensorRT's default is 3).
        timing_cache: a file to reuse kernel timings across builds (read if present, then written).

    Returns:
        The serialized engine (the bytes of a ``.plan`` / ``.engine`` file).

    Raises:
        TensorRTUnavailableError: no TensorRT; EngineBuildError: parse or build failure.
    """
    trt = import_tensorrt()
    major, _ = trt_version(trt)
    if not strongly_typed and major >= 11:
        raise EngineBuildError("TensorRT 11 builds only strongly typed networks; precision comes from the ONNX "
                               "(Q/DQ pairs, Casts), so strongly_typed=False is not possible. Drop it.")
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    NF = trt.NetworkDefinitionCreationFlag
    if strongly_typed and major < 11 and hasattr(NF, "STRONGLY_TYPED"):
        flags |= 1 << int(NF.STRONGLY_TYPED)  # on 11 the flag is deprecated and ignored: always strong
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if isinstance(onnx_model, (bytes, bytearray)):
        ok = parser.parse(bytes(onnx_model))
    else:
        path = Path(onnx_model)
        if not path.is_file():
            raise EngineBuildError(f"ONNX file {str(path)!r} does not exist.")
        ok = parser.parse_from_file(str(path))  # resolves external data next to the file
    if not ok:
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected the model: {errs or 'no error text'}.")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer names, types and precisions
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    if not strongly_typed:
        for name in ("INT8", "FP16"):  # deprecated in 10.12, still honoured by 10.x
            if hasattr(trt.BuilderFlag, name):
                config.set_flag(getattr(trt.BuilderFlag, name))
    _add_profile(trt, builder, network, config, input_shapes or {})
    cache = None
    if timing_cache is not None:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError("TensorRT could not build an engine from the model (see its log above); common "
                               "causes: Q/DQ with a non-zero zero point, an FP8 layer on a GPU older than Ada (SM 8.9), "
                               "or an op TensorRT does not support.")
    if cache is not None:
        Path(timing_cache).write_bytes(bytes(cache.serialize()))
    return bytes(plan)


def _add_profile(trt: Any, builder: Any, network: Any, config: Any, shapes: Mapping[str, Sequence[int]]) -> None:
    dynamic = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if any(int(d) < 0 for d in t.shape):
            dynamic.append(t.name)
    if not dynamic:
        return
    missing = [n for n in dynamic if n not in shapes]
    if missing:
        raise EngineBuildError(f"input(s) {missing} have dynamic dimensions; pass input_shapes={{name: shape}} "
                               "for them (the engine is built for that shape).")
    profile = builder.create_optimization_profile()
    for n in dynamic:
        s = tuple(int(d) for d in shapes[n])
        profile.set_shape(n, s, s, s)
    config.add_optimization_profile(profile)


# ------------------------------------------------------------------------------------------- run
@dataclass(frozen=True)
class _IO:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple


class Engine:
    """A deserialized TensorRT engine with device buffers, ready to run, time, profile and inspect.

    Args:
        plan: serialized engine bytes (from ``build_engine`` or a ``.plan`` file).
        input_shapes: shapes for dynamic inputs.
    """

    def __init__(self, plan: bytes, input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> None:
        self.trt = trt = import_tensorrt()
        self.cuda = _Cuda()
        self.plan = bytes(plan)
        self._runtime = trt.Runtime(_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(self.plan)
        if self.engine is None:
            raise EngineBuildError("TensorRT could not deserialize the engine: it was built by another TensorRT "
                                   "version or for another GPU; build it again here.")
        self.context = self.engine.create_execution_context()
        shapes = dict(input_shapes or {})
        self.io: list[_IO] = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_in = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_in:
                shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    if name not in shapes:
                        raise LatencyError(f"engine input {name!r} has dynamic shape {shape}; pass input_shapes.")
                    shape = tuple(int(d) for d in shapes[name])
                self.context.set_input_shape(name, shape)
            self.io.append(_IO(name, is_in, np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))), ()))
        self.io = [_IO(t.name, t.is_input, t.dtype, tuple(int(d) for d in self.context.get_tensor_shape(t.name)))
                   for t in self.io]
        self._bufs = {}
        for t in self.io:
            buf = self.cuda.alloc(int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize)
            self._bufs[t.name] = buf
            self.context.set_tensor_address(t.name, self.cuda.ptr(buf))

    @classmethod
    def from_onnx(cls, onnx_model: str | os.PathLike | bytes, **build_kwargs: Any) -> "Engine":
        """Build (``build_engine``) and load an engine in one step."""
        return cls(build_engine(onnx_model, **build_kwargs), build_kwargs.get("input_shapes"))

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> "Engine":
        return cls(Path(path).read_bytes(), **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the serialized engine (load it with ``Engine.load`` on the same GPU and TensorRT)."""
        from mixq.artifacts import write_atomic

        return write_atomic(path, self.plan)

    # ---------------------------------------------------------------- execution
    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise LatencyError("TensorRT's execute_async_v3 failed (see its log).")

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on host arrays; return the outputs as host arrays.

        Raises:
            LatencyError: an input is missing or has the wrong shape.
        """
        for t in self.io:
            if t.is_input:
                if t.name not in inputs:
                    raise LatencyError(f"missing engine input {t.name!r}; the engine takes "
                                       f"{[x.name for x in self.io if x.is_input]}.")
                arr = np.asarray(inputs[t.name], dtype=t.dtype)
                if tuple(arr.shape) != t.shape:
                    raise LatencyError(f"input {t.name!r} must have shape {t.shape}, but got {tuple(arr.shape)}.")
                self.cuda.to_device(self._bufs[t.name], arr)
        self._enqueue()
        self.cuda.synchronize()
        return {t.name: self.cuda.to_host(self._bufs[t.name], t.shape, t.dtype) for t in self.io if not t.is_input}

    def _fill_random(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        for t in self.io:
            if t.is_input:
                arr = (rng.integers(0, 100, t.shape) if t.dtype.kind in "iu" else rng.standard_normal(t.shape))
                self.cuda.to_device(self._bufs[t.name], arr.astype(t.dtype))

    def latency(self, runs: int = 200, warmup: int = 50) -> LatencyStats:
        """GPU time per inference (CUDA events around each enqueue), after ``warmup`` runs.

        Returns:
            ``LatencyStats`` with clock "cuda_event".

        Raises:
            LatencyError: runs < 1 or warmup < 0.
        """
        if not isinstance(runs, int) or not isinstance(warmup, int) or runs < 1 or warmup < 0:
            raise LatencyError(f"runs must be an integer >= 1 and warmup >= 0, but got runs={runs!r}, warmup={warmup!r}.")
        self._fill_random()
        for _ in range(warmup):
            self._enqueue()
        self.cuda.synchronize()
        ts = [self.cuda.time_ms(self._enqueue) for _ in range(runs)]
        batch = next((t.shape[0] for t in self.io if t.is_input and t.shape), None)
        return LatencyStats.from_times(ts, warmup, "cuda_event", batch=batch)

    def setup(self, build_kwargs: Optional[Mapping[str, Any]] = None) -> MeasurementSetup:
        """What a latency measured on this engine depends on (TensorRT version, GPU, input shapes, build options)."""
        opts = {k: (str(v) if isinstance(v, (os.PathLike, Path)) else v) for k, v in (build_kwargs or {}).items()
                if k not in ("timing_cache",)}
        return MeasurementSetup(engine=f"tensorrt {getattr(self.trt, '__version__', '?')}", device=self.cuda.device_name(),
                                clock="cuda_event", level=str(opts.pop("optimization_level", "default")),
                                input_shapes={t.name: list(t.shape) for t in self.io if t.is_input},
                                options={k: v if isinstance(v, (int, float, str, bool)) or v is None else repr(v)
                                         for k, v in opts.items()})

    def profile(self, runs: int = 50, warmup: int = 10) -> list[dict]:
        """Per-layer GPU time through ``IProfiler``, median over ``runs`` inferences.

        Returns:
            One {"name", "median_ms", "mean_ms"} per engine layer, in execution order. Profiling
            synchronises after each layer, so the sum exceeds ``latency()``.
        """
        trt = self.trt
        times: dict[str, list[float]] = {}

        class _Profiler(trt.IProfiler):
            def __init__(self) -> None:
                trt.IProfiler.__init__(self)  # pybind11 trampolines need the explicit base init

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                times.setdefault(layer_name, []).append(float(ms))

        self._fill_random()
        for _ in range(warmup):
            self._enqueue()
        self.cuda.synchronize()
        prof = _Profiler()
        self.context.profiler = prof
        if hasattr(self.context, "enqueue_emits_profile"):
            self.context.enqueue_emits_profile = True
        try:
            for _ in range(runs):
                self._enqueue()
                self.cuda.synchronize()
        finally:
            self.context.profiler = None
        return [{"name": n, "median_ms": statistics.median(v), "mean_ms": statistics.fmean(v)} for n, v in times.items()]

    # ---------------------------------------------------------------- inspection
    def inspect(self) -> dict:
        """The engine inspector's JSON (``Layers`` plus ``Bindings`` on 10 / ``I/O Tensors`` on 11)."""
        trt = self.trt
        insp = self.engine.create_engine_inspector()
        if hasattr(insp, "execution_context"):
            insp.execution_context = self.context  # resolves dynamic shapes in the report
        return json.loads(insp.get_engine_information(trt.LayerInformationFormat.JSON))

    def layers(self, units: Sequence[str] = (), onnx_model: Any = None,
               node_map: Optional[Mapping[str, str]] = None) -> list[dict]:
        """Engine layers with their type, precision and the mixq units they compute.

        Args:
            units: the model's unit names (to attribute fused layers to units).
            onnx_model: the ONNX the engine was built from, to map exporter node names to units.
            node_map: ONNX node name -> unit when known, e.g. from mixq's export
                (``{n: u for u, nodes in float_graph.unit_nodes.items() for n in nodes}``).
        """
        if onnx_model is not None and units:
            node_map = {**node_units(onnx_model, units), **(node_map or {})}
        out = []
        for layer in load_layer_info(self.inspect()):
            name = str(layer.get("Name", ""))
            out.append({"name": name, "type": layer.get("LayerType", ""), "precision": layer_precision(layer),
                        "tactic": layer.get("TacticName", ""),
                        "units": layer_units(name, units, node_map) if units else []})
        return out

    def precision_report(self, assignment: Mapping[str, str], onnx_model: Any = None,
                         node_map: Optional[Mapping[str, str]] = None) -> dict:
        """Which units actually run in a low precision, against what the plan asked for.

        Returns:
            {"units": {unit: {"planned", "observed": [precisions of its compute layers]}},
             "mismatches": [units planned low that run only float, or planned fp32 that run low],
             "unmatched_layers": [compute layers no unit claims]}
        """
        return precision_report(self.layers(list(assignment), onnx_model, node_map), assignment)


# -------------------------------------------------------------------------------- latency model
class TensorRTLatency(MeasuredLatency):
    """Measured TensorRT latency of a plan: export Q/DQ ONNX, build, time (a LatencyModel).

    Args:
        export_fn: assignment -> tensorrt-flavour Q/DQ ONNX (path or bytes) for that plan.
        kinds: unit name -> kind of the model.
        runs / warmup: timing repeats per plan.
        build_kwargs: passed to ``build_engine`` (input_shapes, workspace_mb, timing_cache ...).
        keep_dir: when set, every engine is saved there as ``<hash>.plan``.
        node_map: ONNX node name -> unit, so the inspector's layers can be checked against the plan.
    """

    def __init__(self, export_fn: Callable[[Assignment], Any], kinds: Mapping[str, str], runs: int = 200,
                 warmup: int = 50, keep_dir: Optional[str | os.PathLike] = None,
                 node_map: Optional[Mapping[str, str]] = None, **build_kwargs: Any) -> None:
        super().__init__(kinds, "tensorrt")
        ok, why = available()
        if not ok:
            raise TensorRTUnavailableError(why)
        self.export_fn, self.runs, self.warmup = export_fn, runs, warmup
        self.node_map = dict(node_map or {})
        self.build_kwargs = dict(build_kwargs)
        self.keep_dir = Path(keep_dir) if keep_dir else None
        if "timing_cache" not in self.build_kwargs and self.keep_dir is not None:
            self.build_kwargs["timing_cache"] = self.keep_dir / "timing.cache"

    def _measure(self, assignment: Assignment) -> dict:
        onnx_model = self.export_fn(assignment)
        eng = Engine.from_onnx(onnx_model, **self.build_kwargs)
        if self.setup is None:
            self.setup = eng.setup(self.build_kwargs)
        st = eng.latency(self.runs, self.warmup).to_dict()
        src = onnx_model if isinstance(onnx_model, (str, os.PathLike)) else None
        report = eng.precision_report(assignment, src, self.node_map)
        st["precision_mismatches"] = report["mismatches"]
        if self.keep_dir is not None:
            import hashlib

            key = hashlib.sha256(json.dumps(sorted(assignment.items())).encode()).hexdigest()[:12]
            eng.save(self.keep_dir / f"{key}.plan")
        return st
