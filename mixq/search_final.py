"""Final figures of ``mixq search``: every reported plan on the test split, and re-timed in a fresh process.

The test split is never seen by the search. Latency: each distinct plan is exported once from the calibrated
model (the one saved in ``RUN/search-cache/calibrated``) to ``RUN/search-final/<n>.onnx`` with the FP32 graph
beside it; ``mixq.search_retime`` then builds every session in a new Python process and times FP32 and the
plan back to back, ``rounds`` times. A plan meets the budget when its re-measured median does: ``x`` budgets
compare the median ratio to the FP32 run next to it, ``ms`` budgets the median milliseconds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mixq.search_prep import CACHE

SUBDIR = "search-final"


class TestScores:
    """Per-sample test-split scores of the plans already evaluated, in a JSON file of the search's cache folder.

    Baselines recur between searches of one run folder (other budgets, seeds, a resumed run); their test-split
    evaluation, the most expensive step of the final figures, is done once. The file is keyed by plan and lives in
    the cache folder, which is refused for another model, data or backend and discarded by ``--fresh``; the
    simulation and the engine keep separate files.
    """

    def __init__(self, path: Path) -> None:
        import json

        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.is_file() else {}

    @staticmethod
    def _key(k: Any) -> str:
        return k if isinstance(k, str) else ",".join(f"{u}={f}" for u, f in k)

    def get(self, k: Any) -> Any:
        """The cached evaluation (a ``PlanEvaluation`` without a reference), or None."""
        import numpy as np

        from mixq.evaluate import PlanEvaluation

        s = self.data.get(self._key(k))
        if s is None:
            return None
        a = np.asarray(s, dtype=np.float64)
        return PlanEvaluation(float(a.mean()), a)

    def put(self, k: Any, scores: Any) -> None:
        import json

        from mixq.artifacts import write_atomic

        self.data[self._key(k)] = [float(x) for x in scores]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.data))


def retime_plans(reported: dict, lat: Any, calib: Any, folder: Path, opts: Any) -> tuple[dict, dict, dict]:
    """Export each distinct plan of ``reported`` (name -> assignment) to ``folder`` and re-time them all in one
    fresh process, each interleaved with FP32.

    Returns:
        (name -> re-timing of its plan, name -> ONNX path, the whole re-timing result).
    """
    import numpy as np

    from mixq.export import save_onnx
    from mixq.search import PlanCache
    from mixq.search_retime import retime_in_fresh_process

    folder.mkdir(parents=True, exist_ok=True)
    distinct: dict[tuple, int] = {}
    for a in reported.values():
        distinct.setdefault(PlanCache.key(a), len(distinct))
    fp32_plan = {u: "fp32" for u in next(iter(reported.values()))}
    save_onnx(lat.onnx_model(fp32_plan), folder / "fp32.onnx")
    paths = {}
    for a in reported.values():
        i = distinct[PlanCache.key(a)]
        if i not in paths:
            paths[i] = str(save_onnx(lat.onnx_model(a), folder / f"plan{i}.onnx"))
    example = calib[0][:1] if not isinstance(calib[0], (tuple, list)) else tuple(t[:1] for t in calib[0])
    items = example if isinstance(example, (tuple, list)) else (example,)
    inputs = []
    for j, t in enumerate(items):
        p = folder / f"input{j}.npy"
        np.save(p, t.detach().cpu().numpy())
        inputs.append(str(p))
    job = {"fp32": str(folder / "fp32.onnx"), "plans": {str(i): p for i, p in paths.items()}, "inputs": inputs,
           "threads": 1, "runs": opts.runs, "warmup": 5, "min_seconds": opts.retime_seconds, "rounds": opts.rounds,
           "clock": "thread", "disabled_optimizers": None}
    retimed = retime_in_fresh_process(job, folder)
    by_name = {n: retimed["plans"][str(distinct[PlanCache.key(a)])] for n, a in reported.items()}
    onnx = {n: paths[distinct[PlanCache.key(a)]] for n, a in reported.items()}
    return by_name, onnx, retimed


def meets_budget(budget: Any, t: dict, fp32_ms: float) -> tuple[bool, float, float]:
    """(meets, margin ms, margin fraction) of one re-timed plan ``t`` (a ``retime_plans`` entry)."""
    return budget.margin(t["median_ms"], t["ratio"], fp32_ms)


def final_figures(q: Any, model: Any, metric_fn: Callable, test_data: Any, reported: dict, lat: Any,
                  plan_of: Callable, metric_of: Callable, plan_cache: Any, d: Path, opts: Any,
                  calib: Any, engine: Any = None) -> tuple[list, dict]:
    """Evaluate ``reported`` plans (name -> assignment) on the test split; re-time them in a fresh process.

    With ``engine`` (``mixq.evaluate.EngineRunner``) the plans and the FP32 reference run on ONNX Runtime.

    Returns:
        (one row per reported plan, the re-timing result).
    """
    from mixq.evaluate import against, evaluate, evaluate_plan
    from mixq.search import PlanCache

    print(f"[5/5] final figures: {len(reported)} plans on the test split; latencies re-timed in a fresh process, "
          f"interleaved with FP32 ({opts.rounds} rounds) ...", flush=True)
    by_name, onnx, retimed = retime_plans(reported, lat, calib, d / SUBDIR, opts)
    scores = TestScores(d / CACHE / f"test-scores-{opts.evaluate}.json")
    ref = scores.get("fp32 reference")
    if ref is None:
        ref = evaluate(model, test_data, metric_fn) if engine is None else \
            evaluate_plan(q, plan_of({u: "fp32" for u in next(iter(reported.values()))}), test_data, metric_fn,
                          engine=engine)
        scores.put("fp32 reference", ref.scores)
    evals: dict[int, Any] = {}
    rows = []
    for name, a in reported.items():
        k = PlanCache.key(a)
        if k not in evals:
            evals[k] = scores.get(k)
            if evals[k] is None:
                evals[k] = evaluate_plan(q, plan_of(a), test_data, metric_fn, engine=engine)
                scores.put(k, evals[k].scores)
            evals[k] = against(evals[k], ref)
        ev = evals[k]
        if k not in plan_cache.metrics:
            plan_cache.metrics[k] = metric_of(a)
        t = by_name[name]
        # the study's figure when it timed the plan (a ratio to FP32 in ms of the reference, with a relative budget)
        search_ms = plan_cache.latencies[k] if k in plan_cache.latencies else lat(a)
        row = {"plan": name, "low_units": sum(f != "fp32" for f in a.values()), "units": len(a),
               "search_metric": plan_cache.metrics[k], "search_latency_ms": search_ms, "test_metric": ev.metric,
               "drop": ev.drop, "drop_ci": list(ev.drop_ci), "latency_ms": t["median_ms"], "ratio": t["ratio"],
               "rounds_ms": t["rounds_ms"], "ratios": t["ratios"], "onnx": onnx[name], "assignment": a,
               "within_budget": None, "margin_ms": None, "margin_frac": None}
        if opts.budget is not None:
            ok, m_ms, m_frac = opts.budget.margin(t["median_ms"], t["ratio"], retimed["fp32_ms"])
            row.update(within_budget=ok, margin_ms=m_ms, margin_frac=m_frac)
        rows.append(row)
    return rows, {"fp32_ms": retimed["fp32_ms"], "seconds": retimed["seconds"], "rounds": opts.rounds,
                  "runs": retimed.get("runs", opts.runs), "fp32_metric": ref.metric}


def select_by_retiming(results: dict, lat: Any, calib: Any, d: Path, opts: Any, limit_ms: float) -> tuple[dict, dict]:
    """Choose each study's plan (``mixq.search.choose``): its best candidates re-timed in one fresh process.

    Args:
        results: label -> SearchResult (the study, the random search).
        limit_ms: the budget in ms (from the in-process FP32 latency; only the candidate list uses it).

    Returns:
        (label -> chosen TrialRecord or None, label -> the candidates with their re-timing, for the report).
    """
    from mixq.search import PlanCache
    from mixq.search.choose import Retimed, candidates, choose

    cands = {label: candidates(r.records, limit_ms, opts.metric_tolerance, opts.candidates)
             for label, r in results.items()}
    pool = {f"{label} #{c.number}": c.assignment for label, cs in cands.items() for c in cs}
    if not pool:
        return {label: None for label in results}, {label: [] for label in results}
    print(f"[5/5] choosing: {len(pool)} candidate plans (best metric, then the fastest) re-timed in a fresh "
          f"process before one is chosen ...", flush=True)
    by_name, _, retimed = retime_plans(pool, lat, calib, d / SUBDIR / "candidates", opts)
    verdict: dict[tuple, Retimed] = {}
    log: dict[str, list] = {}
    for label, cs in cands.items():
        log[label] = []
        for c in cs:
            t = by_name[f"{label} #{c.number}"]
            ok, m_ms, _ = meets_budget(opts.budget, t, retimed["fp32_ms"])
            verdict[PlanCache.key(c.assignment)] = Retimed(ok, t["median_ms"], m_ms)
            log[label].append({"trial": c.number, "metric": c.metric, "search_latency_ms": c.latency_ms,
                               "retimed_ms": t["median_ms"], "ratio": t["ratio"], "meets": ok, "margin_ms": m_ms})
    chosen = {label: choose(cs, verdict) for label, cs in cands.items()}
    for label, c in chosen.items():
        for row in log[label]:
            row["chosen"] = c is not None and row["trial"] == c.number
    return chosen, log
