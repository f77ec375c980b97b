"""``mixq search``: a plan per unit under a latency budget measured on the engine, against the baselines.

    mixq search --example mnist_resnet --budget 0.8x --trials 30
    -> RUN/search.json, RUN/search.md, RUN/search-best.json (the plan)

Stages: calibrate once for every format of the space; one-at-a-time sensitivity on the search split (``mixq
scan``'s exact scan of the prepared model); single-unit latencies; the baselines (FP32, uniform low format,
weighted layers only, greedy fallback, ILP); the Optuna study warm-started with them; then every reported plan
is evaluated on the test split (never seen by the search) and re-timed, interleaved with FP32.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from mixq.errors import MixqError


def register(sub, add_task_args: Callable, task_of: Callable, run_dir_of: Callable) -> None:
    """Add the ``search`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("search", help="per-unit formats under a latency budget measured on ONNX Runtime",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p)
    p.add_argument("--budget", default=None, help="latency budget: '6.5ms', or '0.6x' / '60%%' of FP32 (required "
                                                  "unless --front)")
    p.add_argument("--front", action="store_true", help="two objectives (metric, latency): the Pareto front")
    p.add_argument("--trials", type=int, default=40, help="Optuna trials, baselines included (default 40)")
    p.add_argument("--sampler", default="tpe", help="tpe (default, multivariate), nsga2, gp or random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--formats", default="int8", help="comma-separated low formats of the space (default int8)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per latency measurement (median)")
    p.add_argument("--calib-method", default="max", help="max (default), entropy, percentile or mse")
    p.set_defaults(func=lambda a: cmd_search(a, task_of, run_dir_of))


def _example_batch(batch):
    return tuple(t[:1] for t in batch) if isinstance(batch, (tuple, list)) else batch[:1]


def cmd_search(args: argparse.Namespace, task_of: Callable, run_dir_of: Callable) -> int:
    from mixq.calib_methods import check_calib_method
    from mixq.search import SAMPLERS, Budget

    task = task_of(args)
    backend = args.backend or "ort-cpu"
    if backend != "ort-cpu":
        raise MixqError(f"mixq search measures latency on ONNX Runtime CPU here; --backend {backend} needs its engine "
                        "(TensorRT), which this command does not drive yet.")
    if args.budget is None and not args.front:
        raise MixqError("give a latency budget (--budget 0.6x, or --budget 6.5ms), or --front for the Pareto front.")
    budget = Budget.parse(args.budget) if args.budget is not None else None
    if args.sampler not in SAMPLERS:
        raise MixqError(f"unknown sampler {args.sampler!r}; valid samplers are {', '.join(SAMPLERS)}.")
    if args.trials < 1 or args.runs < 1:
        raise MixqError(f"--trials and --runs must be at least 1, got {args.trials} and {args.runs}.")
    method = check_calib_method(args.calib_method)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    d = run_dir_of(args, task)
    return _search(args, task, d, backend, budget, formats, method)


def _search(args, task, d: Path, backend: str, budget, formats: list, method: str) -> int:
    import mixq
    from mixq.artifacts import write_atomic
    from mixq.cli_deploy import float_graph_of
    from mixq.evaluate import evaluate, evaluate_plan
    from mixq.latency.ort import OrtLatency
    from mixq.plan import QuantPlan
    from mixq.search import SearchSpace, baselines, run_search
    from mixq.sensitivity import scan

    t0 = time.perf_counter()
    search_data = task.search_fn() if task.search_fn is not None else None
    test_data = task.eval_fn()
    if search_data is None:
        print("mixq: warning: the task has no search split; the search and the final figures use the same "
              "evaluation data (give the example a search_data function to keep them apart)", file=sys.stderr)
        search_data = test_data
    model, calib = task.model_fn(), task.calib_fn()
    print(f"[1/5] {task.name}: calibrating {', '.join(formats)} ({backend}, {method}) ...", flush=True)
    q = mixq.quantize(model, QuantPlan(backend=backend, default="fp32", calib_method=method), calib_data=calib,
                      formats=formats, progress="calibrate")
    space = SearchSpace.build(q.mixq.kinds, backend, formats)
    print(f"[1/5] space: {space.describe()}", flush=True)

    def plan_of(a: dict) -> QuantPlan:
        return QuantPlan(backend=backend, default="fp32", layers={u: f for u, f in a.items() if f != "fp32"},
                         calib_method=method)

    print("[2/5] one-at-a-time sensitivity on the search split ...", flush=True)
    table = scan(q, None, search_data, task.metric_fn, modes="one-at-a-time", proxies=False, progress=False,
                 task_name=task.name)
    drops = {}
    for r in table.rows:
        if r.drop is not None:
            drops.setdefault(r.layer, {})[r.format] = float(r.drop)
    graph = float_graph_of(q, calib, args)
    lat = OrtLatency(q, _example_batch(calib[0]), runs=args.runs, float_graph=graph)
    fp32_plan = baselines.fp32(space)
    singles = [{**fp32_plan, u: f} for name, units, choices in space.parameters() for u in units
               for f in choices if f != "fp32"]
    print(f"[3/5] timing FP32 and {len(singles)} single-unit plans on ONNX Runtime ({args.runs} runs each) ...",
          flush=True)
    lat.measure_many([fp32_plan, *singles])
    fp32_ms = lat(fp32_plan)
    deltas = {}
    for a in singles:
        u, f = next((u, f) for u, f in a.items() if f != "fp32")
        deltas.setdefault(u, {})[f] = lat(a) - fp32_ms
    low = formats[0]
    limit = budget.limit_ms(fp32_ms) if budget is not None else None
    base = {"fp32": fp32_plan, f"all-{low}": baselines.uniform(space, low),
            f"weighted-only {low}": baselines.weighted_only(space, low)}
    if limit is not None:
        base["greedy fallback"], _ = baselines.greedy_fallback(space, low, drops, lat, limit)
        ilp_plan = baselines.ilp(space, drops, deltas, fp32_ms, limit)
        if ilp_plan is not None:
            base["ILP (additive)"] = ilp_plan
    n_random = max(args.trials - len(base), 0)
    print(f"[4/5] Optuna study: {args.trials} trials ({args.sampler}, seed {args.seed}), warm-started with "
          f"{len(base)} baselines ...", flush=True)

    def metric_of(a: dict) -> float:
        return evaluate_plan(q, plan_of(a), search_data, task.metric_fn).metric

    res = run_search(space, metric_of, lat, args.trials, budget, front=args.front, sampler=args.sampler,
                     seed=args.seed, warm_start=base)
    rand = baselines.random_plans(space, n_random, seed=args.seed + 1)
    rand_recs = [(a, lat(a)) for a in rand]
    rand_ok = [a for a, ms in rand_recs if limit is None or ms <= limit]
    rand_best = max(rand_ok, key=metric_of) if rand_ok else None

    print("[5/5] final figures: test split, latency re-measured interleaved with FP32 ...", flush=True)
    reported = dict(base)
    notes = []
    if rand_best is not None:
        reported[f"random search ({n_random} plans)"] = rand_best
    elif n_random:
        notes.append(f"random search: none of {n_random} random plans met the budget")
    if limit is not None and "ILP (additive)" not in base:
        notes.append("ILP on additive single-unit latencies: no plan meets the budget by its own (additive) account")
    if res.best is None:
        notes.append("the study found no plan within the budget")
    if res.best is not None:
        reported["searched"] = res.best.assignment
    ref = evaluate(model, test_data, task.metric_fn)
    # A new cache: every reported plan is timed again, three rounds interleaved with FP32.
    final = OrtLatency(q, _example_batch(calib[0]), runs=args.runs, float_graph=graph)
    final.measure_many([fp32_plan, *reported.values()], rounds=3)
    fp32_final = final(fp32_plan)
    limit_final = budget.limit_ms(fp32_final) if budget is not None else None
    rows = []
    for name, a in reported.items():
        ev = evaluate_plan(q, plan_of(a), test_data, task.metric_fn, reference=ref)
        ms = final(a)
        rows.append({"plan": name, "low_units": sum(f != "fp32" for f in a.values()), "units": len(a),
                     "latency_ms": ms, "ratio": ms / fp32_final,
                     "within_budget": limit_final is None or ms <= limit_final,
                     "margin_ms": None if limit_final is None else limit_final - ms, "test_metric": ev.metric,
                     "drop": ev.drop, "drop_ci": list(ev.drop_ci), "assignment": a})
    md = _markdown(task.name, budget, fp32_final, limit_final, rows, res, args, notes)
    print(md)
    if res.best is not None:
        plan_of(res.best.assignment).save(d / "search-best.json")
    write_atomic(d / "search.json", json.dumps({"task": task.name, "budget": str(budget) if budget else None,
                                                "rows": rows, "search": res.to_dict(),
                                                "seconds": time.perf_counter() - t0}, indent=1, default=str))
    write_atomic(d / "search.md", md)
    print(f"wrote {d / 'search.json'}, {d / 'search.md'}" + (f", {d / 'search-best.json'}" if res.best else ""))
    return 0


def _markdown(name, budget, fp32_ms, limit, rows, res, args, notes=()) -> str:
    t = res.timing
    lines = [f"# Search on {name}", "",
             f"Budget: {budget} -> {limit:.3f} ms (FP32 {fp32_ms:.3f} ms, re-measured with every plan below, three "
             f"rounds interleaved). The study ran on the search split; every metric below is on the test split."
             if limit else
             f"Pareto front; FP32 {fp32_ms:.3f} ms.", "",
             f"Study: {t['trials']} trials ({args.sampler}, seed {args.seed}), {t['evaluated']} evaluated; time "
             f"evaluate {t['evaluate_s']:.1f} s, measure {t['measure_s']:.1f} s, Optuna {t['optuna_s']:.1f} s.", "",
             "| plan | low units | latency ms | x FP32 | within budget | test metric | drop [95% CI] |",
             "|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lo, hi = r["drop_ci"]
        lines.append(f"| {r['plan']} | {r['low_units']}/{r['units']} | {r['latency_ms']:.3f} | {r['ratio']:.2f} | "
                     f"{'yes' if r['within_budget'] else 'no'} | {r['test_metric']:.2f} | "
                     f"{r['drop']:+.2f} [{lo:+.2f}, {hi:+.2f}] |")
    lines += [""] + [f"- {n}" for n in notes] if notes else []
    return "\n".join(lines) + "\n"
