"""verify: does the engine compute what the simulation computes?

The evaluation set runs through the exported model on ONNX Runtime and through the fake-quant
model under the same plan. Reported: top-1 agreement (classifiers), cosine similarity of the
outputs (embeddings), the largest difference in output quantization steps (where the output is
quantized), per-sample agreement of the metric and the metric on both.

A model can be chaotic under a plan: a rounding flip of one activation code, caused by a float
difference in the last bit, can grow layer by layer. ``noise_floor=True`` measures that: the same
figures for the simulation run in float64 against the simulation in float32, two correct
implementations that differ only in float rounding. An engine cannot be expected to agree with the
simulation better than the simulation agrees with itself.

Pass rule. Each figure has a target (agreement >= 99.5%, |metric difference| <= 0.2 points, and
cosine min >= 0.99 where there is neither). Where the float64 simulation misses a target (the model
is chaotic under the plan: no implementation can be held to the targets), a figure that misses its
target still passes when the engine is within the float64 simulation's figure (``_within_floor``).
``passed_by`` says which rule passed; ``waived`` names every figure that passed by the floor, so a
report can say so.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from mixq.errors import MixqError
from mixq.progress import batches as progress_batches
from mixq.quantize import applied, call_model

TARGET_AGREEMENT = 0.995
TARGET_METRIC_DIFF = 0.2  # points of the metric (percent)
TARGET_COSINE_MIN = 0.99  # used only where there is neither an agreement nor a metric
FLOOR_SIGMAS = 3.0  # how many standard errors of the floor's own figure the engine may fall below it
OUTPUT_KINDS = ("auto", "classifier", "embedding", "other")


@dataclass
class Comparison:
    """How closely one set of outputs follows a reference (the simulation).

    Attributes:
        samples: evaluation samples (output rows) compared.
        scored: per-sample metric scores compared (e.g. queries of a retrieval metric).
        top1_agreement: fraction of samples with the same argmax (classifiers), else None.
        score_agreement: fraction of samples with the same per-sample metric score, else None.
        cosine_mean / cosine_min: cosine similarity of output rows.
        max_abs_diff: largest absolute output difference.
        max_err_steps: ``max_abs_diff`` in output quantization steps, when the output is quantized.
        metric: the metric on these outputs; metric_ref: on the reference; metric_diff: their difference.
        metric_diff_se: standard error of ``metric_diff`` (of the mean of per-sample score differences).
    """

    samples: int = 0
    scored: int = 0
    top1_agreement: Optional[float] = None
    score_agreement: Optional[float] = None
    cosine_mean: float = float("nan")
    cosine_min: float = float("nan")
    max_abs_diff: float = float("nan")
    max_err_steps: Optional[float] = None
    metric: Optional[float] = None
    metric_ref: Optional[float] = None
    metric_diff: Optional[float] = None
    metric_diff_se: Optional[float] = None

    @property
    def agreement(self) -> Optional[float]:
        """Top-1 agreement where there is one, else per-sample metric agreement (None without either)."""
        return self.top1_agreement if self.top1_agreement is not None else self.score_agreement


@dataclass
class VerifyResult:
    """Engine vs simulation for one plan.

    Attributes:
        plan: the plan as a dict; resolved: {layer: format}.
        output_kind: "classifier", "embedding" or "other".
        engine: the engine's outputs compared with the simulation's.
        noise_floor: the float64 simulation compared with the float32 one (None unless asked).
        output_step: quantization step of the model output (None when the output is float).
        targets: the pass thresholds; passed: whether the engine met them (or, figure by figure,
            the noise floor where the float64 simulation misses the target too).
        failures: the figures that failed, in words.
        passed_by: "targets" (every target met), "noise floor" (the float64 simulation misses a
            target; the engine missed some too, within that floor) or None (failed).
        waived: the figures that passed by the noise floor, in words.
        within_noise_floor: the engine agrees with the simulation about as well as the float64
            simulation does on every figure (see ``_within_floor``); None without a noise floor.
        kernels: integer-kernel counts of the engine (ort-cpu), as a dict.
        graph: the float graph the engine's model came from (``FloatGraph.describe()``: example and
            traced input shapes, batch axis, opset, digest).
        onnx_given: the engine ran an ONNX model passed in (``onnx_model``), not one built here.
    """

    plan: dict
    resolved: dict
    backend: str
    output_kind: str
    engine: Comparison
    noise_floor: Optional[Comparison] = None
    output_step: Optional[float] = None
    targets: dict = field(default_factory=lambda: {"agreement": TARGET_AGREEMENT, "metric_diff": TARGET_METRIC_DIFF})
    passed: bool = False
    failures: list = field(default_factory=list)
    passed_by: Optional[str] = None
    waived: list = field(default_factory=list)
    within_noise_floor: Optional[bool] = None
    kernels: Optional[dict] = None
    graph: Optional[dict] = None
    onnx_given: bool = False

    def to_dict(self) -> dict:
        return _finite(asdict(self))

    def summary(self) -> str:
        e = self.engine
        parts = [f"{e.samples} samples"]
        if e.top1_agreement is not None:
            parts.append(f"top-1 agreement {100 * e.top1_agreement:.2f}%")
        if e.score_agreement is not None:
            parts.append(f"per-sample metric agreement {100 * e.score_agreement:.2f}%")
        parts.append(f"cosine mean {e.cosine_mean:.5f} (min {e.cosine_min:.5f})")
        if e.max_err_steps is not None:
            parts.append(f"max error {e.max_err_steps:.2f} output steps")
        else:
            parts.append(f"max abs diff {e.max_abs_diff:.3g}")
        if e.metric is not None:
            parts.append(f"metric engine {e.metric:.2f} vs simulation {e.metric_ref:.2f} ({e.metric_diff:+.2f})")
        verdict = (" -> FAIL (" + "; ".join(self.failures) + ")" if not self.passed else
                   " -> PASS" if not self.waived else
                   " -> PASS by the noise floor (" + "; ".join(self.waived) + ")")
        s = "; ".join(parts) + verdict
        if self.noise_floor is not None:
            n = self.noise_floor
            agree = n.agreement
            s += (f"\n  noise floor (float64 vs float32 simulation): agreement "
                  f"{'-' if agree is None else f'{100 * agree:.2f}%'}, cosine mean {n.cosine_mean:.5f} "
                  f"(min {n.cosine_min:.5f})" + ("" if n.metric_diff is None else f", metric diff {n.metric_diff:+.2f}")
                  + ("; the engine is within it" if self.within_noise_floor else "; the engine is NOT within it"))
        return s


def _finite(x: Any) -> Any:
    """JSON-safe: NaN / Inf become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    return out.detach().float().cpu()


def _rows(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-batch outputs as one (samples, features) matrix."""
    return torch.cat([o.reshape(o.shape[0], -1) for o in outputs])


def infer_output_kind(outputs: Sequence[torch.Tensor]) -> str:
    """"embedding" when every output row has unit L2 norm, "classifier" for other 2-D outputs, else "other"."""
    y = _rows(outputs) if outputs else torch.empty(0)
    if y.dim() != 2 or y.numel() == 0 or outputs[0].dim() != 2:
        return "other"
    norms = y.norm(dim=1)
    return "embedding" if torch.allclose(norms, torch.ones_like(norms), atol=1e-3) else "classifier"


def compare(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], kind: str,
            targets: Optional[list] = None, metric_fn: Optional[Callable] = None,
            output_step: Optional[float] = None) -> Comparison:
    """Compare per-batch ``outputs`` with ``reference`` (see ``Comparison``)."""
    a, b = _rows(outputs), _rows(reference)
    if a.shape != b.shape:
        raise MixqError(f"engine output shape {tuple(a.shape)} differs from the simulation's {tuple(b.shape)}.")
    c = Comparison(samples=a.shape[0])
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-12)
    c.cosine_mean, c.cosine_min = float(cos.mean()), float(cos.min())
    c.max_abs_diff = float((a - b).abs().max())
    if output_step:
        c.max_err_steps = c.max_abs_diff / output_step
    if kind == "classifier":
        c.top1_agreement = float((a.argmax(1) == b.argmax(1)).double().mean())
    if metric_fn is not None and targets is not None:
        from mixq.task import score

        s_a, s_b = score(metric_fn, list(outputs), targets), score(metric_fn, list(reference), targets)
        c.metric, c.metric_ref = float(s_a.mean()), float(s_b.mean())
        c.metric_diff = c.metric - c.metric_ref
        if s_a.shape == s_b.shape:
            c.score_agreement = float((s_a == s_b).mean())
            c.scored = int(s_a.size)
            d = (s_a - s_b).astype(np.float64).ravel()
            c.metric_diff_se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    return c


def _graph_output_step(model) -> Optional[float]:
    """The scale of the DequantizeLinear producing the first graph output, if it is per-tensor."""
    from onnx import numpy_helper

    out = model.graph.output[0].name
    node = next((n for n in model.graph.node if out in n.output), None)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    init = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
    if init is None:
        return None
    s = numpy_helper.to_array(init)
    return float(s) if s.size == 1 else None


def _double_inputs(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_double_inputs(t) for t in batch)
    if isinstance(batch, dict):
        return {k: _double_inputs(v) for k, v in batch.items()}
    return batch


def verify(qmodel: torch.nn.Module, plan, eval_data: Sequence, metric_fn: Optional[Callable] = None,
           graph=None, threads: int = 1, output_kind: str = "auto", noise_floor: bool = False,
           kernels: bool = True, targets: Optional[dict] = None, onnx_model: Any = None,
           batch_axis: Optional[int] = 0, progress: Optional[str] = None) -> VerifyResult:
    """Run ``eval_data`` through the ONNX Runtime engine and the simulation; compare.

    Args:
        qmodel: a calibrated model from ``mixq.quantize`` (its active plan is restored afterwards).
        plan: a QuantPlan (or dict / format name) for the model's backend.
        eval_data: list of (inputs, targets) batches, as ``Task.eval_fn`` returns.
        metric_fn: the task's per-sample metric; None skips the metric figures.
        graph: the FloatGraph of this run (``export_float_graph``), shared with ``export`` so that the
            graph verified is the file written; default: exported here from the first batch's inputs.
        threads: ONNX Runtime intra-op threads.
        output_kind: "auto" (unit-norm rows -> embedding, else classifier), "classifier",
            "embedding" or "other".
        noise_floor: also compare the float64 simulation with the float32 one.
        kernels: count integer kernels (ort-cpu).
        targets: {"agreement": fraction, "metric_diff": points}; defaults 0.995 and 0.2.
        onnx_model: the ONNX model to run in the engine (a ModelProto, its bytes or a path), e.g. the
            file ``export`` wrote; default: ``apply_plan(graph, qmodel, plan)``. The plan still names
            what the simulation runs.
        batch_axis: the inputs' batch axis when the graph is exported here (see ``export_float_graph``).
        progress: label of a progress bar over the batches (shown on a terminal), or None.

    Returns:
        The VerifyResult; ``passed`` says whether the targets were met.

    Raises:
        MixqError subclasses for a bad plan, missing calibration, empty data or engine failures.
    """
    from mixq.engine.ort import build
    from mixq.export import _as_plan, apply_plan, export_float_graph, resolve_plan

    if output_kind not in OUTPUT_KINDS:
        raise MixqError(f"unknown output kind {output_kind!r}; valid kinds are {', '.join(OUTPUT_KINDS)}.")
    batches = list(eval_data)
    if not batches:
        raise MixqError("the evaluation loader yielded no batch: pass a list of (inputs, targets) batches.")
    if graph is None:
        graph = export_float_graph(qmodel, batches[0][0], batch_axis=batch_axis)
    plan = _as_plan(plan, graph.backend, qmodel.mixq.calib_method)
    resolved = resolve_plan(graph, plan)
    model = apply_plan(graph, qmodel, plan) if onnx_model is None else _load_onnx(onnx_model)
    if graph.backend == "ort-cpu":
        engine = build(model, threads)
    else:
        # TensorRT flavour on the CPU: Q/DQ run as written. Above "basic", ORT 1.31 drops a ReLU in
        # front of an FP8 QuantizeLinear (ReluQuantFusion treats zero point 0 as clipping), so stay there.
        engine = build(model, threads, level="basic", qdq_fusion=False)
    with applied(qmodel, plan):
        plan_obj = qmodel.mixq.plan
        sim, eng, tgts = [], [], []
        with torch.no_grad():
            for inputs, target in progress_batches(batches, progress):
                sim.append(_first_output(call_model(qmodel, inputs)))
                eng.append(_first_output(engine.run(inputs)[0]))
                tgts.append(target)
        floor_out = _float64_outputs(qmodel, batches) if noise_floor else None
    kind = infer_output_kind(sim) if output_kind == "auto" else output_kind
    step = _graph_output_step(model)
    res = VerifyResult(plan=plan_obj.to_dict(), resolved=resolved, backend=graph.backend, output_kind=kind,
                       engine=compare(eng, sim, kind, tgts, metric_fn, step), output_step=step,
                       graph=graph.describe(), onnx_given=onnx_model is not None)
    if targets:
        res.targets.update(targets)
    if floor_out is not None:
        res.noise_floor = compare(floor_out, sim, kind, tgts, metric_fn, step)
        res.within_noise_floor = all(_within_floor(res.engine, res.noise_floor, name, res.targets["metric_diff"])[0]
                                     for name, _, _ in _figures(res.engine, res.targets))
    if kernels and graph.backend == "ort-cpu":
        quantized = [u for u, f in resolved.items() if f != "fp32"]
        res.kernels = engine.kernel_counts(graph.unit_nodes, quantized).to_dict()
    _judge(res)
    return res


def _load_onnx(model: Any):
    """A ModelProto from a ModelProto, its bytes or a path.

    Raises:
        MixqError: it cannot be read.
    """
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load_from_string(bytes(model)) if isinstance(model, (bytes, bytearray)) else onnx.load(str(model))
    except Exception as e:  # onnx raises DecodeError, OSError ...
        raise MixqError(f"cannot read the ONNX model {str(model)[:80]!r}: {e}; pass a ModelProto, its bytes or the "
                        "path of an exported .onnx file.") from None


def _figures(e: Comparison, t: dict) -> list[tuple[str, str, bool]]:
    """(figure, its value in words, target met) for each figure the targets judge."""
    out = []
    agree = e.agreement
    if agree is not None:
        what = "top-1" if e.top1_agreement is not None else "per-sample metric"
        out.append(("agreement", f"{what} agreement {100 * agree:.2f}% vs target {100 * t['agreement']:.2f}%",
                    agree >= t["agreement"]))
    if e.metric_diff is not None:
        out.append(("metric_diff", f"|metric difference| {abs(e.metric_diff):.2f} vs target {t['metric_diff']} points",
                    abs(e.metric_diff) <= t["metric_diff"]))
    if agree is None and e.metric_diff is None:
        out.append(("cosine_min", f"cosine min {e.cosine_min:.4f} vs target {TARGET_COSINE_MIN}",
                    e.cosine_min >= TARGET_COSINE_MIN))
    return out


def _judge(res: VerifyResult) -> None:
    """Set ``failures``, ``waived``, ``passed`` and ``passed_by`` of ``res`` (see the module's pass rule)."""
    e, floor = res.engine, res.noise_floor
    # Chaotic under this plan: float rounding alone (float64 vs float32 simulation) misses a target.
    chaotic = floor is not None and not all(ok for _, _, ok in _figures(floor, res.targets))
    res.failures, res.waived = [], []
    for name, words, ok in _figures(e, res.targets):
        if ok:
            continue
        if chaotic:
            within, why = _within_floor(e, floor, name, res.targets["metric_diff"])
            if within:
                res.waived.append(f"{words}: within the float64 simulation's noise floor ({why})")
                continue
            res.failures.append(f"{words}, and outside the float64 simulation's noise floor ({why})")
        else:
            res.failures.append(words)
    res.passed = not res.failures
    res.passed_by = None if res.failures else "noise floor" if res.waived else "targets"


def _within_floor(e: Comparison, floor: Comparison, name: str, metric_tol: float) -> tuple[bool, str]:
    """Whether the engine's ``name`` figure is within the float64 simulation's, and the comparison in words.

    The floor is one draw of float-rounding noise, so the engine may fall below it by
    ``FLOOR_SIGMAS`` standard errors of the floor's own figure (a binomial proportion over the
    samples for agreement; for the metric difference, the standard error of the floor's per-sample
    score differences, at least ``metric_tol``), and at least one sample.
    """
    if name == "agreement":
        n = (e.samples if e.top1_agreement is not None else e.scored) or e.samples or 1
        p = floor.agreement
        tol = max(FLOOR_SIGMAS * math.sqrt(max(p * (1 - p), 0.0) / n), 1.5 / n)
        return (e.agreement >= p - tol,
                f"engine {100 * e.agreement:.2f}% vs floor {100 * p:.2f}%, tolerance {100 * tol:.2f} points")
    if name == "metric_diff":
        tol = max(metric_tol, FLOOR_SIGMAS * (floor.metric_diff_se or 0.0))
        return (abs(e.metric_diff) <= abs(floor.metric_diff) + tol,
                f"engine {abs(e.metric_diff):.2f} vs floor {abs(floor.metric_diff):.2f}, tolerance {tol:.2f} points")
    return (e.cosine_min >= floor.cosine_min - 1e-3,
            f"engine {e.cosine_min:.4f} vs floor {floor.cosine_min:.4f}, tolerance 0.001")


def _float64_outputs(qmodel: torch.nn.Module, batches: Sequence) -> list[torch.Tensor]:
    """The simulation in float64 (quantizer ranges unchanged): same plan, different float rounding."""
    m64 = copy.deepcopy(qmodel).double()
    with torch.no_grad():
        return [_first_output(call_model(m64, _double_inputs(inputs))) for inputs, _ in batches]
