"""Imports point one way (STYLE.md): the quantizer core knows nothing of later stages."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mixq"
CORE = ["formats.py", "errors.py", "quant"]
LATER_STAGES = ("mixq.sensitivity", "mixq.search", "mixq.latency", "mixq.export", "mixq.engine", "mixq.qat",
                "mixq.report", "mixq.verify", "mixq.cli", "optuna", "onnx", "onnxruntime", "tensorrt", "matplotlib")


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files(*parts: str) -> list[Path]:
    out = []
    for p in parts:
        q = ROOT / p
        out.extend(sorted(q.rglob("*.py")) if q.is_dir() else [q] if q.exists() else [])
    return out


@pytest.mark.parametrize("path", files(*CORE), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_does_not_import_later_stages(path):
    bad = {n for n in imports_of(path) if n.startswith(LATER_STAGES)}
    assert not bad, f"{path.name} imports {bad}"


TORCH_FREE = ("report.py", "search.py", "plan.py", "formats.py", "errors.py", "artifacts.py", "latency/base.py",
              "latency/stats.py", "latency/model.py", "latency/trtexec.py", "latency/trtexec_files.py",
              "latency/trt_layers.py", "engine", "sensitivity/table.py", "run_config.py", "pipeline_report.py",
              "report_html.py", "search_report.py")


@pytest.mark.parametrize("path", files(*TORCH_FREE),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_search_and_report_do_not_touch_torch(path):
    bad = {n for n in imports_of(path) if n == "torch" or n.startswith("torch.")}
    assert not bad, f"{path.name} imports {bad}"
