"""Artifacts and report of ``mixq search``, from its summary dict (plain data; imports no torch).

Writes, next to each other in the run folder: ``search-trials.{json,csv}`` (every trial of the study and of
the random-search study), ``search-front.{json,csv}`` (with ``--front``), the plots ``search-pareto.png``
(metric vs measured latency, the budget line, every baseline marked), ``search-precision.png`` (per-unit
format of each reported plan) and ``search-history.png`` (best feasible metric vs trial), and ``search.md``.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

from mixq.artifacts import write_atomic

TRIAL_FIELDS = ("study", "number", "source", "latency_ms", "metric", "feasible", "evaluated", "screened",
                "evaluate_s", "measure_s", "storage_s", "sampler_s", "low_units", "plan")


def _low(a: dict) -> str:
    """The non-fp32 units of a plan: ``unit:fmt;unit:fmt``."""
    return ";".join(f"{u}:{f}" for u, f in a.items() if f != "fp32")


def trial_rows(summary: dict) -> list[dict]:
    """Every trial of both studies as flat rows."""
    rows = []
    for key in ("search", "random"):
        res = summary.get(key)
        if not res:
            continue
        for r in res["records"]:
            rows.append({"study": res["study"], "number": r["number"], "source": r["source"],
                         "latency_ms": r["latency_ms"], "metric": r["metric"], "feasible": r["feasible"],
                         "evaluated": r["metric"] is not None, "screened": r.get("screened", False),
                         "evaluate_s": r["evaluate_s"], "measure_s": r["measure_s"],
                         "storage_s": r.get("storage_s", 0.0), "sampler_s": r.get("sampler_s", 0.0),
                         "low_units": sum(f != "fp32" for f in r["assignment"].values()), "plan": _low(r["assignment"]),
                         "assignment": r["assignment"]})
    return rows


def _csv(rows: list[dict], fields: tuple) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()


def write_artifacts(summary: dict, d: Path) -> dict:
    """Write the trial and front tables, the plots and ``search.md``; return {what: path}."""
    d = Path(d)
    paths = {}
    trials = trial_rows(summary)
    paths["trials_json"] = str(write_atomic(d / "search-trials.json", json.dumps(trials, indent=1)))
    paths["trials_csv"] = str(write_atomic(d / "search-trials.csv", _csv(trials, TRIAL_FIELDS)))
    if summary.get("front"):
        front = [{"number": r["number"], "source": r["source"], "latency_ms": r["latency_ms"], "metric": r["metric"],
                  "feasible": r["feasible"], "low_units": sum(f != "fp32" for f in r["assignment"].values()),
                  "plan": _low(r["assignment"]), "assignment": r["assignment"]} for r in summary["search"]["front"]]
        paths["front_json"] = str(write_atomic(d / "search-front.json", json.dumps(front, indent=1)))
        paths["front_csv"] = str(write_atomic(d / "search-front.csv", _csv(front, (
            "number", "source", "latency_ms", "metric", "feasible", "low_units", "plan"))))
    paths.update(plots(summary, d))
    paths["report"] = str(write_atomic(d / "search.md", markdown(summary, paths)))
    return paths


# ----------------------------------------------------------------------------- plots
def plots(summary: dict, d: Path) -> dict:
    """The three PNGs (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    limit = summary.get("limit_ms")
    # 1. metric vs measured latency: every evaluated trial, the front, the baselines, the budget
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for key, color, label in (("random", "0.7", "random search trials"), ("search", "tab:blue", "study trials")):
        res = summary.get(key)
        if not res:
            continue
        pts = [(r["latency_ms"], r["metric"]) for r in res["records"] if r["metric"] is not None]
        if pts:
            ax.scatter(*zip(*pts), s=14, color=color, alpha=0.6, label=label)
    front = summary["search"]["front"]
    if front:
        ax.step([r["latency_ms"] for r in front], [r["metric"] for r in front], where="post", color="tab:blue",
                lw=1, label="front (study)")
    markers = "osD^v<>ph*"
    for i, row in enumerate(r for r in summary["rows"] if r["plan"] != "searched"):
        ax.scatter([row["search_latency_ms"]], [row["search_metric"]], marker=markers[i % len(markers)], s=60,
                   edgecolor="k", zorder=3, label=row["plan"])
    best = next((r for r in summary["rows"] if r["plan"] == "searched"), None)
    if best is not None:
        ax.scatter([best["search_latency_ms"]], [best["search_metric"]], marker="*", s=220, color="gold",
                   edgecolor="k", zorder=4, label="searched (chosen)")
    if limit is not None:
        ax.axvline(limit, color="tab:red", ls="--", lw=1, label=f"budget {summary['budget']} ({limit:.3f} ms)")
    ax.set_xlabel("measured latency, ms (ONNX Runtime CPU, batch 1, 1 thread)")
    ax.set_ylabel("metric on the search split")
    ax.set_title(f"{summary['task']}: metric vs measured latency")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out["pareto_png"] = _save(fig, d / "search-pareto.png")
    # 2. per-unit precision map of every reported plan (the chosen one on top)
    rows = sorted(summary["rows"], key=lambda r: r["plan"] != "searched")
    units = list(summary["space"]["kinds"])
    fmts = sorted({f for r in rows for f in r["assignment"].values()}, key=lambda f: (f != "fp32", f))
    code = {f: i for i, f in enumerate(fmts)}
    grid = [[code[r["assignment"][u]] for u in units] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(units) + 3), 0.4 * len(rows) + 1.8))
    cmap = matplotlib.colors.ListedColormap(["#dddddd", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"][:len(fmts)])
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(fmts) - 0.5, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [r["plan"] for r in rows], fontsize=7)
    ax.set_xticks(range(len(units)), units, rotation=90, fontsize=6)
    ax.set_title("format per unit (grey: fp32)")
    handles = [matplotlib.patches.Patch(color=cmap(code[f]), label=f) for f in fmts]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out["precision_png"] = _save(fig, d / "search-precision.png")
    # 3. optimization history
    from mixq.search.records import TrialRecord, best_so_far

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, color, label in (("search", "tab:blue", f"study ({summary['sampler']})"),
                              ("random", "0.5", "random search")):
        res = summary.get(key)
        if not res:
            continue
        recs = [TrialRecord(**r) for r in res["records"]]
        best = best_so_far(recs)
        xs = [r.number for r, b in zip(recs, best) if b is not None]
        ax.step(xs, [b for b in best if b is not None], where="post", color=color, label=f"best feasible, {label}")
        pts = [(r.number, r.metric) for r in recs if r.metric is not None and r.feasible]
        if pts:
            ax.scatter(*zip(*pts), s=8, color=color, alpha=0.4)
    ax.set_xlabel("trial")
    ax.set_ylabel("metric on the search split")
    ax.set_title("optimization history (dots: feasible evaluated trials)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out["history_png"] = _save(fig, d / "search-history.png")
    return out


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return str(write_atomic(path, buf.getvalue()))


# ----------------------------------------------------------------------------- markdown
def _f(x: Optional[float], fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def timing_lines(res: dict) -> list[str]:
    """The time split of a study's trials (this session's totals and the per-trial means)."""
    t = res["timing"]
    total = t.get("total_s", 0.0)
    if not t.get("trials"):
        return [f"- study {res['study']!r}: no trial ran in this session ({len(res['records'])} finished earlier)."]
    sh = t["share"]
    n = t["trials"]
    return [f"- study {res['study']!r}, {n} trials in this session, {total:.1f} s: evaluate {t['evaluate_s']:.1f} s "
            f"({100 * sh['evaluate']:.0f}%), measure {t['measure_s']:.1f} s ({100 * sh['measure']:.0f}%), storage "
            f"{t['storage_s']:.2f} s ({100 * sh['storage']:.1f}%), sampler and bookkeeping {t['sampler_s']:.2f} s "
            f"({100 * sh['sampler']:.1f}%); per trial {1e3 * total / n:.0f} ms, of which storage "
            f"{1e3 * t['storage_s'] / n:.1f} ms; {t['evaluated']} evaluations."]


def selection_lines(summary: dict) -> list[str]:
    """How each study's plan was chosen: its best candidates, re-timed in a fresh process."""
    sel = summary.get("selection") or {}
    if not any(sel.values()):
        return []
    L = ["## How the plan was chosen", "",
         "A search's best trial is one in-process measurement on a shared machine, so its best candidates (the "
         f"feasible plans within {summary.get('metric_tolerance', 0.1):g} metric points of the best, fastest first, "
         "then the next best) were re-timed in a fresh process, interleaved with FP32; the chosen plan is the best "
         "one that met the budget there (equal metrics go to the larger re-timed margin). The figures "
         "below come from a second, independent re-timing.", "",
         "| study | trial | search metric | search ms | re-timed ms | x FP32 | meets | chosen |",
         "|---|---:|---:|---:|---:|---:|---|---|"]
    for label, rows in sel.items():
        for r in rows:
            L.append(f"| {label} | {r['trial']} | {r['metric']:.2f} | {r['search_latency_ms']:.3f} | "
                     f"{r['retimed_ms']:.3f} | {r['ratio']:.3f} | {'yes' if r['meets'] else 'no'} | "
                     f"{'**chosen**' if r.get('chosen') else ''} |")
    return L + [""]


def markdown(summary: dict, paths: dict) -> str:
    """``search.md``: what was asked, what was found, how it compares, where the time went."""
    rows, limit = summary["rows"], summary.get("limit_ms")
    rt = summary["retime"]
    best = next((r for r in rows if r["plan"] == "searched"), None)
    L = [f"# mixq search on {summary['task']}", "", f"Command: `{summary['command']}`", ""]
    if limit is not None:
        L.append(f"Budget {summary['budget']}: {limit:.3f} ms against FP32 {summary['fp32_ms']:.3f} ms as measured in "
                 f"the search (ONNX Runtime CPU, batch 1, one thread).")
    else:
        L.append(f"No budget: the metric/latency front. FP32 {summary['fp32_ms']:.3f} ms.")
    mode = summary.get("latency_mode")
    if mode and mode["mode"] == "ratio":
        L.append(f"Latency in the search: each plan timed back to back with FP32 in {mode['rounds']} alternating "
                 "rounds, the budget judged on the median ratio, shown as that ratio x FP32 "
                 f"{mode['reference_ms']:.3f} ms.")
    elif mode:
        L.append("Latency in the search: one absolute measurement per plan (median of its runs).")
    if summary.get("evaluate") == "engine":
        L.append("Metrics (search and test split, FP32 included): each plan's model run on ONNX Runtime, the numbers "
                 "the deployed engine gives.")
    else:
        L.append("Metrics (search and test split): the fake-quant simulation of each plan (`mixq verify` compares it "
                 "with the engine).")
    source = summary.get("sensitivity", {}).get("source")
    if source:
        L.append(f"Sensitivity (what the scan-guided, greedy and ILP baselines rank units by): {source}.")
    L += ["", f"Space: {summary['space']['describe']}.", "",
          f"Study `{summary['study']}` in {summary['storage']} ({summary['trials']} trials, {summary['sampler']}, seed "
          f"{summary['seed']}), warm-started with the baselines; random search with the same number of trials in "
          f"`{summary['study']}-random`, evaluated the same way (latency first, no evaluation of a plan more than 5% "
          f"over budget). Browse the studies with `{summary['dashboard']}`.", ""]
    if best is not None:
        verdict = ("meets the budget" if best["within_budget"] else "does NOT meet the budget") \
            if best["within_budget"] is not None else ""
        L += ["## Result", "",
              f"The searched plan runs {best['low_units']} of {best['units']} units in a low format: test metric "
              f"{best['test_metric']:.2f} (drop {best['drop']:+.2f} [{best['drop_ci'][0]:+.2f}, "
              f"{best['drop_ci'][1]:+.2f}]), {best['latency_ms']:.3f} ms ({best['ratio']:.2f}x FP32) re-timed in a "
              f"fresh process; it {verdict}" + (f" with a margin of {best['margin_ms']:+.3f} ms "
                                                f"({100 * best['margin_frac']:+.1f}% of the budget)."
                                                if best["margin_ms"] is not None else "."), ""]
    elif limit is not None:
        L += ["## Result", "", "The study found no plan that met the budget when re-timed.", ""]
    L += selection_lines(summary)
    front = summary["search"]["front"] if summary.get("front") else []
    if front:
        L += ["## Metric/latency front of the study", "",
              f"{len(front)} plans no other evaluated plan beats on both (search split, latency as measured in the "
              "search; `search-front.csv`).", "", "| trial | source | low units | latency ms | x FP32 | metric |",
              "|---:|---|---:|---:|---:|---:|"]
        for r in front:
            low = sum(f != "fp32" for f in r["assignment"].values())
            L.append(f"| {r['number']} | {r['source']} | {low}/{len(r['assignment'])} | {r['latency_ms']:.3f} | "
                     f"{r['latency_ms'] / summary['fp32_ms']:.2f} | {r['metric']:.2f} |")
        L.append("")
    L += ["## Every reported plan", "",
          f"Test split (never seen by the search; FP32 {rt['fp32_metric']:.2f}). Latency re-timed in a new process: "
          f"{rt['rounds']} rounds of {rt['runs']} runs, each plan right after an FP32 run; `x FP32` is the median "
          f"ratio to that FP32 run (FP32 median {rt['fp32_ms']:.3f} ms there).", "",
          "| plan | low units | search metric | search ms | test metric | drop [95% CI] | re-timed ms | x FP32 | "
          "meets budget | margin |", "|---|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for r in rows:
        ok = "-" if r["within_budget"] is None else ("yes" if r["within_budget"] else "**no**")
        margin = "-" if r["margin_ms"] is None else f"{r['margin_ms']:+.3f} ms ({100 * r['margin_frac']:+.1f}%)"
        L.append(f"| {r['plan']} | {r['low_units']}/{r['units']} | {_f(r['search_metric'])} | "
                 f"{r['search_latency_ms']:.3f} | {r['test_metric']:.2f} | {r['drop']:+.2f} [{r['drop_ci'][0]:+.2f}, "
                 f"{r['drop_ci'][1]:+.2f}] | {r['latency_ms']:.3f} | {r['ratio']:.2f} | {ok} | {margin} |")
    if limit is not None:
        within = [r for r in rows if r["within_budget"] is not None and r["plan"] != "fp32"]
        n_ok = sum(r["within_budget"] for r in within)
        L += ["", f"{n_ok} of {len(within)} plans other than FP32 meet the budget when re-timed (baselines are "
                  "reported whether or not they meet it)."]
    L += ["", f"![metric vs latency]({Path(paths['pareto_png']).name})", "",
          f"![precision map]({Path(paths['precision_png']).name})", "",
          f"![optimization history]({Path(paths['history_png']).name})", "", "## Where the time went", ""]
    for key in ("search", "random"):
        if summary.get(key):
            L += timing_lines(summary[key])
    st = summary["stages"]
    L += [f"- stages: calibration + sensitivity {st.get('calibrate_and_sensitivity_s', 0):.1f} s, single-unit "
          f"latencies + baselines {st.get('latency_and_baselines_s', 0):.1f} s, studies {st.get('study_s', 0):.1f} s, "
          f"final figures {st.get('final_s', 0):.1f} s; total {st.get('total_s', 0):.1f} s (cached stages of an "
          f"earlier session cost nothing here)."]
    if summary["notes"]:
        L += ["", "## Notes", ""] + [f"- {n}" for n in summary["notes"]]
    files = ", ".join(f"`{Path(p).name}`" for k, p in paths.items() if k != "report")
    L += ["", f"Files: {files}" + (", `search-best.json` (deploy with `mixq export --plan`)" if best else "") + "."]
    return "\n".join(L) + "\n"
