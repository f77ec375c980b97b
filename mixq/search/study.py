"""How to search: an Optuna study over a ``SearchSpace``, handed two callables (metric of a plan, latency of a plan).

The objective measures latency first (cheap, cached by plan), records the budget through Optuna's constraint
API (``trial.set_constraint``; a trial is feasible when the value is <= 0) and spends an accuracy evaluation
only on plans that are not clearly over budget. With ``front=True`` the study has two objectives (metric up,
latency down) and returns the Pareto front. Samplers are Optuna's, chosen by name and seeded; storage is any
Optuna storage (None: in memory).

Resuming: everything a trial found (latency, metric, timings) is written to its user attrs before it is told,
so a study in a persistent storage is resumed by running the same call again: finished trials count towards
``n_trials`` and fill the plan caches (no plan is measured or evaluated twice), a RUNNING trial left by a dead
process is marked FAIL (and re-enqueued when it was a fixed plan, e.g. a baseline), and baselines already in
the study are not enqueued again.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from mixq.errors import ConfigError, did_you_mean
from mixq.search.budget import Budget
from mixq.search.records import SearchResult, TrialRecord, best_feasible, best_so_far, pareto_front
from mixq.search.space import Assignment, SearchSpace
from mixq.search.storage import check_fingerprint, is_dead, worker_id
from mixq.search import workers as _w

SAMPLERS = ("tpe", "nsga2", "gp", "random")
ATTR = "mixq"  # the user attr holding what a trial found


def make_sampler(name: str, seed: int = 0, front: bool = False) -> Any:
    """An Optuna sampler by name, seeded.

    ``tpe`` is multivariate TPE (it models the joint distribution of the per-unit choices, which interact
    through the engine's fusions); ``nsga2`` suits the two-objective front; ``gp`` is Optuna's Gaussian
    process sampler; ``random`` samples uniformly.

    Raises:
        ConfigError: an unknown name, with the valid ones.
    """
    import optuna

    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; valid samplers are {', '.join(SAMPLERS)}."
                          f"{did_you_mean(name, SAMPLERS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


@dataclass
class PlanCache:
    """Metric and latency of plans already looked at, keyed by the full assignment (shared between studies)."""

    metrics: dict = field(default_factory=dict)
    latencies: dict = field(default_factory=dict)

    @staticmethod
    def key(a: Mapping[str, str]) -> tuple:
        return tuple(sorted(a.items()))


class _StorageClock:
    """Seconds spent inside the storage's methods (each public method of the instance is wrapped once)."""

    def __init__(self, storage: Any) -> None:
        self.seconds = 0.0
        if storage is None or getattr(storage, "_mixq_clock", None) is not None:
            self._shared = getattr(storage, "_mixq_clock", None)
            return
        self._shared = None
        from optuna.storages import BaseStorage

        for name in dir(BaseStorage):
            if name.startswith("_") or not callable(getattr(storage, name, None)):
                continue
            setattr(storage, name, self._timed(getattr(storage, name)))
        storage._mixq_clock = self

    def _timed(self, fn: Callable) -> Callable:
        def call(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t
        return call

    def now(self) -> float:
        return (self._shared or self).seconds


def _record(t: Any, space: SearchSpace, sampler: str) -> Optional[TrialRecord]:
    info = t.user_attrs.get(ATTR)
    if info is None:
        return None
    return TrialRecord(t.number, info.get("source", sampler), space.from_params(t.params), float(info["latency_ms"]),
                       info.get("metric"), bool(info["feasible"]), float(info.get("evaluate_s", 0.0)),
                       float(info.get("measure_s", 0.0)), float(info.get("storage_s", 0.0)),
                       float(info.get("sampler_s", 0.0)), bool(info.get("screened", False)),
                       float(info.get("lock_wait_s", 0.0)), str((t.user_attrs.get("worker") or {}).get("host", "")),
                       info.get("measured_by"))


def finished_records(study: Any, space: SearchSpace, sampler: str = "") -> list[TrialRecord]:
    """Every COMPLETE trial of ``study`` as a TrialRecord, by number."""
    from optuna.trial import TrialState

    recs = [_record(t, space, sampler) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return sorted((r for r in recs if r is not None), key=lambda r: r.number)


def _enqueue_baselines(study: Any, space: SearchSpace, warm_start: Mapping[str, Assignment]) -> list[str]:
    """Enqueue each distinct baseline plan once (names of identical plans joined by " = "), unless the study
    already holds it (a resumed study). Returns the labels enqueued now."""
    from optuna.trial import TrialState

    groups: dict[tuple, list[str]] = {}
    params_of = {}
    for name, plan in warm_start.items():
        p = space.params_of(plan)
        k = tuple(sorted(p.items()))
        groups.setdefault(k, []).append(name)
        params_of[k] = p
    present = {t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.FAIL}
    new = []
    for k, names in groups.items():
        label = " = ".join(names)
        if label not in present:
            study.enqueue_trial(params_of[k], user_attrs={"baseline": label})
            new.append(label)
    return new


def run_search(space: SearchSpace, evaluate: Callable[[Assignment], float], latency: Callable[[Assignment], float],
               n_trials: int, budget: Optional[Budget] = None, front: bool = False, sampler: str = "tpe",
               seed: int = 0, warm_start: Optional[Mapping[str, Assignment]] = None, storage: Any = None,
               study_name: Optional[str] = None, over_budget_slack: float = 0.05,
               screen: Optional[Callable[[Assignment], float]] = None, progress: bool = False,
               fingerprint: Optional[Mapping[str, Any]] = None, storage_text: str = "the storage",
               exclusive: bool = False, cache: Optional[PlanCache] = None, fp32_ms: Optional[float] = None,
               label: str = "search", latency_setup: Any = None, lock: Optional[_w.LatencyLock] = None,
               poll_s: float = 0.5, on_ready: Optional[Callable[[Any], None]] = None) -> SearchResult:
    """Search ``space`` for the plan with the best metric under ``budget`` (or the metric/latency front).

    Several processes (on one machine or several) may run this on one study at once: each stops when the study
    holds ``n_trials`` finished trials (never more), takes over the plans of dead workers' trials, and reuses
    the latencies the others measured.

    Args:
        space: the per-unit choices.
        evaluate: plan -> task metric on the search split (higher is better, e.g. percent).
        latency: plan -> milliseconds (any LatencyModel; measured, cached by plan).
        n_trials: finished trials the study should hold (enqueued baselines, trials of earlier sessions and of
            other workers count).
        budget: latency budget; required unless ``front`` (with ``front`` it marks the feasible plans).
        front: two objectives (metric, latency) instead of a constrained single objective; every plan is evaluated.
        sampler: one of ``SAMPLERS``; seed: its seed (give each worker its own).
        warm_start: name -> plan, enqueued as the first trials (the baselines).
        storage / study_name: an Optuna storage (None: in memory) and study name.
        over_budget_slack: a plan whose latency exceeds the budget by more than this fraction is not
            evaluated (it cannot be chosen; latency noise is a few percent).
        screen: optional predictor plan -> ms; a plan it predicts over ``(1 + 2 * slack)`` x budget is
            neither measured nor evaluated (recorded as infeasible with the predicted latency).
        progress: a progress bar with the best feasible metric so far.
        fingerprint: what the trials mean (model, data, backend, budget ...): recorded on a new study, checked
            on an existing one.
        storage_text: the storage as messages should name it (no password).
        exclusive: this process is the only one using the study (the run folder is locked), so every RUNNING
            trial found is a dead process's; otherwise only trials whose worker is known dead (same host) or
            whose heartbeat stopped (RDB storages opened with one) are failed and their plans re-queued.
        cache: plan caches shared with other studies of the same problem (filled from this study's trials).
        fp32_ms: the FP32 latency the budget is relative to (default: the study's, else ``latency`` of the
            all-fp32 plan); recorded on the study, so every worker uses the same budget.
        label: name of the progress bar.
        latency_setup: what the latencies depend on (engine, CPU, threads, clock ...). Given, latencies are
            shared through the study (a plan is measured once in the whole study) and a study whose latencies
            were measured with another setup is refused.
        lock: the machine's latency lock, held while measuring (None: no lock).
        poll_s: seconds between looks at the study while other workers finish its last trials.
        on_ready: called once the study is ready for other workers (dead trials re-queued, baselines enqueued,
            FP32 latency recorded), with the study's ``SharedLatencies`` (or None); e.g. to start more workers.
            From then on this process is no longer ``exclusive``.

    Returns:
        A SearchResult over every finished trial of the study.

    Raises:
        ConfigError: no budget in single-objective mode, bad counts, slack or sampler, a study made for
            another search (fingerprint) or whose latencies come from another setup.
    """
    import optuna
    from optuna.trial import TrialState

    if n_trials < 1:
        raise ConfigError(f"n_trials must be at least 1, but got {n_trials}.")
    if budget is None and not front:
        raise ConfigError("a single-objective search needs a latency budget (e.g. '0.6x' or '6.5ms'); "
                          "or ask for the metric/latency front.")
    if not 0 <= over_budget_slack < 1:
        raise ConfigError(f"over_budget_slack must be in [0, 1), but got {over_budget_slack}.")
    sampler_obj = make_sampler(sampler, seed, front)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if isinstance(storage, optuna.storages.RDBStorage):
        # Optuna puts its cache in front of an RDB storage; time the cache's calls, not the backend's internals.
        storage = optuna.storages._CachedStorage(storage)
    clock = _StorageClock(storage)
    directions = ["maximize", "minimize"] if front else ["maximize"]
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions, sampler=sampler_obj,
                                load_if_exists=True)
    if list(study.directions) != [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else
                                  optuna.study.StudyDirection.MINIMIZE for d in directions]:
        raise ConfigError(f"study {study.study_name!r} in {storage_text} has {len(study.directions)} objective(s); "
                          f"this search has {len(directions)} ({'--front' if front else 'a budget'}); give another "
                          "--study name.")
    if fingerprint is not None:
        check_fingerprint(study, fingerprint, storage_text)
    shared = _w.SharedLatencies(study, latency, latency_setup, lock) if latency_setup is not None else None
    cache = cache if cache is not None else PlanCache()
    # one process of this machine at a time re-queues dead workers' plans and enqueues the baselines: none twice
    reap_lock = _w.LatencyLock(_w.default_lock_path().with_name(
        f"mixq-reap-{_w.plan_digest({'s': study.study_name})}.lock"))
    with reap_lock:
        failed, left = _w.reap(study, exclusive, is_dead)
        enqueued = _enqueue_baselines(study, space, warm_start or {})
    before = finished_records(study, space, sampler)
    _fill(cache, before)
    fp32_plan = {u: "fp32" for u in space.kinds}
    recorded = study.user_attrs.get(_w.FP32_ATTR)
    if recorded is not None:
        fp32_ms = float(recorded)
    if fp32_ms is None:
        fp32_ms = cache.latencies.get(PlanCache.key(fp32_plan))
    if fp32_ms is None:
        fp32_ms = shared(fp32_plan)[0] if shared is not None else float(latency(fp32_plan))
    if recorded is None and storage is not None:
        study.set_user_attr(_w.FP32_ATTR, float(fp32_ms))
    if shared is not None:
        shared.publish(fp32_plan, fp32_ms)
    limit = budget.limit_ms(fp32_ms) if budget is not None else None
    me = worker_id()
    if on_ready is not None:
        on_ready(shared)
        exclusive = False

    def objective(trial, t_ask: float, s_ask: float) -> tuple:
        if not exclusive:  # another process may resume the study: say who runs this trial (one more write)
            trial.set_user_attr("worker", me)
        a = space.suggest(trial)
        k = PlanCache.key(a)
        source = trial.user_attrs.get("baseline") or sampler
        t0 = time.perf_counter()
        ms, screened, waited, by = cache.latencies.get(k), False, 0.0, None
        if ms is None and screen is not None and limit is not None:
            predicted = float(screen(a))
            screened = predicted > limit * (1 + 2 * over_budget_slack)
            ms = predicted if screened else None
        if ms is None:
            if shared is not None:
                ms, waited, by = shared(a)
            elif lock is not None:
                before_wait = lock.waited_s
                with lock:
                    waited = lock.waited_s - before_wait
                    ms = float(latency(a))
            else:
                ms = float(latency(a))
            cache.latencies[k] = ms
        t1 = time.perf_counter()
        feasible = limit is None or ms <= limit
        metric = cache.metrics.get(k)
        wants = not screened and (limit is None or front or ms <= limit * (1 + over_budget_slack))
        if metric is None and wants and not exclusive:  # another worker may have evaluated it meanwhile
            _fill(cache, finished_records(study, space, sampler))
            metric = cache.metrics.get(k)
        if metric is None and wants:
            metric = float(evaluate(a))
            cache.metrics[k] = metric
            t2 = time.perf_counter()
        else:
            t1 = t2 = time.perf_counter()  # nothing evaluated: no evaluation time
        if limit is not None:
            trial.set_constraint("latency", ms - limit)
        storage_s = clock.now() - s_ask
        measure_s = max(t1 - t0 - waited, 0.0)
        sampler_s = max((time.perf_counter() - t_ask) - (t2 - t0) - storage_s, 0.0)
        trial.set_user_attr(ATTR, {"source": source, "latency_ms": ms, "metric": metric, "feasible": feasible,
                                   "screened": screened, "evaluate_s": t2 - t1, "measure_s": measure_s,
                                   "lock_wait_s": waited, "storage_s": storage_s, "sampler_s": sampler_s,
                                   "measured_by": by})
        value = metric if metric is not None else 0.0  # never chosen: the constraint marks it infeasible
        return TrialRecord(trial.number, source, a, ms, metric, feasible, t2 - t1, measure_s, storage_s, sampler_s,
                           screened, waited, me["host"], by), ((value, ms) if front else value)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max(n_trials - len(before), 0), desc=label, unit="trial", leave=False, disable=None,
                   dynamic_ncols=True)
    records: list[TrialRecord] = []
    best = best_so_far(before)[-1] if before else None
    t_start, s_start = time.perf_counter(), clock.now()
    waited_idle, surplus, reaped = 0.0, 0, []
    try:
        while True:
            if not exclusive:
                with reap_lock:
                    reaped += _w.reap(study, False, is_dead)[0]
            c = _w.counts(study)
            if c["complete"] >= n_trials:
                break
            if c["complete"] + c["running"] >= n_trials:  # the last trials run elsewhere; take over if they die
                time.sleep(poll_s)
                waited_idle += poll_s
                continue
            t_ask, s_ask = time.perf_counter(), clock.now()
            trial = study.ask()
            if not exclusive and _w.is_surplus(study, trial, n_trials):  # another worker asked at the same time
                trial.set_user_attr(_w.SURPLUS_ATTR, True)
                study.tell(trial, state=TrialState.FAIL)
                # not re-queued even when it was a queued plan: n trials before it are live, and should one of
                # them die, its own plan is re-queued; re-queuing this one too would leave it waiting forever
                surplus += 1
                continue
            try:
                with _w.Heartbeat(study._storage, trial._trial_id):
                    rec, values = objective(trial, t_ask, s_ask)
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)
                raise
            study.tell(trial, values)
            records.append(rec)
            if rec.feasible and rec.metric is not None and not rec.screened and (best is None or rec.metric > best):
                best = rec.metric
            if bar is not None:
                bar.set_postfix_str(f"best feasible {best:.2f}" if best is not None else "no feasible plan yet",
                                    refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    total = time.perf_counter() - t_start
    ev = sum(r.evaluate_s for r in records)
    mea = sum(r.measure_s for r in records)
    lw = sum(r.lock_wait_s for r in records)
    sto = clock.now() - s_start
    other = max(total - ev - mea - lw - sto - waited_idle, 0.0)
    timing = {"total_s": total, "evaluate_s": ev, "measure_s": mea, "lock_wait_s": lw, "storage_s": sto,
              "sampler_s": other, "idle_s": waited_idle, "trials": len(records),
              "evaluated": sum(r.evaluate_s > 0 for r in records),
              "cached_or_skipped": sum(r.evaluate_s == 0 for r in records),
              "measured_here": shared.measured if shared is not None else None,
              "latencies_reused": shared.reused if shared is not None else None, "surplus": surplus,
              "share": {k: (v / total if total else 0.0) for k, v in (("evaluate", ev), ("measure", mea),
                                                                       ("lock_wait", lw), ("storage", sto),
                                                                       ("sampler", other), ("idle", waited_idle))}}
    allrecs = finished_records(study, space, sampler)
    resumed = {"finished_before": len(before), "stale_failed": failed, "running_left": left,
               "baselines_enqueued": enqueued, "requeued_while_running": sorted(set(reaped))}
    return SearchResult(fp32_ms, limit, allrecs, best_feasible(allrecs), pareto_front(allrecs), timing,
                        study.study_name, resumed)


def _fill(cache: PlanCache, records: list) -> None:
    for r in records:
        k = PlanCache.key(r.assignment)
        if not r.screened:
            cache.latencies.setdefault(k, r.latency_ms)
        if r.metric is not None:
            cache.metrics.setdefault(k, r.metric)
