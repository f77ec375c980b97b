"""FP32 vs all-INT8 (and TensorRT FP8) PTQ accuracy for the examples, per calibrator.

    python bench/ptq_accuracy.py [--examples mnist_resnet,minilm] [--out reports/ptq_accuracy] [--split eval|search]

Prints a table and writes JSON + Markdown. Calibration happens once per (backend, method). Every
number comes from ``mixq.evaluate``: the drop against the float model with its paired bootstrap
95% interval over the evaluation samples.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixq  # noqa: E402
from mixq.artifacts import write_atomic  # noqa: E402
from mixq.evaluate import evaluate, evaluate_plan  # noqa: E402
from mixq.task import Task  # noqa: E402

METHODS = ("max", "entropy", "percentile", "mse")
CONFIGS = (("ort-cpu", "int8"), ("tensorrt", "int8"), ("tensorrt", "fp8_e4m3"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", default="mnist_resnet,minilm")
    ap.add_argument("--out", default="reports/ptq_accuracy")
    ap.add_argument("--split", default="eval", choices=("eval", "search"),
                    help="evaluate on the example's evaluation (test) split or on its search split")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.examples.split(","):
        task = Task.example(name)
        if args.split == "search" and task.search_fn is None:
            raise SystemExit(f"--split search: the example {name!r} has no search split")
        model, calib = task.model_fn(), task.calib_fn()
        evald = task.search_fn() if args.split == "search" else task.eval_fn()
        fp32 = evaluate(model, evald, task.metric_fn)
        rows.append(dict(example=name, backend="-", format="fp32", calib_method="-", metric=fp32.metric, drop=0.0,
                         drop_ci=[0.0, 0.0], samples=fp32.samples))
        print(f"{name:14s} {'-':9s} {'fp32':9s} {'-':10s} {fp32.metric:7.2f}  ({fp32.samples} samples)", flush=True)
        for backend, fmt in CONFIGS:
            for method in METHODS if fmt == "int8" else ("max",):
                t0 = time.perf_counter()
                q = mixq.quantize(model, fmt, backend=backend, calib_data=calib, calib_method=method)
                r = evaluate_plan(q, q.mixq.plan, evald, task.metric_fn, reference=fp32)
                rows.append(dict(example=name, backend=backend, format=fmt, calib_method=method, metric=r.metric,
                                 drop=r.drop, drop_ci=list(r.drop_ci), mode=q.mixq.mode,
                                 seconds=time.perf_counter() - t0))
                print(f"{name:14s} {backend:9s} {fmt:9s} {method:10s} {r.metric:7.2f}  (drop {r.drop:+.2f}, 95% "
                      f"[{r.drop_ci[0]:+.2f}, {r.drop_ci[1]:+.2f}])", flush=True)
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps({"command": " ".join(["python"] + sys.argv), "split": args.split, "rows": rows},
                                                      indent=1))
    lines = [f"Command: `python {' '.join(sys.argv)}`", "", f"Data: the examples' {args.split} split.", "",
             "| example | backend | format | calibrator | metric | drop vs FP32 | 95% interval |",
             "|---|---|---|---|---:|---:|---|"]
    lines += [f"| {r['example']} | {r['backend']} | {r['format']} | {r['calib_method']} | {r['metric']:.2f} | "
              f"{r['drop']:+.2f} | [{r['drop_ci'][0]:+.2f}, {r['drop_ci'][1]:+.2f}] |" for r in rows]
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
