"""Latency from ``trtexec`` output files, for users who profile engines on their own GPU.

trtexec writes three JSON files (writer: ``samples/common/sampleReporting.cpp`` in NVIDIA/TensorRT)::

    trtexec --onnx=model_int8.onnx --profilingVerbosity=detailed --separateProfileRun \\
            --exportProfile=int8_profile.json --exportTimes=int8_times.json --exportLayerInfo=int8_layers.json

- ``--exportProfile``: ``[{"count": N}, {"name", "timeMs", "averageMs", "medianMs", "percentage"}, ...]``,
  one entry per engine layer (``medianMs`` only in newer versions; ``timeMs`` is the total over N runs).
- ``--exportTimes``: one object per inference with ``startEnqMs`` ... ``h2dMs``, ``computeMs``,
  ``d2hMs``, ``latencyMs`` (note the lower-case ``H2d`` / ``D2h`` in the start/end keys; older
  versions add ``endToEndMs``).
- ``--exportLayerInfo``: the engine inspector's JSON, ``{"Layers": [...], "Bindings": [...]}`` (TensorRT 10)
  or ``{"Layers": [...], "I/O Tensors": [...]}`` (TensorRT 11); layers are plain names unless the
  engine was built with detailed profiling verbosity.

An engine layer is usually several ONNX nodes fused (``/layer1/layer1.0/conv1/Conv +
/layer1/layer1.0/relu/Relu``, ``PWN(...)``, ``Reformatting CopyNode for Input Tensor 0 to ...``,
Myelin's ``{ForeignNode[first.../last]}``). ``layer_units`` maps such a name to mixq unit names
through the ONNX node names in it, and ``LayerTable`` turns per-format profiles into a table of
per-unit milliseconds from which ``TrtexecLatency`` predicts a plan's latency.
"""
from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from mixq.errors import MixqError
from mixq.latency.base import Assignment, LatencyError
from mixq.latency.model import UnitGraph, Predictor

OTHER = "<other>"  # engine layers that belong to no unit (float ops, reformats at the graph input ...)


class TrtexecFormatError(MixqError, ValueError):
    """A file that is not in the format trtexec writes."""


# ------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class ProfileLayer:
    """One engine layer of a ``--exportProfile`` file.

    Attributes:
        name: the engine layer name.
        average_ms: mean time per inference.
        median_ms: median time per inference (None in files from older trtexec versions).
        percentage: share of the total time, in percent.
        total_ms: total over all profiled inferences.
    """

    name: str
    average_ms: float
    median_ms: Optional[float]
    percentage: float
    total_ms: float

    @property
    def ms(self) -> float:
        """The per-inference time to use: the median when trtexec wrote one, else the mean."""
        return self.median_ms if self.median_ms is not None else self.average_ms

    @property
    def is_reformat(self) -> bool:
        return self.name.startswith("Reformatting CopyNode")


@dataclass(frozen=True)
class Profile:
    """A parsed ``--exportProfile`` file: iteration count and layers in execution order."""

    count: int
    layers: tuple

    @property
    def total_ms(self) -> float:
        return float(sum(layer.ms for layer in self.layers))


@dataclass(frozen=True)
class Times:
    """Summary of a parsed ``--exportTimes`` file (per-inference milliseconds)."""

    count: int
    median_latency_ms: float
    median_compute_ms: float
    p25_compute_ms: float
    p75_compute_ms: float
    mean_compute_ms: float


def _read_json(src: Any, what: str) -> Any:
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.is_file():
            raise TrtexecFormatError(f"{what} file {str(p)!r} does not exist.")
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise TrtexecFormatError(f"{what} file {str(p)!r} is not valid JSON: {e}.") from None
    return src


def load_profile(src: str | os.PathLike | list) -> Profile:
    """Parse a ``trtexec --exportProfile`` file (or its already-loaded list).

    Raises:
        TrtexecFormatError: not a list of ``{"count"}`` followed by layer objects with
            ``name`` and ``averageMs``.
    """
    data = _read_json(src, "trtexec profile")
    if not isinstance(data, list) or not data:
        raise TrtexecFormatError("a trtexec profile is a JSON list [{\"count\": N}, {\"name\": ..., \"averageMs\": ...}, "
                                 f"...], but got {type(data).__name__}. Export it with --exportProfile=FILE.")
    count = 0
    rows = data
    if isinstance(data[0], dict) and "count" in data[0] and "name" not in data[0]:
        count, rows = int(data[0]["count"]), data[1:]
    layers = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "name" not in r or not ({"averageMs", "timeMs"} & set(r)):
            raise TrtexecFormatError(f"entry {i + 1} of the trtexec profile is not a layer "
                                     f"{{\"name\", \"timeMs\", \"averageMs\", ...}}: {str(r)[:120]}")
        total = float(r.get("timeMs", 0.0))
        avg = float(r["averageMs"]) if "averageMs" in r else (total / count if count else total)
        med = float(r["medianMs"]) if "medianMs" in r else None
        layers.append(ProfileLayer(str(r["name"]), avg, med, float(r.get("percentage", 0.0)), total))
    return Profile(count, tuple(layers))


def load_times(src: str | os.PathLike | list) -> Times:
    """Parse a ``trtexec --exportTimes`` file into per-inference statistics.

    Raises:
        TrtexecFormatError: not a non-empty list of objects with ``computeMs``.
    """
    data = _read_json(src, "trtexec times")
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) and "computeMs" in r for r in data):
        raise TrtexecFormatError("trtexec times are a JSON list of {\"startEnqMs\", ..., \"computeMs\", \"latencyMs\"} "
                                 "objects, one per inference. Export them with --exportTimes=FILE.")
    comp = np.asarray([float(r["computeMs"]) for r in data])
    lat = np.asarray([float(r.get("latencyMs", r.get("endToEndMs", r["computeMs"]))) for r in data])
    return Times(len(data), float(np.median(lat)), float(np.median(comp)), float(np.percentile(comp, 25)),
                 float(np.percentile(comp, 75)), float(comp.mean()))


def load_layer_info(src: str | os.PathLike | dict) -> list[dict]:
    """Parse a ``trtexec --exportLayerInfo`` file (engine inspector JSON, TensorRT 10 or 11).

    Returns:
        One dict per engine layer; with names-only verbosity each is ``{"Name": name}``.

    Raises:
        TrtexecFormatError: no ``Layers`` list.
    """
    data = _read_json(src, "trtexec layer info")
    if isinstance(data, str):
        data = json.loads(data)
    if not isinstance(data, dict) or not isinstance(data.get("Layers"), list):
        raise TrtexecFormatError("engine layer info is a JSON object with a \"Layers\" list; export it with "
                                 "--exportLayerInfo=FILE (and --profilingVerbosity=detailed for precisions).")
    return [{"Name": x} if isinstance(x, str) else dict(x) for x in data["Layers"]]


# ------------------------------------------------------------------------------------- precisions
_DTYPE_WORDS = (("FP8", "fp8"), ("Int8", "int8"), ("Int4", "int4"), ("FP4", "fp4"), ("Half", "fp16"), ("FP16", "fp16"),
                ("BFloat16", "bf16"), ("BF16", "bf16"), ("Float", "fp32"), ("FP32", "fp32"), ("Int32", "int32"),
                ("Int64", "int64"), ("Bool", "bool"))
_TACTIC_HINTS = (("i8i8", "int8"), ("int8", "int8"), ("e4m3", "fp8"), ("fp8", "fp8"), ("f16f16", "fp16"),
                 ("h884", "fp16"), ("h1688", "fp16"), ("hmma", "fp16"), ("fp16", "fp16"), ("bf16", "bf16"))


def dtype_of(fmt: str) -> str:
    """Normalised data type of an inspector ``Format/Datatype`` string ("Int8", "Row major linear FP16 format")."""
    for word, name in _DTYPE_WORDS:
        if re.search(rf"\b{word}\b", fmt):
            return name
    return "unknown"


def layer_precision(layer: Mapping) -> str:
    """The precision an engine layer computes in, from its detailed inspector entry.

    Weights decide for weighted layers (``Weights.Type``); otherwise the lowest-precision input
    tensor; otherwise hints in the tactic (kernel) name. Returns "unknown" for names-only entries.
    """
    w = layer.get("Weights")
    if isinstance(w, dict) and w.get("Type"):
        d = dtype_of(str(w["Type"]))
        if d != "unknown":
            return d
    order = ["fp4", "int4", "fp8", "int8", "fp16", "bf16", "fp32"]
    dts = [dtype_of(str(t.get("Format/Datatype", ""))) for t in layer.get("Inputs", []) if isinstance(t, dict)]
    dts = [d for d in dts if d in order]
    if dts:
        return min(dts, key=order.index)
    tactic = str(layer.get("TacticName", "")).lower()
    for hint, name in _TACTIC_HINTS:
        if hint in tactic:
            return name
    return "unknown"


# ------------------------------------------------------------------------------ names -> units
_ONNX_OP = re.compile(r"^([A-Z][A-Za-z0-9]*)(_\d+)?$")
# ONNX op type -> the op name mixq's FX mode gives a functional unit (``layer1.0.add``).
_FUNCTIONAL_OPS = {"Add": "add", "MatMul": "matmul", "Concat": "cat", "MaxPool": "max_pool"}


def onnx_names_in(layer_name: str) -> list[str]:
    """The ONNX node (or tensor) names a TensorRT engine layer name is made of.

    Handles fusion (`` + ``), pointwise groups (``PWN(a, PWN(b))``), reformats (``Reformatting
    CopyNode for Input Tensor 0 to X``) and Myelin regions (``{ForeignNode[first...last]}``).
    """
    s = re.sub(r"^Reformatting CopyNode for (Input|Output) Tensor \d+ to ", "", layer_name)
    s = s.replace("...", " + ")
    parts = re.split(r" \+ |, |\bPWN\(|\bForeignNode\[|[{}\[\]]|\)(?=\s|$|\)|,|\])", s)
    out = []
    for p in parts:
        p = p.strip().strip("()[]{}").strip()
        if p and p not in out:
            out.append(p)
    return out


def unit_of_path(name: str, units: Iterable[str]) -> Optional[str]:
    """Map one ONNX node name in TorchScript-exporter style to a unit, or None.

    ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``; ``/layer1/layer1.0/Add_1`` ->
    ``layer1.0.add_1``; ``/fc/input_quantizer/QuantizeLinear`` -> ``fc`` (nodes inside a unit).
    """
    unit_set = set(units)
    comps = [c for c in name.strip("/").split("/") if c]
    if not comps:
        return None
    op = comps[-1] if len(comps) > 1 or _ONNX_OP.match(comps[-1]) else ""
    path, prev = "", ""
    for c in comps[:-1] if op else comps:
        # The exporter writes a container's child as "<container attr>.<index>" ("downsample.0").
        path = f"{path}{c[len(prev):]}" if prev and c.startswith(prev + ".") else f"{path}.{c}" if path else c
        prev = c
    m = _ONNX_OP.match(op) if op else None
    if m and m.group(1) in _FUNCTIONAL_OPS:
        fname = _FUNCTIONAL_OPS[m.group(1)] + (m.group(2) or "")
        cand = f"{path}.{fname}" if path else fname
        if cand in unit_set:
            return cand
    while path:
        if path in unit_set:
            return path
        path = path.rpartition(".")[0]
    return None


def node_units(onnx_model: Any, units: Iterable[str]) -> dict[str, str]:
    """Map the node names of an ONNX model to units, using the exporter's metadata where present.

    Looks, per node, at ``mixq.unit`` metadata, then the dynamo exporter's
    ``pkg.torch.onnx.name_scopes`` (deepest scope that is or lies inside a unit), then the node
    name in TorchScript style. Output tensor names map to the node's unit too (TensorRT names
    some layers after tensors).

    Args:
        onnx_model: an ``onnx.ModelProto`` or a path to one.
        units: the model's unit names.
    """
    import onnx

    m = onnx.load(str(onnx_model), load_external_data=False) if isinstance(onnx_model, (str, os.PathLike)) else onnx_model
    unit_list = list(units)
    unit_set = set(unit_list)
    out: dict[str, str] = {}
    for n in m.graph.node:
        meta = {p.key: p.value for p in n.metadata_props}
        u = meta.get("mixq.unit") if meta.get("mixq.unit") in unit_set else None
        if u is None and "pkg.torch.onnx.name_scopes" in meta:
            try:
                scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            except (ValueError, SyntaxError):
                scopes = []
            for sc in reversed([s for s in scopes if isinstance(s, str) and s]):
                u = unit_of_path("/" + sc.replace(".", "/") + "/X", unit_set) if sc not in unit_set else sc
                if u is not None:
                    break
        if u is None and n.name:
            u = unit_of_path(n.name, unit_set)
        if u is not None:
            if n.name:
                out[n.name] = u
            for t in n.output:
                out.setdefault(t, u)
    return out


def layer_units(layer_name: str, units: Iterable[str], node_map: Optional[Mapping[str, str]] = None) -> list[str]:
    """Units an engine layer computes (several when TensorRT fused them), in name order."""
    found = []
    unit_set = set(units)
    for n in onnx_names_in(layer_name):
        u = node_map.get(n) if node_map else None
        if u is None:
            u = unit_of_path(n, unit_set)
        if u is not None and u not in found:
            found.append(u)
    return found


# ------------------------------------------------------------------------------------- the table
@dataclass
class LayerTable:
    """Per-unit milliseconds for each format, from trtexec profiles of uniformly quantized engines.

    Attributes:
        ms: format -> unit -> ms per inference (``OTHER`` holds time no unit owns).
        reformat_ms: format -> unit -> reformat time into that unit's layers.
        totals: format -> end-to-end compute ms (from the times file when given, else the profile sum).
        unmatched: format -> engine layer names that matched no unit.
    """

    ms: dict = field(default_factory=dict)
    reformat_ms: dict = field(default_factory=dict)
    totals: dict = field(default_factory=dict)
    unmatched: dict = field(default_factory=dict)

    def add(self, fmt: str, profile: Profile, units: Sequence[str], times: Optional[Times] = None,
            node_map: Optional[Mapping[str, str]] = None) -> None:
        """Add the profile of an engine in which every unit runs ``fmt``.

        A fused layer's time is split equally among its units; if ``times`` is given, every layer
        time is scaled so that they sum to the median compute time (per-layer profiling adds
        synchronisation overhead, so the profile's sum overstates the real latency).
        """
        per = {u: 0.0 for u in units}
        per[OTHER] = 0.0
        ref = {u: 0.0 for u in units}
        unmatched = []
        for layer in profile.layers:
            us = layer_units(layer.name, units, node_map)
            if not us:
                per[OTHER] += layer.ms
                if layer.ms > 0:
                    unmatched.append(layer.name)
                continue
            for u in us:
                per[u] += layer.ms / len(us)
                if layer.is_reformat:
                    ref[u] += layer.ms / len(us)
        total = times.median_compute_ms if times is not None else profile.total_ms
        scale = total / profile.total_ms if profile.total_ms > 0 else 1.0
        self.ms[fmt] = {u: v * scale for u, v in per.items()}
        self.reformat_ms[fmt] = {u: v * scale for u, v in ref.items()}
        self.totals[fmt] = float(total)
        self.unmatched[fmt] = unmatched

    def rows(self) -> list[dict]:
        """One row per unit: {"unit": name, fmt: ms, ...}, then the ``OTHER`` row and the total."""
        fmts = list(self.ms)
        units = [u for u in next(iter(self.ms.values()), {}) if u != OTHER]
        rows = [{"unit": u, **{f: self.ms[f].get(u, 0.0) for f in fmts}} for u in units]
        rows.append({"unit": OTHER, **{f: self.ms[f].get(OTHER, 0.0) for f in fmts}})
        rows.append({"unit": "total", **{f: self.totals[f] for f in fmts}})
        return rows

    def to_dict(self) -> dict:
        return {"ms": self.ms, "reformat_ms": self.reformat_ms, "totals": self.totals, "unmatched": self.unmatched}


def table_from_files(units: Sequence[str], profiles: Mapping[str, Any], times: Optional[Mapping[str, Any]] = None,
                     onnx_models: Optional[Mapping[str, Any]] = None,
                     node_maps: Optional[Mapping[str, Optional[Mapping[str, str]]]] = None) -> LayerTable:
    """Build a ``LayerTable`` from trtexec files, one set per format.

    Args:
        units: the model's unit names.
        profiles: format -> ``--exportProfile`` file (or loaded list), e.g. {"fp32": ..., "int8": ...}.
        times: format -> ``--exportTimes`` file, to scale layer times to the real latency.
        onnx_models: format -> the ONNX model the engine was built from (for exporters whose node
            names are not module paths, e.g. torch's dynamo exporter).
        node_maps: format -> {ONNX node name: unit} when already known, e.g. from mixq's export
            (``{n: u for u, nodes in float_graph.unit_nodes.items() for n in nodes}``).

    Raises:
        TrtexecFormatError: a file is not in trtexec's format; LatencyError: no fp32 profile.
    """
    if "fp32" not in profiles:
        raise LatencyError(f"the trtexec table needs an fp32 profile (the reference), but got {sorted(profiles)}.")
    table = LayerTable()
    for fmt, src in profiles.items():
        t = load_times(times[fmt]) if times and fmt in times else None
        nm = dict(node_maps[fmt]) if node_maps and node_maps.get(fmt) else None
        if onnx_models and fmt in onnx_models:
            nm = {**node_units(onnx_models[fmt], units), **(nm or {})}
        table.add(fmt, load_profile(src), units, t, nm)
    return table


class TrtexecLatency(Predictor):
    """Predict a plan's latency from per-unit times of uniformly quantized engines (a LatencyModel).

    ``ms(plan) = sum over units of table[format of u][u] + other``, where ``other`` (time of
    layers no unit owns) is interpolated between the formats by the share of units in each.
    Additive, so it does not know boundary costs; use ``deltas()`` as the prior of a
    ``BoundaryLatency`` fitted on partial plans you also profiled for that.

    Args:
        graph: the model's units (``UnitGraph``; edges unused).
        table: the ``LayerTable``.
        backend: plans must be for this backend (default "tensorrt").
    """

    def __init__(self, graph: UnitGraph, table: LayerTable, backend: Optional[str] = "tensorrt") -> None:
        self.graph, self.table, self.backend = graph, table, backend
        missing = [u for u in graph.units if u not in table.ms.get("fp32", {})]
        if missing:
            raise LatencyError(f"the trtexec table has no entry for {len(missing)} unit(s) of the model, e.g. "
                               f"{missing[:3]}; build it with this model's unit names.")

    def predict(self, assignment: Mapping[str, str]) -> float:
        """Predicted milliseconds of a resolved assignment.

        Raises:
            LatencyError: a format that no profile covers.
        """
        counts: dict[str, int] = {}
        total = 0.0
        for u in self.graph.units:
            f = assignment.get(u, "fp32")
            if f not in self.table.ms:
                raise LatencyError(f"no trtexec profile for format {f!r} (unit {u!r}); profiles cover "
                                   f"{', '.join(self.table.ms)}. Profile an engine with every layer in {f!r}.")
            total += self.table.ms[f][u]
            counts[f] = counts.get(f, 0) + 1
        n = max(1, len(self.graph.units))
        total += sum(c / n * self.table.ms[f][OTHER] for f, c in counts.items())
        return float(total)

    def deltas(self) -> dict[tuple, float]:
        """(unit, format) -> ms relative to fp32, e.g. as the prior of a ``BoundaryLatency``."""
        base = self.table.ms["fp32"]
        return {(u, f): self.table.ms[f][u] - base[u] for f in self.table.ms if f != "fp32" for u in self.graph.units}

    def records(self) -> list[tuple[Assignment, float]]:
        """The uniform plans the profiles measured, as (assignment, total ms)."""
        return [({u: f for u in self.graph.units}, self.table.totals[f]) for f in self.table.ms]
