"""Regret of the search on a space small enough to enumerate.

    python bench/bench_regret.py --example mnist_resnet --groups 8 --trials 30 --seeds 0,1,2

The example's units are grouped, in model order, into ``--groups`` contiguous groups that each take one
format (ties of the search space: "grouped for enumeration"), so the space has 2**groups plans with INT8.
Every plan is measured once in this process (ONNX Runtime, interleaved rounds, median) and evaluated once
on the search split; the table is saved (``RUN/enumerated.json``) and reused by a rerun. Budgets are set
between the fastest plan and FP32 of that table. The search (TPE, warm-started with FP32 and all-INT8, as
``mixq search`` does) and random search then run on the table itself, through the same callables the
search is always handed (plan -> metric, plan -> ms), so their regret is about the search alone: the true
best feasible metric of the table minus the search's best feasible metric. Reported per budget and seed,
with the trial at which each search came within ``--noise`` points of the true best. ``tpe-cold`` is
TPE without the warm start, to tell what the sampler finds from what the baselines hand it.

Writes reports/regret_<example>.{md,json}.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mixq.search_prep import EVALUATE_MODES  # noqa: E402


def grouped_space(kinds: dict, backend: str, groups: int):
    """Contiguous groups of the searchable units, each one parameter."""
    from mixq.search import SearchSpace

    free = SearchSpace.build(kinds, backend, ["int8"])
    units = [u for _, us, _ in free.parameters() for u in us]
    if not 1 <= groups <= len(units):
        raise SystemExit(f"--groups must be between 1 and {len(units)} (the searchable units), got {groups}")
    size = -(-len(units) // groups)
    chunks = [units[i:i + size] for i in range(0, len(units), size)]
    ties = [(c, "grouped for enumeration") for c in chunks if len(c) > 1]
    return SearchSpace.build(kinds, backend, ["int8"], ties=ties), chunks


def enumerate_space(task, q, calib, space, path: Path, rounds: int, search_batches: int | None,
                    on_engine: bool = False) -> dict:
    """Every plan of ``space``: in-process latency (median of interleaved rounds) and search-split metric (of the
    fake-quant simulation, or with ``on_engine`` of the plan's model on ONNX Runtime)."""
    from mixq.artifacts import write_atomic
    from mixq.cli_deploy import float_graph_of
    from mixq.evaluate import EngineRunner, evaluate_plan
    from mixq.latency.ort import OrtLatency
    from mixq.plan import QuantPlan

    search = task.search_fn() if task.search_fn is not None else task.eval_fn()
    if search_batches is not None:
        search = search[:search_batches]
    names = [(units, choices) for _, units, choices in space.parameters()]
    plans = []
    for combo in itertools.product(*[c for _, c in names]):
        a = {u: "fp32" for u in space.kinds}
        for (units, _), f in zip(names, combo):
            a.update({u: f for u in units})
        plans.append(a)
    done = json.loads(path.read_text()) if path.is_file() else {"plans": []}
    if len(done["plans"]) == len(plans):
        print(f"enumerated table reused: {path}")
        return done

    class _Args:
        batch_axis = 0

    example = tuple(t[:1] for t in calib[0]) if isinstance(calib[0], (tuple, list)) else calib[0][:1]
    lat = OrtLatency(q, example, runs=50, float_graph=float_graph_of(q, calib, _Args))
    t0 = time.perf_counter()
    print(f"measuring {len(plans)} plans ({rounds} interleaved rounds) ...", flush=True)
    ms = lat.measure_many(plans, rounds=rounds)
    t1 = time.perf_counter()
    engine = EngineRunner(q, lat.float_graph) if on_engine else None
    print(f"evaluating {len(plans)} plans on the search split ({'ONNX Runtime' if on_engine else 'simulation'}) ...",
          flush=True)
    rows = []
    for i, (a, m) in enumerate(zip(plans, ms)):
        ev = evaluate_plan(q, QuantPlan(backend=space.backend, default="fp32",
                                        layers={u: f for u, f in a.items() if f != "fp32"}), search, task.metric_fn,
                           engine=engine)
        rows.append({"assignment": a, "latency_ms": m, "metric": ev.metric})
        if (i + 1) % 32 == 0:
            print(f"  {i + 1}/{len(plans)}", flush=True)
    out = {"plans": rows, "measure_s": t1 - t0, "evaluate_s": time.perf_counter() - t1, "rounds": rounds}
    write_atomic(path, json.dumps(out))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", default="mnist_resnet")
    ap.add_argument("--groups", type=int, default=8, help="parameters of the grouped space (<= 12)")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--gaps", default="0.1,0.25,0.5", help="budgets: fastest + gap x (FP32 - fastest)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds per plan")
    ap.add_argument("--noise", type=float, default=0.1, help="metric points counted as within noise")
    ap.add_argument("--search-batches", type=int, default=None,
                    help="evaluate the plans on the first N batches of the search split only (a large example)")
    ap.add_argument("--evaluate", default="simulation", choices=EVALUATE_MODES,
                    help="where each plan's metric is measured (as `mixq search --evaluate`)")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not 1 <= args.groups <= 12:
        raise SystemExit(f"--groups must be between 1 and 12, got {args.groups}")
    from mixq.search import Budget, PlanCache, baselines, run_search
    from mixq.task import Task

    import mixq
    from mixq.plan import QuantPlan

    task = Task.example(args.example)
    calib = task.calib_fn()
    q = mixq.quantize(task.model_fn(), QuantPlan(backend="ort-cpu", default="fp32"), calib_data=calib,
                      formats=["int8"])
    run = Path(args.run_dir or f"runs/bench_regret_{args.example}")
    run.mkdir(parents=True, exist_ok=True)
    space, chunks = grouped_space(q.mixq.kinds, "ort-cpu", args.groups)
    mode = "" if args.evaluate == "simulation" else f"-{args.evaluate}"
    table = enumerate_space(task, q, calib, space, run / f"enumerated-g{args.groups}-b{args.search_batches or 'all'}{mode}.json",
                            args.rounds, args.search_batches, on_engine=args.evaluate == "engine")
    by_key = {PlanCache.key(r["assignment"]): r for r in table["plans"]}
    metric = lambda a: by_key[PlanCache.key(a)]["metric"]
    latency = lambda a: by_key[PlanCache.key(a)]["latency_ms"]
    fp32 = baselines.fp32(space)
    fp32_ms = latency(fp32)
    fastest = min(r["latency_ms"] for r in table["plans"])
    results = []
    for g in [float(x) for x in args.gaps.split(",")]:
        limit = fastest + g * (fp32_ms - fastest)
        feas = [r for r in table["plans"] if r["latency_ms"] <= limit]
        true_best = max(r["metric"] for r in feas)
        for sampler in ("tpe", "tpe-cold", "random"):
            for s in [int(x) for x in args.seeds.split(",")]:
                warm = {"fp32": fp32, "all-int8": baselines.uniform(space, "int8")} if sampler == "tpe" else None
                res = run_search(space, metric, latency, args.trials, Budget(limit, "ms"), sampler=sampler.split("-")[0], seed=s,
                                 warm_start=warm, fp32_ms=fp32_ms)
                got = res.best.metric if res.best is not None else None
                reach = next((i for i, r in enumerate(res.records, 1) if r.feasible and r.metric is not None
                              and r.metric >= true_best - args.noise), None)
                results.append({"gap": g, "limit_ms": limit, "x": limit / fp32_ms, "sampler": sampler, "seed": s,
                                "true_best": true_best, "feasible_plans": len(feas), "found": got,
                                "regret": None if got is None else true_best - got, "trial_within_noise": reach})
    summary = {"command": "python " + " ".join(sys.argv), "example": args.example, "groups": chunks,
               "space_size": len(table["plans"]), "search_batches": args.search_batches, "evaluate": args.evaluate, "trials": args.trials, "noise": args.noise, "fp32_ms": fp32_ms,
               "fastest_ms": fastest, "enumeration": {k: table[k] for k in ("measure_s", "evaluate_s", "rounds")},
               "metric_range": [min(r["metric"] for r in table["plans"]), max(r["metric"] for r in table["plans"])],
               "results": results}
    out = Path(args.out or ROOT / "reports" / f"regret_{args.example}")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    md = markdown(summary)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def markdown(s: dict) -> str:
    sub = "" if s.get("search_batches") is None else f" (its first {s['search_batches']} batches)"
    L = [f"# Search regret on an enumerated space: {s['example']}", "", f"Command: `{s['command']}`", "",
         f"{len(s['groups'])} groups of units (model order; each group takes one format), so {s['space_size']} plans "
         f"with INT8, every one measured in-process ({s['enumeration']['rounds']} interleaved rounds, "
         f"{s['enumeration']['measure_s']:.0f} s) and evaluated on the search split"
         f"{sub} "
         f"({'on ONNX Runtime, ' if s.get('evaluate') == 'engine' else ''}{s['enumeration']['evaluate_s']:.0f} s). Search-split metric over the space: "
         f"{s['metric_range'][0]:.2f} to {s['metric_range'][1]:.2f}; FP32 {s['fp32_ms']:.3f} ms, fastest plan "
         f"{s['fastest_ms']:.3f} ms. Searches run on the table (the same callables `mixq search` is handed), "
         f"{s['trials']} trials; regret = best feasible metric of the table - the search's; 'within noise' = within "
         f"{s['noise']:g} points.", "", "Groups: " + "; ".join(f"{i}: {', '.join(c)}" for i, c in enumerate(s["groups"])),
         "", "| budget x FP32 | feasible plans | true best | sampler | regret per seed | median regret | trial within noise per seed |",
         "|---:|---:|---:|---|---|---:|---|"]
    keys = sorted({(r["gap"], r["sampler"]) for r in s["results"]}, key=lambda k: (k[0], ["tpe", "tpe-cold", "random"].index(k[1])))
    for g, smp in keys:
        rs = [r for r in s["results"] if r["gap"] == g and r["sampler"] == smp]
        reg = [r["regret"] for r in rs]
        med = statistics.median([x for x in reg if x is not None]) if any(x is not None for x in reg) else None
        L.append(f"| {rs[0]['x']:.3f} | {rs[0]['feasible_plans']} | {rs[0]['true_best']:.2f} | {smp} | "
                 + ", ".join("-" if x is None else f"{x:.2f}" for x in reg) + f" | {'-' if med is None else f'{med:.2f}'} | "
                 + ", ".join(str(r["trial_within_noise"]) for r in rs) + " |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
