"""`mixq run`: the whole pipeline in one command (see ``mixq.pipeline``).

    mixq run [--config run.toml] [--example NAME | --model ... --calib ... --eval ... --metric ... [--train ...]]
             [--budget 0.8x] [--trials N] [--from STAGE] [--until STAGE] [--fresh] [--run-dir DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from mixq.errors import MixqError

# command-line flag -> configuration (section, key); "" is the top level
_OVERRIDES = {**{f: ("", f) for f in ("example", "model", "calib", "eval", "metric", "train", "run_dir", "backend",
                                     "budget", "batch_axis")}, "trials": ("search", "trials")}


def register(sub, add_task_args: Callable, task_of: Callable, run_dir_of: Callable) -> None:
    from mixq.pipeline import STAGES

    p = sub.add_parser("run", help="the whole pipeline: inventory, scan, search, QAT, export, verify, latency, report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p)
    p.add_argument("--train", default=None, help="spec of a function returning training batches, for QAT "
                   "(with --model ...; examples bring their own)")
    p.add_argument("--config", default=None, help="a TOML file with the run's settings (see README); flags win over it")
    p.add_argument("--budget", default=None, help="latency budget of the search: '0.8x' of FP32 (default), '6.5ms'")
    p.add_argument("--trials", type=int, default=None, help="trials of the search (default 30)")
    p.add_argument("--batch-axis", default=None, help="the inputs' batch axis (default 0), or none")
    p.add_argument("--from", dest="first", default=STAGES[0], choices=STAGES,
                   help="run again from this stage (the earlier ones must have finished)")
    p.add_argument("--until", dest="last", default=STAGES[-1], choices=STAGES, help="stop after this stage")
    p.add_argument("--fresh", action="store_true",
                   help="run every stage again from nothing (the scan, the search study and QAT checkpoints discarded)")
    p.set_defaults(func=lambda a: cmd_run(a, task_of, run_dir_of))


def config_of(args: argparse.Namespace):
    """The run configuration: the --config file (or the defaults) with the flags given over it, said."""
    from mixq.run_config import RunConfig

    cfg = RunConfig.load(args.config) if args.config else RunConfig.build()
    cfg, said = cfg.override({where: getattr(args, flag) for flag, where in _OVERRIDES.items()})
    for s in said:
        print(f"mixq: {s}", flush=True)
    return cfg


def _task_args(cfg) -> list[str]:
    top = cfg.section("")
    specs = [top[k] for k in ("model", "calib", "eval", "metric")]
    if any(specs):
        if top["example"]:
            raise MixqError(f"example {top['example']!r} and model/calib/eval/metric specs are alternatives: give "
                            "the example, or your four specs, not both.")
        if not all(specs):
            raise MixqError("model, calib, eval and metric go together: give all four specs, or an example.")
        return ["--model", top["model"], "--calib", top["calib"], "--eval", top["eval"], "--metric", top["metric"]]
    if top["train"]:
        raise MixqError("train goes with model/calib/eval/metric specs; an example brings its own training data.")
    from mixq.examples import DEFAULT_EXAMPLE

    return ["--example", top["example"] or DEFAULT_EXAMPLE]


def _check_stage_args(pipe) -> None:
    """Parse the scan, search and QAT command lines now, so a bad setting fails before any work."""
    from mixq.cli import build_parser
    from mixq.cli_search import options_of

    parser = build_parser()
    for stage in ("scan", "search", "qat"):
        argv = pipe.args_of(stage)
        if argv is None:
            continue
        if "--sensitivity" in argv:  # the scan writes it later
            i = argv.index("--sensitivity")
            argv = argv[:i] + argv[i + 2:]
        try:
            ns = parser.parse_args(argv)
        except SystemExit:
            raise MixqError(f"the {stage} settings above are not valid (from the configuration "
                            f"{pipe.cfg.source or '(defaults)'} and the flags).") from None
        if stage == "search":
            ns.argv = argv
            options_of(ns)
    q = pipe.cfg.section("qat")
    recipe = pipe.task.train_recipe or {}
    if pipe.args_of("qat") is not None and (q["epochs"] is None or q["lr"] is None) and \
            not {"epochs", "lr"} <= set(recipe):
        raise MixqError(f"the task {pipe.task.name!r} states no training recipe for QAT: give epochs and lr in the "
                        "configuration ([qat] epochs = 1, lr = 1e-4), or [qat] enabled = false.")
    top = pipe.cfg.section("")
    if top["backend"] != "ort-cpu":
        raise MixqError(f"backend = {top['backend']!r}: the pipeline measures latency on ONNX Runtime CPU here; "
                        "use ort-cpu (TensorRT runs through `mixq export` and the TensorRT latency model).")
    from mixq.calib_methods import check_calib_method
    from mixq.cli_scan import MODES

    check_calib_method(pipe.cfg.get("scan", "calib_method"))
    if pipe.cfg.get("scan", "mode") not in MODES:
        raise MixqError(f"scan.mode = {pipe.cfg.get('scan', 'mode')!r} is not a scan mode; valid: {', '.join(MODES)}.")


def cmd_run(args: argparse.Namespace, task_of: Callable, run_dir_of: Callable) -> int:
    from mixq.pipeline import STAGES, Pipeline

    if STAGES.index(args.first) > STAGES.index(args.last):
        raise MixqError(f"--from {args.first} comes after --until {args.last}; stages run in the order "
                        f"{' -> '.join(STAGES)}.")
    cfg = config_of(args)
    task_args = _task_args(cfg)
    top = cfg.section("")
    ns = argparse.Namespace(example=task_args[1] if task_args[0] == "--example" else None, model=top["model"],
                            calib=top["calib"], eval=top["eval"], metric=top["metric"], run_dir=top["run_dir"])
    task = task_of(ns)
    if top["train"]:
        from mixq.task import load_spec

        task.train_fn = load_spec(top["train"])  # checked now; the qat stage passes --train on
    d = Path(run_dir_of(ns, task)).resolve()  # the records name files by absolute path
    pipe = Pipeline(cfg, d, task_args, task, list(getattr(args, "argv", [])), fresh=args.fresh)
    _check_stage_args(pipe)
    return pipe.run(args.first, args.last)
