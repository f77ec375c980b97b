"""Latency predictors: plan -> milliseconds from a few measured plans, on plain lists (no torch).

Two predictors:

- ``AdditiveLatency``: a base plan's latency plus one measured delta per layer changed from it.
  The classic baseline (base = all-FP32, deltas = one layer INT8 at a time), or its mirror,
  leave-one-out around all-INT8. It ignores that a float/int8 *boundary* costs a conversion
  (Q/DQ, layout transposes, reformats): a lone INT8 layer pays two conversions that vanish when its
  neighbours are INT8 too, so summing single-layer deltas mispredicts partial plans badly (see
  reports/latency_predictor.md).
- ``BoundaryLatency``: a linear model over per-unit format indicators *and* per-edge boundary
  indicators (producer and consumer in different formats), plus two shared terms proportional to
  the size of the tensors that cross a boundary, optionally on the formats the engine really runs
  (absorption: a float unit enclosed by INT8 units runs INT8 on an engine that fuses around Q/DQ).
  Fitted by regularised non-negative least squares on relative error (boundary costs are >= 0),
  penalties and absorption chosen by cross-validation, refitted whenever ``observe`` adds a
  measured plan. Random partial plans are what pin the boundaries down; single-layer plans help
  only a little.

The graph these need is a ``UnitGraph`` (units, kinds, producer -> consumer edges, output sizes),
built from a prepared model by ``mixq.latency.graph_edges.unit_graph``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from mixq.latency.base import Assignment, LatencyError, PlanLike, assignment_of


@dataclass(frozen=True)
class UnitGraph:
    """The units of a model and the edges between them (plain data, JSON-friendly).

    Attributes:
        units: unit names in execution order.
        kinds: unit name -> kind ("conv", "linear", "add" ...).
        edges: (producer, consumer) pairs: the producer's output reaches the consumer through ops
            that do not compute (reshape, transpose, ReLU ...).
        float_inputs: units that also read a tensor no unit produced (graph input, LayerNorm ...).
        float_outputs: units whose output also reaches a float op or the graph output.
        sizes: unit -> elements of its output per forward (0 / missing when unknown).
        input_groups: (source, units) for every tensor read by two or more units; ``source`` is the
            producing unit or ``"float:<node>"``. Their input conversion can be shared.
    """

    units: tuple
    kinds: dict
    edges: tuple = ()
    float_inputs: frozenset = frozenset()
    float_outputs: frozenset = frozenset()
    sizes: dict = field(default_factory=dict)
    input_groups: tuple = ()

    def to_dict(self) -> dict:
        return {"units": list(self.units), "kinds": dict(self.kinds), "edges": [list(e) for e in self.edges],
                "float_inputs": sorted(self.float_inputs), "float_outputs": sorted(self.float_outputs),
                "sizes": dict(self.sizes), "input_groups": [[src, list(us)] for src, us in self.input_groups]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "UnitGraph":
        return cls(units=tuple(d["units"]), kinds=dict(d["kinds"]), edges=tuple(tuple(e) for e in d.get("edges", ())),
                   float_inputs=frozenset(d.get("float_inputs", ())), float_outputs=frozenset(d.get("float_outputs", ())),
                   sizes=dict(d.get("sizes", {})),
                   input_groups=tuple((src, tuple(us)) for src, us in d.get("input_groups", ())))


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Mean absolute percentage error of predictions against measurements, in percent."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    if p.shape != m.shape or m.size == 0:
        raise LatencyError(f"mape needs two equally long, non-empty lists, but got {p.size} and {m.size} values.")
    return float(np.mean(np.abs(p - m) / m) * 100.0)


class Predictor:
    """Shared plan handling: resolve any plan form against the graph's units, then ``predict``."""

    graph: UnitGraph
    backend: Optional[str] = None

    def assignment(self, plan: PlanLike) -> Assignment:
        return assignment_of(plan, self.graph.kinds, self.backend)

    def __call__(self, plan: PlanLike) -> float:
        return self.predict(self.assignment(plan))

    def measure_many(self, plans: Iterable[PlanLike]) -> list[float]:
        return [self(p) for p in plans]

    def predict(self, assignment: Mapping[str, str]) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class AdditiveLatency(Predictor):
    """Base plan's latency + one measured delta per unit whose format differs from the base plan.

    Args:
        graph: the model's units (edges are not used).
        base: the base assignment (e.g. every unit fp32).
        base_ms: its measured latency.
        deltas: (unit, format) -> latency of the base plan with only that unit in that format,
            minus ``base_ms``.
        backend: plans must be for this backend (None: any).
    """

    def __init__(self, graph: UnitGraph, base: Mapping[str, str], base_ms: float,
                 deltas: Mapping[tuple, float], backend: Optional[str] = None) -> None:
        self.graph, self.backend = graph, backend
        self.base, self.base_ms, self.deltas = dict(base), float(base_ms), dict(deltas)

    @classmethod
    def from_records(cls, graph: UnitGraph, base: Mapping[str, str], records: Iterable[tuple[Mapping, float]],
                     backend: Optional[str] = None) -> "AdditiveLatency":
        """Build from measurements: the base plan and plans that differ from it in one unit.

        Raises:
            LatencyError: the base plan is not among the records.
        """
        base = dict(base)
        base_ms, singles = None, {}
        for a, ms in records:
            diff = [u for u in graph.units if a.get(u, "fp32") != base.get(u, "fp32")]
            if not diff:
                base_ms = ms
            elif len(diff) == 1:
                singles[(diff[0], a[diff[0]])] = ms
        if base_ms is None:
            raise LatencyError("the records lack the base plan itself; measure it first.")
        return cls(graph, base, base_ms, {k: v - base_ms for k, v in singles.items()}, backend)

    def predict(self, assignment: Mapping[str, str]) -> float:
        """Predicted milliseconds of a resolved assignment.

        Raises:
            LatencyError: a unit runs a format whose delta was never measured.
        """
        total = self.base_ms
        for u in self.graph.units:
            f = assignment.get(u, "fp32")
            if f != self.base.get(u, "fp32"):
                if (u, f) not in self.deltas:
                    raise LatencyError(f"no measured delta for unit {u!r} in format {f!r}: measure the base plan "
                                       f"with only that unit changed.")
                total += self.deltas[(u, f)]
        return total


class BoundaryLatency(Predictor):
    """Boundary-aware linear latency model, fitted on measured plans and refreshed as they arrive.

    Features of an assignment ``a`` (reference format ``ref``, normally fp32):

    - ``unit[u, f] = 1[a_u == f]`` for every unit and non-reference format: the unit's own cost;
    - ``edge[p -> c] = 1[a_p != a_c]`` for every edge: a conversion between two units;
    - ``size_in = sum of size_p over edges where a_c != ref and a_p != a_c`` and
      ``size_out = sum of size_p over producers with a_p != ref, some consumer in another format
      and no float consumer anyway``: conversion cost per element, shared by all edges.

    ``ms = intercept + w . features``; fitted to minimise relative error with a ridge penalty
    (``alpha`` on unit terms, ``alpha * edge_ratio`` on edge terms, none on the two shared terms),
    boundary weights bounded >= 0, and ``alpha`` / ``edge_ratio`` picked by K-fold cross-validation.

    Absorption: an engine that fuses around existing Q/DQ pairs runs a unit the plan keeps in
    ``ref`` in the low format anyway when *every* tensor it reads comes from, and every tensor it
    writes goes to, units in that format (ONNX Runtime fuses DQ -> op -> Q, quantizing a float
    weight itself). With ``absorb`` the features describe what the engine runs, not what the plan
    says; cross-validation decides whether the measurements show it (``chosen["absorb"]``).

    Args:
        graph: units and edges (``mixq.latency.graph_edges.unit_graph``).
        ref: the reference format every indicator is relative to.
        backend: plans must be for this backend (None: any).
        alphas / edge_ratios: the grids cross-validation picks from.
        folds: K of the K-fold cross-validation.
        prior: (unit, format) -> ms the unit terms are shrunk toward instead of 0 (e.g. the deltas of
            a ``TrtexecLatency`` table, or of single-layer measurements).
        absorb: the absorption settings cross-validation picks from ((False, True): let the data say).
    """

    def __init__(self, graph: UnitGraph, ref: str = "fp32", backend: Optional[str] = None,
                 alphas: Sequence[float] = (1e-3, 1e-2, 0.1, 1.0, 10.0), edge_ratios: Sequence[float] = (1.0, 10.0, 100.0),
                 folds: int = 5, prior: Optional[Mapping[tuple, float]] = None,
                 absorb: Sequence[bool] = (False, True)) -> None:
        self.graph, self.ref, self.backend = graph, ref, backend
        self.prior = dict(prior or {})
        self.absorb_grid = tuple(bool(x) for x in absorb) or (False,)
        self._absorb = self.absorb_grid[0]
        self.alphas, self.edge_ratios, self.folds = tuple(alphas), tuple(edge_ratios), int(folds)
        self._records: list[tuple[Assignment, float]] = []
        self._formats: list[str] = []
        self._w: Optional[np.ndarray] = None
        self._names: list[tuple] = []
        self.chosen: dict = {}
        consumers: dict[str, list[str]] = {u: [] for u in graph.units}
        producers: dict[str, list[str]] = {u: [] for u in graph.units}
        for p, c in graph.edges:
            consumers.setdefault(p, []).append(c)
            producers.setdefault(c, []).append(p)
        self._consumers, self._producers = consumers, producers
        # Units that read and write only other units' tensors: the ones an engine can absorb.
        self._enclosed = [u for u in graph.units if producers[u] and consumers[u] and u not in graph.float_inputs
                          and u not in graph.float_outputs]
        sizes = [graph.sizes.get(u, 0) for u in graph.units]
        self._size_scale = float(np.mean([s for s in sizes if s > 0])) if any(s > 0 for s in sizes) else 0.0

    # ---------------------------------------------------------------- data
    def observe(self, assignment: Mapping[str, str], ms: float) -> None:
        """Add one measured plan; the model is refitted on the next prediction."""
        if not (isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0):
            raise LatencyError(f"a measured latency must be a positive finite number of ms, but got {ms!r}.")
        a = {u: assignment.get(u, "fp32") for u in self.graph.units}
        self._records.append((a, float(ms)))
        for f in a.values():
            if f != self.ref and f not in self._formats:
                self._formats.append(f)
        self._w = None

    def fit(self, records: Iterable[tuple[Mapping[str, str], float]]) -> "BoundaryLatency":
        """Add measured (assignment, ms) pairs and fit now; return self."""
        for a, ms in records:
            self.observe(a, ms)
        self._fit()
        return self

    @property
    def num_records(self) -> int:
        return len(self._records)

    # ---------------------------------------------------------------- features
    def _feature_names(self) -> list[tuple]:
        g = self.graph
        names: list[tuple] = [("unit", u, f) for u in g.units for f in self._formats]
        names += [("edge", p, c) for p, c in g.edges]
        if self._size_scale > 0:
            names += [("size_in",), ("size_out",)]
        return names

    def effective(self, assignment: Mapping[str, str]) -> Assignment:
        """The formats the engine runs: the plan's, with enclosed ``ref`` units absorbed (see class doc)."""
        a = {u: assignment.get(u, "fp32") for u in self.graph.units}
        out = dict(a)
        for u in self._enclosed:
            if a[u] == self.ref:
                around = {a[v] for v in self._producers[u]} | {a[v] for v in self._consumers[u]}
                if len(around) == 1 and self.ref not in around:
                    out[u] = around.pop()
        return out

    def features(self, assignment: Mapping[str, str]) -> np.ndarray:
        """The feature vector of an assignment (in the order of ``coefficients``)."""
        g, ref = self.graph, self.ref
        a = self.effective(assignment) if self._absorb else {u: assignment.get(u, "fp32") for u in g.units}
        x = [1.0 if a[u] == f else 0.0 for u in g.units for f in self._formats]
        x += [1.0 if a[p] != a[c] else 0.0 for p, c in g.edges]
        if self._size_scale > 0:
            s_in = sum(g.sizes.get(p, 0) for p, c in g.edges if a[c] != ref and a[p] != a[c])
            s_out = sum(g.sizes.get(p, 0) for p in g.units
                        if a[p] != ref and p not in g.float_outputs and any(a[c] != a[p] for c in self._consumers[p]))
            x += [s_in / self._size_scale, s_out / self._size_scale]
        return np.asarray(x, float)

    # ---------------------------------------------------------------- fitting
    def _design(self, records: list) -> tuple[np.ndarray, np.ndarray]:
        X = np.stack([self.features(a) for a, _ in records]) if records else np.zeros((0, len(self._names)))
        y = np.asarray([ms for _, ms in records], float)
        return X, y

    def _solve(self, X: np.ndarray, y: np.ndarray, alpha: float, edge_ratio: float) -> np.ndarray:
        """Ridge on relative error with boundary weights >= 0; returns [intercept, w...].

        Solved as one non-negative least-squares problem (``scipy.optimize.nnls``): every free
        weight is split into a positive and a negative part, and the ridge rows penalise both,
        which leaves the optimum of the original problem unchanged (one part is always zero).
        """
        from scipy.optimize import nnls

        n, k = X.shape
        A = np.hstack([np.ones((n, 1)), X]) / y[:, None]  # rows scaled by 1/y: relative residuals
        kinds = ["intercept"] + [nm[0] for nm in self._names]
        free = np.array([kd in ("intercept", "unit") for kd in kinds])
        # Penalties are relative to the typical latency, so alpha does not depend on the model's speed.
        scale = 1.0 / float(np.median(y))
        pen = np.array([0.0 if kd == "intercept" else alpha if kd == "unit" else alpha * edge_ratio if kd == "edge"
                        else 0.0 for kd in kinds]) * scale ** 2
        prior = np.zeros(k + 1)
        for j, nm in enumerate(self._names, start=1):
            if nm[0] == "unit":
                prior[j] = self.prior.get((nm[1], nm[2]), 0.0)
        # w = prior + d (prior is zero on bounded terms); unknowns [d+ (k+1), d- (free ones)].
        cols = np.hstack([A, -A[:, free]])
        m = cols.shape[1]
        pen_all = np.concatenate([pen, pen[free]])
        rows = np.nonzero(pen_all)[0]
        P = np.zeros((len(rows), m))
        P[np.arange(len(rows)), rows] = np.sqrt(pen_all[rows])
        z, _ = nnls(np.vstack([cols, P]), np.concatenate([np.ones(n) - A @ prior, np.zeros(len(rows))]),
                    maxiter=50 * m)
        w = prior + z[: k + 1]
        w[free] -= z[k + 1:]
        return w

    def _fit(self) -> None:
        if not self._records:
            raise LatencyError("BoundaryLatency has no measured plan yet: observe or fit some measurements first.")
        self._names = self._feature_names()
        designs = {}
        for ab in self.absorb_grid:
            self._absorb = ab
            designs[ab] = self._design(self._records)
        grid = [(ab, a, r) for ab in self.absorb_grid for a in self.alphas for r in self.edge_ratios]
        n = len(self._records)
        if n >= 2 * self.folds and len(grid) > 1:
            order = np.random.default_rng(0).permutation(n)
            folds = np.array_split(order, self.folds)
            scores = []
            for ab, a, r in grid:
                X, y = designs[ab]
                err = []
                for f in folds:
                    tr = np.setdiff1d(order, f)
                    w = self._solve(X[tr], y[tr], a, r)
                    err += list(np.abs(w[0] + X[f] @ w[1:] - y[f]) / y[f])
                scores.append(float(np.mean(err)))
            ab, a, r = grid[int(np.argmin(scores))]
            cv = 100.0 * min(scores)
        else:
            ab, a, r = self.absorb_grid[0], self.alphas[len(self.alphas) // 2], self.edge_ratios[len(self.edge_ratios) // 2]
            cv = None
        self.chosen = {"absorb": ab, "alpha": a, "edge_ratio": r, "cv_mape": cv}
        self._absorb = ab
        X, y = designs[ab]
        self._w = self._solve(X, y, a, r)

    # ---------------------------------------------------------------- prediction
    def predict(self, assignment: Mapping[str, str]) -> float:
        """Predicted milliseconds of a resolved assignment (refits first if plans were added).

        Raises:
            LatencyError: nothing measured yet, or a format never seen in the measurements.
        """
        if self._w is None:
            self._fit()
        unseen = {f for f in assignment.values() if f != self.ref and f not in self._formats}
        if unseen:
            raise LatencyError(f"no measured plan uses format(s) {sorted(unseen)}; measure some plans with them first.")
        return float(self._w[0] + self.features(assignment) @ self._w[1:])

    def coefficients(self) -> dict:
        """The fitted terms in ms: {"intercept": ms, "unit": {u: {f: ms}}, "edge": {"p -> c": ms}, ...}."""
        if self._w is None:
            self._fit()
        out: dict = {"intercept": float(self._w[0]), "unit": {}, "edge": {}}
        for nm, w in zip(self._names, self._w[1:]):
            if nm[0] == "unit":
                out["unit"].setdefault(nm[1], {})[nm[2]] = float(w)
            elif nm[0] == "edge":
                out["edge"][f"{nm[1]} -> {nm[2]}"] = float(w)
            else:
                out[nm[0]] = float(w)
        return out
