"""ONNX Runtime CPU deployment: latency of FP32 / mixq plans / ORT's quantize_static, integer-kernel
counts, and engine-vs-simulation verification.

    python bench/bench_ort.py [--models resnet18,minilm] [--batches 1,8] [--rounds 7]
                              [--verify mnist_resnet,minilm] [--out reports/deploy_ort]

Latency: one intra-op thread; every variant of a model is timed in each of ``--rounds`` rounds,
interleaved (A B C A B C ...) so that load on a shared machine falls on all of them alike; a
variant's latency is the median of its per-round medians, and the spread is the IQR of all its runs.
mixq's models use mixq's own calibrated scales (``mixq.export``); ``quantize_static`` gets the same
calibration batches and the same float graph, in QDQ format with uint8 activations and int8
per-channel weights (MinMax), and runs with ONNX Runtime's default optimizers.

Prints tables and writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixq  # noqa: E402
from mixq.artifacts import write_atomic  # noqa: E402
from mixq.engine.ort import build, count_kernels  # noqa: E402
from mixq.export import apply_plan, export_float_graph, resolve_plan  # noqa: E402
from mixq.plan import QuantPlan  # noqa: E402


# ------------------------------------------------------------------------------------------ models
def load(name: str):
    """(float model, calibration batches, one example batch of size 1) of a latency model."""
    if name == "resnet18":
        from experiments import resnet18 as ex

        return ex.model(), ex.calib_data(4), ex.example_inputs(1)
    if name in ("minilm", "mnist_resnet"):
        from mixq.task import Task

        task = Task.example(name)
        calib = task.calib_fn()
        first = calib[0]
        example = tuple(t[:1] for t in first) if isinstance(first, (tuple, list)) else first[:1]
        return task.model_fn(), calib, example
    raise SystemExit(f"unknown model {name!r}; choose resnet18, minilm or mnist_resnet")


def partial_plans(name: str, kinds: dict[str, str]) -> dict[str, QuantPlan]:
    """Two mixed plans per model: what a precision search typically keeps float."""
    if name == "minilm":
        adds = {u: "fp32" for u, k in kinds.items() if k == "add"}
        ffn_out = {u: "fp32" for u in kinds if u.endswith("output.dense")}
        return {"partial: residual adds fp32": QuantPlan(layers=adds),
                "partial: adds + FFN-out fp32": QuantPlan(layers={**adds, **ffn_out})}
    first_last = {u: "fp32" for u in (next(iter(kinds)), "fc") if u in kinds}
    stage1 = {u: "fp32" for u in kinds if u.startswith("layer1.")}
    return {"partial: first conv + fc fp32": QuantPlan(layers=first_last),
            "partial: layer1 fp32": QuantPlan(layers={**first_last, **stage1})}


def quantize_static_model(float_model: onnx.ModelProto, input_names: list[str], calib: list, tmp: str) -> str:
    """ORT's own static quantization of the same float graph with the same calibration batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            feeds = []
            for b in calib:
                items = b if isinstance(b, (tuple, list)) else (b,)
                feeds.append({n: t.numpy() for n, t in zip(input_names, items)})
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    src, pre, out = (os.path.join(tmp, f) for f in ("fp32.onnx", "pre.onnx", "qs.onnx"))
    onnx.save(float_model, src)
    quant_pre_process(src, pre, skip_symbolic_shape=True)
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


# ------------------------------------------------------------------------------------------ latency
def bench_model(name: str, batches: list[int], rounds: int, runs: dict[int, int]) -> dict:
    model, calib, example = load(name)
    t0 = time.perf_counter()
    q = mixq.quantize(model, "int8", backend="ort-cpu", calib_data=calib)
    t1 = time.perf_counter()
    graph = export_float_graph(q, example)
    t2 = time.perf_counter()
    plans = {"mixq all-INT8": QuantPlan.uniform("int8"), **partial_plans(name, graph.kinds)}
    variants, plan_ms = {}, {}
    for label, plan in plans.items():
        t = time.perf_counter()
        variants[label] = apply_plan(graph, q, plan)
        plan_ms[label] = 1e3 * (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        qs_path = quantize_static_model(graph.float_model(), graph.input_names, calib, tmp)
        engines = {"FP32": build(graph.float_model(), disabled_optimizers=[], example_inputs=example)}
        engines.update({k: build(m, example_inputs=example) for k, m in variants.items()})
        engines["ORT quantize_static"] = build(qs_path, disabled_optimizers=[], example_inputs=example)
        kernels = {}
        for label, e in engines.items():
            quantized = [u for u, f in resolve_plan(graph, plans[label]).items() if f != "fp32"] if label in plans else []
            kernels[label] = count_kernels(e.optimized_model(), graph.unit_nodes, quantized).to_dict()
        rows = []
        for b in batches:
            per_round = {k: [] for k in engines}
            spread = {k: [] for k in engines}
            for _ in range(rounds):
                for label, e in engines.items():
                    lat = e.latency(b, runs=runs[b], warmup=max(2, runs[b] // 10))
                    per_round[label].append(lat["median_ms"])
                    spread[label].append((lat["p25_ms"], lat["p75_ms"]))
            med = {k: float(np.median(v)) for k, v in per_round.items()}
            best = {k: float(np.min(v)) for k, v in per_round.items()}
            for label in engines:
                rows.append({"model": name, "variant": label, "batch": b, "median_ms": med[label],
                             "best_round_ms": best[label],
                             "best_round_speed_vs_quantize_static": best["ORT quantize_static"] / best[label],
                             "p25": float(np.median([s[0] for s in spread[label]])),
                             "p75": float(np.median([s[1] for s in spread[label]])),
                             "round_medians": per_round[label], "speedup_vs_fp32": med["FP32"] / med[label],
                             "speed_vs_quantize_static": med["ORT quantize_static"] / med[label]})
                print(f"{name:9s} b{b} {label:32s} {med[label]:8.2f} ms  x{med['FP32'] / med[label]:.2f} vs FP32  "
                      f"{100 * med['ORT quantize_static'] / med[label]:5.1f}% of quantize_static speed", flush=True)
    return {"model": name, "rows": rows, "kernels": kernels, "plans": {k: p.to_dict() for k, p in plans.items()},
            "plan_ms": plan_ms, "float_graph_s": t2 - t1, "quantize_s": t1 - t0,
            "units": len(graph.kinds)}


# ------------------------------------------------------------------------------------------ verify
def verify_example(name: str) -> list[dict]:
    from mixq.task import Task
    from mixq.verify import verify

    task = Task.example(name)
    model, calib, evald = task.model_fn(), task.calib_fn(), task.eval_fn()
    q = mixq.quantize(model, "int8", backend="ort-cpu", calib_data=calib)
    first = calib[0]
    graph = export_float_graph(q, first)
    plans = {"all-INT8": QuantPlan.uniform("int8"), **partial_plans(name, graph.kinds)}
    out = []
    for label, plan in plans.items():
        t = time.perf_counter()
        res = verify(q, plan, evald, task.metric_fn, graph=graph, noise_floor=True)
        d = {"example": name, "plan_label": label, "seconds": time.perf_counter() - t, **res.to_dict()}
        out.append(d)
        print(f"{name:12s} {label:30s} {res.summary()}", flush=True)
    return out


# ------------------------------------------------------------------------------------------ report
def markdown(result: dict) -> str:
    lines = ["# ONNX Runtime CPU deployment: latency, integer kernels, engine vs simulation", "",
             f"Generated by `{result['command']}` on {result['machine']} (onnxruntime {result['onnxruntime']}, "
             f"torch {result['torch']}); 1 intra-op thread; medians of {result['rounds']} interleaved rounds. "
             "The machine is shared: a variant's per-round medians vary by up to ~40% between rounds (see "
             "`round_medians` in the JSON), so ratios within ~10% are within noise; 'best round' is the least "
             "disturbed round of each variant.", ""]
    for m in result["latency"]:
        lines += [f"## {m['model']}: latency", "",
                  "| variant | batch | median ms | IQR ms | best round ms | speedup vs FP32 | speed vs quantize_static "
                  "(median / best round) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in m["rows"]:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['median_ms']:.2f} | {r['p25']:.2f}-{r['p75']:.2f} | "
                         f"{r['best_round_ms']:.2f} | {r['speedup_vs_fp32']:.2f}x | "
                         f"{100 * r['speed_vs_quantize_static']:.0f}% / {100 * r['best_round_speed_vs_quantize_static']:.0f}% |")
        lines += ["", f"Float graph exported once in {m['float_graph_s']:.2f} s; each plan's model built from it in "
                  + ", ".join(f"{v:.0f} ms" for v in m["plan_ms"].values()) + ".", "",
                  "| variant | integer kernels | float ops with Q/DQ around | quantized layers that stayed float |",
                  "|---|---|---|---|"]
        for label, k in m["kernels"].items():
            ints = ", ".join(f"{op} {n}" for op, n in sorted(k["integer"].items())) or "-"
            flt = ", ".join(f"{op} {n}" for op, n in sorted(k["float_qdq"].items())) or "-"
            lost = ", ".join(k["units_float"]) or "none"
            lines.append(f"| {label} | {k['num_integer']} ({ints}) | {k['num_float_qdq']} ({flt}) | {lost} |")
        lines.append("")
    if result.get("verify"):
        lines += ["## Engine vs simulation (`mixq verify`)", "",
                  "Targets: top-1 agreement (per-sample metric agreement for embeddings) >= 99.5%, "
                  "|metric difference| <= 0.2 points. The noise floor is the float64 simulation against the "
                  "float32 one: two correct implementations that differ only in float rounding.", "",
                  "| example | plan | samples | agreement | cosine mean / min | max err (output steps) | "
                  "metric engine / sim (diff) | targets met | noise floor: agreement, cosine min, metric diff | "
                  "within noise floor |",
                  "|---|---|---:|---:|---|---:|---|---|---|---|"]
        for v in result["verify"]:
            e, n = v["engine"], v["noise_floor"] or {}
            agree = e["top1_agreement"] if e["top1_agreement"] is not None else e["score_agreement"]
            nagree = n.get("top1_agreement") if n.get("top1_agreement") is not None else n.get("score_agreement")
            steps = "-" if e["max_err_steps"] is None else f"{e['max_err_steps']:.1f}"
            lines.append(
                f"| {v['example']} | {v['plan_label']} | {e['samples']} | {100 * agree:.2f}% | "
                f"{e['cosine_mean']:.5f} / {e['cosine_min']:.5f} | {steps} | {e['metric']:.2f} / {e['metric_ref']:.2f} "
                f"({e['metric_diff']:+.2f}) | {'yes' if v['passed'] else 'no'} | "
                f"{100 * nagree:.2f}%, {n.get('cosine_min', float('nan')):.5f}, {n.get('metric_diff', 0.0):+.2f} | "
                f"{'yes' if v['within_noise_floor'] else 'no'} |")
        lines.append("")
        notes = []
        for v in result["verify"]:
            if not v["passed"] and v["within_noise_floor"]:
                notes.append(f"- {v['example']} / {v['plan_label']}: misses the targets, but the float64 simulation "
                             "misses them against the float32 simulation by as much: the plan is chaotic (a last-bit "
                             "float difference flips a rounding, and the flip grows layer by layer), so no engine "
                             "that is not bit-identical to PyTorch's float32 kernels can meet them.")
            elif not v["passed"]:
                notes.append(f"- {v['example']} / {v['plan_label']}: misses the targets and is outside the noise floor.")
        if notes:
            lines += ["Notes:", "", *notes, ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,minilm")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--runs", default="1:30,8:8", help="timed runs per round per batch size, e.g. 1:30,8:8")
    ap.add_argument("--verify", default="mnist_resnet,minilm", help="examples to verify ('' to skip)")
    ap.add_argument("--out", default="reports/deploy_ort")
    ap.add_argument("--render", default=None, help="only rewrite the Markdown from this JSON result")
    args = ap.parse_args()
    if args.render:
        result = json.loads(Path(args.render).read_text())
        write_atomic(Path(args.render).with_suffix(".md"), markdown(result))
        return 0
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    runs = {int(k): int(v) for k, v in (p.split(":") for p in args.runs.split(","))}
    runs = {b: runs.get(b, 20) for b in batches}
    import onnxruntime

    result = {"command": " ".join(["python", *sys.argv]), "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "rounds": args.rounds,
              "latency": [bench_model(m, batches, args.rounds, runs) for m in args.models.split(",") if m],
              "verify": [v for ex in args.verify.split(",") if ex for v in verify_example(ex)]}
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(result, indent=1))
    write_atomic(out.with_suffix(".md"), markdown(result))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
