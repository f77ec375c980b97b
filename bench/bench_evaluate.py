"""What a plan's metric costs: the fake-quant simulation against the plan's model on ONNX Runtime (`--evaluate engine`).

    python bench/bench_evaluate.py --example effnet_fashion --plans int8,weighted --out reports/evaluate_effnet_fashion

For each plan (``int8``: every unit INT8; ``weighted``: INT8 on weighted layers only) on the example's search split (its evaluation split where it has none):
the simulation's seconds and metric, the engine's build and run seconds and metric, and the fraction of samples on
which the two give the same score. Both run on one intra-op thread (the machine is shared); the order alternates
between plans. Prints a table, writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixq.artifacts import write_atomic  # noqa: E402
from mixq.errors import MixqError  # noqa: E402
from mixq.evaluate import EngineRunner, eval_batches, evaluate, evaluate_plan  # noqa: E402
from mixq.export import export_float_graph  # noqa: E402
from mixq.formats import WEIGHTED_KINDS  # noqa: E402
from mixq.plan import QuantPlan  # noqa: E402
from mixq.quantize import applied, quantize  # noqa: E402
from mixq.task import Task  # noqa: E402

PLANS = ("int8", "weighted")


def _plan(name: str, qmodel) -> QuantPlan:
    if name == "int8":
        return QuantPlan.uniform("int8", "ort-cpu")
    weighted = {u: "int8" for u, kind in qmodel.mixq.kinds.items() if kind in WEIGHTED_KINDS}
    return QuantPlan(backend="ort-cpu", default="fp32", layers=weighted)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", default="mnist_resnet")
    ap.add_argument("--plans", default="int8,weighted", help=f"comma-separated, of {', '.join(PLANS)}")
    ap.add_argument("--batches", type=int, default=None, help="only the first N batches of the split")
    ap.add_argument("--out", default=None, help="output stem (default reports/evaluate_<example>)")
    args = ap.parse_args()
    names = args.plans.split(",")
    bad = [n for n in names if n not in PLANS]
    if args.batches is not None and args.batches < 1:
        raise SystemExit(f"--batches must be at least 1, got {args.batches}")
    if bad:
        raise SystemExit(f"--plans {bad[0]!r} is not a plan here; valid: {', '.join(PLANS)}")
    torch.set_num_threads(1)
    out = Path(args.out or f"reports/evaluate_{args.example}")
    try:
        task = Task.example(args.example)
    except MixqError as e:
        raise SystemExit(f"bench_evaluate: {e}") from None
    model = task.model_fn().eval()
    calib = task.calib_fn()
    split = "search" if task.search_fn is not None else "evaluation (the example has no search split)"
    data = eval_batches((task.search_fn or task.eval_fn)())[: args.batches]
    q = quantize(model, QuantPlan.uniform("int8", "ort-cpu"), calib_data=calib)
    example = data[0][0]
    t0 = time.perf_counter()
    graph = export_float_graph(q, example if isinstance(example, tuple) else (example,))
    trace_s = time.perf_counter() - t0
    runner = EngineRunner(q, graph, threads=1)
    rows = []
    for name in names:
        plan = _plan(name, q)
        t0 = time.perf_counter()
        sim = evaluate_plan(q, plan, data, task.metric_fn)
        sim_s = time.perf_counter() - t0
        with applied(q, plan):
            t0 = time.perf_counter()
            engine_model = runner.model(q.mixq.plan)
            build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng = evaluate(engine_model, data, task.metric_fn)
        run_s = time.perf_counter() - t0
        same = float(np.mean(sim.scores == eng.scores))
        rows.append({"plan": name, "samples": sim.samples, "sim_s": sim_s, "sim_metric": sim.metric,
                     "engine_build_s": build_s, "engine_run_s": run_s, "engine_metric": eng.metric,
                     "same_score": same, "speedup": sim_s / (build_s + run_s)})
        print(f"{name}: simulation {sim_s:.1f} s ({sim.metric:.2f}), engine {build_s:.1f} + {run_s:.1f} s "
              f"({eng.metric:.2f}); same score on {same:.2%} of {sim.samples}", flush=True)
    summary = {"command": "python " + " ".join(sys.argv), "example": task.name, "split": split, "trace_s": trace_s, "threads": 1,
               "rows": rows, "torch": torch.__version__}
    lines = [f"# Evaluating a plan: simulation vs ONNX Runtime ({task.name}, {split} split)", "",
             f"Command: `{summary['command']}`. One intra-op thread each; the float graph was traced once in "
             f"{trace_s:.1f} s (the search does it anyway for latency).", "",
             "| plan | samples | simulation s | simulation metric | engine build s | engine run s | engine metric | "
             "same score | speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['plan']} | {r['samples']} | {r['sim_s']:.1f} | {r['sim_metric']:.2f} | {r['engine_build_s']:.2f} "
              f"| {r['engine_run_s']:.1f} | {r['engine_metric']:.2f} | {r['same_score']:.2%} | {r['speedup']:.1f}x |"
              for r in rows]
    md = "\n".join(lines) + "\n"
    write_atomic(out.with_suffix(".json"), json.dumps(summary, indent=1))
    write_atomic(out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
