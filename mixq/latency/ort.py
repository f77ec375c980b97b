"""Measured ONNX Runtime CPU latency of a plan: export the plan's Q/DQ ONNX, open a session, time it.

The float graph is exported once per model (``mixq.export.export_float_graph``); each plan is a
cheap rewrite of it (``apply_plan``), so a measurement costs one session creation plus the runs.
Sessions come from ``mixq.engine.ort.build`` (mixq's one session builder: what verify and
deployment run) and runs are timed by ``mixq.latency.stats.time_runs`` into ``LatencyStats``.

Timing follows what makes CPU numbers repeatable: one intra-op thread, sequential execution,
warm-up runs first, then the median of many runs. With one intra-op thread ONNX Runtime computes
on the calling thread, so the default clock is that thread's CPU time (``time.thread_time``): on
a shared, busy machine it does not count the time the thread waits for a core, which wall-clock
time (``time.perf_counter``) does (on an idle machine the two agree to within a few percent). Both
are recorded; the setup saved with the measurements names the clock used.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from mixq.latency.base import Assignment, LatencyError, MeasuredLatency
from mixq.latency.stats import MeasurementSetup, clock_name, cpu_model, time_runs

CLOCKS = ("auto", "thread", "wall")
__all__ = ["CLOCKS", "OrtLatency", "time_runs"]


def _numpy_inputs(example: Any) -> list[np.ndarray]:
    items = example if isinstance(example, (tuple, list)) else (example,)
    return [t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t) for t in items]


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
        session_factory: ``f(onnx.ModelProto) -> object with get_inputs() and run(None, feeds)``;
            default: the session of ``mixq.engine.ort.build`` (what verify and deployment run).
        float_graph: a ``FloatGraph`` already exported from ``qmodel`` (else exported here).
        disabled_optimizers: ORT graph transformers to switch off; None = the engine's default
            (``mixq.engine.ort.DEFAULT_DISABLED``), () = none (ONNX Runtime's own defaults).
        level: ONNX Runtime graph optimization level (``mixq.engine.ort.LEVELS``; default "all").

    Attributes:
        setup: the ``MeasurementSetup`` (ORT version, CPU, threads, clock, level, disabled
            optimizers, input shapes), saved with the measurements and checked by ``load``.

    Raises:
        LatencyError: the model is not prepared for ort-cpu, or a bad clock.
    """

    def __init__(self, qmodel: Any, example_inputs: Any, runs: int = 30, warmup: int = 5, threads: int = 1,
                 clock: str = "auto", session_factory: Optional[Callable[[Any], Any]] = None,
                 float_graph: Any = None, disabled_optimizers: Optional[Sequence[str]] = None,
                 level: str = "all") -> None:
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
        self.level = level
        self.setup = self._setup(session_factory is not None)

    def _setup(self, custom: bool) -> MeasurementSetup:
        import onnxruntime

        from mixq.engine.ort import DEFAULT_DISABLED, LEVELS

        if self.level not in LEVELS:
            raise LatencyError(f"unknown optimization level {self.level!r}; valid levels are {', '.join(LEVELS)}.")
        disabled = DEFAULT_DISABLED if self.disabled_optimizers is None else self.disabled_optimizers
        shapes = {f"input{i}": list(a.shape) for i, a in enumerate(_numpy_inputs(self.example))}
        options = {"provider": "CPUExecutionProvider"}
        if custom:
            options["session_factory"] = "custom"
        return MeasurementSetup(engine=f"onnxruntime {onnxruntime.__version__}", device=cpu_model(),
                                threads=self.threads, clock=clock_name(self.clock), level=self.level,
                                disabled_optimizers=tuple(disabled), input_shapes=shapes, options=options)

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
        from mixq.engine.ort import build

        eng = build(model, self.threads, level=self.level, disabled_optimizers=self.disabled_optimizers)
        self._last_disabled = list(eng.disabled_optimizers)
        return eng.session

    def _measure(self, assignment: Assignment) -> dict:
        self._last_disabled = None
        sess = self.session_factory(self.onnx_model(assignment))
        names = [i.name for i in sess.get_inputs()]
        arrays = _numpy_inputs(self.example)
        if len(arrays) != len(names):
            raise LatencyError(f"the session takes {len(names)} input(s) {names} but the example has {len(arrays)}.")
        feeds = dict(zip(names, arrays))
        batch = int(arrays[0].shape[0]) if arrays and arrays[0].ndim else None
        st = time_runs(lambda: sess.run(None, feeds), self.runs, self.warmup, self.clock, batch=batch,
                       threads=self.threads).to_dict()
        if self._last_disabled is not None:
            st["disabled_optimizers"] = self._last_disabled  # the engine may have retried with more disabled
        return st
