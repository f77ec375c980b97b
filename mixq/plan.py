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
from typing import Mapping, Optional

from mixq.artifacts import write_atomic
from mixq.calib_methods import CALIB_METHODS
from mixq.errors import PlanError, UnsupportedFormatError, did_you_mean
from mixq.formats import DEFAULT_BACKEND, FORMATS, Backend, get_backend, get_format


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
        # The default applies to the units the plan does not name; if it runs on none of them, the result would be
        # a float model labelled with that format.
        left = [kinds[n] for n in kinds if n not in self.layers]
        if self.default != "fp32" and left and not any(self.default in be.supported(k) for k in left):
            counts = {k: left.count(k) for k in dict.fromkeys(left)}
            units = ", ".join(f"{k} ({n})" for k, n in counts.items())
            whose = "the model's units" if len(left) == len(kinds) else \
                f"the {len(left)} unit(s) the plan leaves to its default"
            raise UnsupportedFormatError(
                f"no unit of the model can run {self.default!r} on backend {self.backend!r} ({whose}: "
                f"{units}); {runs_per_kind(be, counts)}. Choose one of those formats or another backend.")

    def resolve(self, kinds: Mapping[str, str]) -> dict[str, str]:
        """Return the full {layer: format} map for a model's layers (validated)."""
        self.validate(kinds)
        return {n: self.format_for(n, k) for n, k in kinds.items()}

    def realisation(self, kinds: Mapping[str, str], not_run: Optional[Mapping[str, str]] = None) -> "Realisation":
        """What this plan realises on a model's units (name -> kind): formats per unit and the fallbacks.

        Args:
            kinds: the model's units and their kinds.
            not_run: units that never ran during calibration -> why; the plan's format for them is not
                realised (they compute float, or not at all), so they count as fp32.

        Raises:
            the errors of ``validate``.
        """
        self.validate(kinds)
        be = get_backend(self.backend)
        assigned, fallback, skipped = {}, {}, {}
        for n, k in kinds.items():
            assigned[n] = self.format_for(n, k)
            if n not in self.layers and assigned[n] != self.default:
                fallback[n] = f"{be.name} cannot run {self.default} on {k} units"
            elif not_run and n in not_run and assigned[n] != "fp32":
                skipped[n], assigned[n] = not_run[n], "fp32"
        counts = {f: n for f in FORMATS if (n := sum(v == f for v in assigned.values()))}
        return Realisation(backend=be.name, default=self.default, total=len(kinds), counts=counts,
                           named={n: f for n, f in self.layers.items() if n not in skipped}, fallback=fallback,
                           default_kinds=tuple(k for k in be.formats if self.default in be.supported(k)),
                           not_run=skipped)

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


def runs_per_kind(backend: Backend, counts: Mapping[str, int]) -> str:
    """``"ort-cpu runs: int8 on conv, linear; int4_wo on linear"`` for the unit kinds in ``counts``."""
    parts = []
    for f in FORMATS:
        on = [k for k in counts if f != "fp32" and f in backend.supported(k)]
        if on:
            parts.append(f"{f} on {', '.join(on)}")
    return f"{backend.name} runs: {'; '.join(parts)}" if parts else f"{backend.name} runs only fp32 on these units"


@dataclass(frozen=True)
class Realisation:
    """What a plan realises on one model: the format of every unit, counted, and why units fell back.

    Attributes:
        backend / default: the plan's.
        total: number of units.
        counts: format -> units that run it (formats in ``FORMATS`` order).
        named: units the plan names explicitly -> their format.
        fallback: unit -> why it runs fp32 although the plan's default is another format.
        default_kinds: unit kinds the backend runs the default on (every kind it knows).
        not_run: units the plan quantizes that never ran during calibration -> why (counted fp32,
            neither in ``named`` nor run by default).
    """

    backend: str
    default: str
    total: int
    counts: dict[str, int]
    named: dict[str, str]
    fallback: dict[str, str]
    default_kinds: tuple[str, ...] = ()
    not_run: dict[str, str] = field(default_factory=dict)

    @property
    def by_default(self) -> int:
        """Units that run the plan's default format without being named."""
        return self.total - len(self.named) - len(self.fallback) - len(self.not_run)

    @property
    def complete(self) -> bool:
        """Every unit runs the default format (the plan is "all-<default>")."""
        return self.by_default == self.total

    @property
    def label(self) -> str:
        """``all-int8`` when every unit runs the default, else ``int4_wo on 1 of 14 units``."""
        return f"all-{self.default}" if self.complete else f"{self.default} on {self.by_default} of {self.total} units"

    def to_dict(self) -> dict:
        """Plain data for reports: the fields, plus ``label`` and ``summary``."""
        return {**asdict(self), "default_kinds": list(self.default_kinds), "label": self.label,
                "summary": self.summary()}

    def summary(self) -> str:
        """One line, e.g. ``int4_wo on 1 of 14 units; 13 stay fp32 because ort-cpu runs int4_wo only on linear``."""
        parts = [f"{self.default} on all {self.total} units" if self.complete else self.label]
        named = {f: sum(v == f for v in self.named.values()) for f in FORMATS}
        for f, n in named.items():
            if n:
                parts.append(f"{f} on {n} named in the plan")
        if self.fallback:
            n = len(self.fallback)
            parts.append(f"{n} {'stays' if n == 1 else 'stay'} fp32 because {self.backend} runs {self.default} only "
                         f"on {', '.join(self.default_kinds)}")
        if self.not_run:
            n, names = len(self.not_run), list(self.not_run)
            shown = ", ".join(names[:3]) + (f" and {n - 3} more" if n > 3 else "")
            parts.append(f"{n} quantized by the plan never ran during calibration and count as fp32 ({shown})")
        return "; ".join(parts)
