"""Latency predictors against measurement on ONNX Runtime CPU: additive per-layer deltas vs boundary-aware.

    python bench/bench_predictor.py [--models resnet18,minilm] [--train 40] [--test 30] [--runs 15]
                                    [--out reports/latency_predictor]

For each model: quantize for ort-cpu, then measure (one intra-op thread, median of ``--runs`` runs
after warm-up, thread CPU time; see mixq/latency/ort.py) FP32, all-INT8, every single-layer-INT8
plan, ``--train`` random partial plans to fit on, and ``--test`` held-out random partial plans,
measured twice so the machine's own noise can be stated; all in one shuffled order, so that the
slow drift of a shared machine affects fitting and held-out plans alike. Then it reports the mean
absolute percentage error (MAPE) on the held-out plans of:

- additive: FP32 + the measured delta of each INT8 layer (the classic baseline; N+1 plans);
- additive-int8: all-INT8 + leave-one-out deltas (with ``--loo``; N+1 plans);
- unit-fit: per-layer terms only, least-squares fitted on the same plans as boundary (ablation);
- boundary terms, no absorption: per-layer + per-edge boundary + size-weighted conversion terms;
- boundary-aware: the same, plus absorption (a float unit enclosed by INT8 units runs INT8 on an
  engine that fuses around Q/DQ) when cross-validation finds it (mixq's BoundaryLatency);
- boundary (random only): the same fitted on the random training plans alone.

Prints tables, writes ``<out>.json`` (every measurement included) and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixq  # noqa: E402
from mixq.artifacts import write_atomic  # noqa: E402
from mixq.latency.graph_edges import unit_graph  # noqa: E402
from mixq.latency.model import AdditiveLatency, BoundaryLatency, UnitGraph  # noqa: E402
from mixq.latency.ort import OrtLatency  # noqa: E402


def load_model(name: str):
    """(float model, calibration batches, one example batch) of a benchmark model."""
    if name == "resnet18":
        from experiments import resnet18

        return resnet18.model(), resnet18.calib_data(2), resnet18.example_inputs(1)
    if name == "minilm":
        from experiments import minilm

        calib = minilm.calib_data(2, 16)
        return minilm.model(), calib, tuple(t[:1] for t in calib[0])
    if name == "mnist_resnet":
        from experiments import mnist_resnet

        calib = mnist_resnet.calib_data(2)
        return mnist_resnet.model(), calib, calib[0][:1]
    raise SystemExit(f"unknown model {name!r}; choose resnet18, minilm or mnist_resnet")


def random_plans(units: tuple, n: int, rng: np.random.Generator) -> list[dict]:
    """Random partial plans: an INT8 share drawn from U(0.15, 0.85), then each unit INT8 with that probability."""
    out = []
    while len(out) < n:
        share = rng.uniform(0.15, 0.85)
        a = {u: "int8" if rng.random() < share else "fp32" for u in units}
        if len(set(a.values())) == 2:
            out.append(a)
    return out


def evaluate(name: str, fit_on: list, test: list, graph: UnitGraph, **kw) -> dict:
    b = BoundaryLatency(graph, **kw).fit(fit_on)
    pred = [b.predict(a) for a, _ in test]
    y = [ms for _, ms in test]
    ape = np.abs(np.asarray(pred) - y) / y * 100
    return {"predictor": name, "plans_measured": len(fit_on), "mape": float(ape.mean()), "max_ape": float(ape.max()),
            "chosen": b.chosen}


def run_model(name: str, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    model, calib, example = load_model(name)
    q = mixq.quantize(model, "int8", backend="ort-cpu", calib_data=calib)
    graph = unit_graph(q, example)
    disabled = None if args.disabled_optimizers == "default" else \
        tuple(x for x in args.disabled_optimizers.split(",") if x and x != "none")
    lat = OrtLatency(q, example, runs=args.runs, warmup=args.warmup, disabled_optimizers=disabled)
    _ = lat.float_graph
    units = graph.units
    print(f"\n{name}: {len(units)} units, {len(graph.edges)} edges, {q.mixq.mode} mode "
          f"(prepared in {time.perf_counter() - t0:.0f} s)", flush=True)
    rng = np.random.default_rng(args.seed)
    fp32 = {u: "fp32" for u in units}
    int8 = {u: "int8" for u in units}
    singles = [dict(fp32, **{u: "int8"}) for u in units]
    loo = [dict(int8, **{u: "fp32"}) for u in units] if args.loo else []
    train = random_plans(units, args.train, rng)
    test = random_plans(units, args.test, rng)

    def progress(done: int, total: int) -> None:
        if done % 20 == 0 or done == total:
            print(f"  measured {done}/{total} ({time.perf_counter() - t0:.0f} s)", flush=True)

    # Everything that is fitted on is measured first; the test plans twice, interleaved.
    cache = Path(args.cache) / f"{name}.json" if args.cache else None
    if cache is not None and cache.is_file():
        print(f"  reusing {lat.load(cache)} measurements from {cache}", flush=True)
    # One shuffled sequence: the plans fitted on once, the held-out plans twice, so that the slow drift
    # of a shared machine hits fitting and test plans alike (measuring the test plans last biased them).
    fit_plans = [fp32, int8] + singles + loo + train
    lat.measure_many(fit_plans + test, rounds=[1] * len(fit_plans) + [2] * len(test), progress=progress,
                     shuffle=True, seed=args.seed)
    if cache is not None:
        lat.save(cache)
    rec = {a_key(a): ms for a, ms in lat.records()}
    m = lambda plans: [(a, rec[a_key(a)]) for a in plans]  # noqa: E731
    test_m = m(test)
    rounds = [lat.details(a).get("rounds_ms", [lat(a)] * 2) for a in test]
    noise = float(np.mean([abs(r[0] - r[1]) / r[1] for r in rounds]) * 100)
    y = [ms for _, ms in test_m]

    rows = []
    add = AdditiveLatency.from_records(graph, fp32, m([fp32] + singles))
    ape = np.abs(np.asarray([add.predict(a) for a in test]) - y) / y * 100
    rows.append({"predictor": "additive (FP32 + single-layer deltas)", "plans_measured": 1 + len(singles),
                 "mape": float(ape.mean()), "max_ape": float(ape.max())})
    if loo:
        add8 = AdditiveLatency.from_records(graph, int8, m([int8] + loo))
        ape = np.abs(np.asarray([add8.predict(a) for a in test]) - y) / y * 100
        rows.append({"predictor": "additive (all-INT8 + leave-one-out deltas)", "plans_measured": 1 + len(loo),
                     "mape": float(ape.mean()), "max_ape": float(ape.max())})
    fit_all = m([fp32, int8] + singles + loo + train)
    no_edges = UnitGraph(units=graph.units, kinds=graph.kinds)
    rows.append(evaluate("unit-fit (per-layer terms only, fitted)", fit_all, test_m, no_edges))
    rows.append(evaluate("boundary terms, no absorption", fit_all, test_m, graph, absorb=(False,)))
    rows.append(evaluate("boundary-aware (BoundaryLatency)", fit_all, test_m, graph))
    rows.append(evaluate("boundary-aware, random plans only", m([fp32, int8] + train), test_m, graph))
    curve = []
    for k in sorted({0, 10, 20, len(train)}):
        if k <= len(train):
            r = evaluate(f"boundary, {k} random", m([fp32, int8] + singles + loo + train[:k]), test_m, graph)
            curve.append({"random_train_plans": k, "plans_measured": r["plans_measured"], "mape": r["mape"]})
    secs = time.perf_counter() - t0
    print(f"  FP32 {rec[a_key(fp32)]:.2f} ms, all-INT8 {rec[a_key(int8)]:.2f} ms, random partial plans "
          f"{min(y):.2f}-{max(y):.2f} ms; repeat noise (MAPE of one measurement vs another) {noise:.1f}%")
    for r in rows:
        print(f"  {r['predictor']:45s} {r['plans_measured']:4d} plans  MAPE {r['mape']:6.1f}%  (max {r['max_ape']:.0f}%)")
    print("  learning curve (single-layer plans + k random):",
          ", ".join(f"k={c['random_train_plans']}: {c['mape']:.1f}%" for c in curve), flush=True)
    return {"model": name, "units": len(units), "edges": len(graph.edges), "mode": q.mixq.mode,
            "ort_disabled_optimizers": args.disabled_optimizers,
            "fp32_ms": rec[a_key(fp32)], "int8_ms": rec[a_key(int8)],
            "test_ms": {"min": min(y), "median": float(np.median(y)), "max": max(y)},
            "repeat_noise_mape": noise, "predictors": rows, "learning_curve": curve, "seconds": secs,
            "graph": graph.to_dict(),
            "measurements": [{"int8_units": sorted(u for u, f in a.items() if f == "int8"), **st}
                             for a, st in ((a, lat.details(a)) for a, _ in lat.records())],
            "sets": {"train": [sorted(u for u, f in a.items() if f == "int8") for a in train],
                     "test": [sorted(u for u, f in a.items() if f == "int8") for a in test]}}


def a_key(a: dict) -> tuple:
    return tuple(sorted(a.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,minilm")
    ap.add_argument("--train", type=int, default=40, help="random partial plans to fit on")
    ap.add_argument("--test", type=int, default=30, help="held-out random partial plans")
    ap.add_argument("--runs", type=int, default=15, help="timed runs per plan (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loo", action="store_true", help="also measure leave-one-out plans around all-INT8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/latency_predictor")
    ap.add_argument("--cache", default=None, help="folder to save measurements in and reuse them from")
    ap.add_argument("--note", action="append", default=[], help="a line of context for the Markdown report")
    ap.add_argument("--disabled-optimizers", default="default",
                    help="ORT optimizers to switch off: 'default' (mixq.engine.ort's choice), 'none', or a comma list")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = [run_model(name, args) for name in args.models.split(",")]
    argv, skip = [], False
    for a in sys.argv:  # the notes are prose, not part of what made the numbers
        if skip or a == "--note":
            skip = not skip
            continue
        argv.append(a)
    command = "python " + " ".join(argv)
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps({"command": command, "results": results}, indent=1))
    write_atomic(out.with_suffix(".md"), markdown(command, results, tuple(args.note)))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def markdown(command: str, results: list, notes: tuple = ()) -> str:
    lines = ["# Latency predictors vs measurement (ONNX Runtime CPU)", "", f"Command: `{command}`", "",
             "Every measurement is in the JSON next to this file; `--cache` only reuses measurements saved by "
             "an earlier run of the same command; without it the command measures afresh (5-7 minutes on "
             "this 2-core machine).", "",
             "Latency: median of timed runs after warm-up, 1 intra-op thread, CPU time of the calling thread "
             "(robust to other jobs on this shared 2-core machine). MAPE: mean absolute percentage error on "
             "held-out random partial plans (each unit INT8 with a per-plan probability in [0.15, 0.85]), "
             "against the median of two measurements. All plans were measured in one shuffled order (the "
             "held-out ones twice), so slow drifts of the machine hit fitted and held-out plans alike. "
             "Repeat noise: MAPE of one measurement of a plan against another.", "",
             f"ONNX Runtime graph optimizers switched off: {results[0].get('ort_disabled_optimizers', 'default')} "
             "('default' = mixq.engine.ort's choice, 'none' = ONNX Runtime's own defaults). With ONNX Runtime's "
             "defaults, its WeightBiasQuantization transformer quantizes the float weights of a Conv / Gemm the "
             "plan keeps FP32 when every tensor around it is INT8 (DQ -> Conv -> Q), so that layer runs INT8; "
             "mixq.engine.ort switches it off, but ONNX Runtime's Q/DQ fusions still run an FP32 Add or pooling "
             "enclosed by INT8 units as QLinearAdd / uint8 pooling. The boundary-aware predictor's *absorption* "
             "option treats such enclosed units as running in their neighbours' format; cross-validation turns "
             "it on only when the measurements show it.", ""] + [f"Note: {n}" for n in notes] + ["",
             "| model | units | FP32 ms | all-INT8 ms | partial plans ms (min / median / max) | repeat noise |",
             "|---|---:|---:|---:|---|---:|"]
    for r in results:
        t = r["test_ms"]
        lines.append(f"| {r['model']} | {r['units']} | {r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | "
                     f"{t['min']:.2f} / {t['median']:.2f} / {t['max']:.2f} | {r['repeat_noise_mape']:.1f}% |")
    lines += ["", "| model | predictor | plans measured | MAPE | max APE | chosen by cross-validation |",
              "|---|---|---:|---:|---:|---|"]
    for r in results:
        for p in r["predictors"]:
            ch = p.get("chosen")
            cv = (f"absorb={ch['absorb']}, alpha={ch['alpha']:g}, edge_ratio={ch['edge_ratio']:g}" if ch else "-")
            lines.append(f"| {r['model']} | {p['predictor']} | {p['plans_measured']} | {p['mape']:.1f}% | "
                         f"{p['max_ape']:.0f}% | {cv} |")
    lines += ["", "Learning curve of the boundary-aware predictor (single-layer plans + k random plans):", "",
              "| model | k | plans measured | MAPE |", "|---|---:|---:|---:|"]
    for r in results:
        for c in r["learning_curve"]:
            lines.append(f"| {r['model']} | {c['random_train_plans']} | {c['plans_measured']} | {c['mape']:.1f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
