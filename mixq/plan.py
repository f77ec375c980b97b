"""QuantPlan: which format each layer runs in, as plain data with a JSON round trip.

JSON form::

    {"backend": "ort-cpu", "default": "int8", "calib_method": "max",
     "layers": {"layer1.0.conv1": "fp32", "fc": "int4_wo"}}

``default`` applies to every layer not named in ``layers`` where the backend can realise it;
elsewhere the layer stays float. A format named explicitly for a layer must be realisable.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from mixq.artifacts import write_atomic
from mixq.errors import PlanError, did_you_mean
from mixq.formats import CALIB_METHODS, DEFAULT_BACKEND, get_backend, get_format


@dataclass
class QuantPlan:
    """A per-layer format assignment for one backend.

    Attributes:
        backend: backend name ("ort-cpu" or "tensorrt").
        default: format for layers not named in ``layers``.
        layers: layer name -> format name overrides.
        calib_method: activation calibration method.
    """

    backend: str = DEFAULT_BACKEND
    default: str = "int8"
    layers: dict[str, str] = field(default_factory=dict)
    calib_method: str = "max"

    def __post_init__(self) -> None:
        self.backend = get_backend(self.backend).name
        self.default = get_format(self.default).name
        self.layers = {str(k): get_format(v).name for k, v in dict(self.layers).items()}
        if self.calib_method == "histogram":
            self.calib_method = "entropy"
        if self.calib_method not in CALIB_METHODS:
            raise PlanError(f"unknown calib_method {self.calib_method!r}; valid methods are {', '.join(CALIB_METHODS)}.")

    @classmethod
    def uniform(cls, fmt: str, backend: str = DEFAULT_BACKEND, calib_method: str = "max") -> "QuantPlan":
        """Every layer in ``fmt`` where the backend can realise it."""
        return cls(backend=backend, default=fmt, calib_method=calib_method)

    def format_for(self, name: str, kind: str) -> str:
        """The format layer ``name`` (of ``kind``) runs in under this plan."""
        if name in self.layers:
            return self.layers[name]
        be = get_backend(self.backend)
        return self.default if self.default in be.supported(kind) else "fp32"

    def validate(self, kinds: Mapping[str, str]) -> None:
        """Check the plan against a model's layers (name -> kind).

        Raises:
            PlanError: the plan names a layer the model lacks (with the nearest names).
            UnsupportedFormatError: a named format cannot run on that layer with this backend.
        """
        missing = [n for n in self.layers if n not in kinds]
        if missing:
            hints = "; ".join(f"{n!r} ({did_you_mean(n, kinds).strip() or 'no similar name'})" for n in missing[:5])
            raise PlanError(
                f"the plan names {len(missing)} layer(s) the model does not have: {hints} "
                f"Run `mixq inventory` to list the model's {len(kinds)} layers."
            )
        be = get_backend(self.backend)
        for n, f in self.layers.items():
            be.check(f, kinds[n], n)

    def resolve(self, kinds: Mapping[str, str]) -> dict[str, str]:
        """Return the full {layer: format} map for a model's layers (validated)."""
        self.validate(kinds)
        return {n: self.format_for(n, k) for n, k in kinds.items()}

    def formats(self) -> set[str]:
        """Every format the plan can ask for."""
        return {self.default, *self.layers.values()}

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "QuantPlan":
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan must be a JSON object, but got {type(data).__name__}.")
        unknown = set(data) - {"backend", "default", "layers", "calib_method"}
        if unknown:
            raise PlanError(f"unknown plan key(s) {sorted(unknown)}; valid keys are backend, default, layers, calib_method.")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "QuantPlan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlanError(f"the plan is not valid JSON: {e}.") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename) so a crash never leaves half a plan."""
        return write_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantPlan":
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file {str(p)!r} does not exist.")
        return cls.from_json(p.read_text())
