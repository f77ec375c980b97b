"""Exact scans: the model's outputs with one unit switched, for every (unit, format).

Two modes share one mechanism: a *base* plan and a per-unit *override*.

- one-at-a-time: base = every unit fp32, override = the unit in the format (only it quantized).
- leave-one-out: base = every unit in the format, override = the unit in fp32 (all but it quantized).

Two methods give identical outputs (a test checks it bit for bit):

- ``fast`` (FX graph mode): a cursor holds the base values of one evaluation batch; for each
  unit only its downstream suffix is recomputed (see ``graphrun``). Batches are the outer loop
  and units (in graph order) the inner one, so only one batch's base values are in memory (for
  MiniLM, caching all eight batches at once doubled the scan's memory). Each (unit, format, batch)
  output is persisted as it finishes (``Partials``; on disk with ``store.PartialFiles``), so a
  killed scan loses at most that one piece; a (unit, format) result is complete after the last
  batch, and the caller then scores and persists it.
- ``naive``: ``set_plan`` then a full evaluation per (unit, format): the reference the fast path
  is measured against, and the fallback for module-mode models.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import fx, nn

from mixq.plan import QuantPlan
from mixq.quant.graph import followers, units
from mixq.quantize import call_model, set_plan
from mixq.sensitivity.graphrun import (Cursor, GraphRunner, NotReplayable, Schedule, SuffixPlan,
                                      release_free_memory, unit_order)

ONE_AT_A_TIME = "one-at-a-time"
LEAVE_ONE_OUT = "leave-one-out"
EXACT_MODES = (ONE_AT_A_TIME, LEAVE_ONE_OUT)


@dataclass
class Finished:
    """Outputs of one (unit, format) evaluation, one entry per evaluation batch."""

    unit: str
    fmt: str
    outputs: list
    seconds: float


def base_plan(mode: str, fmt: str, backend: str, calib_method: str = "max") -> QuantPlan:
    """The plan every unit but the scanned one runs in (for the model's calibration method)."""
    return QuantPlan.uniform("fp32" if mode == ONE_AT_A_TIME else fmt, backend, calib_method)


def override_format(mode: str, fmt: str) -> str:
    """The format the scanned unit runs in."""
    return fmt if mode == ONE_AT_A_TIME else "fp32"


class ExactScanner:
    """Runs exact scans on a calibrated model prepared for every scanned format.

    Args:
        qmodel: the output of ``mixq.quantize`` (any plan; the scanner sets its own).
        inputs: model inputs of each evaluation batch.
        method: "auto" (fast in FX mode, else naive), "fast" or "naive".

    Attributes:
        method: the method in use; ``fallback_reason`` says why "auto" chose naive.
    """

    def __init__(self, qmodel: nn.Module, inputs: Sequence[Any], method: str = "auto") -> None:
        self.qmodel = qmodel
        self.inputs = list(inputs)
        self.backend = qmodel.mixq.backend
        self.owners = units(qmodel)
        self.followers = followers(qmodel)
        self.runner: Optional[GraphRunner] = None
        self.fallback_reason = ""
        if method not in ("auto", "fast", "naive"):
            raise ValueError(f"method must be 'auto', 'fast' or 'naive', got {method!r}")
        if method != "naive":
            if qmodel.mixq.mode != "fx" or not isinstance(qmodel, fx.GraphModule):
                self.fallback_reason = "the model runs in module mode (FX tracing failed)"
            else:
                try:
                    self.runner = GraphRunner(qmodel)
                except NotReplayable as e:
                    self.fallback_reason = str(e)
        self.method = "fast" if self.runner is not None else "naive"
        self._plans: dict[str, SuffixPlan] = {}
        self.node_seconds: Optional[list[float]] = None
        self.peak_cache_bytes = 0  # largest total of cached base values seen (fast method)

    # ------------------------------------------------------------------ helpers
    def plan_of(self, unit: str) -> SuffixPlan:
        if unit not in self._plans:
            self._plans[unit] = self.runner.suffix_plan(unit)
        return self._plans[unit]

    def order(self, names) -> list[str]:
        """Units in the order a scan visits them."""
        return unit_order(self.runner, names) if self.runner is not None else sorted(
            names, key=list(self.owners).index)

    def cost(self, unit: str) -> float:
        """Relative cost of one (unit, format) evaluation, for the progress estimate."""
        if self.runner is None or self.node_seconds is None:
            return 1.0
        p = self.plan_of(unit)
        return max(sum(self.node_seconds[self.runner.index(n)] for n in p.dirty), 1e-6)

    @contextlib.contextmanager
    def switched(self, unit: str, fmt: str):
        """Run ``unit`` (and the output quantizers that follow it) in ``fmt`` inside the block."""
        mods = [self.owners[unit]] + [f for f in self.followers if f.owner == unit]
        before = [m.active_format for m in mods]
        for m in mods:
            m.set_format(fmt)
        try:
            yield
        finally:
            for m, f in zip(mods, before):
                m.active_format = f

    # ------------------------------------------------------------------ passes
    def reference(self, mode: str, fmt: str) -> tuple[list, float]:
        """Outputs of the base plan (FP32, or all in ``fmt``) on every batch, and the seconds taken.

        In fast mode the nodes are timed too, which weights the progress estimate.
        """
        set_plan(self.qmodel, base_plan(mode, fmt, self.backend, self.qmodel.mixq.calib_method))
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.runner is not None:
                self.node_seconds = [0.0] * len(self.runner.nodes)
                outs = [self.runner.run(b, self.node_seconds) for b in self.inputs]
            else:
                outs = [call_model(self.qmodel, b) for b in self.inputs]
        release_free_memory()
        return outs, time.perf_counter() - t0

    def entries(self, mode: str, base_fmt: str, todo: dict[str, list[str]], reference: Optional[list] = None,
                partials: Optional["Partials"] = None,
                on_step: Optional[Callable[[str, str, int], None]] = None) -> Iterator[Finished]:
        """Yield one ``Finished`` per (unit, format) in ``todo`` ({unit: [formats]}).

        Args:
            mode: one-at-a-time or leave-one-out.
            base_fmt: the base's format ("fp32" for one-at-a-time; the scanned format for
                leave-one-out, so ``todo`` then holds that one format).
            reference: the base outputs (from ``reference``), returned as they are for a unit the
                output does not depend on.
            partials: where the fast method keeps each (unit, format, batch) output as it finishes
                (and finds the ones an interrupted scan finished); default: in memory.
            on_step: called as (unit, format, batch) after each piece of work (progress).
        """
        set_plan(self.qmodel, base_plan(mode, base_fmt, self.backend, self.qmodel.mixq.calib_method))
        order = self.order(todo)
        if self.runner is None:
            yield from self._naive(mode, order, todo, on_step)
        else:
            yield from self._fast(mode, base_fmt, order, todo, reference, partials or Partials(), on_step)

    def _naive(self, mode: str, order: list[str], todo: dict[str, list[str]], on_step):
        for unit in order:
            for fmt in todo[unit]:
                t0 = time.perf_counter()
                outs = []
                with torch.no_grad(), self.switched(unit, override_format(mode, fmt)):
                    for b, batch in enumerate(self.inputs):
                        outs.append(call_model(self.qmodel, batch))
                        if on_step:
                            on_step(unit, fmt, b)
                yield Finished(unit, fmt, outs, time.perf_counter() - t0)

    def _fast(self, mode: str, base_fmt: str, order: list[str], todo: dict[str, list[str]],
              reference: Optional[list], partials: "Partials", on_step):
        # Batches outer, units inner: only one batch's base values are alive at a time, and every
        # base value is still computed once per batch. Each (unit, format, batch) output goes to
        # ``partials`` as it finishes, so an interrupted scan resumes from there.
        plans = [self.plan_of(u) for u in order]
        schedule = Schedule(self.runner, plans)
        seconds = {(u, f): 0.0 for u in order for f in todo[u]}
        for b, batch in enumerate(self.inputs):
            cur = None
            for step, (unit, plan) in enumerate(zip(order, plans)):
                for fmt in todo[unit]:
                    if partials.has(mode, base_fmt, unit, fmt, b):
                        continue
                    t0 = time.perf_counter()
                    with torch.no_grad():  # per step: grad mode must not leak out of this generator
                        if not plan.reaches_output:
                            out = reference[b] if reference is not None else self._full(unit, mode, fmt, batch)
                        else:
                            if cur is None:
                                cur = Cursor(schedule, batch)
                            cur.ensure(plan.frontier, step)
                            with self.switched(unit, override_format(mode, fmt)):
                                out = self.runner.run_suffix(plan, cur.env)
                    partials.put(mode, base_fmt, unit, fmt, b, out)
                    seconds[(unit, fmt)] += time.perf_counter() - t0
                    if on_step:
                        on_step(unit, fmt, b)
                if cur is not None:
                    self.peak_cache_bytes = max(self.peak_cache_bytes, cur.nbytes())
                    cur.release(step)
            del cur
            release_free_memory()
        for unit in order:
            for fmt in todo[unit]:
                outs = [partials.get(mode, base_fmt, unit, fmt, b) for b in range(len(self.inputs))]
                yield Finished(unit, fmt, outs, seconds[(unit, fmt)])

    def _full(self, unit: str, mode: str, fmt: str, batch: Any) -> Any:
        with self.switched(unit, override_format(mode, fmt)):
            return self.runner.run(batch)


class Partials:
    """Outputs of unfinished (unit, format) results, per batch; in memory (see ``store.PartialFiles``)."""

    def __init__(self) -> None:
        self._d: dict[tuple, Any] = {}

    def has(self, *key) -> bool:
        return key in self._d

    def put(self, *key_and_value) -> None:
        *key, value = key_and_value
        self._d[tuple(key)] = value

    def get(self, *key) -> Any:
        return self._d[key]

    def drop(self, mode: str, base: str, unit: str, fmt: str) -> None:
        for k in [k for k in self._d if k[:4] == (mode, base, unit, fmt)]:
            del self._d[k]
