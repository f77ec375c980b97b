"""SensitivityTable: per layer x format, the measured metric drop with its interval, and the proxies.

This module is plain data and statistics (numpy, scipy); it does not import torch, so the search
and the reports can use a table without a model.

Conventions:
- ``drop`` (one-at-a-time) = FP32 metric - metric with only this layer in the format. Positive
  means the layer costs accuracy.
- ``recovered`` (leave-one-out) = metric with every layer but this one in the format - metric
  with every layer in the format. Positive means keeping this layer float buys accuracy back.
- ``out_sqnr_db``: exact end-to-end output SQNR of the one-at-a-time run against FP32 outputs
  (continuous, noise-free; ranks layers whose metric drops are all within noise).
- proxies: ``sqnr_db`` / ``mse`` of the layer's own output (lower SQNR = more damage) and
  ``fisher``, the second-order output-distortion estimate (higher = more sensitive).
- Intervals come from a paired bootstrap over the evaluation samples (the per-sample score
  differences are resampled); a layer is *within noise* when its interval contains 0.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from mixq.artifacts import write_atomic
from mixq.sensitivity.errors import ScanError
from mixq.stats import paired_bootstrap_ci  # noqa: F401 - its old home; the table's intervals come from it

# How `scan` measures its exact drops (see ``mixq.sensitivity.api.scan``); here, without torch, for the run config.
SCAN_METHODS = ("auto", "fast", "naive", "engine")

TABLE_VERSION = 1

# proxy name -> (field, sign): sign * value grows with sensitivity
PROXIES = {"sqnr": ("sqnr_db", -1.0), "mse": ("mse", 1.0), "fisher": ("fisher", 1.0)}
# exact measures a proxy is compared with (field, sign)
TARGETS = {"drop": ("drop", 1.0), "out_sqnr": ("out_sqnr_db", -1.0)}


def spearman(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation over the pairs where both are finite; None if undefined."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = spearmanr(x, y).statistic
    return None if not np.isfinite(rho) else float(rho)


def output_sqnr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(signal / noise); +inf for an exact match."""
    if noise_power <= 0.0:
        return math.inf
    if signal_power <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


@dataclass
class LayerSensitivity:
    """One (layer, format) row; any measurement not taken is None."""

    layer: str
    kind: str
    format: str
    metric: Optional[float] = None
    drop: Optional[float] = None
    drop_ci: Optional[tuple[float, float]] = None
    drop_noise: Optional[bool] = None
    out_sqnr_db: Optional[float] = None
    recovered: Optional[float] = None
    recovered_ci: Optional[tuple[float, float]] = None
    recovered_noise: Optional[bool] = None
    sqnr_db: Optional[float] = None
    mse: Optional[float] = None
    fisher: Optional[float] = None


@dataclass
class SensitivityTable:
    """Everything a scan measured, ready for the search and the report.

    Attributes:
        task, backend, metric: what was scanned (``metric`` is the metric's qualified name).
        layers: (name, kind) of every quantizable unit in graph order.
        formats / modes: scanned formats and exact modes.
        reference: metric means of the bases: ``"fp32"`` and ``"all:<format>"``.
        rows: one ``LayerSensitivity`` per scanned (layer, format).
        samples: evaluation samples per score; bootstrap / confidence: the interval settings.
        spearman: {format: {"<proxy>_vs_<target>": rho}} (None where undefined).
        timing: seconds per stage and the exact method used.
        fingerprint: hash of model, data, metric and settings the results belong to.
    """

    task: str
    backend: str
    metric: str
    layers: list[tuple[str, str]]
    formats: list[str]
    modes: list[str]
    reference: dict[str, float]
    rows: list[LayerSensitivity]
    samples: int = 0
    bootstrap: int = 1000
    confidence: float = 0.95
    spearman: dict[str, dict[str, Optional[float]]] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ queries
    def get(self, layer: str, fmt: str) -> LayerSensitivity:
        """The row of ``layer`` in ``fmt``.

        Raises:
            ScanError: the pair was not scanned.
        """
        for r in self.rows:
            if r.layer == layer and r.format == fmt:
                return r
        scanned = sorted({r.format for r in self.rows if r.layer == layer})
        raise ScanError(f"no result for layer {layer!r} in {fmt!r}; scanned formats for it: "
                        f"{', '.join(scanned) or 'none (unknown layer)'}.")

    def drop(self, layer: str, fmt: str) -> float:
        """One-at-a-time metric drop of ``layer`` in ``fmt`` (0 for fp32)."""
        if fmt == "fp32":
            return 0.0
        d = self.get(layer, fmt).drop
        if d is None:
            raise ScanError("this table has no one-at-a-time drops; scan with mode one-at-a-time or both.")
        return d

    def ranked(self, fmt: str, by: str = "drop") -> list[LayerSensitivity]:
        """Rows of ``fmt`` most sensitive first (``by``: drop, recovered, out_sqnr or a proxy name)."""
        key, sign = {**TARGETS, "recovered": ("recovered", 1.0), **PROXIES}.get(by, (by, 1.0))
        rows = [r for r in self.rows if r.format == fmt]

        def score(r: LayerSensitivity) -> tuple:
            v = getattr(r, key)
            tie = r.out_sqnr_db if r.out_sqnr_db is not None else math.inf
            return (-math.inf if v is None else sign * v, -tie)

        return sorted(rows, key=score, reverse=True)

    def most_sensitive(self, fmt: str, k: int = 5, by: str = "drop") -> list[str]:
        return [r.layer for r in self.ranked(fmt, by)[:k]]

    def predict(self, assignment: Mapping[str, str]) -> float:
        """Additive estimate of the metric of a plan ({layer: format}; missing layers fp32)."""
        return self.reference["fp32"] - sum(self.drop(n, f) for n, f in assignment.items() if f != "fp32")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = TABLE_VERSION
        return _finite(d)

    @classmethod
    def from_dict(cls, data: Mapping) -> "SensitivityTable":
        if not isinstance(data, Mapping) or "rows" not in data:
            raise ScanError("not a sensitivity table: expected a JSON object with 'rows'.")
        if data.get("version", TABLE_VERSION) != TABLE_VERSION:
            raise ScanError(f"sensitivity table version {data.get('version')} is not supported "
                            f"(this mixq reads version {TABLE_VERSION}); rerun the scan.")
        names = {f.name for f in fields(LayerSensitivity)}
        rows = []
        for r in data["rows"]:
            r = {k: v for k, v in r.items() if k in names}
            for k in ("drop_ci", "recovered_ci"):
                if r.get(k) is not None:
                    r[k] = tuple(r[k])
            for k in ("out_sqnr_db", "sqnr_db"):
                if isinstance(r.get(k), str):
                    r[k] = float(r[k])
            rows.append(LayerSensitivity(**r))
        kw = {f.name: data[f.name] for f in fields(cls) if f.name in data and f.name != "rows"}
        kw["layers"] = [tuple(x) for x in kw.get("layers", [])]
        return cls(rows=rows, **kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> Path:
        return write_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SensitivityTable":
        p = Path(path)
        if not p.is_file():
            raise ScanError(f"sensitivity table {str(p)!r} does not exist; run `mixq scan` first.")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ScanError(f"{str(p)!r} is not valid JSON: {e}.") from None


def _finite(x: Any) -> Any:
    """JSON has no inf / nan: infinities become the strings 'inf' / '-inf', nan becomes null."""
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def correlations(rows: Iterable[LayerSensitivity], formats: Iterable[str]) -> dict[str, dict[str, Optional[float]]]:
    """Spearman of each proxy (and of leave-one-out) against each exact target, per format."""
    rows = list(rows)
    out: dict[str, dict[str, Optional[float]]] = {}
    for fmt in formats:
        rs = [r for r in rows if r.format == fmt]
        res: dict[str, Optional[float]] = {}
        for tname, (tkey, tsign) in TARGETS.items():
            target = [_num(getattr(r, tkey), tsign) for r in rs]
            for pname, (pkey, psign) in {**PROXIES, "leave-one-out": ("recovered", 1.0)}.items():
                vals = [_num(getattr(r, pkey), psign) for r in rs]
                if any(np.isfinite(vals)) and any(np.isfinite(target)):
                    res[f"{pname}_vs_{tname}"] = spearman(vals, target)
        out[fmt] = res
    return out


def _num(v: Optional[float], sign: float) -> float:
    if v is None:
        return math.nan
    v = float(v)
    # an exact match (infinite SQNR) ranks as the least sensitive, but must stay comparable
    if math.isinf(v):
        v = math.copysign(1e9, v)
    return sign * v
