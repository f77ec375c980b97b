"""One latency-statistics type and one timing loop for every engine; what a measurement was made with.

``time_runs`` times a callable and returns ``LatencyStats`` (milliseconds, the same field names for
ONNX Runtime and TensorRT). ``MeasurementSetup`` records what a measurement depends on (engine and
its version, threads, clock, disabled optimizers, optimization level, input shapes, CPU), so saved
measurements are only ever merged with measurements made the same way (``MeasuredLatency.load``).

Plain data: imports no torch and no onnxruntime.
"""
from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any, Callable, Iterator, Optional

import numpy as np

from mixq.errors import MixqError

# clock name -> (the function read around each run, what is recorded in a MeasurementSetup)
CLOCKS = {"wall": (time.perf_counter, "time.perf_counter"), "thread": (time.thread_time, "time.thread_time")}


class LatencyError(MixqError, RuntimeError):
    """A latency measurement or prediction that cannot be made (no data, engine failure)."""


@dataclass(frozen=True)
class LatencyStats(Mapping):
    """Per-run milliseconds of one measurement (read as attributes or, for JSON rows, as a mapping).

    Attributes:
        median_ms / p25_ms / p75_ms / mean_ms / min_ms: of the timed runs, on ``clock``.
        runs / warmup: timed and untimed runs.
        clock: "wall" (``time.perf_counter``), "thread" (``time.thread_time``: CPU time of the
            calling thread, which with one intra-op thread is where ONNX Runtime computes) or
            "cuda_event" (GPU time between two CUDA events).
        wall_median_ms: median wall-clock time (equal to ``median_ms`` when clock is "wall").
        cpu_median_ms: median CPU time of the calling thread (None when not measured).
        batch / threads: batch size and intra-op threads, when known.
    """

    median_ms: float
    p25_ms: float
    p75_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup: int = 0
    clock: str = "wall"
    wall_median_ms: Optional[float] = None
    cpu_median_ms: Optional[float] = None
    batch: Optional[int] = None
    threads: Optional[int] = None

    @property
    def iqr_ms(self) -> float:
        """Interquartile range (p75 - p25)."""
        return self.p75_ms - self.p25_ms

    @classmethod
    def from_times(cls, ms: Any, warmup: int = 0, clock: str = "wall", **extra: Any) -> "LatencyStats":
        """Statistics of per-run milliseconds ``ms``.

        Raises:
            LatencyError: no runs.
        """
        t = np.asarray(ms, dtype=np.float64)
        if t.size == 0:
            raise LatencyError("no timed runs to summarise; runs must be >= 1.")
        p25, med, p75 = np.percentile(t, [25, 50, 75])
        return cls(float(med), float(p25), float(p75), float(t.mean()), float(t.min()), int(t.size), int(warmup),
                   clock, **extra)

    def to_dict(self) -> dict:
        """JSON-ready dict of every field plus ``iqr_ms``."""
        return {**asdict(self), "iqr_ms": self.iqr_ms}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LatencyStats":
        """The stats of a ``to_dict`` row (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # Mapping protocol: ``stats["median_ms"]``, ``dict(stats)``, ``{**stats, ...}``.
    def __getitem__(self, key: str) -> Any:
        d = self.to_dict()
        if key not in d:
            raise KeyError(key)
        return d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def time_runs(run: Callable[[], Any], runs: int, warmup: int, clock: str = "wall", **extra: Any) -> LatencyStats:
    """Time ``run()``: ``warmup`` untimed calls, then ``runs`` timed ones.

    Args:
        run: the call to time.
        runs / warmup: timed / untimed calls.
        clock: "wall" (``time.perf_counter``) or "thread" (``time.thread_time``); both are recorded,
            the statistics use ``clock``.
        extra: ``batch`` / ``threads`` to record.

    Raises:
        LatencyError: an unknown clock, runs < 1 or warmup < 0.
    """
    if clock not in CLOCKS:
        raise LatencyError(f"unknown clock {clock!r}; valid clocks are {', '.join(CLOCKS)}.")
    if not isinstance(runs, int) or not isinstance(warmup, int) or runs < 1 or warmup < 0:
        raise LatencyError(f"runs must be an integer >= 1 and warmup >= 0, but got runs={runs!r}, warmup={warmup!r}.")
    for _ in range(warmup):
        run()
    wall, cpu = np.empty(runs), np.empty(runs)
    for i in range(runs):
        w0, c0 = time.perf_counter(), time.thread_time()
        run()
        cpu[i], wall[i] = time.thread_time() - c0, time.perf_counter() - w0
    t = (cpu if clock == "thread" else wall) * 1e3
    return LatencyStats.from_times(t, warmup, clock, wall_median_ms=float(np.median(wall) * 1e3),
                                   cpu_median_ms=float(np.median(cpu) * 1e3), **extra)


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@dataclass(frozen=True)
class MeasurementSetup:
    """What a latency measurement was made with; two measurements compare only under equal setups.

    Attributes:
        engine: "onnxruntime 1.32.0", "tensorrt 10.9.0" ... (name and version).
        device: the CPU model (ONNX Runtime) or GPU name (TensorRT).
        threads: intra-op threads (None where it does not apply).
        clock: the clock function read around each run ("time.perf_counter", "time.thread_time",
            "cuda_event").
        level: the graph optimization level (ONNX Runtime) or builder level (TensorRT).
        disabled_optimizers: optimizers switched off, sorted.
        input_shapes: input name -> shape fed.
        options: anything else the engine's numbers depend on (e.g. ``qdq_fusion``).
    """

    engine: str
    device: str
    threads: Optional[int] = None
    clock: str = "time.perf_counter"
    level: Optional[str] = None
    disabled_optimizers: tuple = ()
    input_shapes: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "disabled_optimizers", tuple(sorted(self.disabled_optimizers)))
        object.__setattr__(self, "input_shapes", {str(k): [int(d) for d in v] for k, v in self.input_shapes.items()})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["disabled_optimizers"] = list(self.disabled_optimizers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "MeasurementSetup":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def differences(self, other: "MeasurementSetup") -> dict:
        """field -> (this value, other value) for every field that differs."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def clock_name(clock: str) -> str:
    """The clock function recorded for a clock ("wall" -> "time.perf_counter")."""
    return CLOCKS[clock][1] if clock in CLOCKS else clock
