"""QAT recovery: FP32 vs PTQ vs QAT on an example's test split, and the plan's latency re-measured.

    python bench/bench_qat.py [--example mnist_resnet] [--plans int8:max,int8:entropy] [--recipes default,3:3e-4]
                              [--out reports/qat_mnist_resnet] [--train-batches N] [--eval-split eval|search]
                              [--no-deploy | --no-verify] [--save-dir DIR]

For each plan (ort-cpu, all units in the format, calibrated with the method) and each recipe
("default" = the field recipe on the example's TRAIN_RECIPE: 10% of its epochs, 1% of its learning
rate; "E:LR" = E epochs at peak LR), the model is quantized and calibrated once for PTQ and once
more for QAT (distillation from FP32, plus cross-entropy where batches carry labels; cosine decay), then evaluated on the test
split. Intervals are paired bootstrap 95% intervals over the test samples (1000 resamples, seed 0);
the recovered fraction is (QAT - PTQ) / (FP32 - PTQ), with its interval from the same resamples.
Latency: the PTQ and the QAT model of a plan are exported to ONNX (Q/DQ), their node lists compared,
and each timed on ONNX Runtime CPU (1 thread, batch of one calibration batch), alternating rounds.
The QAT model is also checked with ``mixq.verify`` (engine vs simulation).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixq.artifacts import write_atomic  # noqa: E402
from mixq.evaluate import evaluate  # noqa: E402
from mixq.plan import QuantPlan  # noqa: E402
from mixq.qat import QATConfig, qat  # noqa: E402
from mixq.quantize import quantize  # noqa: E402
from mixq.stats import paired_bootstrap_ci  # noqa: E402
from mixq.task import Task  # noqa: E402


def _recovered_ci(fp32: np.ndarray, ptq: np.ndarray, q: np.ndarray, resamples: int = 1000) -> tuple:
    rng = np.random.default_rng(0)
    n = fp32.size
    vals = []
    for _ in range(resamples):
        i = rng.integers(0, n, n)
        lost = fp32[i].mean() - ptq[i].mean()
        if lost > 0:
            vals.append((q[i].mean() - ptq[i].mean()) / lost)
    if len(vals) < resamples // 2:
        return None, None
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def _latency(models: dict, plan: QuantPlan, example, runs: int, rounds: int) -> dict:
    from mixq.engine.ort import build
    from mixq.export import apply_plan, export_float_graph
    from mixq.latency.stats import time_runs

    sessions, graphs = {}, {}
    for name, q in models.items():
        onnx_model = apply_plan(export_float_graph(q, example), q, plan)
        graphs[name] = [(n.op_type, tuple(n.input), tuple(n.output)) for n in onnx_model.graph.node]
        sessions[name] = build(onnx_model, 1).session
    tensors = example if isinstance(example, (tuple, list)) else (example,)  # MiniLM: (input_ids, attention_mask)
    feeds = {i.name: t.numpy() for i, t in zip(sessions["ptq"].get_inputs(), tensors)}
    times = {name: [] for name in models}
    for r in range(rounds):
        # Each model goes first in every other round: on a loaded machine the second slot ran slower.
        for name in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
            sess = sessions[name]
            st = time_runs(lambda: sess.run(None, feeds), runs, 10, "thread")
            times[name].append(st.median_ms)
    out = {f"{k}_ms": float(np.median(v)) for k, v in times.items()}
    out["rounds_ms"] = times
    out["same_graph"] = graphs["ptq"] == graphs["qat"]
    return out


def _recipes(text: str, task: Task) -> list[tuple[str, QATConfig]]:
    out = []
    for r in text.split(","):
        if r == "default":
            rec = task.train_recipe
            config = QATConfig.from_recipe(rec)
            lr = f"lr {rec['lr']:g} x 1%" if "qat_lr" not in rec else f"lr {config.lr:g} (measured; not {rec['lr']:g} x 1%)"
            out.append((f"default ({rec['epochs']} ep x 10%, {lr})", config))
        else:
            e, lr = r.split(":")
            out.append((f"{e} ep, lr {float(lr):g}", QATConfig(epochs=int(e), lr=float(lr))))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", default="mnist_resnet")
    ap.add_argument("--plans", default="int8:max,int8:entropy", help="FORMAT:CALIB_METHOD,... (ort-cpu, uniform)")
    ap.add_argument("--recipes", default="default,3:3e-4")
    ap.add_argument("--train-batches", type=int, default=None, help="use only the first N training batches")
    ap.add_argument("--eval-split", default="eval", choices=("eval", "search"),
                    help="evaluate on the example's evaluation (test) split or on its (smaller) search split")
    ap.add_argument("--no-deploy", action="store_true",
                    help="skip verify and latency (quick runs, e.g. choosing a recipe on the search split)")
    ap.add_argument("--no-verify", action="store_true", help="skip verify (run `mixq verify --qat` on --save-dir instead)")
    ap.add_argument("--save-dir", default=None,
                    help="save each trained model to DIR/qat-<format>-<method>-<n> (for `mixq export/verify --qat`)")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per latency round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating latency rounds per model")
    ap.add_argument("--out", default=None, help="output stem (default reports/qat_<example>)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out or f"reports/qat_{args.example}")
    task = Task.example(args.example)
    model = task.model_fn().eval()
    calib = task.calib_fn()
    evald = task.eval_fn() if args.eval_split == "eval" else task.search_fn()
    train = list(task.train_fn())[: args.train_batches]
    fp32 = evaluate(model, evald, task.metric_fn)
    rows = []
    print(f"{task.name}: FP32 {fp32.metric:.2f} on {fp32.samples} {args.eval_split} samples; {len(train)} training batches",
          flush=True)
    for spec in args.plans.split(","):
        fmt, method = spec.split(":")
        plan = QuantPlan.uniform(fmt, "ort-cpu", method)
        ptq_model = quantize(model, plan, calib_data=calib)
        ptq = evaluate(ptq_model, evald, task.metric_fn)
        for n, (label, config) in enumerate(_recipes(args.recipes, task)):
            t0 = time.perf_counter()
            q = quantize(model, plan, calib_data=calib)
            res = qat(q, model, train, config, progress=False, log=None)
            train_s = time.perf_counter() - t0
            ev = evaluate(q, evald, task.metric_fn)
            saved = None
            if args.save_dir:
                from mixq.qat import save_trained

                saved = str(save_trained(q, Path(args.save_dir) / f"qat-{fmt}-{method}-{n}",
                                         extra={"config": dataclasses.asdict(config), "history": res.history}))
            deploy = {"verify_passed": None, "verify": None, "ptq_ms": None, "qat_ms": None, "same_graph": None}
            if not args.no_deploy:
                if not args.no_verify:
                    from mixq.export import export_float_graph
                    from mixq.verify import verify

                    ver = verify(q, plan, evald, task.metric_fn, graph=export_float_graph(q, calib[0]), threads=1)
                    deploy.update(verify_passed=bool(ver.passed), verify=ver.summary())
                deploy.update(_latency({"ptq": ptq_model, "qat": q}, plan, calib[0], args.runs, args.rounds))
            d_ptq = fp32.metric - ptq.metric
            rec = (ev.metric - ptq.metric) / d_ptq if d_ptq > 0 else None
            row = {"plan": f"ort-cpu all-{fmt}, {method}", "recipe": label, "epochs": config.epochs, "lr": config.lr,
                   "fp32": fp32.metric, "ptq": ptq.metric, "qat": ev.metric,
                   "ptq_drop": d_ptq, "ptq_drop_ci": paired_bootstrap_ci(fp32.scores - ptq.scores),
                   "qat_drop": fp32.metric - ev.metric, "qat_drop_ci": paired_bootstrap_ci(fp32.scores - ev.scores),
                   "gain_ci": paired_bootstrap_ci(ev.scores - ptq.scores),
                   "recovered": rec, "recovered_ci": _recovered_ci(fp32.scores, ptq.scores, ev.scores) if rec is not None
                   else (None, None),
                   "train_seconds": train_s, "history": res.history, "saved": saved, **deploy}
            rows.append(row)
            print(_line(row), flush=True)
    table = _table(rows)
    print(table)
    meta = {"command": "python " + " ".join(sys.argv), "example": task.name, "split": args.eval_split,
            "eval_samples": fp32.samples,
            "train_batches": len(train), "rows": rows}
    write_atomic(out.with_suffix(".json"), json.dumps(meta, indent=1))
    split = "evaluation (test)" if args.eval_split == "eval" else "search"
    write_atomic(out.with_suffix(".md"), f"Command: `{meta['command']}`\n\n{task.name}: the {split} split, {fp32.samples} "
                 f"samples; {len(train)} training batches; paired-bootstrap 95% intervals.\n\n{table}\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def _ci(ci) -> str:
    return "-" if ci[0] is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _line(r: dict) -> str:
    rec = "n/a" if r["recovered"] is None else f"{100 * r['recovered']:.0f}%"
    return (f"{r['plan']} | {r['recipe']}: FP32 {r['fp32']:.2f}, PTQ {r['ptq']:.2f} (drop {r['ptq_drop']:+.2f} "
            f"{_ci(r['ptq_drop_ci'])}), QAT {r['qat']:.2f} (drop {r['qat_drop']:+.2f} {_ci(r['qat_drop_ci'])}), "
            f"recovered {rec}; latency PTQ {_ms(r['ptq_ms'])} ms, QAT {_ms(r['qat_ms'])} ms, same graph "
            f"{r['same_graph']}; verify {_verdict(r['verify_passed'])}; {r['train_seconds']:.0f} s to train")


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _verdict(passed) -> str:
    return "not run" if passed is None else "PASS" if passed else "FAIL"


def _table(rows: list) -> str:
    head = ("| plan | recipe | FP32 | PTQ | PTQ drop [95%] | QAT | QAT drop [95%] | recovered [95%] | "
            "PTQ ms | QAT ms | same graph | verify | train s |\n|---|---|---:|---:|---|---:|---|---|---:|---:|---|---|---:|")
    lines = [head]
    for r in rows:
        rec = "n/a (PTQ lost nothing)" if r["recovered"] is None else \
            f"{100 * r['recovered']:.0f}% " + ("" if r["recovered_ci"][0] is None else
                                              f"[{100 * r['recovered_ci'][0]:.0f}%, {100 * r['recovered_ci'][1]:.0f}%]")
        lines.append(f"| {r['plan']} | {r['recipe']} | {r['fp32']:.2f} | {r['ptq']:.2f} | {r['ptq_drop']:+.2f} "
                     f"{_ci(r['ptq_drop_ci'])} | {r['qat']:.2f} | {r['qat_drop']:+.2f} {_ci(r['qat_drop_ci'])} | {rec} | "
                     f"{_ms(r['ptq_ms'])} | {_ms(r['qat_ms'])} | "
                     f"{'-' if r['same_graph'] is None else 'yes' if r['same_graph'] else 'NO'} | "
                     f"{_verdict(r['verify_passed'])} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
