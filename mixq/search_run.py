"""The torch side of ``mixq search``: calibrate, sensitivity, single-unit latencies, baselines, studies, final figures.
(What it starts from is in ``mixq.search_prep``; worker processes in ``mixq.search_join``.)

Stages (each cached in ``RUN/search-cache/`` under one fingerprint, so a rerun after a kill skips what is done):

1. calibrate once for every format of the space (``save_quantized`` -> ``search-cache/calibrated``);
2. one-at-a-time sensitivity on the search split with the Fisher proxy (``mixq scan``'s store,
   ``search-cache/scan.jsonl``);
3. FP32 and single-unit latencies on ONNX Runtime (``search-cache/latency.json``; every plan measured later is
   added); the budget is checked against the fastest plan measured and against FP32;
4. the baselines, enqueued as the first trials of the Optuna study; a random-search study with the same
   trial count, evaluated the same way; both in the study storage, resumable; with a relative budget each plan is
   timed back to back with FP32 and judged on the ratio (``search_latency``);
5. every reported plan on the test split, and re-timed in a fresh process (``mixq.search_retime``), each
   interleaved with FP32, against the budget.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mixq.errors import ConfigError, MixqError
from mixq.search_join import collect_workers, latency_setup, pin, start_local_workers
from mixq.search_prep import (CACHE, _say, calibrated_model, check_budget, check_cache, check_study_before_work,
                              discard, engine_latency, engine_runner, fingerprint_parts, imported_sensitivity, plan_of,
                              recorded_fp32_ms, search_latency, sensitivity, study_name, weight_counts)

SCAN_GUIDED_DROP = 0.5  # metric points: a unit that alone costs more stays float in the scan-guided baseline


@dataclass
class SearchOptions:
    """What ``mixq search`` was asked (validated by the CLI)."""

    budget: Any  # mixq.search.Budget or None
    front: bool = False
    trials: int = 40
    sampler: str = "tpe"
    seed: int = 0
    formats: list = field(default_factory=lambda: ["int8"])
    runs: int = 50
    rounds: int = 5
    retime_seconds: float = 0.2
    calib_method: str = "max"
    storage: Optional[str] = None
    study: Optional[str] = None
    fresh: bool = False
    random_baseline: bool = True
    candidates: int = 5
    metric_tolerance: float = 0.1
    sensitivity: Optional[str] = None
    evaluate: str = "simulation"  # or "engine": plans measured on ONNX Runtime (mixq.evaluate.EngineRunner)
    progress: bool = True
    command: str = ""
    batch_axis: Any = 0
    workers: int = 1
    ratio_rounds: int = 3
    join: bool = False
    worker_index: int = 0
    argv: list = field(default_factory=list)


def lock_run_dir(d: Path) -> Any:
    """Hold ``RUN/search.lock`` for this process: one search per run folder.

    Raises:
        MixqError: another search holds it.
    """
    import fcntl

    fh = open(d / "search.lock", "a")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise MixqError(f"another mixq search is running in {str(d)!r}; wait for it, or use another --run-dir.") \
            from None
    return fh


def run(task, d: Path, backend: str, opts: SearchOptions, storage: Any, storage_text: str, dashboard: str) -> dict:
    """Run the whole search (see the module docstring); write every artifact; return the summary dict."""
    from mixq.artifacts import write_atomic
    from mixq.latency.base import LatencyError
    from mixq.search import PlanCache, SearchSpace, baselines, run_search

    t_all = time.perf_counter()
    cache = d / CACHE
    name = study_name(task.name, opts)
    names = [name] + ([name + "-random"] if opts.random_baseline else [])
    if opts.fresh:
        _say(f"--fresh: discarding {', '.join(names)} and {cache}")
        discard(storage, names, cache)
    search_data = task.search_fn() if task.search_fn is not None else None
    test_data = task.eval_fn()
    notes = []
    if search_data is None:
        print("mixq: warning: the task has no search split; the search and the final figures use the same "
              "evaluation data (give the example a search_data function to keep them apart)", file=sys.stderr)
        notes.append("the task has no search split: the search and the final figures use the same data")
        search_data = test_data
    model, calib = task.model_fn(), task.calib_fn()
    parts = fingerprint_parts(task, model, calib, search_data, backend, opts)
    imported = None if opts.sensitivity is None else \
        imported_sensitivity(opts.sensitivity, model, calib, search_data, task, backend, opts)
    check_cache(cache, parts)
    for n in names:
        check_study_before_work(storage, n, parts, storage_text)
    stages = {}
    t0 = time.perf_counter()
    q = calibrated_model(model, calib, backend, opts, cache)
    space = SearchSpace.build(q.mixq.kinds, backend, opts.formats)
    _say(f"[1/5] space: {space.describe()}")
    if imported is not None:
        drops, fisher = imported
        missing = [f"{u} {f}" for u, c in space.choices.items() for f in c if f != "fp32" and f not in drops.get(u, {})]
        if missing:
            raise ConfigError(f"--sensitivity {opts.sensitivity!r} lacks {len(missing)} unit/format drop(s) of this "
                              f"space, e.g. {', '.join(missing[:3])}; it was made on another graph of the model.")
        _say(f"[2/5] sensitivity from {opts.sensitivity} (made by mixq scan on this model, data and backend)")
        source = f"imported from {opts.sensitivity}"
    else:
        drops, fisher, _ = sensitivity(q, calib, search_data, task, cache, opts)
        source = ("ONNX Runtime (one unit at a time, the study's own measurement)" if opts.evaluate == "engine"
                  else "fake-quant simulation (one unit at a time)")
    stages["calibrate_and_sensitivity_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    lat = engine_latency(q, calib, opts)
    lat_file = cache / "latency.json"
    if lat_file.is_file():
        try:
            reused = lat.load(lat_file)
        except LatencyError as e:
            raise ConfigError(f"{e} (pass --fresh to measure afresh)") from None
        _say(f"[3/5] {reused} latencies reused from {lat_file}")
    fp32_plan = baselines.fp32(space)
    singles = {f"single {u} {f}": {**fp32_plan, u: f} for _, units, choices in space.parameters()
               for u in units for f in choices if f != "fp32"}
    low = opts.formats[0]
    base = {"fp32": fp32_plan, f"all-{low}": baselines.uniform(space, low),
            f"weighted-only {low}": baselines.weighted_only(space, low)}
    guided = baselines.scan_guided(space, low, drops, SCAN_GUIDED_DROP)
    if guided != base[f"all-{low}"]:
        base[f"scan-guided {low} (drop > {SCAN_GUIDED_DROP:g} in fp32)"] = guided
    _say(f"[3/5] timing FP32, {len(singles)} single-unit plans and the uniform baselines on ONNX Runtime "
         f"({opts.runs} runs each) ...")
    from mixq.search.workers import LatencyLock

    with LatencyLock():  # no other mixq process of this machine times at the same moment
        lat.measure_many([*base.values(), *singles.values()])
    lat.save(lat_file)
    fp32_ms = lat(fp32_plan)
    deltas = {}
    for a in singles.values():
        u, f = next((u, f) for u, f in a.items() if f != "fp32")
        deltas.setdefault(u, {})[f] = lat(a) - fp32_ms
    limit = opts.budget.limit_ms(fp32_ms) if opts.budget is not None else None
    if limit is not None:
        check_budget(opts.budget, limit, fp32_ms, {**{n: lat(a) for n, a in base.items()},
                                                   **{n: lat(a) for n, a in singles.items()}})
    params = weight_counts(q)
    if limit is not None:
        base["greedy fallback"], _ = baselines.greedy_fallback(space, low, drops, lat, limit)
        ilp_plan = baselines.ilp(space, drops, deltas, fp32_ms, limit)
        if ilp_plan is not None:
            base["ILP (additive)"] = ilp_plan
        else:
            notes.append("ILP on additive single-unit latencies: no plan meets the budget by its own (additive) "
                         "account")
    ref_plan = base.get("greedy fallback", base[f"all-{low}"])
    bits_ref = baselines.effective_bits(ref_plan, params)
    wb = baselines.weight_bits(space, fisher, params, bits_ref) if any(params.values()) else None
    if wb is not None:
        base[f"weight-bits (Fisher) {bits_ref:.1f} bits"] = wb
    with LatencyLock():
        lat.measure_many(list(base.values()))
    lat.save(lat_file)
    stages["latency_and_baselines_s"] = time.perf_counter() - t0

    from mixq.evaluate import evaluate_plan

    runner = engine_runner(q, lat, opts)

    def plan(a: dict):
        return plan_of(a, backend, opts)

    def metric_of(a: dict) -> float:
        return evaluate_plan(q, plan(a), search_data, task.metric_fn, engine=runner).metric

    timed = search_latency(lat, space, opts, recorded_fp32_ms(storage, name) or fp32_ms)

    def measured(a: dict) -> float:
        ms = timed(a)
        lat.save(lat_file)
        return ms

    # besides the baselines, weight-bits plans at a ladder of effective bits (Fisher-ranked): cheap, informed starts
    ladder = baselines.weight_bits_ladder(space, fisher, params, baselines.effective_bits(
        base[f"weighted-only {low}"], params)) if any(params.values()) and fisher else {}
    warm = {**base, **{n: a for n, a in ladder.items() if a not in base.values()}}
    t0 = time.perf_counter()
    plan_cache = PlanCache()
    common = dict(budget=opts.budget, front=opts.front, seed=opts.seed, storage=storage, fingerprint=parts,
                  storage_text=storage_text, exclusive=opts.storage is None, cache=plan_cache, fp32_ms=fp32_ms,
                  progress=opts.progress)
    _say(f"[4/5] Optuna study {name!r} ({storage_text}): {opts.trials} trials ({opts.sampler}, seed {opts.seed}), "
         f"warm-started with {len(base)} baselines and {len(warm) - len(base)} weight-bits plans of a ladder ...")
    started: list = []
    if opts.workers > 1:
        pin(0)

    def start_workers(shared) -> None:
        """--workers N: this process is worker 0; N - 1 more join the study now that it is ready."""
        if shared is not None and timed is lat:  # ratio mode: stage 3's absolute numbers are not the study's
            for a, ms in lat.records():  # what stage 3 measured is measured for the whole study
                shared.publish(a, ms)
        started.extend(start_local_workers(d, opts, storage_text))

    res = run_search(space, metric_of, measured, opts.trials, sampler=opts.sampler, warm_start=warm, study_name=name,
                     label=f"search ({opts.sampler})", latency_setup=latency_setup(lat, opts),
                     lock=LatencyLock(), on_ready=start_workers if opts.workers > 1 else None, **common)
    worker_timings = [{"worker": 0, "pid": os.getpid(), **res.timing}] + collect_workers(started)
    first = res
    res = run_search(space, metric_of, measured, opts.trials, sampler=opts.sampler, study_name=name,
                     label="", latency_setup=latency_setup(lat, opts), **{**common, "exclusive": False,
                                                                          "progress": False}) \
        if started else res  # every trial of every worker, now that all have ended
    if started:
        res.timing, res.resumed = worker_timings[0], first.resumed
    _resumed_note(res, notes)
    rand = None
    if opts.random_baseline:
        _say(f"[4/5] random search, the same {opts.trials} trials, evaluated the same way (study {name + '-random'!r}) ...")
        rand = run_search(space, metric_of, measured, opts.trials, sampler="random", study_name=name + "-random",
                          label="random search", **{**common, "seed": opts.seed + 1})
        _resumed_note(rand, notes)
    stages["study_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reported = dict(base)
    selection: dict = {}
    # Without a budget there is no "best" plan: the front is the answer (search-front.json, the chart).
    if limit is not None:
        from mixq.search_final import select_by_retiming

        studies = {"searched": res, **({"random": rand} if rand is not None else {})}
        chosen, selection = select_by_retiming(studies, lat, calib, d, opts, limit)
        for label, r in studies.items():
            what = "the study" if label == "searched" else f"random search ({opts.trials} trials)"
            if not selection[label]:
                notes.append(f"{what}: none of its trials found a plan within the budget")
            elif chosen[label] is None:
                notes.append(f"{what}: none of its {len(selection[label])} best candidates met the budget when "
                             "re-timed in a fresh process")
    if limit is not None and rand is not None and chosen["random"] is not None:
        reported[f"random search ({opts.trials} trials)"] = chosen["random"].assignment
    best = chosen["searched"] if limit is not None else None
    if best is not None:
        reported["searched"] = best.assignment
        if any(params.values()):
            bits = baselines.effective_bits(best.assignment, params)
            wb2 = baselines.weight_bits(space, fisher, params, bits)
            if wb2 is not None:
                reported[f"weight-bits (Fisher) at the searched plan's {bits:.1f} bits"] = wb2
    from mixq.search_final import final_figures

    rows, retimed = final_figures(q, model, task.metric_fn, test_data, reported, lat, plan, metric_of, plan_cache,
                                  d, opts, calib, runner)
    stages["final_s"] = time.perf_counter() - t0
    stages["total_s"] = time.perf_counter() - t_all
    summary = {"task": task.name, "command": opts.command, "backend": backend, "budget": str(opts.budget)
               if opts.budget is not None else None, "budget_value": None if opts.budget is None else
               [opts.budget.value, opts.budget.unit], "front": opts.front, "sampler": opts.sampler, "seed": opts.seed,
               "trials": opts.trials, "study": name, "storage": storage_text, "dashboard": f"optuna-dashboard {dashboard}",
               "fp32_ms": fp32_ms, "limit_ms": limit, "space": {"describe": space.describe(), "kinds": space.kinds,
               "choices": {u: list(c) for u, c in space.choices.items()}},
               "sensitivity": {"source": source, "drops": drops, "fisher": fisher, "single_deltas_ms": deltas,
                               "weights": params},
               "baselines": base, "rows": rows, "retime": retimed, "search": res.to_dict(),
               "random": rand.to_dict() if rand is not None else None, "notes": notes, "stages": stages,
               "selection": selection, "workers": worker_timings, "metric_tolerance": opts.metric_tolerance,
               "chosen_trial": None if best is None else best.number, "evaluate": opts.evaluate,
               "latency_mode": {"mode": "ratio", "rounds": opts.ratio_rounds, "reference_ms": timed.reference_ms}
               if timed is not lat else {"mode": "absolute", "rounds": 1}}
    if best is not None:
        plan(best.assignment).save(d / "search-best.json")
    else:
        (d / "search-best.json").unlink(missing_ok=True)  # not a plan of an earlier run
    from mixq.search_report import write_artifacts

    paths = write_artifacts(summary, d)
    write_atomic(d / "search.json", json.dumps(summary, indent=1, default=str))
    summary["paths"] = paths
    return summary


def _resumed_note(res, notes: list) -> None:
    r = res.resumed
    if r.get("finished_before"):
        notes.append(f"study {res.study_name!r} resumed: {r['finished_before']} trials finished in an earlier session"
                     + (f"; stale RUNNING trial(s) {r['stale_failed']} of a dead process marked FAIL"
                        if r.get("stale_failed") else ""))
    if r.get("running_left"):
        notes.append(f"study {res.study_name!r}: RUNNING trial(s) {r['running_left']} of another process were left "
                     "alone")
