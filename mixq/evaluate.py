"""The one way mixq evaluates a model or a plan: metric, per-sample scores, and the drop against FP32.

    fp32 = evaluate(float_model, eval_data, metric)                    # Evaluation
    res = evaluate_plan(qmodel, plan, eval_data, metric, reference=fp32)
    res.metric, res.drop, res.drop_ci                                  # percent; paired bootstrap interval

``eval_data`` is a list of ``(inputs, targets)`` batches; ``inputs`` is what the model takes (a
Tensor, a tuple of positional inputs or a dict of keyword inputs). ``metric(outputs, targets)``
gets every batch's outputs and targets (lists, in order) and returns one finite score per
evaluation sample (for example 100 or 0 for a correct or wrong prediction); its mean is the metric.
The per-sample scores are what make paired intervals possible, so their number is checked.

Samples are counted per batch from the targets: the leading dimension of a target tensor (a
0-d tensor counts one); a list or tuple of tensors sharing one leading dimension counts that
dimension, any other list or tuple its length; a target that holds no tensor (None, a dict, a
string) counts the leading dimension of the batch's first input tensor. A metric that scores
some other number of samples (a retrieval metric scores queries, not documents) says so with
an attribute: ``metric.samples = lambda targets: number_of_scores`` (or an int).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from mixq.errors import MixqError
from mixq.plan import QuantPlan
from mixq.progress import on_batch as progress_callback
from mixq.quantize import applied, call_model
from mixq.stats import check_bootstrap, paired_bootstrap_ci


class EvaluationError(MixqError, ValueError):
    """Evaluation data or a metric that cannot be evaluated (no batch, wrong score count, NaN/Inf)."""


@dataclass
class Evaluation:
    """A model evaluated on evaluation data.

    Attributes:
        metric: mean of the per-sample scores (percent).
        scores: per-sample scores (float64, one per evaluation sample).
        seconds: wall time of the model's forwards and the metric.
        outputs: the model's output per batch, when asked for (``keep_outputs=True``), else None.
    """

    metric: float
    scores: np.ndarray
    seconds: float = 0.0
    outputs: Optional[list] = None

    @property
    def samples(self) -> int:
        return int(self.scores.size)


@dataclass
class PlanEvaluation(Evaluation):
    """A plan evaluated on a calibrated model, and its drop against a reference (FP32) when one was given.

    Attributes:
        plan: the plan that ran; resolved: its {layer: format}.
        reference: the reference metric (None without a reference).
        drop: reference - metric (positive: the plan costs accuracy).
        drop_ci: paired bootstrap interval of ``drop`` at ``confidence`` (``resamples`` draws).
    """

    plan: Optional[QuantPlan] = None
    resolved: Optional[dict] = None
    reference: Optional[float] = None
    drop: Optional[float] = None
    drop_ci: Optional[tuple[float, float]] = None
    confidence: float = 0.95
    resamples: int = 1000

    @property
    def drop_noise(self) -> Optional[bool]:
        """True when the interval contains 0: the drop is not distinguishable from none."""
        return None if self.drop_ci is None else bool(self.drop_ci[0] <= 0.0 <= self.drop_ci[1])


# --------------------------------------------------------------------- data and sample counts
def eval_batches(eval_data: Iterable) -> list:
    """The evaluation batches as a list, each checked to be an ``(inputs, targets)`` pair.

    Raises:
        EvaluationError: no batch, or a batch that is not a pair.
    """
    batches = list(eval_data)
    if not batches:
        raise EvaluationError("the evaluation loader yielded no batch: pass a list of (inputs, targets) batches.")
    for i, b in enumerate(batches):
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise EvaluationError(f"evaluation batch {i} is a {type(b).__name__}, not an (inputs, targets) pair.")
    return batches


def batch_size(batch: Any) -> Optional[int]:
    """Leading size of the first tensor in a (nested) batch; None if it holds no tensor with a dimension."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return int(batch.shape[0]) if batch.ndim else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        n = batch_size(v)
        if n is not None:
            return n
    return None


def _target_count(target: Any) -> Optional[int]:
    if isinstance(target, (torch.Tensor, np.ndarray)):
        return int(target.shape[0]) if target.ndim else 1
    if isinstance(target, (tuple, list)):
        if target and all(isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim for t in target):
            leads = {int(t.shape[0]) for t in target}
            if len(leads) == 1:
                return leads.pop()  # a tuple of per-sample target tensors (labels, weights)
        return len(target)
    return None


def declared_samples(metric_fn: Callable, targets: Sequence) -> Optional[int]:
    """The number of scores ``metric_fn`` declares it returns (its ``samples`` attribute), or None."""
    decl = getattr(metric_fn, "samples", None)
    if decl is None:
        return None
    n = decl(list(targets)) if callable(decl) else decl
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise EvaluationError(f"the metric's `samples` gave {n!r}: it must be a positive number of scores "
                              "(or a function of the targets returning one).")
    return int(n)


def count_samples(targets: Sequence, inputs: Optional[Sequence] = None, metric_fn: Optional[Callable] = None) -> int:
    """How many scores the metric must return for these batches (see the module docstring).

    Args:
        targets: the targets of every batch.
        inputs: the inputs (or outputs) of every batch, counted where a target holds no tensor.
        metric_fn: a metric that may declare its count (``metric.samples``).

    Raises:
        EvaluationError: a batch whose samples cannot be counted.
    """
    if metric_fn is not None:
        n = declared_samples(metric_fn, targets)
        if n is not None:
            return n
    total = 0
    for i, t in enumerate(targets):
        n = _target_count(t)
        if n is None and inputs is not None:
            n = batch_size(inputs[i])
        if n is None:
            raise EvaluationError(
                f"cannot count the samples of evaluation batch {i}: its target is a {type(t).__name__} and its "
                "inputs hold no tensor with a batch dimension. Give the metric a `samples` attribute "
                "(metric.samples = lambda targets: number_of_scores).")
        total += n
    return total


# --------------------------------------------------------------------- running and scoring
def forward_all(model: nn.Module, inputs: Sequence, on_batch: Optional[Callable[[int], None]] = None) -> list:
    """The model's output for each batch of inputs (no_grad), in order.

    Args:
        on_batch: called with the batch index after each forward (progress).
    """
    outputs = []
    with torch.no_grad():
        for i, x in enumerate(inputs):
            outputs.append(call_model(model, x))
            if on_batch is not None:
                on_batch(i)
    return outputs


def run_outputs(model: nn.Module, eval_data: Sequence, on_batch: Optional[Callable[[int], None]] = None
                ) -> tuple[list, list]:
    """Run every batch's inputs through ``model`` as it is (no_grad); return (outputs, targets).

    Args:
        on_batch: called with the batch index after each forward (progress).

    Raises:
        EvaluationError: no batch, or a batch that is not an (inputs, targets) pair.
    """
    batches = eval_batches(eval_data)
    return forward_all(model, [b[0] for b in batches], on_batch), [b[1] for b in batches]


def score(metric_fn: Callable, outputs: list, targets: list, samples: Optional[int] = None) -> np.ndarray:
    """The metric's per-sample scores, checked: exactly ``samples`` finite numbers.

    Args:
        samples: the number of evaluation samples (``count_samples``); None counts them from the
            targets (and the outputs where a target holds no tensor).

    Raises:
        EvaluationError: a count other than ``samples`` (a scalar metric is one score), a score
            array of more than one dimension, non-numbers, or NaN/Inf.
    """
    if samples is None:
        samples = count_samples(targets, outputs, metric_fn)
    raw = metric_fn(outputs, targets)
    try:
        s = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise EvaluationError(f"the metric returned a {type(raw).__name__}, not numbers: it must return one "
                              "score per evaluation sample (a 1-D array).") from None
    if s.ndim > 1:
        s = s.squeeze()
        if s.ndim > 1:
            raise EvaluationError(f"the metric returned an array of shape {np.shape(raw)}: it must return a 1-D "
                                  "array of one score per evaluation sample.")
    s = s.reshape(-1)
    if s.size != samples:
        raise EvaluationError(
            f"the metric returned {s.size} score(s) for {samples} evaluation samples: it must return one score per "
            "sample (e.g. a 0/100 correctness per sample). Samples are counted from the targets' leading dimension; "
            "a metric that scores another number of samples sets `metric.samples = lambda targets: count`.")
    if not np.isfinite(s).all():
        raise EvaluationError(f"the metric returned {int((~np.isfinite(s)).sum())} NaN/Inf score(s) of {s.size}: "
                              "fix the metric (or the model's outputs) so every score is finite.")
    return s


def evaluate(model: nn.Module, eval_data: Iterable, metric_fn: Callable, keep_outputs: bool = False,
             progress: Optional[str] = None) -> Evaluation:
    """Evaluate ``model`` as it is (its current plan, if it is a mixq model) on ``eval_data``.

    Args:
        model: any module; a mixq model runs in whatever plan it holds.
        eval_data: (inputs, targets) batches.
        metric_fn: ``metric(outputs, targets) -> per-sample scores`` in percent.
        keep_outputs: keep the model's outputs in the result.
        progress: label of a progress bar over the batches (shown on a terminal), or None.

    Returns:
        An ``Evaluation``.

    Raises:
        EvaluationError: empty or malformed data, or a metric whose scores are not one finite number per sample.
    """
    batches = eval_batches(eval_data)
    n = count_samples([b[1] for b in batches], [b[0] for b in batches], metric_fn)
    t0 = time.perf_counter()
    step, close = progress_callback(len(batches), progress)
    try:
        outputs, targets = run_outputs(model, batches, step)
    finally:
        close()
    s = score(metric_fn, outputs, targets, n)
    return Evaluation(float(s.mean()), s, time.perf_counter() - t0, outputs if keep_outputs else None)


def evaluate_plan(qmodel: nn.Module, plan: QuantPlan | str | dict, eval_data: Iterable, metric_fn: Callable,
                  reference: Optional[Evaluation] = None, seed: int = 0, *, resamples: int = 1000,
                  confidence: float = 0.95, keep_outputs: bool = False,
                  progress: Optional[str] = None, engine: Optional["EngineRunner"] = None) -> PlanEvaluation:
    """Evaluate ``plan`` on a calibrated mixq model; the model's previous plan is back afterwards.

    Args:
        qmodel: a calibrated model from ``mixq.quantize`` prepared for the plan's formats.
        plan: a QuantPlan, its dict form, or a format name for every layer.
        eval_data: (inputs, targets) batches.
        metric_fn: ``metric(outputs, targets) -> per-sample scores`` in percent.
        reference: an evaluation of the same ``eval_data`` to measure the drop against (usually
            FP32: ``evaluate(float_model, ...)`` or ``evaluate_plan(qmodel, "fp32", ...)``).
        seed: seed of the bootstrap resamples.
        resamples: bootstrap resamples (0: the interval is the drop itself).
        confidence: interval coverage.
        keep_outputs: keep the model's outputs in the result.
        progress: label of a progress bar over the batches (shown on a terminal), or None.
        engine: run the plan on this engine (``EngineRunner``: its Q/DQ model on ONNX Runtime) instead of the
            fake-quant simulation; the plan is checked against ``qmodel`` all the same.

    Returns:
        A ``PlanEvaluation``; ``drop`` and ``drop_ci`` are None without a reference.

    Raises:
        PlanError / UnsupportedFormatError: the plan does not fit the model (nothing is switched).
        EvaluationError: bad data or metric, or a reference with another number of samples.
        ConfigError: bad ``resamples`` / ``confidence``.
    """
    check_bootstrap(resamples, confidence)
    batches = eval_batches(eval_data)
    with applied(qmodel, plan) as resolved:
        ran = qmodel.mixq.plan
        ev = evaluate(qmodel if engine is None else engine.model(ran), batches, metric_fn, keep_outputs, progress)
    res = PlanEvaluation(ev.metric, ev.scores, ev.seconds, ev.outputs, plan=ran, resolved=dict(resolved),
                         confidence=confidence, resamples=resamples)
    return res if reference is None else against(res, reference, seed)


def against(res: PlanEvaluation, reference: Evaluation, seed: int = 0) -> PlanEvaluation:
    """Set ``res``'s reference, drop and paired-bootstrap drop interval against ``reference``; return ``res``.

    Raises:
        EvaluationError: the two have different numbers of per-sample scores.
    """
    ref = np.asarray(reference.scores, dtype=np.float64).reshape(-1)
    if ref.size != res.scores.size:
        raise EvaluationError(f"the reference has {ref.size} per-sample scores but this evaluation has "
                              f"{res.scores.size}: evaluate both on the same evaluation data.")
    res.reference = float(reference.metric)
    res.drop = float(reference.metric - res.metric)
    res.drop_ci = paired_bootstrap_ci(ref - res.scores, res.resamples, res.confidence, seed)
    return res


# --------------------------------------------------------------------- plans on the engine
class EngineModel:
    """One plan's engine called like the model: a batch in (Tensor, tuple of positional inputs, or keyword
    inputs), torch tensors out (the one output, or a tuple of them in the graph's output order)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch = kwargs if kwargs else args[0] if len(args) == 1 else args
        outs = [torch.from_numpy(np.ascontiguousarray(o)) for o in self.engine.run(batch)]
        return outs[0] if len(outs) == 1 else tuple(outs)


class EngineRunner:
    """Plans of a calibrated model run on ONNX Runtime: each plan's Q/DQ model is made from the float graph traced
    once (``mixq.export.apply_plan``, tens of milliseconds) and built on ``threads`` intra-op threads.

    On EfficientNet-Lite0 the engine evaluates a plan about ten times faster than the fake-quant simulation, and its
    metric is the deployed model's. It is not the simulation's: ``mixq verify`` measures how far they differ.
    """

    def __init__(self, qmodel: nn.Module, graph: Any, threads: Optional[int] = None) -> None:
        self.qmodel, self.graph = qmodel, graph
        self.threads = threads or torch.get_num_threads()

    def model(self, plan: QuantPlan) -> EngineModel:
        from mixq.engine import build
        from mixq.export import apply_plan

        return EngineModel(build(apply_plan(self.graph, self.qmodel, plan), self.threads))
