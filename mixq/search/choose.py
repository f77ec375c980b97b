"""Which plan a search reports: its best candidates, re-timed, and the choice among them.

In-process latencies are single measurements on a shared machine: a plan measured just under the budget is
as likely to be just over it when timed again, and plans whose search metrics differ by less than the
metric's noise are equally good. So a search does not report its single best trial: it takes the few best
feasible candidates (those within a tolerance of the best metric, fastest first, then the next best), has
them re-timed (the caller's callable: a fresh process, interleaved with FP32), and reports the best one that
still meets the budget, breaking ties in the metric by the re-timed margin. The figures then reported come from a second, independent re-timing.

Plain data (imports no torch and no Optuna).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from mixq.errors import ConfigError
from mixq.search.records import TrialRecord


@dataclass(frozen=True)
class Retimed:
    """A candidate's re-timing: whether it meets the budget, its median latency, its margin (ms, + inside)."""

    meets: bool
    median_ms: float
    margin_ms: float


_EPS = 1e-9  # metrics are means of per-sample scores: 98.2 - 0.1 must still admit 98.1


def _key(r: TrialRecord) -> tuple:
    return tuple(sorted(r.assignment.items()))


def candidates(records: list[TrialRecord], limit_ms: float, tolerance: float = 0.1, k: int = 5,
               slack: float = 0.05) -> list[TrialRecord]:
    """The distinct evaluated plans worth re-timing, best first.

    A plan is a candidate when it was evaluated (not screened) and measured within ``slack`` of the budget
    (one measured a little over may be under when timed again). Order: plans within ``tolerance`` metric
    points of the best metric first, fastest first (the most margin); then the rest by metric. At most ``k``.

    Raises:
        ConfigError: ``k < 1`` or a negative tolerance or slack.
    """
    if k < 1 or tolerance < 0 or slack < 0:
        raise ConfigError(f"`k >= 1`, `tolerance >= 0` and `slack >= 0` must hold, but got (k={k}, "
                          f"tolerance={tolerance}, slack={slack}).")
    seen, pool = set(), []
    ok = [r for r in records if r.metric is not None and not r.screened and r.latency_ms <= limit_ms * (1 + slack)]
    for r in sorted(ok, key=lambda r: (-r.metric, r.latency_ms, r.number)):
        if _key(r) not in seen:
            seen.add(_key(r))
            pool.append(r)
    if not pool:
        return []
    best = pool[0].metric
    near = sorted((r for r in pool if r.metric >= best - tolerance - _EPS), key=lambda r: (r.latency_ms, -r.metric))
    rest = [r for r in pool if r.metric < best - tolerance - _EPS]
    return (near + rest)[:k]


def choose(cands: list[TrialRecord], retimed: Mapping[tuple, Retimed]) -> Optional[TrialRecord]:
    """The best candidate that meets the budget when re-timed (None when none does).

    The objective is the metric within the budget, so the highest search metric among those that meet it wins;
    plans with the same metric go to the larger re-timed margin (the likelier to keep meeting it).
    """
    ok = [r for r in cands if retimed[_key(r)].meets]
    if not ok:
        return None
    best = max(r.metric for r in ok)
    return max((r for r in ok if r.metric >= best - _EPS), key=lambda r: retimed[_key(r)].margin_ms)
