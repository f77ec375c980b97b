"""The report of `mixq run`: one Markdown page telling the story, from the stages' artifacts, and its HTML.

FP32 vs all-INT8 vs the searched plan vs QAT, each with its re-measured latency and its test metric with the
interval of its drop; the sensitivity chart; the Pareto front with the baselines; the per-unit precision map;
the optimization history; QAT's training; verification; the checks; the command and the versions.
Reads artifacts only: imports no torch.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

from mixq.artifacts import write_atomic
from mixq.search.budget import Budget

FIGURES = {"sensitivity": ("scan", "report/drops.png"), "pareto": ("search", "search-pareto.png"),
           "precision": ("search", "search-precision.png"), "history": ("search", "search-history.png")}


def _load(path: Optional[str | Path]) -> Optional[dict]:
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None


def _f(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _ci(ci: Any) -> str:
    return "" if not ci else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _meets(budget: Optional[list], t: Optional[dict]) -> Optional[bool]:
    """Whether a re-timed plan meets ``budget`` ([value, "x" | "ms"], as search.json keeps it)."""
    if budget is None or t is None:
        return None
    return Budget(*budget).margin(t["median_ms"], t["ratio"], 0.0)[0]


def _rows(search: dict, qat: Optional[dict], latency: Optional[dict]) -> list[dict]:
    """The comparison table: the search's rows (test split, re-timed), then QAT; latencies from the final re-timing."""
    timed = (latency or {}).get("plans", {})
    fp32_ms = (latency or {}).get("fp32_ms")
    out = []
    for r in search["rows"]:
        t = timed.get(r["plan"])
        out.append({"plan": r["plan"], "low": f"{r['low_units']}/{r['units']}", "metric": r["test_metric"],
                    "drop": r["drop"], "drop_ci": r.get("drop_ci"),
                    "ms": (fp32_ms if r["plan"] == "fp32" else t["median_ms"]) if latency and (t or r["plan"] == "fp32")
                    else r["latency_ms"],
                    "ratio": 1.0 if r["plan"] == "fp32" else (t["ratio"] if t else r["ratio"]),
                    "meets": _meets(search.get("budget_value"), t) if t else r.get("within_budget")})
    if qat is not None:
        t = timed.get("deployed")
        searched = next((r for r in search["rows"] if r["plan"] == "searched"), None)
        out.append({"plan": "searched + QAT", "low": f"{searched['low_units']}/{searched['units']}" if searched else "-",
                    "metric": qat["qat"], "drop": qat.get("qat_drop", qat["fp32"] - qat["qat"]),
                    "drop_ci": qat.get("qat_drop_ci"), "ms": t["median_ms"] if t else None,
                    "ratio": t["ratio"] if t else None,
                    "meets": _meets(search.get("budget_value"), t)})
    return out


def _verdict(verify: dict, passed: str, by_floor: str, failed: str) -> str:
    """The verification outcome in words: passed on its targets, passed by the float64 noise floor, or failed."""
    if not verify["passed"]:
        return failed + "; ".join(verify["failures"]) + "."
    if verify.get("waived"):
        return by_floor + "; ".join(verify["waived"]) + ")."
    return passed


def _story(search: dict, rows: list[dict], qat: Optional[dict], verify: Optional[dict], test: str) -> list[str]:
    by = {r["plan"]: r for r in rows}
    fp32, int8, best = by.get("fp32"), by.get("all-int8"), by.get("searched")
    lines = []
    if fp32 and int8:
        lines.append(f"FP32 scores **{fp32['metric']:.2f}** on the {test}; all-INT8 scores **{int8['metric']:.2f}** "
                     f"(drop {int8['drop']:+.2f}{_ci(int8['drop_ci'])}) at **{int8['ratio']:.2f}x** of FP32 latency.")
    if best:
        others = [r for r in rows if r["plan"] not in ("fp32", "searched", "searched + QAT") and r["meets"]]
        beaten = [r["plan"] for r in others if r["metric"] <= best["metric"]]
        lines.append(f"Under the budget **{search['budget']}**, the search chose a plan with {best['low']} units low "
                     f"that scores **{best['metric']:.2f}** at **{best['ratio']:.2f}x** "
                     f"({'meets' if best['meets'] else 'MISSES'} the budget when re-timed in a fresh process); "
                     f"of the {len(others)} baselines that meet the budget, it scores at least as well as "
                     f"{len(beaten)}" + (f" ({', '.join(beaten)})" if beaten else "") + ".")
    if qat is not None:
        lost = qat["fp32"] - qat["ptq"]
        rec = qat.get("recovered_fraction")
        lines.append(f"QAT of that plan ({qat['config']['epochs']} epoch(s) at lr {qat['config']['lr']:g}): PTQ "
                     f"{qat['ptq']:.2f} -> QAT **{qat['qat']:.2f}** (FP32 {qat['fp32']:.2f}); " +
                     ("PTQ lost nothing to recover." if rec is None or lost <= 0 else
                      f"**{100 * rec:.0f}%** of the {lost:.2f} points PTQ lost are recovered." if rec >= 0 else
                      f"QAT lost {qat['ptq'] - qat['qat']:.2f} points more than PTQ: the trained model is worse.")
                     + (" (PTQ lost less than one point here: the recovery goal of at least 60% applies from one "
                        "point up.)" if 0 < lost < 1 else ""))
    if verify is not None:
        lines.append("The deployed ONNX Runtime engine " + _verdict(verify, "computes what the simulation computes "
                     "(verification passed).", "computes what the simulation computes as far as float rounding lets "
                     "any implementation: verification passed by the noise floor, not by the targets (",
                     "does NOT pass verification: "))
    return lines


def markdown(d: Path, records: Mapping, config: Mapping, command: str, versions: Mapping, figures: Mapping) -> str:
    """The report text (figures: name -> file name next to the report)."""
    search = _load(d / "search" / "search.json") or {}
    qat = _load(records.get("qat", {}).get("summary"))
    verify = _load(records.get("verify", {}).get("summary"))
    latency = _load(records.get("latency", {}).get("summary"))
    export = _load(d / "export" / "export.json")
    scan = _load(d / "scan" / "sensitivity.json")
    rows = _rows(search, qat, latency) if search else []
    split = "evaluation" if any("no search split" in n for n in search.get("notes", [])) else "search"
    L = [f"# mixq run: {search.get('task', '?')}", "", f"`{command}`", ""]
    L += [f"- {line}" for line in _story(search, rows, qat, verify, "test split" if split == "search" else
                                           "evaluation data")] if search else ["The search did not finish."]
    L += ["", "## Plans compared", "",
          ("Test split (never seen by the search)" if split == "search" else "Evaluation data (the search saw it "
           "too: the task has no search split)") + "; latency: batch 1, one thread, ONNX Runtime CPU, medians of "
          f"{(latency or {}).get('job', {}).get('rounds', '?')} rounds re-timed in one fresh process, each interleaved "
          f"with FP32 (FP32 {_f((latency or {}).get('fp32_ms'), '.3f')} ms). Budget: {search.get('budget', '-')}.", "",
          "| plan | units low | test metric | drop vs FP32 [95% CI] | latency ms | x FP32 | meets budget |",
          "|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        meets = "-" if r["meets"] is None else ("yes" if r["meets"] else "**no**")
        L.append(f"| {r['plan']} | {r['low']} | {_f(r['metric'])} | {r['drop']:+.2f}{_ci(r['drop_ci'])} | "
                 f"{_f(r['ms'], '.3f')} | {_f(r['ratio'])} | {meets} |")
    for n in search.get("notes", []):
        L.append(f"\nNote: {n}.")
    if "sensitivity" in figures and scan:
        top = sorted((r for r in scan["rows"] if r.get("drop") is not None), key=lambda r: -r["drop"])[:5]
        L += ["", "## Sensitivity (one unit at a time)", "",
              f"{len(scan['rows'])} (unit, format) pairs scanned on the {split} split; the most sensitive:", ""]
        L += [f"- `{r['layer']}` {r['format']}: drop {r['drop']:+.2f}{_ci(r['drop_ci'])}"
              + (" (within noise)" if r.get("drop_noise") else "") for r in top]
        L += ["", f"![sensitivity]({figures['sensitivity']})"]
    for key, title in (("pareto", f"Metric vs measured latency ({split} split), with every baseline"),
                       ("precision", "Format per unit of every reported plan"), ("history", "Optimization history")):
        if key in figures:
            L += ["", f"## {title}", "", f"![{key}]({figures[key]})"]
    if qat is not None:
        L += ["", "## QAT", "", f"Plan: the searched one. {qat['train_batches']} training batches per epoch, "
              f"{qat['config']['epochs']} epoch(s), peak lr {qat['config']['lr']:g}, cosine decay, distillation from "
              f"FP32; {qat['seconds']:.0f} s.", "", "| epoch | loss | validation metric |", "|---:|---:|---:|"]
        L += [f"| {h.get('epoch')} | {_f(h.get('loss'), '.4f')} | {_f(h.get('metric'))} |" for h in qat["history"]]
    elif "qat" in records:
        L += ["", "## QAT", "", f"Not run: {records['qat'].get('skipped', 'no record')}."]
    L += ["", "## Checks", "", "| check | result |", "|---|---|"]
    if export:
        kc = export.get("kernels", {})
        stayed = kc.get("units_float") or []
        L.append(f"| every unit the plan quantizes runs an integer kernel on ONNX Runtime | "
                 f"{'yes' if not stayed else '**no**: ' + ', '.join(stayed)} |")
    if verify is not None:
        e = verify["engine"]
        agree = e.get("top1_agreement") if e.get("top1_agreement") is not None else e.get("score_agreement")
        L.append(f"| engine vs simulation ({e['samples']} samples): agreement {_f(100 * agree if agree is not None else None)}%, "
                 f"metric {_f(e.get('metric'))} vs {_f(e.get('metric_ref'))} | "
                 f"{_verdict(verify, 'pass', 'pass by the noise floor (', '**FAIL**: ')} |")
    for r in rows:
        if r["plan"] in ("searched", "searched + QAT") and r["meets"] is not None:
            L.append(f"| {r['plan']} meets the budget when re-timed ({_f(r['ratio'])}x) | "
                     f"{'yes' if r['meets'] else '**no** (reported, not a failure of the run: timing noise)'} |")
    L += ["", "## Stages", "", "| stage | seconds | finished |", "|---|---:|---|"]
    L += [f"| {n} | {_f(r.get('seconds'), '.0f')} | {r.get('finished', r.get('skipped', '-'))} |"
          for n, r in records.items() if n != "report"]
    L += ["", "## Versions and machine", "", "| | |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in versions.items()]
    L += ["", "Configuration:", "", "```json", json.dumps(dict(config), indent=1), "```", ""]
    return "\n".join(L)


def write_report(d: Path, records: Mapping, config: Mapping, command: str, versions: Mapping) -> tuple[Path, Path]:
    """Copy the figures next to ``RUN/report/report.md``, write it and its HTML; return both paths."""
    from mixq.report_html import render_html

    out = d / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, (stage, rel) in FIGURES.items():
        src = d / stage / rel
        if src.is_file():
            shutil.copyfile(src, out / f"{name}.png")
            figures[name] = f"{name}.png"
    md = write_atomic(out / "report.md", markdown(d, records, config, command, versions, figures))
    return md, render_html(md)
