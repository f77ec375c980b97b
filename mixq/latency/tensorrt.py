"""TensorRT engines from Q/DQ ONNX: build, serialize, time, profile per layer, inspect precisions.

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

from mixq.errors import MixqError
from mixq.latency.base import Assignment, LatencyError, MeasuredLatency
from mixq.latency.trtexec import layer_precision, layer_units, load_layer_info, node_units

INSTALL_HINT = ("install TensorRT's Python package on a machine with an NVIDIA GPU and driver "
                "(`pip install 'mixq[tensorrt]'`, i.e. tensorrt>=10), plus either a CUDA build of torch "
                "or cuda-python (`pip install cuda-python`) for device memory.")
LOW_PRECISIONS = ("int8", "fp8", "int4", "fp4")


class TensorRTUnavailableError(MixqError, RuntimeError):
    """TensorRT, CUDA or a GPU is missing; the message says what to install."""


class EngineBuildError(MixqError, RuntimeError):
    """TensorRT could not parse the ONNX or build an engine; the message carries its errors."""


# ----------------------------------------------------------------------------------- environment
def import_tensorrt() -> Any:
    """Import ``tensorrt`` or raise ``TensorRTUnavailableError`` with the install hint."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailableError(f"TensorRT is not installed ({e}); {INSTALL_HINT}") from None
    return trt


def trt_version(trt: Any = None) -> tuple[int, int]:
    """(major, minor) of the installed TensorRT."""
    trt = trt or import_tensorrt()
    parts = str(getattr(trt, "__version__", "0.0")).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def available() -> tuple[bool, str]:
    """Whether engines can be built and run here, and if not, why (for skip messages)."""
    try:
        trt = import_tensorrt()
        if trt_version(trt)[0] < 10:
            return False, f"TensorRT {trt.__version__} is older than 10; mixq needs TensorRT >= 10."
        _Cuda()
    except TensorRTUnavailableError as e:
        return False, str(e)
    return True, ""


class _Cuda:
    """Device memory, streams and event timing through torch (CUDA build) or cuda-python."""

    def __init__(self) -> None:
        self.torch = None
        self.cudart = None
        try:
            import torch

            if torch.cuda.is_available():
                self.torch = torch
                self.stream = torch.cuda.Stream()
                return
        except ImportError:
            pass
        try:
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:
                from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise TensorRTUnavailableError(f"no CUDA device is usable from Python (torch has no CUDA and "
                                           f"cuda-python is not installed); {INSTALL_HINT}") from None
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count == 0:
            raise TensorRTUnavailableError(f"no CUDA device found (cudaGetDeviceCount: {err}, {count}); {INSTALL_HINT}")
        self.cudart = cudart
        self.stream = self._ok(cudart.cudaStreamCreate())

    def _ok(self, ret: Any) -> Any:
        err, *rest = ret if isinstance(ret, tuple) else (ret,)
        if int(err) != 0:
            raise LatencyError(f"CUDA call failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream if self.torch else int(self.stream)

    def alloc(self, nbytes: int) -> Any:
        if self.torch:
            return self.torch.empty(max(1, nbytes), dtype=self.torch.uint8, device="cuda")
        return self._ok(self.cudart.cudaMalloc(max(1, nbytes)))

    def ptr(self, buf: Any) -> int:
        return buf.data_ptr() if self.torch else int(buf)

    def free(self, buf: Any) -> None:
        if not self.torch:
            self._ok(self.cudart.cudaFree(buf))

    def to_device(self, buf: Any, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        if self.torch:
            src = self.torch.from_numpy(host.view(np.uint8).reshape(-1))
            buf[: src.numel()].copy_(src)
        else:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._ok(self.cudart.cudaMemcpy(buf, host.ctypes.data, host.nbytes, kind))

    def to_host(self, buf: Any, shape: tuple, dtype: np.dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        if self.torch:
            out.view(np.uint8).reshape(-1)[:] = buf[: out.nbytes].cpu().numpy()
        else:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._ok(self.cudart.cudaMemcpy(out.ctypes.data, buf, out.nbytes, kind))
        return out

    def synchronize(self) -> None:
        if self.torch:
            self.stream.synchronize()
        else:
            self._ok(self.cudart.cudaStreamSynchronize(self.stream))

    def time_ms(self, fn: Callable[[], None]) -> float:
        """GPU time of ``fn`` (which enqueues on ``self.stream``) measured with CUDA events."""
        if self.torch:
            a, b = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            a.record(self.stream)
            fn()
            b.record(self.stream)
            b.synchronize()
            return float(a.elapsed_time(b))
        rt = self.cudart
        a, b = self._ok(rt.cudaEventCreate()), self._ok(rt.cudaEventCreate())
        try:
            self._ok(rt.cudaEventRecord(a, self.stream))
            fn()
            self._ok(rt.cudaEventRecord(b, self.stream))
            self._ok(rt.cudaEventSynchronize(b))
            return float(self._ok(rt.cudaEventElapsedTime(a, b)))
        finally:
            rt.cudaEventDestroy(a)
            rt.cudaEventDestroy(b)


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

    def latency(self, runs: int = 200, warmup: int = 50) -> dict:
        """GPU time per inference (CUDA events around each enqueue), after ``warmup`` runs.

        Returns:
            {"median_ms", "p25_ms", "p75_ms", "mean_ms", "min_ms", "runs"}.
        """
        self._fill_random()
        for _ in range(warmup):
            self._enqueue()
        self.cuda.synchronize()
        ts = np.asarray([self.cuda.time_ms(self._enqueue) for _ in range(runs)])
        return {"median_ms": float(np.median(ts)), "p25_ms": float(np.percentile(ts, 25)),
                "p75_ms": float(np.percentile(ts, 75)), "mean_ms": float(ts.mean()), "min_ms": float(ts.min()),
                "runs": int(runs)}

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


def precision_report(layers: Sequence[Mapping], assignment: Mapping[str, str]) -> dict:
    """Compare engine layers (``Engine.layers`` output) with the plan's formats per unit."""
    seen: dict[str, list[str]] = {u: [] for u in assignment}
    unmatched = []
    for layer in layers:
        if str(layer["name"]).startswith("Reformatting CopyNode") or layer.get("type") == "Reformat":
            continue
        if not layer["units"]:
            unmatched.append(layer["name"])
        for u in layer["units"]:
            if layer["precision"] not in seen[u]:
                seen[u].append(layer["precision"])
    mism = []
    for u, f in assignment.items():
        obs = [p for p in seen[u] if p != "unknown"]
        planned_low = f in ("int8", "fp8_e4m3", "int4_wo")
        if not obs:
            continue
        runs_low = any(p in LOW_PRECISIONS for p in obs)
        if planned_low != runs_low:
            mism.append(u)
    return {"units": {u: {"planned": assignment[u], "observed": seen[u]} for u in assignment},
            "mismatches": mism, "unmatched_layers": unmatched}


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
        st = eng.latency(self.runs, self.warmup)
        src = onnx_model if isinstance(onnx_model, (str, os.PathLike)) else None
        report = eng.precision_report(assignment, src, self.node_map)
        st["precision_mismatches"] = report["mismatches"]
        if self.keep_dir is not None:
            import hashlib

            key = hashlib.sha256(json.dumps(sorted(assignment.items())).encode()).hexdigest()[:12]
            eng.save(self.keep_dir / f"{key}.plan")
        return st
