"""The configuration of `mixq run`: a TOML file, command-line flags over it, every key checked.

    # run.toml
    example = "effnet_fashion"      # or model / calib / eval / metric (/ train) specs
    budget = "0.9x"                 # '6.5ms', '0.6x' or '60%' of FP32 measured in the same session
    [scan]
    mode = "one-at-a-time"
    [search]
    trials = 40
    [qat]
    epochs = 1

A key the pipeline does not know is an error naming the nearest valid key; a value of the wrong type names the key,
the value and the type expected. Plain data: imports no torch.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
from pathlib import Path
from typing import Any, Mapping, Optional

from mixq.errors import ConfigError
from mixq.search_prep import EVALUATE_MODES
from mixq.sensitivity.table import SCAN_METHODS


# section -> key -> (type, default). "" is the top level.
SCHEMA: dict[str, dict[str, tuple[type, Any]]] = {
    "": {"example": (str, None), "model": (str, None), "calib": (str, None), "eval": (str, None),
         "metric": (str, None), "train": (str, None), "run_dir": (str, None), "budget": (str, "0.8x"),
         "backend": (str, "ort-cpu"), "batch_axis": (str, "0")},
    "scan": {"mode": (str, "one-at-a-time"), "formats": (str, "int8"), "bootstrap": (int, 1000),
             "calib_method": (str, "max"), "seed": (int, 0), "method": (str, "auto")},
    "search": {"trials": (int, 30), "sampler": (str, "tpe"), "seed": (int, 0), "formats": (str, "int8"),
               "runs": (int, 50), "rounds": (int, 5), "candidates": (int, 5), "workers": (int, 1),
               "storage": (str, None), "random_baseline": (bool, True),
               "evaluate": (str, "simulation")},
    "qat": {"enabled": (bool, True), "epochs": (int, None), "lr": (float, None), "train_batches": (int, None),
            "seed": (int, 0)},
    "verify": {"threads": (int, 1), "noise_floor": (bool, True)},
    "latency": {"rounds": (int, 7), "runs": (int, 50), "min_seconds": (float, 0.2)},
}
# keys whose value is one of a few words, checked here so that a typo is named before any stage starts
CHOICES: dict[str, tuple[str, ...]] = {"search.evaluate": EVALUATE_MODES,
                                       "scan.method": SCAN_METHODS}


def _qualified() -> list[str]:
    return [k if not s else f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys]


def _nearest(bad: str) -> str:
    close = difflib.get_close_matches(bad, _qualified(), n=1, cutoff=0.4)
    if not close:  # a key put in the wrong section: match on the last part
        last = bad.rsplit(".", 1)[-1]
        close = [q for q in _qualified() if q.rsplit(".", 1)[-1] == last][:1]
    return f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(_qualified())}."


def _nearest_word(bad: str, words: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(bad, words, n=1, cutoff=0.4)
    return f" Did you mean {close[0]!r}?" if close else ""


def _typed(key: str, value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: {key} = {value!r} must be {kind.__name__ if kind is not str else 'a string'}, "
                          f"but got a {type(value).__name__}.")
    return value


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of the pipeline, by section: ``cfg.get("search", "trials")``."""

    values: Mapping[str, Mapping[str, Any]]
    source: Optional[str] = None  # the TOML file, when one was read

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def section(self, section: str) -> dict[str, Any]:
        return dict(self.values[section])

    def to_dict(self) -> dict:
        return {s: dict(v) for s, v in self.values.items()}

    @classmethod
    def build(cls, data: Mapping[str, Any] | None = None, where: str = "the configuration",
              source: Optional[str] = None) -> "RunConfig":
        """Defaults overlaid with ``data`` (a parsed TOML document).

        Raises:
            ConfigError: an unknown key (naming the nearest valid one) or a value of the wrong type.
        """
        values = {s: {k: d for k, (_, d) in keys.items()} for s, keys in SCHEMA.items()}
        for key, value in (data or {}).items():
            if isinstance(value, dict):
                if key not in SCHEMA or key == "":
                    raise ConfigError(f"{where}: unknown section [{key}].{_nearest(key)}")
                for sub, v in value.items():
                    if sub not in SCHEMA[key]:
                        raise ConfigError(f"{where}: unknown key {key}.{sub}.{_nearest(f'{key}.{sub}')}")
                    values[key][sub] = _typed(f"{key}.{sub}", v, SCHEMA[key][sub][0], where)
                    choices = CHOICES.get(f"{key}.{sub}")
                    if choices and v not in choices:
                        raise ConfigError(f"{where}: {key}.{sub} = {v!r} is not valid; choose from "
                                          f"{', '.join(choices)}.{_nearest_word(v, choices)}")
            else:
                if key not in SCHEMA[""]:
                    raise ConfigError(f"{where}: unknown key {key!r}.{_nearest(key)}")
                values[""][key] = _typed(key, value, SCHEMA[""][key][0], where)
        return cls(values, source)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """Read a TOML file.

        Raises:
            ConfigError: missing or unreadable file, TOML syntax error, unknown key or wrong type.
        """
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {str(p)!r} is not a file; give a TOML file (see README, `mixq run`).")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {str(p)!r} is not valid TOML: {e}") from None
        return cls.build(data, where=str(p), source=str(p))

    def override(self, changes: Mapping[tuple[str, str], Any]) -> tuple["RunConfig", list[str]]:
        """Command-line values (``("search", "trials")`` -> 40; None: not given) over this configuration; returns
        what each one replaced."""
        values = self.to_dict()
        said = []
        for (section, key), v in changes.items():
            if v is None:
                continue
            qkey = f"{section}.{key}" if section else key
            old = values[section][key]
            if self.source is not None and old != v and old != SCHEMA[section][key][1]:
                said.append(f"--{key.replace('_', '-')} {v} overrides {qkey} = {old!r} of {self.source}")
            values[section][key] = v
        return RunConfig(values, self.source), said
