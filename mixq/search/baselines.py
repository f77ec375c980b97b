"""Baseline plans a search must beat, in the same run and the same report.

Each returns an assignment ``{unit: format}`` from plain data: the search space, per-unit numbers
(sensitivity drops, single-unit latency deltas, gradient scores, parameter counts) and, for the
greedy method, a latency callable. None imports torch.

- ``uniform``: every unit that can run ``fmt`` in it (all-INT8).
- ``weighted_only``: ``fmt`` on weighted layers only, functional ops float (what module-level tools produce).
- ``scan_guided``: ``fmt`` everywhere except the units whose one-at-a-time drop exceeds a threshold (what a
  user does by hand after reading ``mixq scan``'s table).
- ``greedy_fallback``: the NVIDIA white-paper method: from all-``fmt``, revert the most sensitive units to
  float while the latency budget holds.
- ``ilp``: HAWQ-V3 style: minimise summed single-unit drops under summed single-unit latency deltas,
  solved exactly with ``scipy.optimize.milp``.
- ``weight_bits``: ModelOpt ``auto_quantize`` style: minimise summed gradient scores under an effective
  weight-bits budget (a memory proxy, blind to latency), also with ``milp``.
- ``random_plans``: uniform random plans of the space.
"""
from __future__ import annotations

import random as _random
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from mixq.errors import ConfigError
from mixq.formats import WEIGHTED_KINDS, get_format
from mixq.search.space import Assignment, SearchSpace


def fp32(space: SearchSpace) -> Assignment:
    """Every unit in fp32."""
    return {u: "fp32" for u in space.kinds}


def uniform(space: SearchSpace, fmt: str) -> Assignment:
    """``fmt`` on every unit (and tie) that can take it; the rest fp32."""
    f = get_format(fmt).name
    return {u: (f if f in space.choices[u] else "fp32") for u in space.kinds}


def weighted_only(space: SearchSpace, fmt: str) -> Assignment:
    """``fmt`` on weighted layers (conv, linear, ...) only; functional ops (add, matmul, cat, pools) float.

    Ties that join a weighted unit with functional ones follow the weighted unit.
    """
    base = uniform(space, fmt)
    weighted = {u for u, k in space.kinds.items() if k in WEIGHTED_KINDS}
    for g in space.ties:
        if weighted & set(g):
            weighted |= set(g)
    return {u: (f if u in weighted else "fp32") for u, f in base.items()}


def scan_guided(space: SearchSpace, fmt: str, drops: Mapping[str, Mapping[str, float]],
                threshold: float) -> Assignment:
    """All-``fmt`` with every unit (or tie) whose one-at-a-time drop in ``fmt`` exceeds ``threshold`` points in fp32.

    Raises:
        ConfigError: a negative threshold.
    """
    if threshold < 0:
        raise ConfigError(f"threshold must be >= 0 metric points, but got {threshold}.")
    out = uniform(space, fmt)
    f = get_format(fmt).name
    for _, units, _ in space.parameters():
        if sum(float(drops.get(u, {}).get(f, 0.0)) for u in units) > threshold:
            out.update({u: "fp32" for u in units})
    return out


def _param_values(space: SearchSpace, per_unit: Mapping[str, Mapping[str, float]], fmt: str) -> dict[str, float]:
    """Per searched parameter: the summed value of its units in ``fmt``."""
    return {name: sum(float(per_unit.get(u, {}).get(fmt, 0.0)) for u in units)
            for name, units, choices in space.parameters() if fmt in choices}


def greedy_fallback(space: SearchSpace, fmt: str, drops: Mapping[str, Mapping[str, float]],
                    latency: Callable[[Assignment], float], limit_ms: float) -> tuple[Assignment, list[str]]:
    """From all-``fmt``, revert the most sensitive units (one-at-a-time drops) to fp32 while the budget holds.

    A revert that would break the budget is skipped and the next most sensitive unit is tried; units whose
    drop is not positive are never reverted (they would cost latency for nothing).

    Returns:
        (the plan, the units reverted in order).
    """
    plan = uniform(space, fmt)
    order = sorted(((d, name) for name, d in _param_values(space, drops, fmt).items() if d > 0), reverse=True)
    units_of = {name: units for name, units, _ in space.parameters()}
    reverted = []
    for _, name in order:
        trial = dict(plan)
        for u in units_of[name]:
            trial[u] = "fp32"
        if latency(trial) <= limit_ms:
            plan = trial
            reverted.append(name)
    return plan, reverted


def _milp_choice(space: SearchSpace, cost: Mapping[str, Mapping[str, float]],
                 weight: Mapping[str, Mapping[str, float]], capacity: float) -> Optional[Assignment]:
    """Minimise summed ``cost`` over one choice per parameter subject to summed ``weight`` <= ``capacity``.

    Returns None when no plan fits.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    params = space.parameters()
    var = [(name, f) for name, _, choices in params for f in choices]
    c = np.array([cost[name].get(f, 0.0) for name, f in var], dtype=float)
    w = np.array([weight[name].get(f, 0.0) for name, f in var], dtype=float)
    one = np.zeros((len(params), len(var)))
    row = {name: i for i, (name, _, _) in enumerate(params)}
    for j, (name, _) in enumerate(var):
        one[row[name], j] = 1.0
    cons = [LinearConstraint(one, 1, 1), LinearConstraint(w[None, :], -np.inf, capacity)]
    res = milp(c, constraints=cons, integrality=np.ones(len(var)), bounds=Bounds(0, 1))
    if res.x is None:
        return None
    plan = fp32(space)
    units_of = {name: units for name, units, _ in params}
    for j, (name, f) in enumerate(var):
        if res.x[j] > 0.5:
            for u in units_of[name]:
                plan[u] = f
    return plan


def ilp(space: SearchSpace, drops: Mapping[str, Mapping[str, float]], deltas_ms: Mapping[str, Mapping[str, float]],
        fp32_ms: float, limit_ms: float) -> Optional[Assignment]:
    """HAWQ-V3 style integer program on additive numbers.

    Args:
        drops: unit -> format -> one-at-a-time metric drop (points; fp32 is 0).
        deltas_ms: unit -> format -> latency of the single-unit plan minus FP32 (negative = faster).
        fp32_ms / limit_ms: FP32 latency and the budget; the program keeps fp32_ms + sum(deltas) <= limit_ms.

    Returns:
        The plan, or None when even the summed deltas cannot meet the budget.
    """
    cost, weight = {}, {}
    for name, units, choices in space.parameters():
        cost[name] = {f: sum(float(drops.get(u, {}).get(f, 0.0)) for u in units) for f in choices if f != "fp32"}
        weight[name] = {f: sum(float(deltas_ms.get(u, {}).get(f, 0.0)) for u in units) for f in choices if f != "fp32"}
    return _milp_choice(space, cost, weight, limit_ms - fp32_ms)


def weight_bits(space: SearchSpace, scores: Mapping[str, Mapping[str, float]], params: Mapping[str, int],
                effective_bits: float) -> Optional[Assignment]:
    """ModelOpt auto_quantize style: minimise summed gradient scores with mean weight bits <= ``effective_bits``.

    Units without weights cost no bits (as in ModelOpt, whose budget counts weight memory only).

    Raises:
        ConfigError: ``effective_bits`` outside (0, 32].
    """
    if not 0 < effective_bits <= 32:
        raise ConfigError(f"effective_bits must be in (0, 32], but got {effective_bits}.")
    total = sum(int(params.get(u, 0)) for u in space.kinds)
    if total == 0:
        raise ConfigError("weight_bits needs parameter counts of the units; every count was zero.")
    cost, weight = {}, {}
    for name, units, choices in space.parameters():
        cost[name] = {f: sum(float(scores.get(u, {}).get(f, 0.0)) for u in units) for f in choices}
        weight[name] = {f: sum(int(params.get(u, 0)) for u in units) * get_format(f).weight_bits for f in choices}
    fixed = sum(int(params.get(u, 0)) * 32 for u in space.kinds if len(space.choices[u]) == 1)
    return _milp_choice(space, cost, weight, effective_bits * total - fixed)


LADDER = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6)  # fractions of the way from the lowest effective bits to 32


def weight_bits_ladder(space: SearchSpace, scores: Mapping[str, Mapping[str, float]], params: Mapping[str, int],
                       low_bits: float, fractions: Sequence[float] = LADDER) -> dict[str, Assignment]:
    """Weight-bits plans at a ladder of effective bits from ``low_bits`` up to 32: warm starts for the study.

    The Fisher ranking keeps the most sensitive weights float first; which of these plans is fast enough is for the
    engine to say, so the study measures them all (over-budget ones cost a latency measurement only). On the MiniLM
    verses the weight-bits plan at the searched plan's bits beat the searched plan by about a point: the study had
    not been given it. Identical plans appear once, under their lowest level.
    """
    out: dict[str, Assignment] = {}
    seen: set = set()
    for f in fractions:
        bits = low_bits + f * (32.0 - low_bits)
        plan = weight_bits(space, scores, params, bits)
        key = None if plan is None else tuple(sorted(plan.items()))
        if plan is not None and key not in seen:
            seen.add(key)
            out[f"weight-bits (Fisher) {bits:.1f} bits, warm start"] = plan
    return out


def effective_bits(assignment: Mapping[str, str], params: Mapping[str, int]) -> float:
    """Mean weight bits of a plan, weighted by each unit's weight count (ModelOpt's "effective bits").

    Raises:
        ConfigError: every unit of the plan has zero weights.
    """
    total = sum(int(params.get(u, 0)) for u in assignment)
    if total == 0:
        raise ConfigError("effective bits need parameter counts of the units; every count was zero.")
    return sum(int(params.get(u, 0)) * get_format(f).weight_bits for u, f in assignment.items()) / total


def random_plans(space: SearchSpace, n: int, seed: int = 0) -> list[Assignment]:
    """``n`` plans drawn uniformly from the space (seeded)."""
    rng = _random.Random(seed)
    out = []
    for _ in range(n):
        plan = fp32(space)
        for _, units, choices in space.parameters():
            f = rng.choice(choices)
            for u in units:
                plan[u] = f
        out.append(plan)
    return out
