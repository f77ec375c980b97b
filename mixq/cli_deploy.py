"""Deploy subcommands: ``mixq export`` and ``mixq verify`` (registered by ``mixq.cli``).

    mixq export [--plan PLAN.json | --format int8] [--out MODEL.onnx] [--opset N]
        -> MODEL.onnx (default RUN/model-<plan>.onnx) and RUN/export.json (Q/DQ and integer-kernel counts)
    mixq verify [--plan PLAN.json | --format int8] [--threads 1] [--no-noise-floor]
        -> RUN/verify-<plan>.json: engine vs simulation on the evaluation set; exit status 1 if the
           targets (top-1 agreement >= 99.5%, |metric difference| <= 0.2 points) are missed, unless
           the float64 simulation misses them too and the engine is within that noise floor
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from mixq.errors import MixqError


def register(sub, add_task_args: Callable, task_of: Callable, run_dir_of: Callable) -> None:
    """Add the ``export`` and ``verify`` subcommands to ``sub`` (an argparse subparsers object)."""
    e = sub.add_parser("export", help="write the ONNX model of a plan: Q/DQ with mixq's scales where it quantizes")
    add_task_args(e)
    _plan_args(e)
    e.add_argument("--out", default=None, help="ONNX file to write (default: RUN/model-<plan>.onnx)")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17 for ort-cpu, 21 for tensorrt)")
    add_batch_axis_arg(e)
    e.set_defaults(func=lambda a: cmd_export(a, task_of, run_dir_of))
    v = sub.add_parser("verify", help="run the evaluation set on ONNX Runtime and the simulation; compare")
    add_task_args(v)
    _plan_args(v)
    v.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    v.add_argument("--onnx", default=None,
                   help="verify this exported file (from `mixq export`) instead of exporting the plan again")
    add_batch_axis_arg(v)
    v.add_argument("--output-kind", default="auto", help="auto, classifier, embedding or other")
    v.add_argument("--no-noise-floor", action="store_true",
                   help="skip the float64-vs-float32 simulation comparison (the achievable agreement)")
    v.set_defaults(func=lambda a: cmd_verify(a, task_of, run_dir_of))


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", default=None, help="a plan JSON file (its backend decides the ONNX flavour)")
    p.add_argument("--format", default=None, help="format for every layer (default int8); not with --plan")
    p.add_argument("--calib-method", default=None,
                   help="max (default), entropy, percentile or mse; given beside --plan, it overrides the plan's")
    p.add_argument("--qat", default=None,
                   help="the folder of a model trained by `mixq qat` (RUN/qat-<plan>): use it, under its plan")


def add_batch_axis_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-axis", default="0",
                   help="input axis that is the batch (default 0; exported as dynamic); 'none' traces the example "
                        "inputs as given, with static shapes (e.g. a time-major model)")


def batch_axis_of(args: argparse.Namespace):
    """``--batch-axis`` as an int, or None for 'none'.

    Raises:
        MixqError: anything else.
    """
    text = str(getattr(args, "batch_axis", "0")).strip().lower()
    if text == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise MixqError(f"--batch-axis must be an input axis (0, 1, ...) or 'none', but got {args.batch_axis!r}.") \
            from None


def float_graph_of(q, calib, args: argparse.Namespace, opset=None):
    """The one traced float graph of a run: exported from the first calibration batch."""
    from mixq.export import export_float_graph

    return export_float_graph(q, calib[0], opset, batch_axis=batch_axis_of(args))


def write_deployable(model, out: Path, calib) -> Path:
    """Write the file to ship beside ``out`` (``<stem>.ort.onnx``) and say so."""
    from mixq.engine.deploy import save_deployable

    ship = save_deployable(model, out.with_name(out.stem + ".ort.onnx"), example_inputs=calib[0])
    print(f"file to ship: {ship} (ONNX Runtime-optimized with mixq's settings: a default onnxruntime session "
          "computes the verified numbers; the plain .onnx is for inspection and other runtimes)", flush=True)
    return ship


def _plan(args: argparse.Namespace):
    from mixq.cli import plan_from_args

    plan, label = plan_from_args(args)
    label = label if args.plan else f"{plan.backend}-{plan.default}"
    if getattr(args, "qat", None):
        from mixq.cli_qat import qat_plan_check

        return qat_plan_check(args, plan, args.qat), Path(args.qat).name
    return plan, label


def check_writable(path: str | os.PathLike) -> Path:
    """Raise ExportError now, before any work, if ``path`` cannot be written."""
    from mixq.export import ExportError

    p = Path(path)
    if p.is_dir():
        raise ExportError(f"output path {str(p)!r} is a folder; give a file name such as {str(p / 'model.onnx')!r}.")
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the folder {str(parent)!r} for {str(p)!r}: {e.strerror or e}.") from None
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ExportError(f"output path {str(p)!r} is not writable; choose another --out.")
    return p


def _quantized(task, plan, qat_dir=None):
    from mixq.quantize import quantize

    calib = task.calib_fn()
    if not calib:
        raise MixqError("the calibration loader yielded no batch; export needs calibration data.")
    model = task.model_fn()
    if qat_dir:
        from mixq.qat import load_trained

        return load_trained(model, qat_dir), calib
    return quantize(model, plan, calib_data=calib, calib_method=plan.calib_method, progress="calibrate"), calib


def cmd_export(args: argparse.Namespace, task_of: Callable, run_dir_of: Callable) -> int:
    from mixq.artifacts import write_atomic
    from mixq.export import apply_plan, check_opset, export_float_graph, qdq_summary, save_onnx

    task = task_of(args)
    plan, label = _plan(args)
    if args.opset is not None:
        check_opset(plan.backend, args.opset)
    batch_axis_of(args)
    d = run_dir_of(args, task)
    out = check_writable(args.out or d / f"model-{label}.onnx")
    q, calib = _quantized(task, plan, getattr(args, "qat", None))
    t0 = time.perf_counter()
    print(f"{task.name}: tracing the float graph ...", flush=True)
    graph = float_graph_of(q, calib, args, args.opset)
    t1 = time.perf_counter()
    model = apply_plan(graph, q, plan)
    t2 = time.perf_counter()
    save_onnx(model, out)
    info = {"task": task.name, "plan": plan.to_dict(), "onnx": str(out), "backend": graph.backend, "opset": graph.opset,
            "float_graph_seconds": t1 - t0, "plan_seconds": t2 - t1, "nodes": qdq_summary(model)}
    print(f"{task.name}: wrote {out} ({graph.backend}, opset {graph.opset}; float graph {t1 - t0:.2f} s, "
          f"plan {1e3 * (t2 - t1):.0f} ms; {info['nodes']})")
    if graph.backend == "ort-cpu":
        from mixq.engine.ort import build
        from mixq.export import resolve_plan

        quantized = [u for u, f in resolve_plan(graph, plan).items() if f != "fp32"]
        kc = build(model).kernel_counts(graph.unit_nodes, quantized)
        info["kernels"] = kc.to_dict()
        print(f"ONNX Runtime CPU: {kc.summary()}")
        info["ship"] = str(write_deployable(model, out, calib))
        unknown = info["kernels"].get("units_unknown") or []
        if unknown:
            print(f"mixq: warning: {len(unknown)} quantized unit(s) not found in ONNX Runtime's optimized graph "
                  f"(renamed by a fusion?): {', '.join(unknown[:8])}", file=sys.stderr)
        stayed = info["kernels"].get("units_float") or []
        if stayed:
            write_atomic(d / "export.json", json.dumps(info, indent=1))
            print(f"mixq: FAILED: {len(stayed)} unit(s) the plan quantizes run float on ONNX Runtime: "
                  f"{', '.join(stayed)}", file=sys.stderr)
            return 1
    write_atomic(d / "export.json", json.dumps(info, indent=1))
    return 0


def cmd_verify(args: argparse.Namespace, task_of: Callable, run_dir_of: Callable) -> int:
    from mixq.artifacts import write_atomic
    from mixq.verify import verify

    task = task_of(args)
    plan, label = _plan(args)
    batch_axis_of(args)
    if args.onnx and not Path(args.onnx).is_file():
        raise MixqError(f"--onnx {args.onnx!r} is not a file; give the .onnx that `mixq export` wrote.")
    d = run_dir_of(args, task)
    q, calib = _quantized(task, plan, getattr(args, "qat", None))
    evald = task.eval_fn()
    print(f"{task.name}: running the evaluation set on ONNX Runtime and the simulation ...", flush=True)
    res = verify(q, plan, evald, task.metric_fn, graph=float_graph_of(q, calib, args), threads=args.threads,
                 output_kind=args.output_kind, noise_floor=not args.no_noise_floor, onnx_model=args.onnx,
                 progress="engine vs simulation")
    print(f"{task.name} ({label}): {res.summary()}")
    if res.kernels and res.kernels.get("units_float"):
        print(f"warning: quantized layers that stayed float on ONNX Runtime: {', '.join(res.kernels['units_float'])}")
    out = write_atomic(d / f"verify-{label}.json", json.dumps({"task": task.name, **res.to_dict()}, indent=1))
    print(f"wrote {out}")
    return 0 if res.passed else 1
