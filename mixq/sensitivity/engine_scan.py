"""Exact scans on the engine: each (unit, format) entry's plan built and run on ONNX Runtime.

The same entries as ``exact.ExactScanner`` (one-at-a-time: the unit alone in the format; leave-one-out: every unit
but it), measured where the plan will be deployed: the float graph is traced once, each entry's Q/DQ model is made
from it (``mixq.export.apply_plan``) and run by an ONNX Runtime session (``mixq.evaluate.EngineRunner``). On the
MiniLM verses an entry cost about 20 s on 2,048 texts (59 entries in 20 minutes, two threads), against 38 minutes
for the search's simulated table with calibration on a loaded machine. Engine and simulation differ by what
``mixq verify`` measures, so the scan's store keeps the method in its fingerprint.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Optional, Sequence

from torch import nn

from mixq.evaluate import forward_all
from mixq.quant.graph import units
from mixq.sensitivity.exact import Finished, base_plan, entry_plan

ENGINE_BACKENDS = ("ort-cpu",)  # the backends whose engine runs here


class EngineScanner:
    """``ExactScanner``'s interface, with every output computed by ONNX Runtime.

    Args:
        qmodel: the calibrated mixq model (its quantizers give the Q/DQ scales).
        inputs: model inputs of each evaluation batch.
        trace_input: the batch the float graph is traced on.
        batch_axis: the inputs' batch axis, exported as dynamic (None: static shapes).
        threads: intra-op threads of each session (default: torch's).
    """

    method = "engine"
    fallback_reason = ""
    peak_cache_bytes = 0
    node_seconds = None

    def __init__(self, qmodel: nn.Module, inputs: Sequence[Any], trace_input: Any, batch_axis: Optional[int] = 0,
                 threads: Optional[int] = None) -> None:
        self.qmodel, self.inputs, self.trace_input, self.threads = qmodel, list(inputs), trace_input, threads
        self.batch_axis = batch_axis
        self.backend = qmodel.mixq.backend
        self.owners = units(qmodel)
        self._runner = None

    def engine(self):
        """The engine runner, made on first use: the graph is traced only when an entry is left to measure."""
        if self._runner is None:
            from mixq.evaluate import EngineRunner
            from mixq.export import export_float_graph

            graph = export_float_graph(self.qmodel, self.trace_input, batch_axis=self.batch_axis)
            self._runner = EngineRunner(self.qmodel, graph, self.threads)
        return self._runner

    def order(self, names) -> list[str]:
        return sorted(names, key=list(self.owners).index)

    def cost(self, unit: str) -> float:
        return 1.0

    def reference(self, mode: str, fmt: str) -> tuple[list, float]:
        """Outputs of the base plan (FP32, or all in ``fmt``) on the engine, and the seconds taken."""
        t0 = time.perf_counter()
        plan = base_plan(mode, fmt, self.backend, self.qmodel.mixq.calib_method)
        outs = forward_all(self.engine().model(plan), self.inputs)
        return outs, time.perf_counter() - t0

    def entries(self, mode: str, base_fmt: str, todo: dict[str, list[str]], reference: Optional[list] = None,
                partials: Any = None, on_step: Optional[Callable[[str, str, int], None]] = None
                ) -> Iterator[Finished]:
        """One ``Finished`` per (unit, format) of ``todo``; an entry is one engine evaluation (nothing partial)."""
        for unit in self.order(todo):
            for fmt in todo[unit]:
                t0 = time.perf_counter()
                step = (lambda b, u=unit, f=fmt: on_step(u, f, b)) if on_step else None
                plan = entry_plan(mode, base_fmt, unit, fmt, self.backend, self.qmodel.mixq.calib_method)
                outs = forward_all(self.engine().model(plan), self.inputs, step)
                yield Finished(unit, fmt, outs, time.perf_counter() - t0)
