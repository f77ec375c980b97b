"""``mixq search``: a format per unit under a latency budget measured on the engine, against the baselines.

    mixq search --example mnist_resnet --budget 0.8x --trials 40
    -> RUN/search-best.json (the plan: mixq export --plan RUN/search-best.json), RUN/search.md (report, with
       search-pareto.png, search-precision.png, search-history.png), RUN/search.json (everything),
       RUN/search-trials.{json,csv} (every trial), RUN/search-front.{json,csv} (with --front)

The Optuna study lives in RUN/search-study.journal unless --storage names another (an RDB URL such as
sqlite:///study.db or postgresql://user:pw@host/db, or a journal file path); running the same command again
resumes it. Calibration, sensitivity and single-unit latencies are cached in RUN/search-cache/ under a
fingerprint of the model, data, backend and settings; --fresh discards them and the study.

--budget and --front: a budget alone is a constrained single-objective study (the best plan within it);
--front alone is the two-objective metric/latency front; both together give the front and the best plan
within the budget (every plan is then evaluated, over budget or not, to draw the front).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Callable

from mixq.errors import MixqError
from mixq.search_prep import EVALUATE_MODES


def register(sub, add_task_args: Callable, task_of: Callable, run_dir_of: Callable) -> None:
    """Add the ``search`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("search", help="per-unit formats under a latency budget measured on ONNX Runtime",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p)
    p.add_argument("--budget", default=None, help="latency budget: '6.5ms', or '0.6x' / '60%%' of FP32 measured "
                                                  "in the same session (required unless --front)")
    p.add_argument("--front", action="store_true", help="two objectives (metric, latency): the Pareto front")
    p.add_argument("--trials", type=int, default=40, help="finished trials of the study, baselines and earlier "
                                                          "sessions included (default 40)")
    p.add_argument("--sampler", default="tpe", help="tpe (default, multivariate), nsga2, gp or random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--formats", default="int8", help="comma-separated low formats of the space (default int8)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per latency measurement in the search (median; "
                                                     "default 50)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the fresh-process re-timing (default 5)")
    p.add_argument("--ratio-rounds", type=int, default=3, help="with a relative budget (0.8x), each plan is timed "
                   "back to back with FP32 in this many alternating rounds and judged on the median ratio (default 3)")
    p.add_argument("--retime-seconds", type=float, default=0.2,
                   help="each fresh-process measurement runs at least this long (default 0.2 s)")
    p.add_argument("--calib-method", default="max", help="max (default), entropy, percentile or mse")
    p.add_argument("--storage", default=None, help="Optuna storage: a journal file path, sqlite:///FILE, "
                                                   "postgresql://... (default: RUN/search-study.journal)")
    p.add_argument("--study", default=None, help="study name (default: <task>-<budget>)")
    p.add_argument("--fresh", action="store_true", help="discard the study and the cached calibration, "
                                                        "sensitivity and latencies, and start over")
    p.add_argument("--no-random-baseline", action="store_true",
                   help="skip the random-search baseline (a second study with the same number of trials)")
    p.add_argument("--evaluate", default="simulation", choices=EVALUATE_MODES,
                   help="where a plan's metric is measured, in the study and in the final figures: the fake-quant "
                        "simulation (default) or the plan's model on ONNX Runtime, the deployed numbers (about "
                        "10x faster on EfficientNet-Lite0; the sensitivity scan stays in the simulation)")
    p.add_argument("--candidates", type=int, default=5,
                   help="best trials re-timed in a fresh process before the plan is chosen (default 5)")
    p.add_argument("--metric-tolerance", type=float, default=0.1,
                   help="plans within this many metric points of the best are re-timed as candidates too (fastest "
                        "first), so a near-best plan with more margin can stand in when the best misses the budget "
                        "(default 0.1)")
    p.add_argument("--sensitivity", default=None,
                   help="a sensitivity.json from `mixq scan --split search` of the same model, data and backend: "
                        "used instead of the search's own one-at-a-time scan (refused by fingerprint otherwise)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes working on the study on this machine, one core and one intra-op thread each; "
                        "latency measurements take turns (a machine-wide lock) and are shared through the study")
    p.add_argument("--join", action="store_true",
                   help="join an existing study as one more worker (e.g. on another machine, with --storage "
                        "postgresql://...): run trials until the study holds --trials, then exit; the command "
                        "that started the study writes the report")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from mixq.cli_deploy import add_batch_axis_arg

    add_batch_axis_arg(p)
    p.set_defaults(func=lambda a: cmd_search(a, task_of, run_dir_of))


def options_of(args: argparse.Namespace):
    """The validated options (everything that can be checked without the model).

    Raises:
        MixqError: a bad budget, sampler, count, format, calibration method or --budget/--front combination.
    """
    from mixq.calib_methods import check_calib_method
    from mixq.cli_deploy import batch_axis_of
    from mixq.formats import get_format
    from mixq.search import SAMPLERS, Budget
    from mixq.search_run import SearchOptions

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.workers > cores:
        print(f"mixq: warning: --workers {args.workers} is more than the {cores} core(s) this process may use: "
              "workers will wait for cores, and the time they wait is counted in their latency measurements "
              f"(wall clock) or stretches them; use --workers {cores} or fewer for clean timings.", file=sys.stderr)
    if args.budget is None and not args.front:
        raise MixqError("give a latency budget (--budget 0.6x, or --budget 6.5ms), or --front for the Pareto front.")
    budget = Budget.parse(args.budget) if args.budget is not None else None
    if budget is not None and budget.unit == "x" and budget.value >= 1:
        raise MixqError(f"--budget {args.budget} is at or above FP32 latency (1x): FP32 itself meets it and loses "
                        "nothing. Give a fraction below 1 (e.g. 0.8x), or --front to see every trade-off.")
    if args.sampler not in SAMPLERS:
        from mixq.errors import did_you_mean

        raise MixqError(f"unknown sampler {args.sampler!r}; valid samplers are {', '.join(SAMPLERS)}."
                        f"{did_you_mean(args.sampler, SAMPLERS)}")
    for flag, v in (("--trials", args.trials), ("--runs", args.runs), ("--rounds", args.rounds),
                    ("--ratio-rounds", args.ratio_rounds), ("--candidates", args.candidates)):
        if v < 1:
            raise MixqError(f"{flag} must be at least 1, but got {v}.")
    if not args.retime_seconds >= 0:
        raise MixqError(f"--retime-seconds must be >= 0, but got {args.retime_seconds}.")
    if not args.metric_tolerance >= 0:
        raise MixqError(f"--metric-tolerance must be >= 0 metric points, but got {args.metric_tolerance}.")
    if args.sensitivity is not None and not Path(args.sensitivity).is_file():
        raise MixqError(f"--sensitivity {args.sensitivity!r} is not a file; give the sensitivity.json that "
                        "`mixq scan --split search` wrote.")
    if args.study is not None and not args.study.strip():
        raise MixqError("--study must be a non-empty name.")
    if args.workers < 1:
        raise MixqError(f"--workers must be at least 1, but got {args.workers}.")
    if args.join and args.workers != 1:
        raise MixqError("--join adds one worker to a running study; leave --workers out (or start several --join).")
    if args.join and args.fresh:
        raise MixqError("--join works on an existing study; --fresh would discard it. Leave one of them out.")
    formats = [get_format(f.strip()).name for f in args.formats.split(",") if f.strip()]
    if not formats or formats == ["fp32"]:
        raise MixqError(f"--formats {args.formats!r} names no low format; give e.g. int8.")
    formats = [f for f in formats if f != "fp32"]
    return SearchOptions(budget=budget, front=args.front, trials=args.trials, sampler=args.sampler, seed=args.seed,
                         formats=formats, runs=args.runs, rounds=args.rounds, retime_seconds=args.retime_seconds,
                         ratio_rounds=args.ratio_rounds,
                         calib_method=check_calib_method(args.calib_method), storage=args.storage, study=args.study,
                         fresh=args.fresh, random_baseline=not args.no_random_baseline,
                         candidates=args.candidates, metric_tolerance=args.metric_tolerance,
                         sensitivity=args.sensitivity, evaluate=args.evaluate,
                         progress=not args.no_progress, command="mixq " + shlex.join(getattr(args, "argv", sys.argv[1:])),
                         batch_axis=batch_axis_of(args), workers=args.workers, join=args.join,
                         worker_index=args.worker_index, argv=list(getattr(args, "argv", sys.argv[1:])))


def cmd_search(args: argparse.Namespace, task_of: Callable, run_dir_of: Callable) -> int:
    from mixq import search_join, search_prep, search_run
    from mixq.formats import get_backend
    from mixq.search.storage import dashboard_url, describe_storage, open_storage

    opts = options_of(args)
    backend = args.backend or "ort-cpu"
    if backend != "ort-cpu":
        raise MixqError(f"mixq search measures latency on ONNX Runtime CPU here; --backend {backend} needs its engine "
                        "(TensorRT), which this command does not drive yet; use --backend ort-cpu.")
    be = get_backend(backend)
    useless = [f for f in opts.formats if not any(f in fs for fs in be.formats.values())]
    if useless:
        raise MixqError(f"format(s) {', '.join(useless)} run on no unit kind of {be.name}; formats it runs: "
                        f"{', '.join(sorted({f for fs in be.formats.values() for f in fs if f != 'fp32'}))}.")
    task = task_of(args)
    d = Path(run_dir_of(args, task))
    default = d / search_prep.JOURNAL
    if opts.join:
        storage = open_storage(opts.storage, default)
        name = search_prep.study_name(task.name, opts)
        text = describe_storage(opts.storage, default)
        try:
            storage.get_study_id_from_name(name)
        except KeyError:
            raise MixqError(f"--join: there is no study {name!r} in {text}; start it first with the same command "
                            "without --join (and the same --storage), or give the --study name it has.") from None
        search_join.join(task, d, backend, opts, storage, text)
        return 0
    lock = search_run.lock_run_dir(d)
    try:
        # the run folder is ours: a journal lock file there was left by a killed search
        storage = open_storage(opts.storage, default, exclusive=opts.storage is None)
        summary = search_run.run(task, d, backend, opts, storage, describe_storage(opts.storage, default),
                                 dashboard_url(opts.storage, default))
    finally:
        lock.close()
    print(Path(summary["paths"]["report"]).read_text())
    wrote = [summary["paths"]["report"], str(d / "search.json"), summary["paths"]["trials_csv"]]
    if (d / "search-best.json").is_file() and any(r["plan"] == "searched" for r in summary["rows"]):
        wrote.append(str(d / "search-best.json"))
    if "front_csv" in summary["paths"]:
        wrote.append(summary["paths"]["front_csv"])
    print("wrote " + ", ".join(wrote))
    return 0
