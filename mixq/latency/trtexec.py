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

Modules: ``trtexec_files`` (the three parsers), ``trt_layers`` (layer names -> units, precisions),
and this one (``LayerTable``, ``table_from_files``, ``TrtexecLatency``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from mixq.latency.base import Assignment, LatencyError
from mixq.latency.model import Predictor, UnitGraph
from mixq.latency.trt_layers import (dtype_of, layer_precision, layer_units, node_units, onnx_names_in,
                                     unit_of_path)
from mixq.latency.trtexec_files import (Profile, ProfileLayer, Times, TrtexecFormatError, load_layer_info,
                                        load_profile, load_times)

__all__ = ["OTHER", "LayerTable", "Profile", "ProfileLayer", "Times", "TrtexecFormatError", "TrtexecLatency",
           "dtype_of", "layer_precision", "layer_units", "load_layer_info", "load_profile", "load_times",
           "node_units", "onnx_names_in", "table_from_files", "unit_of_path"]

OTHER = "<other>"  # engine layers that belong to no unit (float ops, reformats at the graph input ...)


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
