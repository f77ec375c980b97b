"""A task: model factory, calibration data, evaluation data and metric, from specs or an example.

Users pass their own as ``module:function`` specs; the built-in examples in ``experiments/``
expose the same four functions (``model``, ``calib_data``, ``eval_data``, ``metric``).
The metric returns per-sample scores whose mean is the metric (in percent), so that later
stages can put confidence intervals on differences. Evaluating lives in ``mixq.evaluate``;
``run_outputs`` / ``score`` / ``evaluate`` here are its older names.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from torch import nn

from mixq.evaluate import evaluate as _evaluate
from mixq.evaluate import run_outputs as _run_outputs
from mixq.evaluate import score as _score
from mixq.errors import SpecError, did_you_mean

from mixq.examples import DEFAULT_EXAMPLE, EXAMPLES  # noqa: F401  (re-exported)


def load_spec(spec: str) -> Callable:
    """Resolve ``package.module:function`` to the callable.

    Raises:
        SpecError: malformed spec, module not importable, or no such attribute.
    """
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise SpecError(f"spec {spec!r} is not of the form 'package.module:function'.")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise SpecError(f"cannot import module {mod_name!r} from spec {spec!r}: {e}.") from None
    obj = getattr(mod, attr, None)
    if not callable(obj):
        names = [n for n in dir(mod) if not n.startswith("_")]
        raise SpecError(f"module {mod_name!r} has no callable {attr!r}.{did_you_mean(attr, names)}")
    return obj


@dataclass
class Task:
    """The four things mixq needs to measure a model."""

    name: str
    model_fn: Callable[[], nn.Module]
    calib_fn: Callable[[], list]
    eval_fn: Callable[[], list]
    metric_fn: Callable[[list, list], np.ndarray]
    search_fn: Optional[Callable[[], list]] = None  # the search split, when the task has one
    train_fn: Optional[Callable[[], list]] = None  # training batches (QAT), when the task has them
    train_recipe: Optional[dict] = None  # the float model's schedule: {"epochs", "lr", ...}, when known

    @classmethod
    def example(cls, name: str = DEFAULT_EXAMPLE) -> "Task":
        """A built-in example by name (see ``EXAMPLES``)."""
        if name not in EXAMPLES:
            raise SpecError(f"unknown example {name!r}; built-in examples are {', '.join(EXAMPLES)}."
                            f"{did_you_mean(name, EXAMPLES)}")
        m = EXAMPLES[name]
        mod = importlib.import_module(m)
        search, train = getattr(mod, "search_data", None), getattr(mod, "train_data", None)
        return cls(name, load_spec(f"{m}:model"), load_spec(f"{m}:calib_data"), load_spec(f"{m}:eval_data"),
                   load_spec(f"{m}:metric"), search if callable(search) else None,
                   train if callable(train) else None, getattr(mod, "TRAIN_RECIPE", None))

    @classmethod
    def from_specs(cls, model: str, calib: str, eval: str, metric: str, name: Optional[str] = None) -> "Task":
        return cls(name or model.partition(":")[0].rsplit(".", 1)[-1], load_spec(model), load_spec(calib),
                   load_spec(eval), load_spec(metric))


def run_outputs(model: nn.Module, eval_data: list) -> tuple[list, list]:
    """Run every eval batch through ``model``; return (outputs, targets). See ``mixq.evaluate.run_outputs``."""
    return _run_outputs(model, eval_data)


def score(metric_fn: Callable, outputs: list, targets: list) -> np.ndarray:
    """Per-sample scores, checked to be one finite score per sample. See ``mixq.evaluate.score``.

    Raises:
        EvaluationError: a wrong number of scores (counted from the targets), or NaN/Inf.
    """
    return _score(metric_fn, outputs, targets)


def evaluate(model: nn.Module, eval_data: list, metric_fn: Callable) -> tuple[float, np.ndarray]:
    """Return (metric mean, per-sample scores) of ``model`` on ``eval_data``. See ``mixq.evaluate.evaluate``."""
    ev = _evaluate(model, eval_data, metric_fn)
    return ev.metric, ev.scores
