"""What to search: one categorical per unit (or per group of tied units) over the formats the backend realises.

Plain data (imports no torch): the space is built from the model's unit kinds and the backend's capability
table in ``mixq.formats``, which lists a format for a unit kind only where export and the engine realise it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from mixq.errors import ConfigError, did_you_mean
from mixq.formats import get_backend, get_format

Assignment = dict  # unit name -> format name, for every unit


@dataclass(frozen=True)
class SearchSpace:
    """Per-unit choices of a mixed-precision search.

    Attributes:
        backend: the backend whose capability table gave the choices.
        kinds: unit name -> kind, for every unit of the model (in model order).
        choices: unit name -> formats it may take, ``fp32`` always among them; a unit with only
            ``fp32`` is fixed and not searched.
        ties: groups of units that must take the same format (the engine runs them in one
            precision); each group is one parameter, named by its first unit.
        tie_reasons: why each group is tied (same order as ``ties``).
    """

    backend: str
    kinds: dict
    choices: dict
    ties: tuple = ()
    tie_reasons: tuple = ()

    @classmethod
    def build(cls, kinds: Mapping[str, str], backend: str, formats: Optional[Sequence[str]] = None,
              ties: Iterable[tuple[Sequence[str], str]] = ()) -> "SearchSpace":
        """The space of every realisable format (or only ``formats``) per unit, plus fp32.

        Args:
            kinds: unit name -> kind.
            backend: backend name.
            formats: low formats to consider (default: every format the backend offers per kind).
            ties: (units, reason) pairs of units that must share a format.

        Raises:
            UnknownFormatError: an unknown format; ConfigError: a tie naming an unknown unit, a tie
                whose units share no format but fp32, a unit in two ties, or no searchable unit.
        """
        be = get_backend(backend)
        wanted = None if formats is None else [get_format(f).name for f in formats]
        choices = {}
        for unit, kind in kinds.items():
            offered = [f for f in be.supported(kind) if f != "fp32"]
            if wanted is not None:
                offered = [f for f in offered if f in wanted]
            choices[unit] = tuple(offered) + ("fp32",)
        if wanted is not None:
            unused = [f for f in wanted if f != "fp32" and not any(f in c for c in choices.values())]
            if unused:
                kinds_ok = {f: sorted(k for k, fs in be.formats.items() if f in fs) for f in unused}
                raise ConfigError(
                    "format(s) no unit of the model can run on " + be.name + ": " +
                    "; ".join(f"{f} (runs only on {', '.join(k) or 'no'} units)" for f, k in kinds_ok.items()))
        groups, reasons, seen = [], [], set()
        for units, reason in ties:
            units = tuple(dict.fromkeys(units))
            bad = [u for u in units if u not in kinds]
            if bad:
                raise ConfigError(f"tie names unknown unit(s) {bad[:3]}{did_you_mean(str(bad[0]), kinds)}")
            twice = [u for u in units if u in seen]
            if twice:
                raise ConfigError(f"unit(s) {twice[:3]} appear in two ties; merge the groups.")
            seen.update(units)
            common = [f for f in choices[units[0]] if all(f in choices[u] for u in units)]
            if common == ["fp32"] and any(len(choices[u]) > 1 for u in units):
                raise ConfigError(f"tied units {list(units)} share no low format; untie them.")
            for u in units:
                choices[u] = tuple(common)
            if len(units) > 1:
                groups.append(units)
                reasons.append(reason)
        space = cls(be.name, dict(kinds), choices, tuple(groups), tuple(reasons))
        if not space.parameters():
            raise ConfigError(f"nothing to search: no unit of the model can run a low format on {be.name}"
                              + (f" among {wanted}" if wanted else "") + ".")
        return space

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        """(parameter name, units it sets, choices) for every searched parameter, in model order."""
        tied = {u: g for g in self.ties for u in g}
        out, done = [], set()
        for unit in self.kinds:
            if unit in done:
                continue
            group = tied.get(unit, (unit,))
            done.update(group)
            if len(self.choices[unit]) > 1:
                out.append((unit, group, self.choices[unit]))
        return out

    @property
    def size(self) -> int:
        """Number of distinct plans in the space."""
        n = 1
        for _, _, c in self.parameters():
            n *= len(c)
        return n

    def suggest(self, trial: Any) -> Assignment:
        """Ask an Optuna trial for one plan: ``{unit: format}`` for every unit."""
        out = {u: "fp32" for u in self.kinds}
        for name, units, choices in self.parameters():
            f = trial.suggest_categorical(name, list(choices))
            for u in units:
                out[u] = f
        return out

    def from_params(self, params: Mapping[str, str]) -> Assignment:
        """The plan ``{unit: format}`` a trial's parameters give (units not searched stay fp32).

        Raises:
            ConfigError: a parameter this space does not have, or a choice outside it.
        """
        out = {u: "fp32" for u in self.kinds}
        known = {name: (units, choices) for name, units, choices in self.parameters()}
        for name, f in params.items():
            if name not in known:
                raise ConfigError(f"parameter {name!r} is not in this search space{did_you_mean(str(name), known)}")
            units, choices = known[name]
            if f not in choices:
                raise ConfigError(f"parameter {name!r} cannot take {f!r}; its choices are {', '.join(choices)}.")
            for u in units:
                out[u] = f
        return out

    def params_of(self, assignment: Mapping[str, str]) -> dict[str, str]:
        """The trial parameters that give ``assignment`` (for ``study.enqueue_trial``).

        Raises:
            ConfigError: the assignment gives a unit a format outside its choices, or splits a tie.
        """
        a = self.complete(assignment)
        params = {}
        for name, units, choices in self.parameters():
            fs = {a[u] for u in units}
            if len(fs) > 1:
                raise ConfigError(f"the plan splits the tied units {list(units)} over {sorted(fs)}.")
            params[name] = fs.pop()
        return params

    def complete(self, assignment: Mapping[str, str]) -> Assignment:
        """``assignment`` for every unit (missing units fp32), checked against the choices.

        Raises:
            ConfigError: an unknown unit or a format outside that unit's choices.
        """
        bad = [u for u in assignment if u not in self.kinds]
        if bad:
            raise ConfigError(f"unknown unit(s) {bad[:3]}{did_you_mean(str(bad[0]), self.kinds)}")
        out = {u: get_format(assignment.get(u, "fp32")).name for u in self.kinds}
        for u, f in out.items():
            if f not in self.choices[u]:
                raise ConfigError(f"unit {u!r} ({self.kinds[u]}) cannot take {f!r} in this space; its choices are "
                                  f"{', '.join(self.choices[u])}.")
        return out

    def shrink(self, drops: Mapping[str, Mapping[str, float]], max_drop: float) -> "SearchSpace":
        """Remove the (unit, format) choices whose one-at-a-time metric drop exceeds ``max_drop`` points.

        A plan that quantizes a unit which alone costs more than the whole accuracy we are willing to lose
        cannot be a good plan, so the sampler need not spend trials on it. Units keep fp32.
        """
        choices = dict(self.choices)
        for u, per_fmt in drops.items():
            if u in choices:
                choices[u] = tuple(f for f in choices[u] if f == "fp32" or per_fmt.get(f, 0.0) <= max_drop)
        for g in self.ties:
            common = tuple(f for f in choices[g[0]] if all(f in choices[u] for u in g))
            for u in g:
                choices[u] = common
        return SearchSpace(self.backend, self.kinds, choices, self.ties, self.tie_reasons)

    def describe(self) -> str:
        """One line: units, searched parameters, size, ties."""
        params = self.parameters()
        fixed = sum(1 for u in self.kinds if len(self.choices[u]) == 1)
        s = (f"{len(self.kinds)} units, {len(params)} searched parameters ({fixed} units fixed at fp32), "
             f"{self.size:.3g} plans")
        if self.ties:
            s += "; tied: " + "; ".join(f"{'+'.join(g)} ({r})" for g, r in zip(self.ties, self.tie_reasons))
        return s
