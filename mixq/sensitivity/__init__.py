"""Sensitivity analysis: how much each layer costs in each format, measured and by proxy.

    table = mixq.sensitivity.scan(model, calib_batches, eval_batches, metric, formats=["int8"])
    table.ranked("int8")[:5]          # most sensitive first, with intervals and proxies
    table.save("sensitivity.json")    # what the search consumes and the report reads

Modules: ``api`` (``scan``: orchestration), ``exact`` (one-at-a-time / leave-one-out, fast suffix replay
or naive), ``graphrun`` (node-by-node FX execution), ``proxies`` (SQNR / MSE / Fisher in one
pass), ``selection`` (modes, (layer, format) pairs, prepared-model checks), ``store``
(fingerprinted, resumable JSONL), ``table`` (SensitivityTable; no torch).
"""
from mixq.sensitivity.errors import ScanError, StaleScanError
from mixq.sensitivity.exact import EXACT_MODES, LEAVE_ONE_OUT, ONE_AT_A_TIME
from mixq.sensitivity.api import scan, scan_task, select
from mixq.sensitivity.table import LayerSensitivity, SensitivityTable, spearman
from mixq.stats import paired_bootstrap_ci

__all__ = ["scan", "scan_task", "select", "SensitivityTable", "LayerSensitivity", "ScanError", "StaleScanError",
           "paired_bootstrap_ci", "spearman", "EXACT_MODES", "ONE_AT_A_TIME", "LEAVE_ONE_OUT"]
