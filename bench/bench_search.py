"""The search against its baselines at budgets set relative to all-INT8, over seeds.

    python bench/bench_search.py --example mnist_resnet --trials 30 --seeds 0,1,2 --gaps 0.1,0.25,0.5 \\
        --out reports/search_mnist_resnet

1. A probe: ``mixq search --front`` with the baselines only, whose fresh-process re-timing gives FP32 and the fastest
   baseline (normally all-INT8) as ratios of FP32.
2. For each gap g: budget = fastest + g * (1 - fastest) (x FP32), and for each seed one ``mixq search --budget``
   in the same run folder (calibration, sensitivity and latencies cached once; one study per budget and seed). The
   random-search baseline runs with the first seed only.
3. The summary: per budget, every plan's test metric (with its bootstrap standard error) and fresh-process latency
   ratio; whether the searched plan is >= every baseline within budget, within one standard error; whether every
   searched plan still meets its budget when re-timed; the trial at which each seed reached its final best.

Writes OUT.json and OUT.md (and OUT/ with each run's search.json and, for the first seed, its plots).
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixq.search_prep import EVALUATE_MODES  # noqa: E402

Z95 = 1.959964


def _mixq(args: list[str], must: bool = True) -> int:
    cmd = [sys.executable, "-m", "mixq.cli", *args]
    print("$ mixq " + " ".join(args), flush=True)
    r = subprocess.run(cmd)
    if r.returncode != 0 and must:
        raise SystemExit(f"mixq {' '.join(args)} exited {r.returncode}")
    return r.returncode


def _se(row: dict) -> float:
    lo, hi = row["drop_ci"]
    return (hi - lo) / (2 * Z95)


def _first_reaching(search: dict) -> int | None:
    """The 1-based trial at which the study's best feasible metric first reached its final value."""
    best, at, final = None, None, (search.get("best") or {}).get("metric")
    for k, r in enumerate(search["records"], 1):
        if r["feasible"] and r["metric"] is not None and (best is None or r["metric"] > best):
            best, at = r["metric"], k
    return at if final is not None else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", default="mnist_resnet")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--gaps", default="0.1,0.25,0.5", help="budgets as fractions of the gap fastest -> FP32")
    ap.add_argument("--run-dir", default=None, help="the search's run folder (default runs/bench_search_<example>)")
    ap.add_argument("--out", default=None, help="output stem (default reports/search_<example>)")
    ap.add_argument("--evaluate", default="simulation", choices=EVALUATE_MODES,
                    help="passed on to every mixq search: where plan metrics are measured")
    ap.add_argument("--search-args", default="",
                    help="more options passed on to every mixq search, e.g. \"--runs 20 --rounds 3\"")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    gaps = [float(g) for g in args.gaps.split(",")]
    if not seeds or any(not 0 < g < 1 for g in gaps):
        raise SystemExit(f"--gaps must lie strictly between 0 and 1 and --seeds be non-empty, got {args.gaps!r}, "
                         f"{args.seeds!r}")
    run = Path(args.run_dir or f"runs/bench_search_{args.example}")
    out = Path(args.out or f"reports/search_{args.example}")
    out.mkdir(parents=True, exist_ok=True)
    common = ["--example", args.example, "--run-dir", str(run), "--no-progress", "--evaluate", args.evaluate,
              *shlex.split(args.search_args)]
    t0 = time.perf_counter()

    _mixq(["search", *common, "--front", "--trials", "1", "--no-random-baseline", "--study", "probe"])
    probe = json.loads((run / "search.json").read_text())
    ratios = {r["plan"]: r["ratio"] for r in probe["rows"]}
    fastest = min((n for n in ratios if n != "fp32"), key=ratios.get)
    shutil.copy(run / "search.json", out / "probe.json")

    budgets = []
    for g in gaps:
        x = ratios[fastest] + g * (1.0 - ratios[fastest])
        runs = []
        for s in seeds:
            extra = [] if not any(r.get("rows") for r in runs) else ["--no-random-baseline"]
            rc = _mixq(["search", *common, "--budget", f"{x:.3f}x", "--trials", str(args.trials), "--seed", str(s),
                        "--study", f"b{x:.3f}-s{s}", *extra], must=False)
            if rc != 0:  # e.g. the search's own timing puts the budget below the fastest plan: said in its error
                runs.append({"seed": s, "searched": None, "refused": f"mixq search exited {rc}", "rows": None})
                continue
            res = json.loads((run / "search.json").read_text())
            shutil.copy(run / "search.json", out / f"g{g}-s{s}.json")
            if not extra:
                for f in ("search.md", "search-pareto.png", "search-precision.png", "search-history.png"):
                    if (run / f).is_file():
                        shutil.copy(run / f, out / f"g{g}-{f}")
            rows = {r["plan"]: r for r in res["rows"]}
            searched = rows.get("searched")
            base_ok = [r for n, r in rows.items() if n != "searched" and r["within_budget"]]
            beats = None if searched is None else all(
                searched["test_metric"] >= r["test_metric"] - max(_se(r), _se(searched)) for r in base_ok)
            runs.append({"seed": s, "searched": searched, "beats_baselines_within_1se": beats,
                         "meets_budget_retimed": None if searched is None else searched["within_budget"],
                         "trial_of_final_best": _first_reaching(res["search"]),
                         "rows": res["rows"] if not extra else None, "stages": res.get("stages")})
        budgets.append({"gap": g, "budget_x": x, "runs": runs})

    summary = {"command": "python " + shlex.join(sys.argv), "example": args.example, "trials": args.trials,
               "evaluate": args.evaluate,
               "seeds": seeds, "fastest_baseline": fastest, "probe_ratios": ratios, "budgets": budgets,
               "seconds": time.perf_counter() - t0}
    (out.with_suffix(".json")).write_text(json.dumps(summary, indent=1, default=str))
    md = _markdown(summary, out)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def _markdown(s: dict, out: Path) -> str:
    lines = [f"# Search vs baselines on {s['example']}", "", f"Command: `{s['command']}` ({s['seconds'] / 60:.0f} min).",
             "", f"Fresh-process probe: the fastest baseline is {s['fastest_baseline']} at "
             f"{s['probe_ratios'][s['fastest_baseline']]:.3f}x of FP32. Budgets: fastest + gap x (1 - fastest). "
             f"{s['trials']} trials per study, seeds {s['seeds']}; metrics from the "
             f"{'ONNX Runtime engine' if s.get('evaluate') == 'engine' else 'fake-quant simulation'}; test metric with its standard error (paired "
             "bootstrap); latency re-timed in a fresh process, ratio to FP32.", ""]
    runs = [r for b in s["budgets"] for r in b["runs"]]
    found = [r for r in runs if r["searched"]]
    firsts = sorted(r["trial_of_final_best"] for r in found if r["trial_of_final_best"] is not None)
    lines += ["## Summary", "",
              f"- searched plans reported: {len(found)} of {len(runs)} runs (budget x seed);",
              f"- meet their budget when re-timed in a fresh process: {sum(bool(r['meets_budget_retimed']) for r in found)}"
              f" of {len(found)};",
              f"- test metric >= every baseline that meets the budget, within one SE: "
              f"{sum(bool(r['beats_baselines_within_1se']) for r in found)} of {len(found)};",
              f"- trial at which the study reached its final best search metric: median "
              f"{firsts[len(firsts) // 2] if firsts else '-'} (of {s['trials']}).", ""]
    for b in s["budgets"]:
        lines += [f"## Budget {b['budget_x']:.3f}x (gap {b['gap']:.2f})", "",
                  "| plan | low units | test metric | SE | latency x FP32 | within budget |", "|---|---:|---:|---:|---:|---|"]
        for r in next((r["rows"] for r in b["runs"] if r["rows"]), []):
            lines.append(f"| {r['plan']} | {r['low_units']}/{r['units']} | {r['test_metric']:.2f} | {_se(r):.2f} | "
                         f"{r['ratio']:.3f} | {'yes' if r['within_budget'] else 'no'} |")
        lines += ["", "| seed | searched metric | latency x FP32 | meets budget re-timed | >= every baseline within "
                  "budget (1 SE) | trial of final best |", "|---:|---:|---:|---|---|---:|"]
        for r in b["runs"]:
            p = r["searched"]
            lines.append(f"| {r['seed']} | {p['test_metric']:.2f} | {p['ratio']:.3f} | {r['meets_budget_retimed']} | "
                         f"{r['beats_baselines_within_1se']} | {r['trial_of_final_best']} |" if p else
                         f"| {r['seed']} | {r.get('refused', 'no plan within budget')} | | | | |")
        lines += ["", f"![pareto]({out.name}/g{b['gap']}-search-pareto.png)", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
