"""Reports from artifacts: a sensitivity table (JSON) -> Markdown + PNG figures.

Reads only the JSON a scan wrote (``sensitivity.json``); imports no torch (from mixq only the plain
``errors`` and ``artifacts``), so it runs anywhere numpy and matplotlib do
(``python mixq/report.py RUN/sensitivity.json``).
Figures are drawn on matplotlib's Agg canvas directly, leaving the user's backend alone.

    scan_report("runs/minilm/sensitivity.json", "reports/scan_minilm")
    -> report.md, drops.png (per-layer drops with intervals, one colour per format),
       proxies.png (each proxy against the exact drops, with its Spearman coefficient)
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script (python mixq/report.py): make the mixq package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixq.artifacts import write_atomic  # noqa: E402
from mixq.errors import MixqError  # noqa: E402

FORMAT_COLORS = {"int8": "#1f77b4", "int4_wo": "#d62728", "fp8_e4m3": "#2ca02c", "fp16": "#9467bd",
                 "bf16": "#8c564b"}
PROXY_LABELS = {"sqnr": "layer output SQNR (dB, lower = worse)", "fisher": "Fisher / 2nd-order score",
                "mse": "layer output MSE"}
PROXY_FIELDS = {"sqnr": "sqnr_db", "fisher": "fisher", "mse": "mse"}


class ReportError(MixqError, ValueError):
    """The input is not a sensitivity table this report understands."""


def _write(path: Path, data: str | bytes) -> Path:
    return write_atomic(path, data)


def load_table(src: str | os.PathLike | Mapping) -> dict:
    """The table as a dict, from a path or an already-loaded mapping."""
    if isinstance(src, Mapping):
        data = dict(src)
    else:
        p = Path(src)
        if not p.is_file():
            raise ReportError(f"sensitivity table {str(p)!r} does not exist; run `mixq scan` first.")
        data = json.loads(p.read_text())
    if "rows" not in data or "reference" not in data:
        raise ReportError("not a sensitivity table: expected the JSON object `mixq scan` writes (rows, reference).")
    return data


# --------------------------------------------------------------------- numbers
def _f(v: Any) -> float:
    if v is None:
        return math.nan
    return float(v)  # handles "inf" / "-inf" strings too


def _fmt(v: Any, nd: int = 2, signed: bool = False) -> str:
    x = _f(v)
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def _sci(v: Any) -> str:
    x = _f(v)
    return "–" if math.isnan(x) else f"{x:.2e}"


def _ci(ci: Optional[Sequence]) -> str:
    return "–" if not ci else f"[{_f(ci[0]):+.2f}, {_f(ci[1]):+.2f}]"


def ranked(rows: list[dict], fmt: str) -> list[dict]:
    """Rows of ``fmt``: largest drop first; ties (and missing drops) by worse output SQNR."""
    rs = [r for r in rows if r["format"] == fmt]

    def key(r: dict) -> tuple:
        d = _f(r.get("drop"))
        o = _f(r.get("out_sqnr_db"))
        return (-(d if not math.isnan(d) else -math.inf), o if not math.isnan(o) else math.inf)

    return sorted(rs, key=key)


# --------------------------------------------------------------------- markdown
def markdown(t: Mapping, figures: Sequence[str] = ("drops.png", "proxies.png")) -> str:
    """The report text for table ``t`` (a dict as ``load_table`` returns)."""
    ref = t["reference"]
    fp32 = _f(ref.get("fp32"))
    rows = t["rows"]
    formats = list(t.get("formats") or sorted({r["format"] for r in rows}))
    modes = list(t.get("modes") or [])
    timing = t.get("timing", {})
    conf = int(round(100 * float(t.get("confidence", 0.95))))
    lines = [f"# Layer sensitivity: {t.get('task') or 'model'} on {t.get('backend')}", ""]
    lines.append(f"- Metric: `{t.get('metric')}` (mean of per-sample scores, %), {t.get('samples', 0)} evaluation "
                 f"samples. FP32 (the prepared graph, every layer fp32): **{_fmt(fp32)}**.")
    for f in formats:
        if f"all:{f}" in ref:
            a = _f(ref[f"all:{f}"])
            lines.append(f"- Every layer in {f}: **{_fmt(a)}** (drop {_fmt(fp32 - a, signed=True)}).")
    method = timing.get("method", "?")
    lines.append(f"- Exact modes: {', '.join(modes) or 'none'}; method: {method}"
                 f"{' (only the part of the graph downstream of each layer is re-run)' if method == 'fast' else ''}. "
                 f"Intervals: {conf}% paired bootstrap over samples, {t.get('bootstrap')} resamples; "
                 f"*noise* = the interval contains 0.")
    lines.append("- Columns: **drop** = FP32 − metric with only this layer quantized; **out SQNR** = exact "
                 "end-to-end output SQNR of that run against FP32 (noise-free, higher = less damage); "
                 "**recovered** = metric with every layer but this one quantized − all quantized; "
                 "**SQNR / Fisher** = proxies (the layer's own output error; second-order output-distortion score).")
    lines.append("")
    for fmt in formats:
        rs = ranked(rows, fmt)
        if not rs:
            continue
        lines += [f"## {fmt}: layers ranked by metric drop", ""]
        have_drop = [r for r in rs if r.get("drop") is not None]
        if have_drop:
            noisy = sum(1 for r in have_drop if r.get("drop_noise"))
            sig = [r for r in have_drop if not r.get("drop_noise") and _f(r["drop"]) > 0]
            top = ", ".join(f"`{r['layer']}` ({_fmt(r['drop'], signed=True)} {_ci(r.get('drop_ci'))})" for r in sig[:5])
            lines.append(f"{len(sig)} of {len(have_drop)} layers cost measurable accuracy in {fmt}"
                         f"{': ' + top if top else ''}. {noisy} of {len(have_drop)} drops are within noise.")
            lines.append("")
        head = ["#", "layer", "kind", "drop", f"{conf}% CI", "verdict", "out SQNR dB"]
        has_loo = any(r.get("recovered") is not None for r in rs)
        has_px = any(r.get("fisher") is not None or r.get("sqnr_db") is not None for r in rs)
        if has_loo:
            head += ["recovered (LOO)", f"{conf}% CI "]
        if has_px:
            head += ["SQNR dB", "Fisher"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---:" if h not in ("layer", "kind", "verdict") else ":---" for h in head) + "|")
        for i, r in enumerate(rs, 1):
            cells = [str(i), f"`{r['layer']}`", r.get("kind", ""), _fmt(r.get("drop"), signed=True),
                     _ci(r.get("drop_ci")), _verdict(r), _fmt(r.get("out_sqnr_db"), 1)]
            if has_loo:
                cells += [_fmt(r.get("recovered"), signed=True), _ci(r.get("recovered_ci"))]
            if has_px:
                cells += [_fmt(r.get("sqnr_db"), 1), _sci(r.get("fisher"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += _proxy_section(t, formats)
    lines += _timing_section(timing)
    if figures:
        lines += ["## Figures", ""]
        for fig in figures:
            lines.append(f"![{fig.rsplit('.', 1)[0]}]({fig})")
        lines.append("")
    notes = t.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _verdict(r: Mapping) -> str:
    if r.get("drop") is None:
        return ""
    if r.get("drop_noise"):
        return "within noise"
    return "**costs**" if _f(r["drop"]) > 0 else "gains"


def _proxy_section(t: Mapping, formats: Sequence[str]) -> list[str]:
    sp = t.get("spearman") or {}
    if not any(sp.get(f) for f in formats):
        return []
    lines = ["## How well the proxies rank the layers", "",
             "Spearman rank correlation of each score with the exact one-at-a-time measurement over the layers "
             "(1 = same order; each score oriented so that larger = more sensitive).", "",
             "| format | score | vs metric drop | vs exact output SQNR |", "|:---|:---|---:|---:|"]
    names = {"sqnr": "layer output SQNR (proxy)", "fisher": "Fisher (proxy)", "mse": "layer output MSE (proxy)",
             "leave-one-out": "leave-one-out recovered (exact)"}
    for f in formats:
        s = sp.get(f) or {}
        for key, label in names.items():
            a, b = s.get(f"{key}_vs_drop"), s.get(f"{key}_vs_out_sqnr")
            if a is not None or b is not None:
                lines.append(f"| {f} | {label} | {_fmt(a)} | {_fmt(b)} |")
    lines.append("")
    for f in formats:
        rs = [r for r in t["rows"] if r["format"] == f and r.get("drop") is not None]
        if len(rs) >= 3:
            noisy = sum(1 for r in rs if r.get("drop_noise"))
            if noisy > len(rs) / 2:
                lines.append(f"In {f}, {noisy} of {len(rs)} drops are within noise, so correlations against the drops "
                             "mostly measure noise; the output-SQNR column is the noise-free comparison.")
                lines.append("")
    return lines


def _timing_section(timing: Mapping) -> list[str]:
    if not timing:
        return []
    lines = ["## Time", "", "| stage | seconds |", "|:---|---:|"]
    for k, v in timing.items():
        if isinstance(v, (int, float)) and k.endswith("_s"):
            lines.append(f"| {k[:-2].replace(':', ' ')} | {v:.1f} |")
    lines.append("")
    return lines


# --------------------------------------------------------------------- figures
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return _write(path, buf.getvalue())


def _color(fmt: str, i: int) -> str:
    return FORMAT_COLORS.get(fmt, f"C{i % 10}")


def drops_figure(t: Mapping, path: str | os.PathLike) -> Optional[Path]:
    """Horizontal bars of per-layer drops (and leave-one-out recoveries) with their intervals."""
    rows = t["rows"]
    formats = [f for f in (t.get("formats") or []) if any(r["format"] == f for r in rows)]
    layers = [l[0] for l in t.get("layers", [])] or list(dict.fromkeys(r["layer"] for r in rows))
    layers = [l for l in layers if any(r["layer"] == l for r in rows)]
    panels = [(k, lbl) for k, lbl in (("drop", "one-at-a-time: metric drop vs FP32 (pp)"),
                                      ("recovered", "leave-one-out: metric recovered vs all-quantized (pp)"))
              if any(r.get(k) is not None for r in rows)]
    if not panels or not layers:
        return None
    n, nf = len(layers), len(formats)
    fig = _figure(5.2 * len(panels) + 2.5, max(3.0, 0.5 + n * (0.16 + 0.07 * nf)))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    ypos = np.arange(n)
    height = 0.8 / max(nf, 1)
    by = {(r["layer"], r["format"]): r for r in rows}
    for ax, (key, label) in zip(axes, panels):
        for i, f in enumerate(formats):
            off = (i - (nf - 1) / 2) * height
            vals, lo, hi, noise, ys = [], [], [], [], []
            for j, l in enumerate(layers):
                r = by.get((l, f))
                if r is None or r.get(key) is None:
                    continue
                v = _f(r[key])
                ci = r.get(f"{key}_ci") or (v, v)
                vals.append(v)
                lo.append(max(v - _f(ci[0]), 0.0))
                hi.append(max(_f(ci[1]) - v, 0.0))
                noise.append(bool(r.get(f"{key}_noise")))
                ys.append(ypos[j] + off)
            if not vals:
                continue
            c = _color(f, i)
            colors = [(c if not nz else "none") for nz in noise]
            ax.barh(ys, vals, height=height * 0.9, color=colors, edgecolor=c, linewidth=0.8,
                    label=f"{f} (hollow = within noise)")
            ax.errorbar(vals, ys, xerr=[lo, hi], fmt="|", color=c, ms=5, ecolor="black", elinewidth=0.7,
                        capsize=1.5)
        ax.axvline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel(label)
        ax.grid(axis="x", linestyle=":", linewidth=0.5)
    axes[0].set_yticks(ypos)
    axes[0].set_yticklabels(layers, fontsize=7 if n > 30 else 8)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    conf = int(round(100 * float(t.get("confidence", 0.95))))
    fig.suptitle(f"{t.get('task') or 'model'} on {t.get('backend')}: per-layer sensitivity, graph order "
                 f"(whiskers: {conf}% bootstrap intervals)", fontsize=10)
    return _save(fig, Path(path))


def proxies_figure(t: Mapping, path: str | os.PathLike) -> Optional[Path]:
    """Each proxy against the exact drop (top row) and the exact output SQNR (bottom row)."""
    rows = [r for r in t["rows"] if r.get("drop") is not None]
    proxies = [p for p in ("sqnr", "fisher", "mse") if any(r.get(PROXY_FIELDS[p]) is not None for r in rows)]
    if not rows or not proxies:
        return None
    formats = [f for f in (t.get("formats") or []) if any(r["format"] == f for r in rows)]
    sp = t.get("spearman") or {}
    targets = [("drop", "metric drop (pp)"), ("out_sqnr_db", "exact output SQNR (dB)")]
    fig = _figure(4.3 * len(proxies), 7.6)
    axes = fig.subplots(2, len(proxies), squeeze=False)
    for col, p in enumerate(proxies):
        for row, (tkey, tlabel) in enumerate(targets):
            ax = axes[row][col]
            rhos = []
            for i, f in enumerate(formats):
                rs = [r for r in rows if r["format"] == f and r.get(PROXY_FIELDS[p]) is not None]
                x = np.array([_f(r[PROXY_FIELDS[p]]) for r in rs])
                y = np.array([_f(r.get(tkey)) for r in rs])
                ok = np.isfinite(x) & np.isfinite(y)
                if not ok.any():
                    continue
                c = _color(f, i)
                if tkey == "drop":
                    err = np.array([[max(_f(r["drop"]) - _f((r.get("drop_ci") or [r["drop"]])[0]), 0.0),
                                     max(_f((r.get("drop_ci") or [0, r["drop"]])[1]) - _f(r["drop"]), 0.0)]
                                    for r in rs]).T
                    ax.errorbar(x[ok], y[ok], yerr=err[:, ok], fmt="o", color=c, ecolor=c, alpha=0.8, ms=4,
                                elinewidth=0.6, capsize=1.5, label=f)
                else:
                    ax.plot(x[ok], y[ok], "o", color=c, alpha=0.8, ms=4, label=f)
                rho = (sp.get(f) or {}).get(f"{p}_vs_{'drop' if tkey == 'drop' else 'out_sqnr'}")
                rhos.append(f"{f}: ρ = {_fmt(rho)}")
            if p in ("fisher", "mse"):
                ax.set_xscale("log")
            ax.set_xlabel(PROXY_LABELS[p], fontsize=8)
            ax.set_ylabel(tlabel, fontsize=8)
            ax.grid(linestyle=":", linewidth=0.5)
            ax.set_title("Spearman " + ", ".join(rhos), fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"{t.get('task') or 'model'}: proxies against the exact one-at-a-time scan "
                 f"(ρ oriented so that 1 = same ranking)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, Path(path))


def scan_report(src: str | os.PathLike | Mapping, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.md, drops.png and proxies.png for a sensitivity table into ``out_dir``.

    Returns:
        {"markdown": path, "drops": path, "proxies": path} (figures only if there was data to plot).
    """
    t = load_table(src)
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    d = drops_figure(t, out / "drops.png")
    if d:
        paths["drops"] = d
    p = proxies_figure(t, out / "proxies.png")
    if p:
        paths["proxies"] = p
    figs = [x.name for x in (d, p) if x]
    paths["markdown"] = _write(out / "report.md", markdown(t, figs))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python mixq/report.py SENSITIVITY.json [OUT_DIR]")
        return 0 if args else 2
    src = Path(args[0])
    out = Path(args[1]) if len(args) > 1 else src.parent / "report"
    try:
        paths = scan_report(src, out)
    except (ReportError, json.JSONDecodeError) as e:
        print(f"mixq report: error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
