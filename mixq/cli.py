"""Command line: one subcommand per stage, each reading and writing artifacts in a run folder.

    mixq inventory [--example NAME | --model SPEC ...]      -> RUN/inventory.json
    mixq quantize  [--format int8 | --plan PLAN.json] ...   -> RUN/plan.json, RUN/quantize.json
    mixq deploy    one plan: quantize + evaluate, export to ONNX Runtime, verify, time (RUN/deploy.json)
    mixq run       the whole pipeline: inventory -> scan -> search -> qat -> export -> verify -> latency -> report
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from mixq.errors import MixqError
from mixq.examples import DEFAULT_EXAMPLE, EXAMPLES


def _add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task (a built-in example, or your own module:function specs)")
    g.add_argument("--example", default=None, help="built-in example: " + ", ".join(
        f"{n} (default)" if n == DEFAULT_EXAMPLE else n for n in EXAMPLES))
    g.add_argument("--model", help="spec of a function returning the float model, e.g. mypkg.models:build")
    g.add_argument("--calib", help="spec of a function returning calibration batches")
    g.add_argument("--eval", help="spec of a function returning (inputs, targets) evaluation batches")
    g.add_argument("--metric", help="spec of a function(outputs, targets) -> per-sample scores")
    p.add_argument("--backend", default=None,
                   help="ort-cpu (the default) or tensorrt; given beside --plan, it overrides the plan's backend")
    p.add_argument("--run-dir", default=None, help="folder for artifacts (default: runs/<task name>)")


def _task(args: argparse.Namespace):
    from mixq.task import DEFAULT_EXAMPLE, Task

    specs = [args.model, args.calib, args.eval, args.metric]
    if any(specs):
        if args.example:
            raise MixqError(f"--example {args.example} and --model/--calib/--eval/--metric are alternatives: "
                            "give the example, or your four specs, not both.")
        if not all(specs):
            raise MixqError("--model, --calib, --eval and --metric go together: give all four specs, or --example.")
        return Task.from_specs(*specs)
    return Task.example(args.example or DEFAULT_EXAMPLE)


def _run_dir(args: argparse.Namespace, task) -> Path:
    """The run folder, created and checked writable now (before any expensive work).

    Raises:
        MixqError: the path is a file, cannot be created, or is not writable.
    """
    d = Path(args.run_dir or Path("runs") / task.name)
    if d.exists() and not d.is_dir():
        raise MixqError(f"--run-dir {str(d)!r} is a file, not a folder; give a folder path (it is created if missing).")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MixqError(f"cannot create the run folder {str(d)!r}: {e.strerror or e}; give a writable --run-dir.") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise MixqError(f"the run folder {str(d)!r} is not writable; give a writable --run-dir.")
    return d


def plan_from_args(args: argparse.Namespace):
    """The plan the command line asks for, under one rule: a flag given on the command line wins, and is said.

    ``--plan FILE`` loads a plan; ``--backend`` and ``--calib-method`` given beside it override the plan's values
    (printed). Without ``--plan``, ``--format`` (default int8) applies to every unit.

    Returns:
        (plan, label) where label names the plan in file names and messages.

    Raises:
        MixqError: --format given beside --plan, or an invalid plan / value.
    """
    from mixq.plan import QuantPlan

    backend, method = getattr(args, "backend", None), getattr(args, "calib_method", None)
    fmt = getattr(args, "format", None)
    if args.plan:
        if fmt is not None:
            raise MixqError(f"--format {fmt} and --plan {args.plan} are alternatives: a plan names each unit's "
                            "format; drop one of them.")
        plan = QuantPlan.load(args.plan)
        changes = {}
        if backend is not None and backend != plan.backend:
            changes["backend"] = backend
        if method is not None and method != plan.calib_method:
            changes["calib_method"] = method
        if changes:
            said = ", ".join(f"--{k.replace('_', '-')} {v} overrides the plan's {k} {getattr(plan, k)!r}"
                             for k, v in changes.items())
            plan = QuantPlan.from_dict({**plan.to_dict(), **changes})
            print(f"mixq: {said}", flush=True)
        return plan, Path(args.plan).stem
    plan = QuantPlan.uniform(fmt or "int8", backend or "ort-cpu", method or "max")
    return plan, f"all-{plan.default}"


def cmd_inventory(args: argparse.Namespace) -> int:
    from mixq.artifacts import write_atomic
    from mixq.inventory import inventory, inventory_json, inventory_table

    task = _task(args)
    d = _run_dir(args, task)
    model = task.model_fn()
    batch = next(iter(task.calib_fn()), None)
    if batch is None:
        raise MixqError("the calibration loader yielded no batch; inventory needs one example batch.")
    layers = inventory(model, batch, backend=args.backend or "ort-cpu")
    print(inventory_table(layers))
    out = write_atomic(d / "inventory.json", inventory_json(layers))
    print(f"wrote {out}")
    return 0


def _stage(text: str) -> float:
    """Say what starts now (long stages take minutes on big models); return the start time."""
    print(text, flush=True)
    return time.perf_counter()


def _drop(ev) -> str:
    """``+0.40 [-0.10, +0.90], within noise`` for a PlanEvaluation."""
    lo, hi = ev.drop_ci
    return f"{ev.drop:+.2f} [{lo:+.2f}, {hi:+.2f}]" + (", within noise" if ev.drop_noise else "")


def cmd_quantize(args: argparse.Namespace) -> int:
    from mixq.artifacts import write_atomic
    from mixq.plan import QuantPlan
    from mixq.quantize import quantize
    from mixq.calib_methods import CALIB_METHODS
    from mixq.evaluate import evaluate, evaluate_plan

    task = _task(args)
    d = _run_dir(args, task)
    plan, label = plan_from_args(args)
    if args.calib_methods and args.calib_method:
        raise MixqError("--calib-method and --calib-methods are alternatives: give one method, or a list to compare.")
    methods = [m.strip() for m in args.calib_methods.split(",")] if args.calib_methods else [plan.calib_method]
    bad = [m for m in methods if m not in CALIB_METHODS]
    if bad:
        raise MixqError(f"unknown calibration method(s) {bad}; valid methods are {', '.join(CALIB_METHODS)}.")
    model = task.model_fn()
    calib, evald = task.calib_fn(), task.eval_fn()
    t0 = time.perf_counter()
    ref = rows = None
    for method in methods:
        _stage(f"{task.name}: calibrating {label} ({plan.backend}, {method}) ...")
        mplan = QuantPlan.from_dict({**plan.to_dict(), "calib_method": method})
        q = quantize(model, mplan, calib_data=calib, progress="calibrate")  # a plan that does not fit fails here
        if ref is None:
            _stage(f"{task.name}: evaluating FP32 on the evaluation set ...")
            ref = evaluate(model, evald, task.metric_fn, progress="evaluate FP32")
            rows = [{"config": "fp32", "calib_method": "-", "metric": ref.metric, "drop": 0.0, "samples": ref.samples}]
            print(f"{task.name}: FP32 metric {ref.metric:.2f} on {ref.samples} samples", flush=True)
        ev = evaluate_plan(q, q.mixq.plan, evald, task.metric_fn, reference=ref, progress=f"evaluate {label}")
        real = q.mixq.realisation
        rows.append({"config": label, "calib_method": method, "metric": ev.metric, "drop": ev.drop,
                     "drop_ci": list(ev.drop_ci), "mode": q.mixq.mode, "realised": real.to_dict()})
        print(f"{task.name}: {label} ({plan.backend}, {method} calibration, {q.mixq.mode} mode): {real.summary()}\n"
              f"  metric {ev.metric:.2f} (drop {_drop(ev)})", flush=True)
    plan.save(d / "plan.json")
    result = {"task": task.name, "backend": plan.backend, "rows": rows, "seconds": time.perf_counter() - t0,
              "left_float": [vars(x) for x in q.mixq.left_float]}
    write_atomic(d / "quantize.json", json.dumps(result, indent=1))
    print(f"wrote {d / 'plan.json'} and {d / 'quantize.json'}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """One plan: quantize + evaluate, then deploy on ONNX Runtime, verify it, and time it.

    Exits 1 when the engine-vs-simulation check fails.
    """
    from mixq.artifacts import write_atomic
    from mixq.latency.ort import OrtLatency
    from mixq.plan import QuantPlan
    from mixq.evaluate import evaluate, evaluate_plan
    from mixq.quantize import quantize
    from mixq.verify import verify

    task = _task(args)
    d = _run_dir(args, task)
    plan, label = plan_from_args(args)
    if args.runs < 1:
        raise MixqError(f"--runs must be at least 1, got {args.runs}.")
    from mixq.cli_deploy import batch_axis_of

    batch_axis_of(args)
    model = task.model_fn()
    calib, evald = task.calib_fn(), task.eval_fn()
    t0 = _stage(f"[1/3] {task.name}: calibration ({plan.calib_method}), FP32 and {label} evaluation ...")
    q = quantize(model, plan, calib_data=calib, progress="calibrate")  # a plan that does not fit fails here
    ref = evaluate(model, evald, task.metric_fn, progress="evaluate FP32")
    ev = evaluate_plan(q, q.mixq.plan, evald, task.metric_fn, reference=ref, progress=f"evaluate {label}")
    real = q.mixq.realisation
    print(f"[1/3] {task.name}: {label} ({plan.backend}, {plan.calib_method} calibration, {q.mixq.mode} mode): "
          f"{real.summary()}\n[1/3] {task.name}: FP32 {ref.metric:.2f} -> {ev.metric:.2f} on {ref.samples} samples "
          f"(drop {_drop(ev)})", flush=True)
    summary = {"task": task.name, "plan": plan.to_dict(), "realised": real.to_dict(), "fp32_metric": ref.metric,
               "sim_metric": ev.metric, "drop": ev.drop, "drop_ci": list(ev.drop_ci),
               "left_float": [vars(x) for x in q.mixq.left_float]}
    passed = True
    if plan.backend == "ort-cpu":
        from mixq.cli_deploy import float_graph_of, write_deployable
        from mixq.export import apply_plan, save_onnx

        _stage("[2/3] exporting to ONNX (one traced graph for the file, the check and the timing), then running the "
               "evaluation set on ONNX Runtime and the simulation ...")
        graph = float_graph_of(q, calib, args)
        onnx_model = apply_plan(graph, q, plan)
        out = save_onnx(onnx_model, d / f"model-{label}.onnx")
        summary["onnx"] = str(out)
        summary["ship"] = str(write_deployable(onnx_model, out, calib))
        res = verify(q, plan, evald, task.metric_fn, graph=graph, onnx_model=onnx_model, progress="engine vs simulation",
                     noise_floor=not args.no_noise_floor)
        summary["verify"] = res.to_dict()
        passed = res.passed
        print(f"[2/3] engine vs simulation: {res.summary()}", flush=True)
        lat = OrtLatency(q, calib[0][:1] if not isinstance(calib[0], (tuple, list)) else tuple(t[:1] for t in calib[0]),
                         runs=args.runs, float_graph=graph)
        _stage(f"[3/3] timing FP32 and {label} on ONNX Runtime ({args.runs} runs each) ...")
        ms_fp32, ms_q = lat(QuantPlan(backend=plan.backend, default="fp32")), lat(plan)
        summary["latency_ms"] = {"fp32": ms_fp32, label: ms_q}
        print(f"[3/3] ONNX Runtime CPU latency, batch 1, 1 thread (median of {args.runs}): FP32 {ms_fp32:.2f} ms, "
              f"{real.label} {ms_q:.2f} ms ({ms_fp32 / ms_q:.2f}x)", flush=True)
    else:
        print(f"[2/3] [3/3] not verified or timed: the {plan.backend} engine is not available here; "
              "`mixq export` writes the TensorRT-flavour ONNX.")
    summary["passed"] = passed
    plan.save(d / "plan.json")
    summary["seconds"] = time.perf_counter() - t0
    write_atomic(d / "deploy.json", json.dumps(summary, indent=1, default=str))
    print(f"wrote {d / 'plan.json'} and {d / 'deploy.json'}")
    if not passed:
        print(f"mixq: FAILED: the engine does not compute what the simulation computes ({'; '.join(res.failures)}); "
              f"see {d / 'deploy.json'}", file=sys.stderr)
        return 1
    return 0


# Later stages register their own subcommands: register(subparsers, add_task_args, task_of, run_dir_of).
_STAGE_COMMANDS: tuple[str, ...] = ("mixq.cli_scan", "mixq.cli_deploy", "mixq.cli_bench", "mixq.cli_search", "mixq.cli_qat",
                                    "mixq.cli_run")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    inv = sub.add_parser("inventory", help="list the quantizable layers of a model")
    _add_task_args(inv)
    inv.set_defaults(func=cmd_inventory)
    for name, help_ in (("quantize", "calibrate, quantize and evaluate a plan against FP32"),
                        ("deploy", "one plan: quantize, evaluate, deploy on ONNX Runtime, verify, time")):
        q = sub.add_parser(name, help=help_)
        _add_task_args(q)
        q.add_argument("--format", default=None, help="format for every layer (default int8); not with --plan")
        q.add_argument("--plan", help="a plan JSON file")
        q.add_argument("--calib-method", default=None,
                       help="max (default), entropy, percentile or mse; given beside --plan, it overrides the plan's")
        if name == "quantize":
            q.add_argument("--calib-methods", default=None, help="comma-separated methods to compare, e.g. max,entropy")
            q.set_defaults(func=cmd_quantize)
        else:
            q.add_argument("--runs", type=int, default=50, help="timed runs per latency measurement")
            q.add_argument("--no-noise-floor", action="store_true",
                           help="skip the float64-vs-float32 simulation comparison in verification (the targets alone "
                                "then decide; see `mixq verify`)")
            from mixq.cli_deploy import add_batch_axis_arg

            add_batch_axis_arg(q)
            q.set_defaults(func=cmd_deploy)
    for module in _STAGE_COMMANDS:
        importlib.import_module(module).register(sub, _add_task_args, _task, _run_dir)
    return p


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """mixq's own warnings as one plain line (no file and line of mixq's code)."""
    from mixq.quantize import FallbackWarning, LeftFloatWarning

    if issubclass(category, (LeftFloatWarning, FallbackWarning)):
        return f"mixq: warning: {message}\n"
    return _PLAIN_FORMAT(message, category, filename, lineno, line)


_PLAIN_FORMAT = warnings.formatwarning


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for reports
    warnings.formatwarning = _format_warning
    try:
        return args.func(args)
    except MixqError as e:
        print(f"mixq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
