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

SUBDIR = "search-final"


def _within(budget: Any, ms: float, ratio: float, fp32_ms: float) -> tuple[bool, float, float]:
    """(meets the budget, margin in ms, margin as a fraction of the budget); positive margins are inside."""
    if budget.unit == "x":
        margin = budget.value - ratio
        return margin >= 0, margin * fp32_ms, margin / budget.value
    margin = budget.value - ms
    return margin >= 0, margin, margin / budget.value


def final_figures(q: Any, model: Any, metric_fn: Callable, test_data: Any, reported: dict, lat: Any,
                  plan_of: Callable, metric_of: Callable, plan_cache: Any, d: Path, opts: Any,
                  calib: Any) -> tuple[list, dict]:
    """Evaluate ``reported`` plans (name -> assignment) on the test split; re-time them in a fresh process.

    Returns:
        (one row per reported plan, the re-timing result).
    """
    import numpy as np

    from mixq.evaluate import evaluate, evaluate_plan
    from mixq.export import save_onnx
    from mixq.search import PlanCache
    from mixq.search_retime import retime_in_fresh_process

    print(f"[5/5] final figures: {len(reported)} plans on the test split; latencies re-timed in a fresh process, "
          f"interleaved with FP32 ({opts.rounds} rounds) ...", flush=True)
    folder = d / SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    distinct: dict[tuple, int] = {}
    for a in reported.values():
        distinct.setdefault(PlanCache.key(a), len(distinct))
    fp32_plan = {u: "fp32" for u in q.mixq.kinds}
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
           "threads": 1, "runs": opts.runs, "warmup": 5, "min_seconds": opts.retime_seconds, "rounds": opts.rounds, "clock": "thread",
           "disabled_optimizers": None}
    retimed = retime_in_fresh_process(job, folder)
    ref = evaluate(model, test_data, metric_fn)
    evals: dict[int, Any] = {}
    rows = []
    for name, a in reported.items():
        k = PlanCache.key(a)
        i = distinct[k]
        if i not in evals:
            evals[i] = evaluate_plan(q, plan_of(a), test_data, metric_fn, reference=ref)
        ev = evals[i]
        if k not in plan_cache.metrics:
            plan_cache.metrics[k] = metric_of(a)
        t = retimed["plans"][str(i)]
        row = {"plan": name, "low_units": sum(f != "fp32" for f in a.values()), "units": len(a),
               "search_metric": plan_cache.metrics[k], "search_latency_ms": lat(a), "test_metric": ev.metric,
               "drop": ev.drop, "drop_ci": list(ev.drop_ci), "latency_ms": t["median_ms"], "ratio": t["ratio"],
               "rounds_ms": t["rounds_ms"], "ratios": t["ratios"], "onnx": paths[i], "assignment": a,
               "within_budget": None, "margin_ms": None, "margin_frac": None}
        if opts.budget is not None:
            ok, m_ms, m_frac = _within(opts.budget, t["median_ms"], t["ratio"], retimed["fp32_ms"])
            row.update(within_budget=ok, margin_ms=m_ms, margin_frac=m_frac)
        rows.append(row)
    return rows, {"fp32_ms": retimed["fp32_ms"], "seconds": retimed["seconds"], "rounds": opts.rounds,
                  "runs": retimed.get("runs", opts.runs), "fp32_metric": ref.metric}
