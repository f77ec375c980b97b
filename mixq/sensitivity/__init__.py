"""Sensitivity analysis: how much each layer costs in each format, measured and by proxy.

    table = mixq.sensitivity.scan(model, calib_batches, eval_batches, metric, formats=["int8"])
    table.ranked("int8")[:5]          # most sensitive first, with intervals and proxies
    table.save("sensitivity.json")    # what the search consumes and the report reads

Modules: ``api`` (``scan``: orchestration), ``exact`` (one-at-a-time / leave-one-out, fast suffix replay
or naive), ``graphrun`` (node-by-node FX execution), ``proxies`` (SQNR / MSE / Fisher in one
pass), ``selection`` (modes, (layer, format) pairs, prepared-model checks), ``store``
(fingerprinted, resumable JSONL), ``table`` (SensitivityTable; no torch).

Names are imported on first use, so ``mixq.sensitivity.table`` imports without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ScanError": "errors", "StaleScanError": "errors",
    "EXACT_MODES": "exact", "LEAVE_ONE_OUT": "exact", "ONE_AT_A_TIME": "exact",
    "scan": "api", "scan_task": "api", "select": "api",
    "LayerSensitivity": "table", "SensitivityTable": "table", "paired_bootstrap_ci": "table", "spearman": "table",
}

__all__ = ["scan", "scan_task", "select", "SensitivityTable", "LayerSensitivity", "ScanError", "StaleScanError",
           "paired_bootstrap_ci", "spearman", "EXACT_MODES", "ONE_AT_A_TIME", "LEAVE_ONE_OUT"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"mixq.sensitivity.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'mixq.sensitivity' has no attribute {name!r}")
