"""How to search: an Optuna study over a ``SearchSpace``, handed two callables (metric of a plan, latency of a plan).

The objective measures latency first (cheap, cached by plan), records the budget through Optuna's constraint
API (``trial.set_constraint``; a trial is feasible when the value is <= 0) and spends an accuracy evaluation
only on plans that are not clearly over budget. With ``front=True`` the study has two objectives (metric up,
latency down) and returns the Pareto front. Samplers are Optuna's, chosen by name and seeded; storage is any
Optuna storage (None: in memory).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional

from mixq.errors import ConfigError, did_you_mean
from mixq.search.budget import Budget
from mixq.search.space import Assignment, SearchSpace

SAMPLERS = ("tpe", "nsga2", "gp", "random")


def make_sampler(name: str, seed: int = 0, front: bool = False) -> Any:
    """An Optuna sampler by name, seeded.

    ``tpe`` is multivariate TPE (it models the joint distribution of the per-unit choices, which interact
    through the engine's fusions); ``nsga2`` suits the two-objective front; ``gp`` is Optuna's Gaussian
    process sampler; ``random`` samples uniformly.

    Raises:
        ConfigError: an unknown name, with the valid ones.
    """
    import warnings

    import optuna

    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; valid samplers are {', '.join(SAMPLERS)}.{did_you_mean(name, SAMPLERS)}")


@dataclass
class TrialRecord:
    """One plan the search looked at.

    Attributes:
        number: Optuna trial number (-1 for plans measured outside the study).
        source: "tpe", "random" ... or the name of an enqueued baseline.
        assignment: {unit: format}.
        latency_ms: measured latency.
        metric: metric on the search split, or None when the plan was clearly over budget and not evaluated.
        feasible: latency within the budget (always True without a budget).
        evaluate_s / measure_s: seconds spent evaluating / measuring for this trial (0 when cached).
    """

    number: int
    source: str
    assignment: dict
    latency_ms: float
    metric: Optional[float]
    feasible: bool
    evaluate_s: float = 0.0
    measure_s: float = 0.0

    @property
    def low_units(self) -> int:
        return sum(f != "fp32" for f in self.assignment.values())


@dataclass
class SearchResult:
    """What a search found.

    Attributes:
        fp32_ms / limit_ms: FP32 latency measured in this session and the budget in ms (None without one).
        records: every trial, in order.
        best: the feasible evaluated plan with the highest metric (lower latency breaks ties), or None.
        front: the Pareto-optimal evaluated plans (metric up, latency down), by latency.
        timing: seconds spent evaluating, measuring, and in Optuna (sampler + storage), and their shares.
    """

    fp32_ms: float
    limit_ms: Optional[float]
    records: list = field(default_factory=list)
    best: Optional[TrialRecord] = None
    front: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"fp32_ms": self.fp32_ms, "limit_ms": self.limit_ms, "timing": self.timing,
                "best": None if self.best is None else asdict(self.best),
                "front": [asdict(r) for r in self.front], "records": [asdict(r) for r in self.records]}


def pareto_front(records: list[TrialRecord]) -> list[TrialRecord]:
    """Evaluated records no other record beats on both metric (higher) and latency (lower), by latency."""
    done = [r for r in records if r.metric is not None]
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
    ok = [r for r in records if r.feasible and r.metric is not None]
    return max(ok, key=lambda r: (r.metric, -r.latency_ms)) if ok else None


def run_search(space: SearchSpace, evaluate: Callable[[Assignment], float], latency: Callable[[Assignment], float],
               n_trials: int, budget: Optional[Budget] = None, front: bool = False, sampler: str = "tpe",
               seed: int = 0, warm_start: Optional[Mapping[str, Assignment]] = None, storage: Any = None,
               study_name: Optional[str] = None, over_budget_slack: float = 0.05,
               screen: Optional[Callable[[Assignment], float]] = None, progress: bool = False) -> SearchResult:
    """Search ``space`` for the plan with the best metric under ``budget`` (or the metric/latency front).

    Args:
        space: the per-unit choices.
        evaluate: plan -> task metric on the search split (higher is better, e.g. percent).
        latency: plan -> milliseconds (any LatencyModel; measured, cached by plan).
        n_trials: trials to run in this call (enqueued baselines count).
        budget: latency budget; required unless ``front``.
        front: two objectives (metric, latency) instead of a constrained single objective.
        sampler: one of ``SAMPLERS``; seed: its seed.
        warm_start: name -> plan, enqueued as the first trials (the baselines).
        storage / study_name: an Optuna storage (None: in memory) and study name.
        over_budget_slack: a plan whose latency exceeds the budget by more than this fraction is not
            evaluated (it cannot be chosen; latency noise is a few percent).
        screen: optional predictor plan -> ms; a plan it predicts over ``(1 + 2 * slack)`` x budget is
            neither measured nor evaluated (recorded as infeasible with the predicted latency).
        progress: show Optuna's progress bar.

    Returns:
        A SearchResult.

    Raises:
        ConfigError: no budget in single-objective mode, bad counts or slack.
    """
    import optuna

    if n_trials < 1:
        raise ConfigError(f"n_trials must be at least 1, but got {n_trials}.")
    if budget is None and not front:
        raise ConfigError("a single-objective search needs a latency budget (e.g. '0.6x' or '6.5ms'); "
                          "or ask for the metric/latency front.")
    if not 0 <= over_budget_slack < 1:
        raise ConfigError(f"over_budget_slack must be in [0, 1), but got {over_budget_slack}.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fp32_plan = {u: "fp32" for u in space.kinds}
    fp32_ms = float(latency(fp32_plan))
    limit = budget.limit_ms(fp32_ms) if budget is not None else None
    metrics: dict[tuple, float] = {}
    records: list[TrialRecord] = []
    marks = {"optuna_s": 0.0, "last_end": None}

    def objective(trial):
        start = time.perf_counter()
        if marks["last_end"] is not None:
            marks["optuna_s"] += start - marks["last_end"]
        a = space.suggest(trial)
        key = tuple(a.values())
        source = trial.user_attrs.get("baseline") or sampler
        t0 = time.perf_counter()
        screened = screen is not None and limit is not None and screen(a) > limit * (1 + 2 * over_budget_slack)
        ms = float(screen(a)) if screened else float(latency(a))
        t1 = time.perf_counter()
        feasible = limit is None or ms <= limit
        if limit is not None:
            trial.set_constraint("latency", ms - limit)
        metric = metrics.get(key)
        if metric is None and not screened and (limit is None or front or ms <= limit * (1 + over_budget_slack)):
            metric = float(evaluate(a))
            metrics[key] = metric
        t2 = time.perf_counter()
        trial.set_user_attr("latency_ms", ms)
        trial.set_user_attr("evaluated", metric is not None)
        records.append(TrialRecord(trial.number, source, a, ms, metric, feasible, t2 - t1, t1 - t0))
        marks["last_end"] = time.perf_counter()
        value = metric if metric is not None else 0.0  # never chosen: the constraint marks it infeasible
        return (value, ms) if front else value

    directions = ["maximize", "minimize"] if front else ["maximize"]
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                sampler=make_sampler(sampler, seed, front), load_if_exists=True)
    for name, plan in (warm_start or {}).items():
        study.enqueue_trial(space.params_of(plan), user_attrs={"baseline": name}, skip_if_exists=True)
    t_start = time.perf_counter()
    study.optimize(objective, n_trials=n_trials, show_progress_bar=progress)
    total = time.perf_counter() - t_start
    ev = sum(r.evaluate_s for r in records)
    me = sum(r.measure_s for r in records)
    other = max(total - ev - me, 0.0)
    timing = {"total_s": total, "evaluate_s": ev, "measure_s": me, "optuna_s": other, "trials": len(records),
              "evaluated": sum(r.metric is not None for r in records),
              "share": {k: (v / total if total else 0.0) for k, v in (("evaluate", ev), ("measure", me),
                                                                       ("optuna", other))}}
    return SearchResult(fp32_ms, limit, records, best_feasible(records), pareto_front(records), timing)
