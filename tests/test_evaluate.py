"""The one evaluator: score counts checked, drop and interval against an independent paired bootstrap,
the previous plan restored (followers included), and the older ``mixq.task`` names delegating to it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mixq
import mixq.task
from mixq.errors import ConfigError, PlanError
from mixq.evaluate import (Evaluation, EvaluationError, count_samples, evaluate, evaluate_plan, run_outputs,
                           score)
from mixq.plan import QuantPlan
from mixq.quantize import call_model, set_plan


def top1(outputs, targets):
    pred = torch.cat([o.float() for o in outputs]).argmax(1)
    return (pred == torch.cat(targets)).double().numpy() * 100.0


def _task(n_batches: int = 4, batch: int = 64, seed: int = 0):
    """An MLP (its ReLUs carry the output quantizers on ort-cpu), labels = float argmax with 15% replaced."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    calib = [torch.randn(32, 16, generator=g) for _ in range(4)]
    evalb = []
    with torch.no_grad():
        for _ in range(n_batches):
            x = torch.randn(batch, 16, generator=g)
            y = model(x).argmax(1)
            flip = torch.rand(y.shape, generator=g) < 0.15
            evalb.append((x, torch.where(flip, torch.randint(0, 10, y.shape, generator=g), y)))
    return model, calib, evalb


def _formats(q) -> dict:
    return {n: m.active_format for n, m in q.named_modules() if hasattr(m, "active_format")}


# --------------------------------------------------------------------------- the metric's output is checked
def test_scalar_metric_is_rejected_with_the_counts():
    model, _, evalb = _task()
    with pytest.raises(EvaluationError) as e:
        evaluate(model, evalb, lambda o, t: float(top1(o, t).mean()))
    assert ("the metric returned 1 score(s) for 256 evaluation samples: it must return one score per sample "
            "(e.g. a 0/100 correctness per sample)") in str(e.value)


def test_wrong_score_count_is_rejected_with_the_counts():
    model, _, evalb = _task()
    with pytest.raises(EvaluationError, match=r"returned 251 score\(s\) for 256 evaluation samples"):
        evaluate(model, evalb, lambda o, t: top1(o, t)[:251])
    with pytest.raises(EvaluationError, match=r"returned 320 score\(s\) for 256 evaluation samples"):
        evaluate(model, evalb, lambda o, t: np.concatenate([top1(o, t), top1(o, t)[:64]]))
    with pytest.raises(EvaluationError, match="1 NaN/Inf score"):
        evaluate(model, evalb, lambda o, t: np.where(np.arange(256) == 7, np.inf, top1(o, t)))
    with pytest.raises(EvaluationError, match=r"shape \(16, 16\)"):
        evaluate(model, evalb, lambda o, t: top1(o, t).reshape(16, 16))
    with pytest.raises(EvaluationError, match="not numbers"):
        evaluate(model, evalb, lambda o, t: "accuracy")
    # the older names check the same way (the CLI and verify call them)
    with pytest.raises(EvaluationError, match=r"returned 1 score\(s\) for 256"):
        mixq.task.evaluate(model, evalb, lambda o, t: top1(o, t).mean())
    outs, targets = run_outputs(model, evalb)
    with pytest.raises(EvaluationError, match=r"returned 255 score\(s\) for 256"):
        mixq.task.score(lambda o, t: top1(o, t)[1:], outs, targets)


def test_samples_are_counted_from_targets_inputs_or_the_metric():
    x = torch.zeros(5, 3)
    assert count_samples([torch.zeros(5), torch.zeros(3)]) == 8
    assert count_samples([torch.tensor(1)]) == 1  # a 0-d target is one sample
    assert count_samples([(torch.zeros(4), torch.ones(4, 2))]) == 4  # labels and weights: 4 samples, not 2
    assert count_samples([["cat", "dog", "emu"]]) == 3
    assert count_samples([None, {"a": 1}], [x, {"ids": torch.zeros(2, 7)}]) == 7
    with pytest.raises(EvaluationError, match="cannot count the samples of evaluation batch 0"):
        count_samples([None], [{"flag": True}])

    def retrieval(outputs, targets):  # scores queries only, as experiments/minilm.py does
        return np.zeros(sum(len(ids) for kind, ids in targets if kind == "query"))

    targets = [("query", torch.arange(5)), ("doc", torch.arange(5)), ("query", torch.arange(5, 8))]
    assert count_samples(targets) == 6  # (kind, ids) pairs are not per-sample tensors: 2 per batch
    with pytest.raises(EvaluationError, match=r"returned 8 score\(s\) for 6 evaluation samples"):
        score(retrieval, [None] * 3, targets)
    retrieval.samples = lambda t: sum(len(ids) for kind, ids in t if kind == "query")
    assert count_samples(targets, metric_fn=retrieval) == 8
    assert score(retrieval, [None] * 3, targets).size == 8
    retrieval.samples = 0
    with pytest.raises(EvaluationError, match="`samples` gave 0"):
        count_samples(targets, metric_fn=retrieval)


def test_minilm_metric_declares_its_scored_queries():
    from experiments import minilm

    targets = [("query", torch.arange(i, i + 64)) for i in range(0, 256, 64)]
    targets += [("doc", torch.arange(i, i + 64)) for i in range(0, 256, 64)]
    assert count_samples(targets, metric_fn=minilm.metric) == 256
    outputs = [torch.randn(64, 8) for _ in targets]
    assert score(minilm.metric, outputs, targets).size == 256


# --------------------------------------------------------------------------- drop and interval
def _np_paired_bootstrap(ref, got, resamples, confidence, seed):
    """Independent reference: resample sample indices, mean of paired differences, percentile interval."""
    d = np.asarray(ref, np.float64) - np.asarray(got, np.float64)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    a = (1 - confidence) / 2
    return tuple(np.quantile(d[idx].mean(axis=1), [a, 1 - a]))


def test_drop_and_interval_match_an_independent_paired_bootstrap():
    model, calib, evalb = _task()
    q = mixq.quantize(model, "fp32", backend="ort-cpu", calib_data=calib, formats=["int8", "int4_wo"])
    with torch.no_grad():  # independent of the evaluator: plain forwards and the metric
        ref = top1([model(x) for x, _ in evalb], [y for _, y in evalb])
        set_plan(q, QuantPlan.uniform("int8", "ort-cpu"))
        got = top1([q(x) for x, _ in evalb], [y for _, y in evalb])
        set_plan(q, QuantPlan.uniform("fp32", "ort-cpu"))
    assert len(set((ref - got).tolist())) > 1, "the fixture must change some predictions"
    fp32 = evaluate(model, evalb, top1)
    assert isinstance(fp32, Evaluation) and fp32.samples == 256 and fp32.metric == ref.mean()
    assert np.array_equal(fp32.scores, ref)
    res = evaluate_plan(q, QuantPlan.uniform("int8", "ort-cpu"), evalb, top1, reference=fp32, seed=3,
                        resamples=700, confidence=0.9)
    assert np.array_equal(res.scores, got) and res.metric == got.mean()
    assert res.reference == ref.mean() and res.drop == pytest.approx(ref.mean() - got.mean(), abs=1e-12)
    assert res.drop_ci == pytest.approx(_np_paired_bootstrap(ref, got, 700, 0.9, 3), abs=0)
    assert res.drop_noise == (res.drop_ci[0] <= 0 <= res.drop_ci[1])
    assert res.resolved == {u: "int8" for u in q.mixq.kinds}
    # without a reference there is no drop; a reference of other data is refused
    alone = evaluate_plan(q, "int4_wo", evalb, top1)
    assert alone.drop is None and alone.drop_ci is None and alone.drop_noise is None
    with pytest.raises(EvaluationError, match="reference has 192 per-sample scores but this evaluation has 256"):
        evaluate_plan(q, "int8", evalb, top1, reference=evaluate(model, evalb[:3], top1))
    with pytest.raises(ConfigError, match="0 < confidence < 1"):
        evaluate_plan(q, "int8", evalb, top1, reference=fp32, confidence=1.5)


# --------------------------------------------------------------------------- plans on the engine
def test_a_plan_evaluated_on_the_engine_is_what_onnx_runtime_computes_for_its_export():
    import onnxruntime as ort

    from mixq.evaluate import EngineRunner
    from mixq.export import export, export_float_graph

    model, calib, evalb = _task()
    q = mixq.quantize(model, "fp32", backend="ort-cpu", calib_data=calib, formats=["int8"])
    runner = EngineRunner(q, export_float_graph(q, calib[0], batch_axis=0), threads=1)
    plan = QuantPlan("ort-cpu", "int8", {"2": "fp32"})
    got = evaluate_plan(q, plan, evalb, top1, engine=runner, keep_outputs=True)
    # independent of the runner: the one-call export of the plan, an ONNX Runtime session made here with the
    # optimizers mixq keeps off (a default session differs on a few near-ties: see mixq.engine.ort), numpy argmax
    from mixq.engine.ort import DEFAULT_DISABLED

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(export(q, plan, calib[0]).SerializeToString(), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DEFAULT_DISABLED))
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x.numpy()})[0] for x, _ in evalb]
    want = np.concatenate([(o.argmax(1) == y.numpy()) * 100.0 for o, (_, y) in zip(outs, evalb)])
    assert np.array_equal(got.scores, want) and got.metric == want.mean()
    assert all(np.array_equal(g.numpy(), o) for g, o in zip(got.outputs, outs)), "the engine's own numbers"
    assert got.resolved == {"0": "int8", "2": "fp32", "4": "int8"}
    # it ran the plan, not the float model, and it is close to (not the same code as) the simulation
    fp32 = evaluate_plan(q, "fp32", evalb, top1, engine=runner)
    sim = evaluate_plan(q, plan, evalb, top1, keep_outputs=True)
    assert not np.array_equal(fp32.scores, got.scores)
    assert not all(torch.equal(s, g) for s, g in zip(sim.outputs, got.outputs)), "the simulation's are not bitwise equal"
    assert (sim.scores == got.scores).mean() >= 0.97
    assert _formats(q) == _formats(mixq.quantize(model, "fp32", backend="ort-cpu", calib_data=calib,
                                                  formats=["int8"])), "the model's own plan is back"


# --------------------------------------------------------------------------- the previous plan comes back
def test_evaluate_plan_restores_the_previous_plan_followers_included():
    model, calib, evalb = _task(n_batches=1)
    q = mixq.quantize(model, QuantPlan("ort-cpu", "int8", {"0": "fp32"}), calib_data=calib, formats=["int8"])
    followers = [n for n, m in q.named_modules() if type(m).__name__ == "QuantFollower"]
    assert followers, "the fixture must have output quantizers moved behind a ReLU"
    before, plan = _formats(q), q.mixq.plan
    with torch.no_grad():
        want = call_model(q, evalb[0][0])
    res = evaluate_plan(q, "fp32", evalb, top1)
    assert set(res.resolved.values()) == {"fp32"}
    assert _formats(q) == before and q.mixq.plan is plan
    with torch.no_grad():
        assert torch.equal(call_model(q, evalb[0][0]), want)
    # also when the metric fails half-way
    with pytest.raises(EvaluationError):
        evaluate_plan(q, "fp32", evalb, lambda o, t: np.zeros(3))
    assert _formats(q) == before and q.mixq.plan is plan
    # and a plan that does not fit switches nothing
    with pytest.raises(PlanError):
        evaluate_plan(q, QuantPlan("ort-cpu", "fp32", {"nope": "int8"}), evalb, top1)
    assert _formats(q) == before and q.mixq.plan is plan


def test_task_names_delegate_to_the_evaluator():
    model, _, evalb = _task(n_batches=2)
    m, s = mixq.task.evaluate(model, evalb, top1)
    ev = evaluate(model, evalb, top1)
    assert m == ev.metric and np.array_equal(s, ev.scores)
    with pytest.raises(EvaluationError, match="yielded no batch"):
        mixq.task.run_outputs(model, [])


def test_import_directions():
    """evaluate imports quantize, never the sensitivity package; the statistics and the table import no torch."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "mixq"

    def imports(rel: str) -> set[str]:
        tree = ast.parse((root / rel).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert "mixq.quantize" in imports("evaluate.py")
    assert not {m for m in imports("evaluate.py") if m.startswith("mixq.sensitivity")}
    for rel in ("stats.py", "sensitivity/table.py"):
        assert not {m for m in imports(rel) if m == "torch" or m.startswith("torch.")}, rel
