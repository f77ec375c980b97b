"""What a search looked at: one ``TrialRecord`` per plan, the ``SearchResult``, the Pareto front.

Plain data (imports no torch and no Optuna).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class TrialRecord:
    """One plan the search looked at.

    Attributes:
        number: Optuna trial number (-1 for plans measured outside the study).
        source: "tpe", "random" ... or the name(s) of an enqueued baseline.
        assignment: {unit: format}.
        latency_ms: measured latency (or the screen's prediction when ``screened``).
        metric: metric on the search split, or None when the plan was clearly over budget and not evaluated.
        feasible: latency within the budget (always True without a budget).
        evaluate_s / measure_s: seconds spent evaluating / measuring for this trial (0 when cached).
        storage_s: seconds in storage calls from the trial's ask up to its last attribute write (its tell,
            one more write, is counted in the session's total, ``SearchResult.timing``).
        sampler_s: the rest of the trial's Optuna time (the sampler, bookkeeping).
        screened: the latency is a predictor's, the plan was neither measured nor evaluated.
        lock_wait_s: seconds the trial waited for the machine's latency lock (another worker was timing).
        host: the machine of the worker that ran the trial ("" when not recorded).
        measured_by: the machine that measured the plan's latency (None: cached, screened or not recorded).
    """

    number: int
    source: str
    assignment: dict
    latency_ms: float
    metric: Optional[float]
    feasible: bool
    evaluate_s: float = 0.0
    measure_s: float = 0.0
    storage_s: float = 0.0
    sampler_s: float = 0.0
    screened: bool = False
    lock_wait_s: float = 0.0
    host: str = ""
    measured_by: Optional[str] = None

    @property
    def low_units(self) -> int:
        return sum(f != "fp32" for f in self.assignment.values())


@dataclass
class SearchResult:
    """What a search found.

    Attributes:
        fp32_ms / limit_ms: FP32 latency and the budget in ms (None without one).
        records: every finished trial of the study (earlier sessions included), by number.
        best: the feasible evaluated plan with the highest metric (lower latency breaks ties), or None.
        front: the Pareto-optimal evaluated plans (metric up, latency down), by latency.
        timing: seconds of this session: evaluate, measure, storage, sampler, their shares.
        study_name: the Optuna study.
        resumed: what an earlier session left: trials finished, stale trials failed / re-enqueued.
    """

    fp32_ms: float
    limit_ms: Optional[float]
    records: list = field(default_factory=list)
    best: Optional[TrialRecord] = None
    front: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    study_name: str = ""
    resumed: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"study": self.study_name, "fp32_ms": self.fp32_ms, "limit_ms": self.limit_ms, "timing": self.timing,
                "resumed": self.resumed, "best": None if self.best is None else asdict(self.best),
                "front": [asdict(r) for r in self.front], "records": [asdict(r) for r in self.records]}


def pareto_front(records: list[TrialRecord]) -> list[TrialRecord]:
    """Evaluated records no other record beats on both metric (higher) and latency (lower), by latency."""
    done = [r for r in records if r.metric is not None and not r.screened]
    front, seen = [], set()
    for r in sorted(done, key=lambda r: (r.latency_ms, -r.metric)):
        key = tuple(sorted(r.assignment.items()))
        if key in seen:
            continue
        if not front or r.metric > front[-1].metric:
            front.append(r)
            seen.add(key)
    return front


def best_feasible(records: list[TrialRecord]) -> Optional[TrialRecord]:
    """The feasible evaluated record with the highest metric (the faster one on a tie), or None."""
    ok = [r for r in records if r.feasible and r.metric is not None and not r.screened]
    return max(ok, key=lambda r: (r.metric, -r.latency_ms, -r.number)) if ok else None


def best_so_far(records: list[TrialRecord]) -> list[Optional[float]]:
    """The best feasible metric after each record (None until the first feasible evaluated plan)."""
    out, best = [], None
    for r in records:
        if r.feasible and r.metric is not None and not r.screened and (best is None or r.metric > best):
            best = r.metric
        out.append(best)
    return out
