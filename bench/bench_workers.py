"""Trials per minute of 1 and of N worker processes on one Optuna study (the latency lock in place).

    python bench/bench_workers.py --example minilm --trials 16 --workers 1,2 --out reports/bench_workers_minilm

The model is calibrated once (int8, max) and saved; each worker process loads it (one intra-op thread, one core),
measures plans on ONNX Runtime under the machine's latency lock (latencies shared through the study) and
evaluates them on the example's search split (its eval split when it has none). Each worker count runs its own
study of ``--trials`` trials in a fresh journal file, TPE seeded ``seed + 1000 * worker``, budget ``--budget``.
Trials per minute are counted from the first worker's start of the study to the last worker's end; the time
split (evaluate, measure, wait for the lock, storage, sampler, idle) is summed over the workers. Writes
``OUT.json`` and ``OUT.md`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One worker: load the calibrated model, run the study, print timing and wall span as JSON."""
    from mixq.checkpoint import load_quantized
    from mixq.evaluate import evaluate_plan
    from mixq.latency.ort import OrtLatency
    from mixq.plan import QuantPlan
    from mixq.search import Budget, SearchSpace, open_storage, run_search
    from mixq.search.workers import LatencyLock
    from mixq.search_join import pin
    from mixq.search_prep import _example_batch
    from mixq.task import Task

    pin(args.index)
    task = Task.example(args.example)
    data = task.search_fn() if task.search_fn is not None else task.eval_fn()
    calib = task.calib_fn()
    q = load_quantized(task.model_fn(), Path(args.out_dir) / "calibrated", calib_data=calib)
    space = SearchSpace.build(q.mixq.kinds, "ort-cpu", ["int8"])
    lat = OrtLatency(q, _example_batch(calib[0]), runs=args.runs)

    def metric(a: dict) -> float:
        plan = QuantPlan(backend="ort-cpu", default="fp32", layers={u: f for u, f in a.items() if f != "fp32"})
        return evaluate_plan(q, plan, data, task.metric_fn).metric

    journal = Path(args.out_dir) / "bench.journal"
    t0 = time.time()
    res = run_search(space, metric, lat, args.trials, Budget.parse(args.budget), front=args.front, sampler="tpe",
                     seed=args.seed + 1000 * args.index, storage=open_storage(str(journal), journal),
                     study_name=args.study, exclusive=False, latency_setup={**lat.setup.to_dict(), "runs": args.runs},
                     lock=LatencyLock(), fingerprint={"bench": args.example, "budget": args.budget})
    best = res.best
    print(json.dumps({"index": args.index, "start": t0, "end": time.time(), "timing": res.timing,
                      "best": None if best is None else {"number": best.number, "metric": best.metric,
                                                          "latency_ms": best.latency_ms,
                                                          "int8_units": best.low_units},
                      "fp32_ms": res.fp32_ms, "limit_ms": res.limit_ms}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--example", default="minilm")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--budget", default="0.8x")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--front", action="store_true", help="two objectives: every plan is evaluated, so each trial "
                                                         "is the same work (budget mode skips over-budget plans)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/bench_workers_minilm")
    p.add_argument("--work-dir", default=None, help="where the calibrated model and the journal go")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--study", default="", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import mixq
    from mixq.checkpoint import save_quantized
    from mixq.plan import QuantPlan
    from mixq.task import Task

    work = Path(args.work_dir or f"/tmp/mixq-bench-workers-{args.example}")
    work.mkdir(parents=True, exist_ok=True)
    (work / "bench.journal").unlink(missing_ok=True)
    t = time.perf_counter()
    if not (work / "calibrated" / "mixq.json").is_file():
        task = Task.example(args.example)
        q = mixq.quantize(task.model_fn(), QuantPlan(backend="ort-cpu", default="fp32", calib_method="max"),
                          calib_data=task.calib_fn(), formats=["int8"])
        save_quantized(q, work / "calibrated")
    print(f"calibrated model ready ({time.perf_counter() - t:.0f} s)", flush=True)
    load = os.getloadavg()
    rows = []
    for n in [int(x) for x in args.workers.split(",")]:
        study = f"bench-{n}-workers"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, __file__, "--worker", "--example", args.example, "--trials", str(args.trials),
               "--budget", args.budget, *(["--front"] if args.front else []), "--runs", str(args.runs), "--seed", str(args.seed), "--study", study,
               "--out-dir", str(work)]
        procs = [subprocess.Popen([*cmd, "--index", str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for k in range(n)]
        outs = []
        for pr in procs:
            o, e = pr.communicate()
            if pr.returncode != 0:
                raise SystemExit(f"worker failed: {e[-3000:]}")
            outs.append(json.loads(o.strip().splitlines()[-1]))
        span = max(o["end"] for o in outs) - min(o["start"] for o in outs)
        split = {k: sum(o["timing"][k] for o in outs) for k in ("evaluate_s", "measure_s", "lock_wait_s",
                                                                 "storage_s", "sampler_s", "idle_s")}
        best = max((o["best"] for o in outs if o["best"]), key=lambda b: b["metric"], default=None)
        evaluated = sum(o["timing"]["evaluated"] for o in outs)
        rows.append({"workers": n, "trials": args.trials, "wall_s": span, "trials_per_min": 60 * args.trials / span,
                     "per_worker_trials": [o["timing"]["trials"] for o in outs], "split_s": split, "evaluated": evaluated,
                     "s_per_evaluation": split["evaluate_s"] / max(evaluated, 1),
                     "measured": sum(o["timing"]["measured_here"] or 0 for o in outs),
                     "reused": sum(o["timing"]["latencies_reused"] or 0 for o in outs), "best": best,
                     "fp32_ms": outs[0]["fp32_ms"], "limit_ms": outs[0]["limit_ms"]})
        r = rows[-1]
        print(f"{n} worker(s): {r['trials_per_min']:.2f} trials/min ({span:.0f} s)", flush=True)
    base = rows[0]["trials_per_min"]
    for r in rows:
        r["speedup"] = r["trials_per_min"] / base
    out = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "example": args.example,
           "cores": len(os.sched_getaffinity(0)), "loadavg_before": load, "loadavg_after": os.getloadavg(),
           "rows": rows}
    head = ("| workers | trials | wall s | trials/min | speedup | evaluate s | measure s | lock wait s | storage s | "
            "sampler s | idle s | evaluated (s each) | plans measured / reused | best metric (latency ms) |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        s = r["split_s"]
        b = r["best"]
        lines.append(f"| {r['workers']} | {r['trials']} | {r['wall_s']:.0f} | {r['trials_per_min']:.2f} | "
                     f"{r['speedup']:.2f}x | {s['evaluate_s']:.0f} | {s['measure_s']:.0f} | {s['lock_wait_s']:.1f} | "
                     f"{s['storage_s']:.1f} | {s['sampler_s']:.1f} | {s['idle_s']:.1f} | {r['evaluated']} "
                     f"({r['s_per_evaluation']:.1f}) | {r['measured']} / "
                     f"{r['reused']} | " + (f"{b['metric']:.2f} ({b['latency_ms']:.2f})" if b else "none") + " |")
    table = "\n".join(lines)
    print(table)
    mode = "two objectives (--front: every plan evaluated)" if args.front else f"budget {args.budget}"
    md = (f"# Several workers on one study: {args.example}, {mode}\n\nCommand: `{out['command']}`\n\n{out['cores']} cores; "
          f"load average before {load[0]:.2f}, after {out['loadavg_after'][0]:.2f} (the machine is shared with "
          f"other jobs). FP32 {rows[0]['fp32_ms']:.3f} ms, budget {args.budget} = {rows[0]['limit_ms']:.3f} ms.\n\n"
          f"{table}\n\nSeconds are summed over the workers; wall s is from the first worker's start of the study "
          "to the last one's end (loading the model before it is not counted).\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    Path(args.out + ".md").write_text(md)
    print(f"wrote {args.out}.json, {args.out}.md")


if __name__ == "__main__":
    main()
