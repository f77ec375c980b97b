"""Measured ONNX Runtime CPU latency of a plan: export the plan's Q/DQ ONNX, open a session, time it.

The float graph is exported once per model (``mixq.export.export_float_graph``); each plan is a
cheap rewrite of it (``apply_plan``), so a measurement costs one session creation plus the runs.

Timing follows what makes CPU numbers repeatable: one intra-op thread, sequential execution,
warm-up runs first, then the median of many runs. With one intra-op thread ONNX Runtime computes
on the calling thread, so the default clock is that thread's CPU time (``time.thread_time``): on
a shared, busy machine it does not count the time the thread waits for a core, which wall-clock
time does (on an idle machine the two agree to within a few percent). Both are recorded.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from mixq.latency.base import Assignment, LatencyError, MeasuredLatency

CLOCKS = ("auto", "thread", "wall")


def ort_session(model: Any, threads: int = 1, disabled_optimizers: tuple = ()) -> Any:
    """An ONNX Runtime CPU session for timing (``threads`` intra-op threads, sequential, all optimisations).

    Args:
        model: an ``onnx.ModelProto``, its bytes, or a path.
        threads: intra-op threads (1 for repeatable single-stream latency).
        disabled_optimizers: ORT graph transformers to switch off, by name.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if disabled_optimizers:
        # ';' is the separator ORT 1.31 actually splits on (',' is documented but ignored).
        so.add_session_config_entry("optimization.disable_specified_optimizers", ";".join(disabled_optimizers))
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    src = str(src) if not isinstance(src, (bytes, str)) else src
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def time_runs(run: Callable[[], Any], runs: int, warmup: int, clock: str = "thread") -> dict:
    """Time ``run()``: ``warmup`` untimed calls, then ``runs`` timed ones.

    Returns:
        {"median_ms", "p25_ms", "p75_ms", "min_ms", "wall_median_ms", "cpu_median_ms", "runs", "clock"},
        where median/p25/p75/min use ``clock`` ("thread": CPU time of this thread; "wall").
    """
    if clock not in ("thread", "wall"):
        raise LatencyError(f"unknown clock {clock!r}; use 'thread' or 'wall'.")
    if runs < 1:
        raise LatencyError(f"runs must be >= 1, but got {runs}.")
    for _ in range(warmup):
        run()
    wall, cpu = np.empty(runs), np.empty(runs)
    for i in range(runs):
        w0, c0 = time.perf_counter(), time.thread_time()
        run()
        cpu[i], wall[i] = time.thread_time() - c0, time.perf_counter() - w0
    t = (cpu if clock == "thread" else wall) * 1e3
    return {"median_ms": float(np.median(t)), "p25_ms": float(np.percentile(t, 25)),
            "p75_ms": float(np.percentile(t, 75)), "min_ms": float(t.min()),
            "wall_median_ms": float(np.median(wall) * 1e3), "cpu_median_ms": float(np.median(cpu) * 1e3),
            "runs": int(runs), "clock": clock}


def _numpy_inputs(example: Any) -> list[np.ndarray]:
    items = example if isinstance(example, (tuple, list)) else (example,)
    out = []
    for t in items:
        out.append(t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t))
    return out


class OrtLatency(MeasuredLatency):
    """Measured ONNX Runtime CPU latency of a plan (a LatencyModel).

    Args:
        qmodel: a calibrated model from ``mixq.quantize`` for backend "ort-cpu", prepared for every
            format the plans use.
        example_inputs: one batch (a Tensor or tuple of Tensors): exported once, fed to every run.
        runs / warmup: timed and untimed runs per plan.
        threads: intra-op threads (1 by default).
        clock: "thread" (CPU time of the calling thread), "wall", or "auto" (thread when
            ``threads == 1``, else wall).
        session_factory: ``f(onnx.ModelProto) -> object with run(None, feeds)``; default: the session
            of ``mixq.engine.ort.build`` (what deployment runs), else ``ort_session``.
        float_graph: a ``FloatGraph`` already exported from ``qmodel`` (else exported here).
        disabled_optimizers: ORT graph transformers to switch off; None = the engine's default
            (``mixq.engine.ort.DEFAULT_DISABLED``), () = none (ONNX Runtime's own defaults).

    Raises:
        LatencyError: the model is not prepared for ort-cpu, or a bad clock.
    """

    def __init__(self, qmodel: Any, example_inputs: Any, runs: int = 30, warmup: int = 5, threads: int = 1,
                 clock: str = "auto", session_factory: Optional[Callable[[Any], Any]] = None,
                 float_graph: Any = None, disabled_optimizers: Optional[Sequence[str]] = None) -> None:
        st = getattr(qmodel, "mixq", None)
        if st is None:
            raise LatencyError("OrtLatency needs a model from mixq.quantize(model, ..., backend='ort-cpu').")
        if st.backend != "ort-cpu":
            raise LatencyError(f"OrtLatency measures ort-cpu plans, but the model was quantized for {st.backend!r}; "
                               "quantize it with backend='ort-cpu'.")
        if clock not in CLOCKS:
            raise LatencyError(f"unknown clock {clock!r}; valid clocks are {', '.join(CLOCKS)}.")
        super().__init__(st.kinds, "ort-cpu")
        self.qmodel, self.example = qmodel, example_inputs
        self.runs, self.warmup, self.threads = int(runs), int(warmup), int(threads)
        self.clock = ("thread" if self.threads == 1 else "wall") if clock == "auto" else clock
        self.session_factory = session_factory or self._engine_session
        self._graph = float_graph
        self.disabled_optimizers = None if disabled_optimizers is None else tuple(disabled_optimizers)

    @property
    def float_graph(self) -> Any:
        """The model's float graph (exported on first use)."""
        if self._graph is None:
            from mixq.export import export_float_graph

            self._graph = export_float_graph(self.qmodel, self.example)
        return self._graph

    def onnx_model(self, plan: Any) -> Any:
        """The Q/DQ ONNX model of ``plan`` (what is measured)."""
        from mixq.export import apply_plan
        from mixq.plan import QuantPlan

        a = self.assignment(plan)
        return apply_plan(self.float_graph, self.qmodel, QuantPlan(backend="ort-cpu", default="fp32", layers=a))

    def _engine_session(self, model: Any) -> Any:
        try:
            from mixq.engine.ort import build
        except ImportError:  # the engine module is optional here: time a plain session instead
            return ort_session(model, self.threads, self.disabled_optimizers or ())
        eng = build(model, self.threads, disabled_optimizers=self.disabled_optimizers)
        self._last_disabled = list(eng.disabled_optimizers)
        return eng.session

    def _measure(self, assignment: Assignment) -> dict:
        sess = self.session_factory(self.onnx_model(assignment))
        names = [i.name for i in sess.get_inputs()]
        arrays = _numpy_inputs(self.example)
        if len(arrays) != len(names):
            raise LatencyError(f"the session takes {len(names)} input(s) {names} but the example has {len(arrays)}.")
        feeds = dict(zip(names, arrays))
        st = time_runs(lambda: sess.run(None, feeds), self.runs, self.warmup, self.clock)
        if getattr(self, "_last_disabled", None) is not None:
            st["disabled_optimizers"] = self._last_disabled
        return st

