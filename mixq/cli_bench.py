"""``mixq bench``: latency of FP32, all-INT8 and partial plans, measured on an engine or read from trtexec.

    mixq bench --example resnet18                         # ONNX Runtime CPU, 1 thread
    mixq bench --example minilm --random 8 --plan p.json  # + 8 random partial plans + your plan
    mixq bench --example resnet18 --backend tensorrt      # TensorRT engines (needs a GPU)
    mixq bench --example resnet18 --backend tensorrt \\
        --trtexec fp32=fp32_profile.json,fp32_times.json --trtexec int8=int8_profile.json,int8_times.json

Writes ``RUN/bench.json`` and ``RUN/bench.md`` (and ``--report PATH`` for a copy to keep).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from mixq.errors import MixqError, SpecError

# Examples that only serve latency work (no evaluation data): name -> module.
LATENCY_ONLY_EXAMPLES = {"resnet18": "experiments.resnet18"}


def register(sub: Any, add_task_args: Callable, task_of: Callable, run_dir_of: Callable) -> None:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("bench", help="latency table of FP32, all-INT8 and partial plans",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p)
    p.add_argument("--format", default="int8", help="the low format of the uniform and partial plans (default int8)")
    p.add_argument("--plan", action="append", default=[], help="a plan JSON file to measure too (repeatable)")
    p.add_argument("--random", type=int, default=4, help="random partial plans to measure (seeded; default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="batch size to time (default 1)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per plan (median)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--clock", default="auto", help="ort-cpu: thread (CPU time), wall, or auto (default)")
    p.add_argument("--disabled-optimizers", default="default",
                   help="ort-cpu: graph optimizers to switch off: default (mixq.engine.ort's), none, or a comma list")
    p.add_argument("--trtexec", action="append", default=[], metavar="FMT=PROFILE[,TIMES]",
                   help="read a trtexec --exportProfile (and --exportTimes) file of an engine with every layer "
                        "in FMT instead of measuring (repeatable; needs FMT=fp32)")
    p.add_argument("--report", default=None, help="also write the Markdown table here (e.g. reports/latency_x.md)")
    p.set_defaults(func=lambda args: cmd_bench(args, task_of, run_dir_of))


def _task(args: argparse.Namespace, task_of: Callable):
    """(name, model_fn, calib_fn) for the task; latency-only examples need no eval data or metric."""
    from mixq.task import load_spec

    if args.example in LATENCY_ONLY_EXAMPLES and not args.model:
        mod = LATENCY_ONLY_EXAMPLES[args.example]
        return args.example, load_spec(f"{mod}:model"), load_spec(f"{mod}:calib_data")
    if args.model and args.calib and not (args.eval or args.metric):
        return args.model.partition(":")[0].rsplit(".", 1)[-1], load_spec(args.model), load_spec(args.calib)
    t = task_of(args)
    return t.name, t.model_fn, t.calib_fn


def _example(batch: Any, n: int) -> Any:
    if isinstance(batch, (tuple, list)):
        return tuple(t[:n] for t in batch)
    if isinstance(batch, dict):
        raise MixqError("bench times models whose batches are a Tensor or a tuple of Tensors, not a dict.")
    return batch[:n]


def _plans(args: argparse.Namespace, units: tuple, backend: str) -> list[tuple[str, dict]]:
    import numpy as np

    from mixq.latency.base import assignment_of
    from mixq.plan import QuantPlan

    low = args.format
    kinds = {u: k for u, k in units}
    names = [u for u, _ in units]
    plans = [("fp32", assignment_of({}, kinds, backend)),
             (f"all-{low}", assignment_of(QuantPlan(backend=backend, default=low), kinds, backend))]
    if len(names) > 2:
        ends = {names[0]: "fp32", names[-1]: "fp32"}
        plans.append((f"{low}, first and last layer fp32",
                      assignment_of(QuantPlan(backend=backend, default=low, layers=ends), kinds, backend)))
    for path in args.plan:
        plans.append((Path(path).name, assignment_of(QuantPlan.load(path), kinds, backend)))
    rng = np.random.default_rng(args.seed)
    full = plans[1][1]
    quantizable = [u for u in names if full[u] != "fp32"]
    for i in range(args.random):
        share = rng.uniform(0.15, 0.85)
        chosen = {u: low for u in quantizable if rng.random() < share}
        plans.append((f"random {i + 1} ({len(chosen)}/{len(quantizable)} {low})", assignment_of(chosen, kinds, backend)))
    return plans


def cmd_bench(args: argparse.Namespace, task_of: Callable, run_dir_of: Callable) -> int:
    import mixq
    from mixq.artifacts import write_atomic
    from mixq.formats import get_backend

    backend = get_backend(args.backend or "ort-cpu").name
    name, model_fn, calib_fn = _task(args, task_of)
    d = run_dir_of(args, SimpleNamespace(name=name))  # the run folder is named after the task; checked before work
    model = model_fn()
    calib = list(calib_fn())
    if not calib:
        raise MixqError("the calibration loader yielded no batch; bench needs at least one.")
    example = _example(calib[0], args.batch)
    t0 = time.perf_counter()
    if args.trtexec:
        rows, extra = _from_trtexec(args, model, example, backend)
        source = "trtexec profiles"
    else:
        q = mixq.quantize(model, args.format, backend=backend, calib_data=calib[:4])
        plans = _plans(args, tuple(q.mixq.kinds.items()), backend)
        if backend == "ort-cpu":
            from mixq.latency.ort import OrtLatency

            disabled = None if args.disabled_optimizers == "default" else \
                tuple(x for x in args.disabled_optimizers.split(",") if x and x != "none")
            lat = OrtLatency(q, example, runs=args.runs, warmup=args.warmup, clock=args.clock,
                             disabled_optimizers=disabled)
            off = "mixq.engine.ort's default" if disabled is None else ", ".join(disabled) or "none"
            source = f"ONNX Runtime CPU, 1 intra-op thread, {lat.clock} clock, graph optimizers switched off: {off}"
        else:
            lat = _tensorrt_latency(q, example, args)
            source = "TensorRT engine, CUDA events"
        lat.measure_many([a for _, a in plans])
        fp32 = lat(plans[0][1])
        rows = []
        for label, a in plans:
            st = lat.details(a)
            rows.append({"plan": label, "low_units": sum(f != "fp32" for f in a.values()), "units": len(a),
                         "median_ms": st["median_ms"], "p25_ms": st.get("p25_ms"), "p75_ms": st.get("p75_ms"),
                         "speedup": fp32 / st["median_ms"],
                         **({"precision_mismatches": st["precision_mismatches"]} if "precision_mismatches" in st else {}),
                         "assignment": a})
        extra = {}
    md = _markdown(name, backend, source, args, rows, extra)
    print(md)
    result = {"task": name, "backend": backend, "source": source, "batch": args.batch, "rows": rows, **extra,
              "seconds": time.perf_counter() - t0}
    write_atomic(d / "bench.json", json.dumps(result, indent=1))
    write_atomic(d / "bench.md", md)
    written = [d / "bench.json", d / "bench.md"]
    if args.report:
        written.append(write_atomic(args.report, md))
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def _tensorrt_latency(q: Any, example: Any, args: argparse.Namespace):
    import tempfile

    from mixq.export import apply_plan, export_float_graph, save_onnx
    from mixq.latency.tensorrt import TensorRTLatency
    from mixq.plan import QuantPlan

    graph = export_float_graph(q, example)
    tmp = Path(tempfile.mkdtemp(prefix="mixq-trt-"))

    def export_fn(a: dict) -> Path:
        return save_onnx(apply_plan(graph, q, QuantPlan(backend="tensorrt", default="fp32", layers=a)), tmp / "plan.onnx")

    shapes = {n: tuple(t.shape) for n, t in zip(graph.input_names, example if isinstance(example, tuple) else (example,))}
    node_map = {n: u for u, nodes in graph.unit_nodes.items() for n in nodes}
    return TensorRTLatency(export_fn, q.mixq.kinds, runs=max(args.runs, 100), warmup=max(args.warmup, 20),
                           node_map=node_map, input_shapes=shapes)


def _from_trtexec(args: argparse.Namespace, model: Any, example: Any, backend: str) -> tuple[list, dict]:
    import mixq
    from mixq.latency.graph_edges import unit_graph
    from mixq.latency.trtexec import TrtexecLatency, table_from_files

    profiles, times = {}, {}
    for spec in args.trtexec:
        fmt, sep, files = spec.partition("=")
        if not sep or not files:
            raise SpecError(f"--trtexec takes FMT=PROFILE[,TIMES], e.g. int8=int8_profile.json,int8_times.json; "
                            f"got {spec!r}.")
        parts = files.split(",")
        profiles[fmt] = parts[0]
        if len(parts) > 1:
            times[fmt] = parts[1]
    q = mixq.prepare(model, backend)
    graph = unit_graph(q)
    node_map = None
    try:
        from mixq.export import export_float_graph

        fg = export_float_graph(q, example)
        node_map = {n: u for u, nodes in fg.unit_nodes.items() for n in nodes}
    except MixqError:
        pass  # fall back to module paths in the node names
    table = table_from_files(list(graph.units), profiles, times, node_maps={f: node_map for f in profiles})
    lat = TrtexecLatency(graph, table, backend=backend)
    low = args.format if args.format in table.ms else next((f for f in table.ms if f != "fp32"), "fp32")
    args.format = low
    plans = _plans(args, tuple(graph.kinds.items()), backend)
    fp32 = lat(plans[0][1])
    rows = [{"plan": label, "low_units": sum(f != "fp32" for f in a.values()), "units": len(a),
             "median_ms": lat(a), "p25_ms": None, "p75_ms": None, "speedup": fp32 / lat(a), "assignment": a}
            for label, a in plans]
    return rows, {"per_unit_ms": table.rows(), "unmatched_layers": table.unmatched}


def command_line(args: argparse.Namespace) -> str:
    """The ``mixq bench`` command that reproduces ``args`` (options left at their default are omitted)."""
    parts = ["mixq bench"]
    for opt, default in (("example", None), ("model", None), ("calib", None), ("eval", None), ("metric", None),
                         ("backend", None), ("format", "int8"), ("random", 4), ("seed", 0), ("batch", 1),
                         ("runs", 30), ("warmup", 5), ("clock", "auto"), ("disabled_optimizers", "default")):
        v = getattr(args, opt, default)
        if v is not None and v != default:
            parts.append(f"--{opt.replace('_', '-')} {v}")
    parts += [f"--plan {p}" for p in args.plan] + [f"--trtexec {t}" for t in args.trtexec]
    if args.report:
        parts.append(f"--report {args.report}")
    return " ".join(parts)


def _markdown(name: str, backend: str, source: str, args: argparse.Namespace, rows: list, extra: dict) -> str:
    lines = [f"# Latency of {name} on {backend}", "", f"Command: `{command_line(args)}`", "",
             f"Source: {source}; batch {args.batch}."
             + ("" if args.trtexec else f" Median of {args.runs} runs after {args.warmup} warm-up runs."), "",
             "| plan | layers in low precision | median ms | p25-p75 ms | speedup vs FP32 |", "|---|---:|---:|---|---:|"]
    for r in rows:
        spread = f"{r['p25_ms']:.2f}-{r['p75_ms']:.2f}" if r.get("p25_ms") is not None else "-"
        lines.append(f"| {r['plan']} | {r['low_units']}/{r['units']} | {r['median_ms']:.2f} | {spread} | "
                     f"{r['speedup']:.2f}x |")
    if any(r.get("precision_mismatches") for r in rows):
        lines += ["", "Layers whose engine precision differs from the plan (engine inspector):", ""]
        lines += [f"- {r['plan']}: {', '.join(r['precision_mismatches'])}" for r in rows if r.get("precision_mismatches")]
    if extra.get("per_unit_ms"):
        fmts = [k for k in extra["per_unit_ms"][0] if k != "unit"]
        lines += ["", "Per-unit milliseconds from the trtexec profiles:", "",
                  "| unit | " + " | ".join(fmts) + " |", "|---|" + "---:|" * len(fmts)]
        lines += ["| " + r["unit"] + " | " + " | ".join(f"{r[f]:.4f}" for f in fmts) + " |" for r in extra["per_unit_ms"]]
    return "\n".join(lines) + "\n"
