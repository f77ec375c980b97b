"""Parsers for the three JSON files ``trtexec`` writes (``--exportProfile``, ``--exportTimes``,
``--exportLayerInfo``); see ``mixq.latency.trtexec`` for the command line and the formats.
Plain data: numpy only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mixq.errors import MixqError


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
