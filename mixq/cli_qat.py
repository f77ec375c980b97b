"""``mixq qat``: fine-tune the quantized model of a plan (registered by ``mixq.cli``).

    mixq qat [--example NAME | specs + --train SPEC] [--plan PLAN.json | --format int8] [--epochs N] [--lr X]
        -> RUN/qat-<plan>/ckpt.pt   the checkpoint of the last finished epoch (a rerun resumes from it)
           RUN/qat-<plan>/model.pt + qat.json   the trained model: `mixq export --qat` / `mixq verify --qat` use it
           RUN/qat-<plan>.json      FP32, PTQ and QAT metric on the evaluation data, the history, the config

Without --epochs / --lr the recipe of the field applies to the task's own training schedule
(``TRAIN_RECIPE`` of an example): 10% of its epochs, 1% of its learning rate, cosine decay; a recipe
may state the learning rate measured to work instead (``qat_lr``, MiniLM), see ``QATConfig.from_recipe``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

from mixq.errors import MixqError


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, but got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, but got {text!r}")
    return v


def register(sub, add_task_args: Callable, task_of: Callable, run_dir_of: Callable) -> None:
    q = sub.add_parser("qat", help="fine-tune the quantized model of a plan (distillation from FP32)")
    add_task_args(q)
    q.add_argument("--train", default=None, help="spec of a function returning training batches (with --model ...)")
    q.add_argument("--plan", default=None, help="a plan JSON file")
    q.add_argument("--format", default=None, help="format for every layer (default int8); not with --plan")
    q.add_argument("--calib-method", default=None,
                   help="max (default), entropy, percentile or mse; given beside --plan, it overrides the plan's")
    q.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs (default: 10%% of the task's training epochs, at least 1)")
    q.add_argument("--lr", type=_positive_float, default=None,
                   help="peak learning rate, cosine decay (default: 1%% of the task's training learning rate)")
    q.add_argument("--train-batches", type=_positive_int, default=None,
                   help="use only the first N training batches (quick runs)")
    q.add_argument("--seed", type=int, default=0, help="batch order and dropout seed (default 0)")
    q.add_argument("--restart", action="store_true", help="ignore a checkpoint of an earlier run and start over")
    q.set_defaults(func=lambda a: cmd_qat(a, task_of, run_dir_of))


def _config(args: argparse.Namespace, task):
    from mixq.qat import QATConfig

    recipe = task.train_recipe or {}
    if (args.epochs is None or args.lr is None) and not {"epochs", "lr"} <= set(recipe):
        raise MixqError(f"the task {task.name!r} states no training recipe (TRAIN_RECIPE with epochs and lr): give "
                        "--epochs and --lr.")
    base = QATConfig.from_recipe(recipe) if {"epochs", "lr"} <= set(recipe) else None
    return QATConfig(epochs=args.epochs or base.epochs, lr=args.lr or base.lr, seed=args.seed)


def cmd_qat(args: argparse.Namespace, task_of: Callable, run_dir_of: Callable) -> int:
    from mixq.artifacts import write_atomic
    from mixq.cli_deploy import _plan
    from mixq.evaluate import evaluate, evaluate_plan
    from mixq.qat import qat, save_trained
    from mixq.quantize import quantize
    from mixq.task import load_spec

    if args.train and args.example:
        raise MixqError("--train goes with --model/--calib/--eval/--metric; an example brings its own training data.")
    task = task_of(args)
    train_fn = load_spec(args.train) if args.train else task.train_fn
    if train_fn is None:
        raise MixqError(f"the task {task.name!r} has no training data: give --train SPEC (a function returning "
                        "(inputs, targets) or input batches); examples with training data: mnist_resnet, effnet_fashion, minilm, minilm_bible.")
    config = _config(args, task)
    plan, label = _plan(args)
    d = run_dir_of(args, task)
    out = d / f"qat-{label}"
    model = task.model_fn().eval()
    calib, evald = task.calib_fn(), task.eval_fn()
    print(f"{task.name}: quantizing ({label}) ...", flush=True)
    q = quantize(model, plan, calib_data=calib, calib_method=plan.calib_method, progress="calibrate")
    train = list(train_fn())
    if args.train_batches:
        train = train[:args.train_batches]
    fp32 = evaluate(model, evald, task.metric_fn, progress="evaluate fp32")
    ptq = evaluate_plan(q, q.mixq.plan, evald, task.metric_fn, reference=fp32, progress="evaluate ptq")
    print(f"{task.name}: FP32 {fp32.metric:.2f}, PTQ {ptq.metric:.2f}; QAT: {config.epochs} epoch(s) of "
          f"{len(train)} batches at lr {config.lr:g} (cosine decay)", flush=True)
    res = qat(q, model, train, config, eval_data=evald, metric_fn=task.metric_fn, checkpoint_dir=out,
              restart=args.restart)
    final = evaluate_plan(q, q.mixq.plan, evald, task.metric_fn, reference=fp32, progress="evaluate qat")
    save_trained(q, out, extra={"config": dataclasses.asdict(config), "history": res.history})
    lost = fp32.metric - ptq.metric
    recovered = (final.metric - ptq.metric) / lost if lost > 0 else None
    summary = {"task": task.name, "plan": plan.to_dict(), "config": dataclasses.asdict(config),
               "train_batches": len(train), "fp32": fp32.metric, "ptq": ptq.metric, "qat": final.metric,
               "ptq_drop": ptq.drop, "ptq_drop_ci": list(ptq.drop_ci), "qat_drop": final.drop,
               "qat_drop_ci": list(final.drop_ci), "samples": fp32.samples,
               "recovered_fraction": recovered, "history": res.history, "resumed_from": res.resumed_from,
               "seconds": res.seconds, "model": str(out)}
    path = write_atomic(d / f"qat-{label}.json", json.dumps(summary, indent=1))
    rec = f", {100 * recovered:.0f}% of the PTQ loss recovered" if recovered is not None else \
        " (PTQ lost nothing to recover)"
    print(f"{task.name} ({label}): FP32 {fp32.metric:.2f}, PTQ {ptq.metric:.2f}, QAT {final.metric:.2f}{rec}")
    print(f"wrote {out} (mixq export --qat {out}; mixq verify --qat {out}) and {path}")
    return 0


def qat_plan_check(args: argparse.Namespace, plan, qat_dir: str):
    """The plan of a trained QAT model, refusing a different --plan / --format given beside --qat.

    Raises:
        MixqError: the folder holds no QAT model, or the plan given differs from the trained one.
    """
    from mixq.plan import QuantPlan
    from mixq.qat import read_trained_meta

    saved = QuantPlan.from_dict(read_trained_meta(qat_dir)["plan"])
    if (args.plan or args.format or args.calib_method) and plan.to_dict() != saved.to_dict():
        raise MixqError(f"--qat {qat_dir} was trained for another plan than the one given ({Path(args.plan).name if args.plan else args.format}); "
                        "drop --plan / --format (the trained plan is used) or train that plan with `mixq qat`.")
    return saved
