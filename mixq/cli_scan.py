"""``mixq scan``: per-layer sensitivity of a task, resumable, with a report.

    mixq scan --example minilm --formats int8 --mode both
    -> RUN/scan.jsonl (resumable results), RUN/sensitivity.json (the SensitivityTable),
       RUN/report/{report.md, drops.png, proxies.png}
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Callable

from mixq.errors import MixqError
from mixq.sensitivity.table import SCAN_METHODS

MODES = ("one-at-a-time", "leave-one-out", "both", "none")


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def register(sub, add_task_args: Callable, task_of: Callable, run_dir_of: Callable) -> None:
    """Add the ``scan`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("scan", help="per-layer sensitivity: exact metric drops with intervals, and fast proxies",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p)
    p.add_argument("--formats", default=None,
                   help="comma-separated formats to scan (default: every format the backend supports, per layer)")
    p.add_argument("--layers", default=None, help="comma-separated layer names (default: all; see `mixq inventory`)")
    p.add_argument("--mode", default="one-at-a-time", choices=MODES,
                   help="exact scans: only this layer quantized (one-at-a-time), all but this layer "
                        "(leave-one-out), both, or none (proxies only)")
    p.add_argument("--proxies", default=True, action=argparse.BooleanOptionalAction,
                   help="compute the SQNR / MSE / Fisher proxies (default: on)")
    p.add_argument("--proxy-data", default="calib", choices=("calib", "eval"),
                   help="data for the proxies (default: calibration data; they need no labels)")
    p.add_argument("--proxy-batch", type=int, default=None,
                   help="samples per forward-backward of the proxy pass (default: a quarter of an evaluation "
                        "batch; lower it if the proxies run out of memory)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--calib-method", default="max", help="max (default), entropy, percentile or mse")
    p.add_argument("--method", default="auto", choices=SCAN_METHODS,
                   help="exact scan method: fast re-runs only what a layer changes (FX mode); naive runs full "
                        "evaluations; engine runs each entry's plan on ONNX Runtime (ort-cpu), the deployed numbers")
    from mixq.cli_deploy import add_batch_axis_arg

    add_batch_axis_arg(p)  # --method engine exports the model
    p.add_argument("--fresh", action="store_true", help="discard finished results in the run folder and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-dir", default=None, help="where the report goes (default: RUN/report)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the Fisher probes")
    p.add_argument("--split", default="eval", choices=("eval", "search"),
                   help="data the exact scan measures: the evaluation (final test) split, the default, or the "
                        "example's search split (what `mixq search` optimises on)")
    p.set_defaults(func=lambda args: cmd_scan(args, task_of, run_dir_of))


def cmd_scan(args: argparse.Namespace, task_of: Callable, run_dir_of: Callable) -> int:
    from mixq.cli_deploy import batch_axis_of
    from mixq.report import ReportError, scan_report
    from mixq.sensitivity import scan_task
    from mixq.sensitivity.api import check_method

    check_method(args.method, args.backend or "ort-cpu")  # before any data is loaded
    task = task_of(args)
    if args.split == "search":
        if task.search_fn is None:
            raise MixqError(f"--split search: the task {task.name!r} has no search split (an example module gives one "
                            "with a search_data() function); use --split eval.")
        task = dataclasses.replace(task, eval_fn=task.search_fn)
    run_dir = Path(run_dir_of(args, task))
    table = scan_task(task, backend=args.backend or "ort-cpu", formats=_names(args.formats), layers=_names(args.layers),
                      modes=args.mode, proxies=args.proxies, proxy_data=args.proxy_data,
                      proxy_batch=args.proxy_batch, bootstrap=args.bootstrap,
                      confidence=args.confidence, calib_method=args.calib_method, method=args.method,
                      store=run_dir / "scan.jsonl", fresh=args.fresh, progress=not args.no_progress, seed=args.seed,
                      batch_axis=batch_axis_of(args))
    print(summary(table))
    try:
        paths = scan_report(run_dir / "sensitivity.json", Path(args.report_dir) if args.report_dir else run_dir / "report")
    except ReportError as e:
        raise MixqError(str(e)) from None
    print(f"wrote {run_dir / 'scan.jsonl'}, {run_dir / 'sensitivity.json'}, " + ", ".join(str(p) for p in paths.values()))
    return 0


def summary(table, top: int = 10) -> str:
    """A terminal summary: reference metrics, the most sensitive layers per format, proxy correlations."""
    ref = table.reference
    out = [f"{table.task}: FP32 {ref.get('fp32', math.nan):.2f}"
           + "".join(f", all-{f} {ref[f'all:{f}']:.2f}" for f in table.formats if f"all:{f}" in ref)]
    for fmt in table.formats:
        rows = table.ranked(fmt)
        if not rows or rows[0].drop is None:
            rows = table.ranked(fmt, by="fisher")
            out.append(f"{fmt}: most sensitive by the Fisher proxy (no exact scan)")
        else:
            noisy = sum(1 for r in rows if r.drop_noise)
            out.append(f"{fmt}: most sensitive layers ({noisy} of {len(rows)} drops within noise)")
        width = max(len(r.layer) for r in rows[:top])
        for r in rows[:top]:
            drop = "" if r.drop is None else (f"drop {r.drop:+6.2f} [{r.drop_ci[0]:+.2f}, {r.drop_ci[1]:+.2f}]"
                                              + (" noise" if r.drop_noise else "      "))
            extra = "" if r.out_sqnr_db is None else f"  out SQNR {r.out_sqnr_db:5.1f} dB"
            fis = "" if r.fisher is None else f"  fisher {r.fisher:.2e}"
            out.append(f"  {r.layer.ljust(width)}  {drop}{extra}{fis}")
        rho = table.spearman.get(fmt, {})
        parts = [f"{k.replace('_vs_', ' vs ')} {v:+.2f}" for k, v in rho.items() if v is not None]
        if parts:
            out.append("  Spearman: " + ", ".join(parts))
    t = table.timing
    out.append(f"time: total {t.get('total_s', 0):.1f} s (method {t.get('method')})")
    return "\n".join(out)
