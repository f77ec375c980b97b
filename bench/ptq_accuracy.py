"""FP32 vs all-INT8 (and TensorRT FP8) PTQ accuracy for the examples, per calibrator.

    python bench/ptq_accuracy.py [--examples mnist_resnet,minilm] [--out reports/ptq_accuracy]

Prints a table and writes JSON + Markdown. Calibration happens once per (backend, method).
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
from mixq.task import Task, evaluate  # noqa: E402

METHODS = ("max", "entropy", "percentile", "mse")
CONFIGS = (("ort-cpu", "int8"), ("tensorrt", "int8"), ("tensorrt", "fp8_e4m3"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", default="mnist_resnet,minilm")
    ap.add_argument("--out", default="reports/ptq_accuracy")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.examples.split(","):
        task = Task.example(name)
        model, calib, evald = task.model_fn(), task.calib_fn(), task.eval_fn()
        fp32, _ = evaluate(model, evald, task.metric_fn)
        rows.append(dict(example=name, backend="-", format="fp32", calib_method="-", metric=fp32, drop=0.0))
        print(f"{name:14s} {'-':9s} {'fp32':9s} {'-':10s} {fp32:7.2f}", flush=True)
        for backend, fmt in CONFIGS:
            for method in METHODS if fmt == "int8" else ("max",):
                t0 = time.perf_counter()
                q = mixq.quantize(model, fmt, backend=backend, calib_data=calib, calib_method=method)
                val, _ = evaluate(q, evald, task.metric_fn)
                rows.append(dict(example=name, backend=backend, format=fmt, calib_method=method, metric=val,
                                 drop=fp32 - val, mode=q.mixq.mode, seconds=time.perf_counter() - t0))
                print(f"{name:14s} {backend:9s} {fmt:9s} {method:10s} {val:7.2f}  (drop {fp32 - val:+.2f})", flush=True)
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps({"command": " ".join(["python"] + sys.argv), "rows": rows},
                                                      indent=1))
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             "| example | backend | format | calibrator | metric | drop vs FP32 |", "|---|---|---|---|---:|---:|"]
    lines += [f"| {r['example']} | {r['backend']} | {r['format']} | {r['calib_method']} | {r['metric']:.2f} | "
              f"{r['drop']:+.2f} |" for r in rows]
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
