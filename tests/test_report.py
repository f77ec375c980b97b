"""Reports read artifacts only: Markdown and PNGs from a sensitivity table, without torch."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "mixq" / "report.py"


def _row(layer, kind, fmt, drop, ci, noise, out_sqnr, fisher, sqnr, recovered=None):
    return {"layer": layer, "kind": kind, "format": fmt, "metric": 90.0 - drop, "drop": drop, "drop_ci": list(ci),
            "drop_noise": noise, "out_sqnr_db": out_sqnr, "recovered": recovered,
            "recovered_ci": None if recovered is None else [recovered - 0.5, recovered + 0.5],
            "recovered_noise": None if recovered is None else False, "sqnr_db": sqnr, "mse": 1e-3, "fisher": fisher}


def table(loo: bool = True, proxies: bool = True) -> dict:
    rows = [
        _row("embed", "linear", "int8", 0.2, (-0.4, 0.8), True, 40.0, 1e-3, 35.0, 0.1 if loo else None),
        _row("attn.q", "linear", "int8", 3.1, (1.9, 4.3), False, 18.0, 5e-1, 33.0, 2.0 if loo else None),
        _row("ffn.out", "linear", "int8", 1.2, (0.4, 2.0), False, 25.0, 8e-2, 30.0, 0.9 if loo else None),
        _row("head", "linear", "int8", 0.0, (0.0, 0.0), True, "inf", 1e-6, 50.0, 0.0 if loo else None),
        _row("attn.q", "linear", "int4_wo", 6.5, (4.0, 9.0), False, 12.0, 2.0, 20.0, None),
    ]
    if not proxies:
        for r in rows:
            r["sqnr_db"] = r["mse"] = r["fisher"] = None
    return {"version": 1, "task": "toy", "backend": "ort-cpu", "metric": "toy:metric",
            "layers": [["embed", "linear"], ["attn.q", "linear"], ["ffn.out", "linear"], ["head", "linear"]],
            "formats": ["int8", "int4_wo"], "modes": ["one-at-a-time"] + (["leave-one-out"] if loo else []),
            "reference": {"fp32": 90.0, "all:int8": 84.5}, "rows": rows, "samples": 256, "bootstrap": 1000,
            "confidence": 0.95,
            "spearman": {"int8": {"sqnr_vs_drop": 0.4, "fisher_vs_drop": 1.0, "fisher_vs_out_sqnr": 1.0,
                                  "leave-one-out_vs_drop": 1.0}, "int4_wo": {}} if proxies else {},
            "timing": {"calibration_s": 1.5, "proxies_s": 2.0, "method": "fast", "total_s": 10.0},
            "fingerprint": "abc", "notes": ["a note"]}


def _load_report_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mixq_report_standalone", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_markdown_ranks_layers_and_states_noise_and_correlations(tmp_path):
    rep = _load_report_module()
    (tmp_path / "sensitivity.json").write_text(json.dumps(table()))
    paths = rep.scan_report(tmp_path / "sensitivity.json", tmp_path / "out")
    md = paths["markdown"].read_text()
    int8 = md[md.index("## int8"):md.index("## int4_wo")]
    order = [int8.index(f"`{n}`") for n in ("attn.q", "ffn.out", "embed", "head")]
    assert order == sorted(order), "largest drop first; ties broken by worse output SQNR"
    assert "2 of 4 layers cost measurable accuracy" in int8 and "2 of 4 drops are within noise" in int8
    assert "| 1 | `attn.q` | linear | +3.10 | [+1.90, +4.30] | **costs** | 18.0 | +2.00 |" in int8
    assert "within noise" in int8 and "∞" in int8
    assert "| int8 | Fisher (proxy) | 1.00 | 1.00 |" in md
    assert "Every layer in int8: **84.50** (drop +5.50)" in md
    assert "![drops](drops.png)" in md and "- a note" in md
    for name in ("drops", "proxies"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_leave_one_out_or_proxies(tmp_path):
    rep = _load_report_module()
    paths = rep.scan_report(table(loo=False, proxies=False), tmp_path)
    assert "proxies" not in paths and "drops" in paths
    md = paths["markdown"].read_text()
    assert "recovered (LOO)" not in md and "How well the proxies" not in md


def test_bad_input_is_a_clear_error(tmp_path):
    rep = _load_report_module()
    with pytest.raises(rep.ReportError, match="does not exist"):
        rep.scan_report(tmp_path / "missing.json", tmp_path)
    with pytest.raises(rep.ReportError, match="not a sensitivity table"):
        rep.scan_report({"rows": []}, tmp_path)


def test_report_imports_no_torch_and_only_plain_mixq_modules():
    tree = ast.parse(REPORT.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    top = {n.split(".")[0] for n in names}
    assert top <= {"__future__", "json", "math", "os", "sys", "pathlib", "typing", "io", "numpy", "matplotlib",
                   "mixq"}, top
    # the one atomic writer (mode, stale temporaries) is shared, not copied
    assert {n for n in names if n.startswith("mixq")} == {"mixq.artifacts", "mixq.errors"}
    assert "mkstemp" not in REPORT.read_text()


def test_report_runs_where_torch_cannot_be_imported(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(table()))
    code = f"""
import sys, importlib.util
sys.modules["torch"] = None  # any `import torch` now fails
spec = importlib.util.spec_from_file_location("r", {str(REPORT)!r})
r = importlib.util.module_from_spec(spec); spec.loader.exec_module(r)
sys.exit(r.main([{str(tmp_path / 't.json')!r}, {str(tmp_path / 'out')!r}]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "proxies.png").is_file()


def test_report_runs_as_a_script_without_torch(tmp_path):
    """``python mixq/report.py TABLE OUT`` finds the mixq package next to it (no install, no PYTHONPATH)."""
    (tmp_path / "t.json").write_text(json.dumps(table()))
    code = f"""
import runpy, sys
sys.modules["torch"] = None
sys.argv = ["report.py", {str(tmp_path / 't.json')!r}, {str(tmp_path / 'out')!r}]
runpy.run_path({str(REPORT)!r}, run_name="__main__")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "report.md").stat().st_mode & 0o777 == _umask_mode()


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
