"""LatencyModel: plan -> milliseconds, measured on an engine or predicted; measurements cached by plan.

Every latency model answers ``model(plan) -> ms`` and ``model.measure_many(plans) -> [ms]``. A plan
is a ``QuantPlan``, its JSON dict form, or a plain ``{unit name: format}`` map in which units not
named run ``fp32`` (the form a search produces). Either way it is first *resolved* to the full
assignment of every unit, and that assignment is the cache key: two plans that run every unit
in the same format are one measurement.

This module imports no torch, so predictors can use it on plain data.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

from mixq.errors import PlanError, did_you_mean
from mixq.formats import get_backend, get_format
from mixq.latency.stats import LatencyError, LatencyStats, MeasurementSetup

Assignment = dict  # unit name -> format name, for every unit
PlanLike = Union[Mapping[str, str], Any]  # QuantPlan (duck-typed: has .resolve) or a mapping
_PLAN_KEYS = {"backend", "default", "layers", "calib_method"}


@runtime_checkable
class LatencyModel(Protocol):
    """Anything that maps a plan to milliseconds (measured or predicted)."""

    def __call__(self, plan: PlanLike) -> float: ...

    def measure_many(self, plans: Iterable[PlanLike]) -> list[float]: ...


def assignment_of(plan: PlanLike, kinds: Mapping[str, str], backend: Optional[str] = None) -> Assignment:
    """Resolve ``plan`` to the format of every unit.

    Args:
        plan: a QuantPlan, a plan dict (``{"default": ..., "layers": ...}``), or ``{unit: format}``
            where units not named run fp32.
        kinds: unit name -> kind, for every unit of the model.
        backend: when given, the plan must be for this backend and every format realisable on it.

    Returns:
        ``{unit: format}`` for every unit in ``kinds`` (in that order).

    Raises:
        PlanError: unknown unit names, a plan for another backend, or not a plan at all.
        UnknownFormatError / UnsupportedFormatError: a format that does not exist / cannot run there.
    """
    if isinstance(plan, Mapping) and plan and set(plan) <= _PLAN_KEYS and not set(plan) & set(kinds):
        from mixq.plan import QuantPlan  # the dict form of a plan; QuantPlan pulls in torch, so lazily

        plan = QuantPlan.from_dict(plan)
    if hasattr(plan, "resolve") and hasattr(plan, "backend"):
        if backend is not None and get_backend(plan.backend).name != get_backend(backend).name:
            raise PlanError(f"the plan is for backend {plan.backend!r} but this latency model measures "
                            f"{get_backend(backend).name!r}; use a plan for {get_backend(backend).name!r}.")
        return dict(plan.resolve(kinds))
    if not isinstance(plan, Mapping):
        raise PlanError(f"a plan must be a QuantPlan or a {{layer: format}} dict, but got {type(plan).__name__}.")
    unknown = [n for n in plan if n not in kinds]
    if unknown:
        hints = "; ".join(f"{n!r}{did_you_mean(str(n), kinds)}" for n in unknown[:5])
        raise PlanError(f"the plan names {len(unknown)} unit(s) the model does not have: {hints}")
    be = get_backend(backend) if backend is not None else None
    out = {}
    for name, kind in kinds.items():
        fmt = get_format(plan.get(name, "fp32")).name
        if be is not None:
            be.check(fmt, kind, name)
        out[name] = fmt
    return out


def plan_key(assignment: Mapping[str, str]) -> tuple:
    """A hashable key of a resolved assignment (independent of dict order)."""
    return tuple(sorted(assignment.items()))


class MeasuredLatency:
    """Base of latency models that measure on an engine: resolve, cache, record, notify.

    Subclasses implement ``_measure(assignment)`` returning ``LatencyStats`` (or a mapping with at
    least ``median_ms``) and set ``setup``.

    Attributes:
        kinds: unit name -> kind of the model measured.
        backend: backend name the plans must be for.
        setup: the ``MeasurementSetup`` every measurement is made with (saved with them, and checked
            when measurements are loaded); None when the subclass does not know it.
        stats: plan key -> the full statistics of its measurement (``LatencyStats.to_dict()`` fields
            plus what the engine adds, e.g. ``rounds_ms``).
        listeners: callables ``f(assignment, ms)`` told of every new measurement (e.g. a
            predictor's ``observe``), so a fitted model is refreshed as plans are measured.
    """

    def __init__(self, kinds: Mapping[str, str], backend: str) -> None:
        self.kinds = dict(kinds)
        self.backend = get_backend(backend).name
        self.setup: Optional[MeasurementSetup] = None
        self.stats: dict[tuple, dict] = {}
        self._assignments: dict[tuple, Assignment] = {}
        self.listeners: list[Callable[[Assignment, float], None]] = []

    def assignment(self, plan: PlanLike) -> Assignment:
        """The resolved ``{unit: format}`` of ``plan`` for this model and backend."""
        return assignment_of(plan, self.kinds, self.backend)

    def __call__(self, plan: PlanLike) -> float:
        """Median latency of ``plan`` in milliseconds (measured once, then cached)."""
        a = self.assignment(plan)
        key = plan_key(a)
        if key not in self.stats:
            self._store(a, self._measure(a))
        return float(self.stats[key]["median_ms"])

    def _store(self, a: Assignment, st: Mapping) -> None:
        st = st.to_dict() if isinstance(st, LatencyStats) else dict(st)
        if "median_ms" not in st:
            raise LatencyError(f"{type(self).__name__}._measure returned no 'median_ms' (got {sorted(st)}).")
        key = plan_key(a)
        self.stats[key] = st
        self._assignments[key] = dict(a)
        for f in self.listeners:
            f(dict(a), float(st["median_ms"]))

    def measure_many(self, plans: Iterable[PlanLike], rounds: int | Sequence[int] = 1,
                     progress: Optional[Callable[[int, int], None]] = None, shuffle: bool = False,
                     seed: int = 0) -> list[float]:
        """Latency of each plan in order; plans already measured are not measured again.

        Args:
            plans: the plans.
            rounds: how many times to measure each new plan (one number, or one per plan); a plan
                measured more than once keeps the median of its rounds (``rounds_ms`` in its stats).
                Rounds are interleaved (plan 1, 2, ..., then again), which spreads the slow drifts
                of a shared machine over all plans instead of biasing those measured in a busy spell.
            progress: called as ``progress(done, total)`` after each measurement.
            shuffle: measure in a random order (seeded) instead: drift then affects every subset of
                the plans alike, e.g. the plans a predictor is fitted on and those it is tested on.
            seed: the order's seed.
        """
        plans = [self.assignment(p) for p in plans]
        counts = [rounds] * len(plans) if isinstance(rounds, int) else list(rounds)
        if len(counts) != len(plans) or min(counts, default=1) < 1:
            raise LatencyError(f"rounds must be >= 1, one number or one per plan ({len(plans)}), but got {rounds!r}.")
        todo: dict[tuple, tuple[Assignment, int]] = {}
        for a, k in zip(plans, counts):
            key = plan_key(a)
            if key not in self.stats:
                todo[key] = (a, max(k, todo.get(key, (a, 0))[1]))
        order = [key for r in range(max((k for _, k in todo.values()), default=0))
                 for key, (_, k) in todo.items() if r < k]
        if shuffle:
            import random

            random.Random(seed).shuffle(order)
        per: dict[tuple, list[dict]] = {key: [] for key in todo}
        for i, key in enumerate(order):
            per[key].append(self._measure(todo[key][0]))
            if progress:
                progress(i + 1, len(order))
        for key, (a, k) in todo.items():
            runs = per[key]
            st = runs[0].to_dict() if isinstance(runs[0], LatencyStats) else dict(runs[0])
            if k > 1:
                st["median_ms"] = float(statistics.median(x["median_ms"] for x in runs))
                st["rounds_ms"] = [float(x["median_ms"]) for x in runs]
            self._store(a, st)
        return [self(a) for a in plans]

    def details(self, plan: PlanLike) -> dict:
        """Full statistics of a plan's measurement (measures it first if needed)."""
        a = self.assignment(plan)
        self(a)
        return dict(self.stats[plan_key(a)])

    def records(self) -> list[tuple[Assignment, float]]:
        """Every measurement so far as (assignment, median ms), in measurement order."""
        return [(dict(self._assignments[k]), float(s["median_ms"])) for k, s in self.stats.items()]

    def save(self, path: str | os.PathLike) -> Path:
        """Write every measurement and the setup they were made with as JSON (see ``load``)."""
        from mixq.artifacts import write_atomic

        rows = [{"assignment": self._assignments[k], **s} for k, s in self.stats.items()]
        setup = self.setup.to_dict() if self.setup is not None else None
        return write_atomic(path, json.dumps({"backend": self.backend, "setup": setup, "measurements": rows},
                                             indent=1))

    def load(self, path: str | os.PathLike) -> int:
        """Add measurements saved by ``save`` to the cache; return how many were added.

        Raises:
            LatencyError: the file is not a saved measurement, or is for another backend, another
                model's units, or another measurement setup (ONNX Runtime version, threads, clock,
                disabled optimizers, level, input shapes, CPU ...): those numbers do not compare.
        """
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LatencyError(f"cannot read saved latency measurements from {path}: {e}") from None
        if not isinstance(data, dict) or "measurements" not in data:
            raise LatencyError(f"{path} is not a file written by MeasuredLatency.save.")
        if data.get("backend") != self.backend:
            raise LatencyError(f"{path} holds {data.get('backend')!r} measurements, not {self.backend!r}.")
        theirs = data.get("setup")
        if (theirs is None) != (self.setup is None):
            raise LatencyError(f"{path} was measured {'without a recorded' if theirs is None else 'with a'} setup "
                               f"but this model's setup is {'unknown' if self.setup is None else 'known'}; "
                               "measurements of unknown setups do not compare: measure afresh.")
        if theirs is not None:
            diff = self.setup.differences(MeasurementSetup.from_dict(theirs))
            if diff:
                what = "; ".join(f"{k}: here {a!r}, in the file {b!r}" for k, (a, b) in diff.items())
                raise LatencyError(f"{path} was measured with another setup ({what}); its numbers do not compare "
                                   "with measurements made here. Measure afresh, or load it with the same setup.")
        rows = []
        for row in data["measurements"]:
            a = dict(row["assignment"])
            if set(a) != set(self.kinds):
                raise LatencyError(f"{path} was measured on a model with other units; measure this model afresh.")
            rows.append((a, {k: v for k, v in row.items() if k != "assignment"}))
        n = 0
        for a, st in rows:
            key = plan_key(a)
            if key not in self.stats:
                self.stats[key] = st
                self._assignments[key] = a
                n += 1
        return n

    def _measure(self, assignment: Assignment) -> Mapping:  # pragma: no cover - abstract
        raise NotImplementedError


class RatioLatency:
    """A plan's latency as its ratio to FP32 timed right next to it, in milliseconds of a fixed FP32 reference.

    On a shared machine absolute milliseconds drift over minutes (2x under load here), so a plan measured late
    in a search and compared with an FP32 measured at its start is judged on stale numbers. Here each plan is
    timed in ``rounds`` rounds back to back with FP32, the order alternating (FP32 then the plan, then the plan
    then FP32, ...), and its figure is the median of the per-round ratios times ``reference_ms``. A budget of
    ``0.6x`` the reference is then met exactly when that ratio is <= 0.6, however fast the machine was meanwhile.

    Args:
        latency: the ``MeasuredLatency`` whose ``_measure`` times one plan (each round measures afresh: its
            cache is not used, and the rounds are not added to it).
        fp32_plan: the all-FP32 plan.
        rounds: FP32 / plan pairs per plan.
        reference_ms: the FP32 milliseconds ratios are expressed in (None: ``latency(fp32_plan)``, on first use).

    Attributes:
        stats: plan key -> {"ratio", "ratios", "median_ms", "rounds_ms", "fp32_rounds_ms"}.

    Raises:
        LatencyError: ``rounds`` below 1.
    """

    def __init__(self, latency: MeasuredLatency, fp32_plan: PlanLike, rounds: int = 3,
                 reference_ms: Optional[float] = None) -> None:
        if int(rounds) < 1:
            raise LatencyError(f"rounds must be >= 1, but got {rounds!r}.")
        self.latency, self.rounds = latency, int(rounds)
        self.fp32 = latency.assignment(fp32_plan)
        self._reference = None if reference_ms is None else float(reference_ms)
        self.stats: dict[tuple, dict] = {}

    @property
    def reference_ms(self) -> float:
        """The FP32 milliseconds a ratio of 1 stands for."""
        if self._reference is None:
            self._reference = float(self.latency(self.fp32))
        return self._reference

    def ratio(self, plan: PlanLike) -> float:
        """Median over rounds of the plan's latency / FP32's right next to it (1 for the FP32 plan itself)."""
        a = self.latency.assignment(plan)
        key = plan_key(a)
        if key == plan_key(self.fp32):
            return 1.0
        if key not in self.stats:
            fp32_ms, plan_ms = [], []
            for r in range(self.rounds):
                first, second = (self.fp32, a) if r % 2 == 0 else (a, self.fp32)
                x, y = (_median_ms(self.latency._measure(b)) for b in (first, second))
                fp32_ms.append(x if r % 2 == 0 else y)
                plan_ms.append(y if r % 2 == 0 else x)
            ratios = [p / f for p, f in zip(plan_ms, fp32_ms)]
            self.stats[key] = {"ratio": float(statistics.median(ratios)), "ratios": ratios,
                               "median_ms": float(statistics.median(plan_ms)), "rounds_ms": plan_ms,
                               "fp32_rounds_ms": fp32_ms}
        return self.stats[key]["ratio"]

    def __call__(self, plan: PlanLike) -> float:
        """The plan's ratio to FP32 times ``reference_ms``."""
        return self.ratio(plan) * self.reference_ms

    def measure_many(self, plans: Iterable[PlanLike]) -> list[float]:
        return [self(p) for p in plans]


def _median_ms(st: Any) -> float:
    return float((st.to_dict() if isinstance(st, LatencyStats) else st)["median_ms"])
