"""The torch side of ``mixq search``: calibrate, sensitivity, single-unit latencies, baselines, studies, final figures.

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
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mixq.errors import ConfigError, MixqError

CACHE = "search-cache"
SCAN_GUIDED_DROP = 0.5  # metric points: a unit that alone costs more stays float in the scan-guided baseline
JOURNAL = "search-study.journal"


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
    progress: bool = True
    command: str = ""
    batch_axis: Any = 0
    workers: int = 1
    ratio_rounds: int = 3
    join: bool = False
    worker_index: int = 0
    argv: list = field(default_factory=list)


def _say(text: str) -> None:
    print(text, flush=True)


def _example_batch(batch):
    return tuple(t[:1] for t in batch) if isinstance(batch, (tuple, list)) else batch[:1]


def study_name(task_name: str, opts: SearchOptions) -> str:
    """The study name: ``--study`` or ``<task>-<budget>`` (``-front`` with --front)."""
    if opts.study:
        return opts.study
    b = opts.budget
    text = "front" if b is None else (f"{b.value:g}ms" if b.unit == "ms" else f"{b.value:g}x")
    return f"{task_name}-{text}" + ("-front" if opts.front and b is not None else "")


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


def fingerprint_parts(task, model, calib, search_data, backend: str, opts: SearchOptions) -> dict:
    """What the caches and the study depend on, each part hashed on its own (a mismatch says what changed)."""
    import onnxruntime

    from mixq.latency.stats import cpu_model
    from mixq.sensitivity.store import digest, fingerprint

    parts = fingerprint(model, calib, search_data, task.metric_fn, {})
    parts.pop("settings", None)
    parts.update({"task": task.name, "backend": backend, "formats": ",".join(opts.formats),
                  "calib_method": opts.calib_method,
                  "latency": digest(onnxruntime.__version__, cpu_model(), 1, "thread", opts.runs, str(opts.batch_axis)),
                  "budget": str(opts.budget) if opts.budget is not None else "none",
                  "objective": "metric+latency" if opts.front else "metric"})
    if ratio_mode(opts):  # absolute studies keep their fingerprint; relative ones made before ratio mode are refused
        parts["latency_mode"] = f"ratio to FP32, {opts.ratio_rounds} rounds"
    return parts


def _cache_parts(parts: dict) -> dict:
    return {k: v for k, v in parts.items() if k not in ("budget", "objective", "latency_mode")}


def ratio_mode(opts: SearchOptions) -> bool:
    """Whether the study judges plans by their ratio to FP32 timed next to them (a relative budget)."""
    return opts.budget is not None and opts.budget.unit == "x"


def search_latency(lat, space, opts: SearchOptions, reference_ms: Optional[float]):
    """What the study times a plan with: ``lat`` itself (absolute budget, or none), or, with a relative budget,
    its ratio to FP32 timed back to back with it (``RatioLatency``) in milliseconds of ``reference_ms``.

    Absolute milliseconds drift up to 2x under load on a shared machine; a ratio to an FP32 run made next to the
    plan does not, and ``ratio * reference <= budget * reference`` is the constraint the study records.
    """
    if not ratio_mode(opts):
        return lat
    from mixq.latency.base import RatioLatency
    from mixq.search import baselines

    return RatioLatency(lat, baselines.fp32(space), opts.ratio_rounds, reference_ms)


def recorded_fp32_ms(storage: Any, name: str) -> Optional[float]:
    """The FP32 latency an existing study's budget is relative to (None: no such study, or none recorded)."""
    from mixq.search.workers import FP32_ATTR

    try:
        v = storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get(FP32_ATTR)
    except KeyError:
        return None
    return None if v is None else float(v)


def check_cache(folder: Path, parts: dict) -> None:
    """Refuse a cache folder made for another model / data / backend; create it when missing.

    Raises:
        ConfigError: naming the parts that differ.
    """
    from mixq.artifacts import write_atomic
    from mixq.search.storage import _PART_WORDS

    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "fingerprint.json"
    want = _cache_parts(parts)
    if p.is_file():
        old = json.loads(p.read_text())
        changed = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
        if changed:
            raise ConfigError(f"{str(folder)!r} holds calibration, sensitivity and latencies of another search ("
                              + ", ".join(_PART_WORDS.get(k, k) for k in changed) + " changed); pass --fresh to "
                              "discard them, or use another --run-dir.")
    else:
        write_atomic(p, json.dumps(want, indent=1))


def check_study_before_work(storage: Any, name: str, parts: dict, storage_text: str) -> None:
    """Refuse an existing study made for another search, before anything expensive runs."""
    from mixq.search.storage import FINGERPRINT_ATTR, check_fingerprint

    try:
        sid = storage.get_study_id_from_name(name)
    except KeyError:
        return

    class _View:  # check_fingerprint reads these two attributes
        study_name = name
        user_attrs = storage.get_study_user_attrs(sid)
        trials = storage.get_all_trials(sid, deepcopy=False)

    if _View.user_attrs.get(FINGERPRINT_ATTR) is not None or _View.trials:
        check_fingerprint(_View, parts, storage_text)


def discard(storage: Any, names: list[str], cache: Path) -> None:
    """--fresh: delete the studies and the cache folder."""
    import optuna

    for n in names:
        try:
            optuna.delete_study(study_name=n, storage=storage)
        except KeyError:
            pass
    shutil.rmtree(cache, ignore_errors=True)


def calibrated_model(model, calib, backend: str, opts: SearchOptions, cache: Path):
    """The model calibrated for every format of the space: loaded from the cache, or calibrated and saved."""
    import mixq
    from mixq.checkpoint import load_quantized, read_meta, save_quantized
    from mixq.plan import QuantPlan

    path = cache / "calibrated"
    if (path / "mixq.json").is_file():
        meta = read_meta(path)
        if meta["backend"] == backend and meta["calib_method"] == opts.calib_method and \
                set(opts.formats) <= set(meta["formats"]):
            _say(f"[1/5] calibrated model from {path}")
            return load_quantized(model, path, calib_data=calib)
    _say(f"[1/5] calibrating {', '.join(opts.formats)} ({backend}, {opts.calib_method}) ...")
    q = mixq.quantize(model, QuantPlan(backend=backend, default="fp32", calib_method=opts.calib_method),
                      calib_data=calib, formats=opts.formats, progress="calibrate" if opts.progress else None)
    save_quantized(q, path)
    return q


def weight_counts(q) -> dict:
    """Unit -> number of weights (0 for functional ops): the cost ModelOpt's effective bits count."""
    from mixq.quant.graph import units

    out = {}
    for name, m in units(q).items():
        w = getattr(m, "weight", None)
        out[name] = int(w.numel()) if w is not None and hasattr(w, "numel") else 0
    return {u: out.get(u, 0) for u in q.mixq.kinds}


def sensitivity(q, calib, search_data, task, cache: Path, opts: SearchOptions) -> tuple[dict, dict, Any]:
    """One-at-a-time drops and Fisher scores per unit and format, on the search split (cached)."""
    from mixq.sensitivity import scan

    _say("[2/5] one-at-a-time sensitivity and Fisher proxy on the search split ...")
    table = scan(q, calib, search_data, task.metric_fn, modes="one-at-a-time", proxies=True, progress=opts.progress,
                 task_name=task.name, store=cache / "scan.jsonl", seed=0)  # not the study's seed: the table serves every study
    drops, fisher = {}, {}
    for r in table.rows:
        if r.drop is not None:
            drops.setdefault(r.layer, {})[r.format] = float(r.drop)
        if r.fisher is not None:
            fisher.setdefault(r.layer, {})[r.format] = float(r.fisher)
    return drops, fisher, table


def imported_sensitivity(path: str, model, calib, search_data, task, backend: str, opts: SearchOptions
                         ) -> tuple[dict, dict]:
    """Drops and Fisher scores from a ``mixq scan --split search`` table of this very model, data and backend.

    Raises:
        ConfigError: the file is not a sensitivity table, was made for another model / data / metric /
            backend / calibration method (fingerprint), or lacks a unit or format of the space.
    """
    from mixq.evaluate import eval_batches
    from mixq.sensitivity.store import digest, fingerprint

    try:
        data = json.loads(Path(path).read_text())
        rows, fp = data["rows"], data["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--sensitivity {path!r} is not a sensitivity table written by `mixq scan` ({e}).") from None
    settings = {"backend": backend, "calib_method": opts.calib_method, "quant_mode": "auto", "proxy_data": "calib",
                "seed": 0}
    want = digest(fingerprint(model, calib, eval_batches(search_data), task.metric_fn, settings))
    if fp != want:
        raise ConfigError(f"--sensitivity {path!r} was made for another model, data, metric, backend or calibration "
                          f"(fingerprint {fp}, this search needs {want}); make it with `mixq scan --example "
                          f"{task.name} --split search --backend {backend} --calib-method {opts.calib_method}` "
                          "(seed 0), or leave --sensitivity out and the search scans itself.")
    drops, fisher = {}, {}
    for r in rows:
        if r.get("drop") is not None:
            drops.setdefault(r["layer"], {})[r["format"]] = float(r["drop"])
        if r.get("fisher") is not None:
            fisher.setdefault(r["layer"], {})[r["format"]] = float(r["fisher"])
    missing = [f for f in opts.formats if not any(f in per for per in drops.values())]
    if missing:
        raise ConfigError(f"--sensitivity {path!r} has no drops for format(s) {', '.join(missing)}; it holds "
                          f"{', '.join(sorted({f for per in drops.values() for f in per}))}. Scan those formats too.")
    return drops, fisher


def check_budget(budget, limit: float, fp32_ms: float, measured: dict) -> None:
    """A budget below the fastest plan measured, or at/above FP32, is refused before the study.

    Raises:
        ConfigError: naming the fastest plan (and its latency) or the plans faster than FP32.
    """
    name, ms = min(measured.items(), key=lambda kv: kv[1])
    if limit < ms:
        raise ConfigError(f"budget {budget} ({limit:.3f} ms) is below the fastest plan measured: {name} at {ms:.3f} ms "
                          f"({ms / fp32_ms:.2f}x of FP32 {fp32_ms:.3f} ms); no plan is known to meet it. Give a "
                          f"budget of at least {ms:.3f} ms ({ms / fp32_ms:.2f}x).")
    if limit >= fp32_ms:
        faster = sorted(((n, m) for n, m in measured.items() if m < fp32_ms and not n.startswith("single ")),
                        key=lambda kv: kv[1])
        listed = "; ".join(f"{n} {m:.3f} ms ({m / fp32_ms:.2f}x)" for n, m in faster[:5]) or "none measured"
        raise ConfigError(f"budget {budget} ({limit:.3f} ms) is at or above FP32 latency ({fp32_ms:.3f} ms): it is "
                          f"trivially met by FP32, which loses nothing. Faster plans: {listed}. Give a budget below "
                          f"FP32, e.g. {0.9 * fp32_ms:.3f}ms or 0.9x.")


def run(task, d: Path, backend: str, opts: SearchOptions, storage: Any, storage_text: str, dashboard: str) -> dict:
    """Run the whole search (see the module docstring); write every artifact; return the summary dict."""
    from mixq.artifacts import write_atomic
    from mixq.latency.base import LatencyError
    from mixq.latency.ort import OrtLatency
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
    else:
        drops, fisher, _ = sensitivity(q, calib, search_data, task, cache, opts)
    stages["calibrate_and_sensitivity_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from mixq.cli_deploy import float_graph_of

    class _Args:
        batch_axis = opts.batch_axis

    graph = float_graph_of(q, calib, _Args)
    lat = OrtLatency(q, _example_batch(calib[0]), runs=opts.runs, float_graph=graph)
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

    from mixq.evaluate import evaluate, evaluate_plan
    from mixq.plan import QuantPlan

    def plan_of(a: dict) -> QuantPlan:
        return QuantPlan(backend=backend, default="fp32", layers={u: f for u, f in a.items() if f != "fp32"},
                         calib_method=opts.calib_method)

    def metric_of(a: dict) -> float:
        return evaluate_plan(q, plan_of(a), search_data, task.metric_fn).metric

    timed = search_latency(lat, space, opts, recorded_fp32_ms(storage, name) or fp32_ms)

    def measured(a: dict) -> float:
        ms = timed(a)
        lat.save(lat_file)
        return ms

    t0 = time.perf_counter()
    plan_cache = PlanCache()
    common = dict(budget=opts.budget, front=opts.front, seed=opts.seed, storage=storage, fingerprint=parts,
                  storage_text=storage_text, exclusive=opts.storage is None, cache=plan_cache, fp32_ms=fp32_ms,
                  progress=opts.progress)
    _say(f"[4/5] Optuna study {name!r} ({storage_text}): {opts.trials} trials ({opts.sampler}, seed {opts.seed}), "
         f"warm-started with {len(base)} baselines ...")
    started: list = []
    if opts.workers > 1:
        pin(0)

    def start_workers(shared) -> None:
        """--workers N: this process is worker 0; N - 1 more join the study now that it is ready."""
        if shared is not None and timed is lat:  # ratio mode: stage 3's absolute numbers are not the study's
            for a, ms in lat.records():  # what stage 3 measured is measured for the whole study
                shared.publish(a, ms)
        started.extend(start_local_workers(d, opts, storage_text))

    res = run_search(space, metric_of, measured, opts.trials, sampler=opts.sampler, warm_start=base, study_name=name,
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

    rows, retimed = final_figures(q, model, task.metric_fn, test_data, reported, lat, plan_of, metric_of, plan_cache,
                                  d, opts, calib)
    stages["final_s"] = time.perf_counter() - t0
    stages["total_s"] = time.perf_counter() - t_all
    summary = {"task": task.name, "command": opts.command, "backend": backend, "budget": str(opts.budget)
               if opts.budget is not None else None, "budget_value": None if opts.budget is None else
               [opts.budget.value, opts.budget.unit], "front": opts.front, "sampler": opts.sampler, "seed": opts.seed,
               "trials": opts.trials, "study": name, "storage": storage_text, "dashboard": f"optuna-dashboard {dashboard}",
               "fp32_ms": fp32_ms, "limit_ms": limit, "space": {"describe": space.describe(), "kinds": space.kinds,
               "choices": {u: list(c) for u, c in space.choices.items()}},
               "sensitivity": {"drops": drops, "fisher": fisher, "single_deltas_ms": deltas, "weights": params},
               "baselines": base, "rows": rows, "retime": retimed, "search": res.to_dict(),
               "random": rand.to_dict() if rand is not None else None, "notes": notes, "stages": stages,
               "selection": selection, "workers": worker_timings, "metric_tolerance": opts.metric_tolerance,
               "chosen_trial": None if best is None else best.number,
               "latency_mode": {"mode": "ratio", "rounds": opts.ratio_rounds, "reference_ms": timed.reference_ms}
               if timed is not lat else {"mode": "absolute", "rounds": 1}}
    if best is not None:
        plan_of(best.assignment).save(d / "search-best.json")
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


# ----------------------------------------------------------------------------- several workers
def latency_setup(lat, opts: SearchOptions) -> dict:
    """What a latency of this search depends on: a study refuses latencies measured with anything else."""
    mode = {"ratio_to_fp32_rounds": opts.ratio_rounds} if ratio_mode(opts) else {}
    return {**lat.setup.to_dict(), "runs": opts.runs, "warmup": lat.warmup, **mode}


def start_local_workers(d: Path, opts: SearchOptions, storage_text: str) -> list:
    """Start workers 1 .. N-1 of ``--workers N``: the same command with ``--join``, one core each.

    Returns:
        the processes (``subprocess.Popen``; their stdout's last line is their timing as JSON).
    """
    import subprocess

    argv, skip = [], False
    for a in opts.argv:
        if skip:
            skip = False
            continue
        if a in ("--workers", "--worker-index", "--storage", "--run-dir"):
            skip = True
            continue
        if a.split("=")[0] in ("--workers", "--worker-index", "--storage", "--run-dir") or a in ("--fresh", "--join"):
            continue
        argv.append(a)
    storage = opts.storage if opts.storage is not None else str(d / JOURNAL)
    root = str(Path(__file__).resolve().parents[1])  # the workers run this very mixq, wherever it was imported from
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}
    procs = []
    for k in range(1, opts.workers):
        cmd = [sys.executable, "-m", "mixq.cli", *argv, "--run-dir", str(d), "--storage", storage, "--join",
               "--worker-index", str(k), "--no-progress"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    _say(f"[4/5] started {len(procs)} more worker process(es) on the study ({storage_text}): pids "
         f"{', '.join(str(p.pid) for p in procs)}")
    return procs


def collect_workers(procs: list) -> list:
    """Wait for the workers; their timings. A worker that failed is reported, its trials were re-queued."""
    out = []
    for k, p in enumerate(procs, start=1):
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            print(f"mixq: warning: worker {k} (pid {p.pid}) ended with status {p.returncode}: "
                  f"{stderr.strip().splitlines()[-1] if stderr.strip() else ''}", file=sys.stderr)
            out.append({"worker": k, "pid": p.pid, "returncode": p.returncode})
            continue
        try:
            out.append({"worker": k, "pid": p.pid, **json.loads(stdout.strip().splitlines()[-1])})
        except (ValueError, IndexError):
            out.append({"worker": k, "pid": p.pid, "returncode": p.returncode})
    return out


def pin(index: int) -> None:
    """One intra-op thread for torch, and (Linux; ``index >= 0``) one core for the process: worker k on core k."""
    import torch

    torch.set_num_threads(1)
    if index >= 0 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[index % len(cores)]})


def join(task, d: Path, backend: str, opts: SearchOptions, storage: Any, storage_text: str) -> dict:
    """``--join``: work on an existing study until it holds ``--trials`` finished trials; print the timing.

    The calibrated model comes from ``RUN/search-cache/calibrated`` (what the first worker saved) or is made
    there (another machine). Nothing else is written to the run folder; the study holds the results.

    Raises:
        ConfigError: the study does not exist, or was made for another model / data / backend (fingerprint).
    """
    from mixq.latency.ort import OrtLatency
    from mixq.search import SearchSpace, run_search
    from mixq.search.workers import LatencyLock

    name = study_name(task.name, opts)
    pin(opts.worker_index if opts.worker_index else -1)  # a --join of its own keeps the cores it was given
    search_data = task.search_fn() if task.search_fn is not None else task.eval_fn()
    model, calib = task.model_fn(), task.calib_fn()
    parts = fingerprint_parts(task, model, calib, search_data, backend, opts)
    check_study_before_work(storage, name, parts, storage_text)
    cache = d / CACHE
    cache.mkdir(parents=True, exist_ok=True)
    opts.progress = False
    q = calibrated_model(model, calib, backend, opts, cache)
    space = SearchSpace.build(q.mixq.kinds, backend, opts.formats)
    from mixq.cli_deploy import float_graph_of

    class _Args:
        batch_axis = opts.batch_axis

    lat = OrtLatency(q, _example_batch(calib[0]), runs=opts.runs, float_graph=float_graph_of(q, calib, _Args))
    timed = search_latency(lat, space, opts, recorded_fp32_ms(storage, name))
    from mixq.evaluate import evaluate_plan
    from mixq.plan import QuantPlan

    def metric_of(a: dict) -> float:
        plan = QuantPlan(backend=backend, default="fp32", layers={u: f for u, f in a.items() if f != "fp32"},
                         calib_method=opts.calib_method)
        return evaluate_plan(q, plan, search_data, task.metric_fn).metric

    # each worker its own sampler seed: equal seeds on one history would propose equal plans
    seed = opts.seed + 1000 * opts.worker_index if opts.worker_index else opts.seed + os.getpid()
    res = run_search(space, metric_of, timed, opts.trials, budget=opts.budget, front=opts.front, sampler=opts.sampler,
                     seed=seed, storage=storage, study_name=name, fingerprint=parts, storage_text=storage_text,
                     exclusive=False, latency_setup=latency_setup(lat, opts), lock=LatencyLock())
    print(json.dumps(res.timing), flush=True)
    return res.timing
