"""Wiring that must fail when it is wrong: verify catches an engine that differs from the simulation,
a latency measurement quantizes exactly its plan's units, and random mixed plans export and verify."""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import mixq
import zoo
from mixq.engine.ort import build
from mixq.export import apply_plan, export_float_graph
from mixq.formats import WEIGHTED_KINDS, get_backend
from mixq.latency.ort import OrtLatency
from mixq.plan import QuantPlan
from mixq.verify import _graph_output_step, verify
from test_verify import attention_task, top1_metric


# ------------------------------------------------------------------------------------------ verify fails
def perturbed(model: onnx.ModelProto, scale_name: str, factor: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    t = next(t for t in out.graph.initializer if t.name == scale_name)
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), scale_name))
    return out


@pytest.fixture(scope="module")
def attention_int8():
    model, calib, evald = attention_task()  # predictions spread over 5 classes
    q = mixq.quantize(model, "int8", calib_data=calib)
    g = export_float_graph(q, calib[0])
    return q, g, evald, apply_plan(g, q, "int8")


def _weight_scale(model: onnx.ModelProto, g, unit: str) -> str:
    prod = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == g.unit_nodes[unit][0])
    return prod[node.input[1]].input[1]


def test_verify_fails_when_one_scale_of_the_exported_model_is_perturbed(attention_int8, tmp_path):
    q, g, evald, good = attention_int8
    assert torch.cat([y for _, y in evald]).unique().numel() >= 5  # top-1 agreement is not trivial here
    ok = verify(q, "int8", evald, top1_metric, graph=g, onnx_model=good, kernels=False)
    assert ok.passed and ok.onnx_given and ok.engine.top1_agreement >= 0.995, ok.summary()
    bad = perturbed(good, _weight_scale(good, g, "attn.v"), 1.5)  # the value projection's weight scales
    res = verify(q, "int8", evald, top1_metric, graph=g, onnx_model=bad, kernels=False, noise_floor=True)
    assert not res.passed and res.passed_by is None, res.summary()  # the noise floor waives nothing here
    assert res.engine.top1_agreement < 0.95 and any("agreement" in f for f in res.failures)
    assert abs(res.engine.metric_diff) > 1 and res.engine.max_err_steps > 10
    path = tmp_path / "bad.onnx"
    path.write_bytes(bad.SerializeToString())
    from_file = verify(q, "int8", evald, top1_metric, graph=g, onnx_model=str(path), kernels=False)
    assert from_file.engine.top1_agreement == res.engine.top1_agreement and not from_file.passed


def test_verify_fails_on_a_perturbed_scale_without_top1_or_metric(attention_int8):
    """Outputs compared as "other" (no top-1, no metric): the cosine check must catch it."""
    q, g, evald, good = attention_int8
    bad = perturbed(good, _weight_scale(good, g, "attn.v"), 1.5)
    res = verify(q, "int8", evald[:4], graph=g, onnx_model=bad, output_kind="other", kernels=False)
    assert not res.passed and res.engine.cosine_min < 0.99, res.summary()
    assert verify(q, "int8", evald[:4], graph=g, onnx_model=good, output_kind="other", kernels=False).passed


# ------------------------------------------------------------------------------------------ partial plans
def _random_partial(rng: random.Random, kinds: dict, backend: str, pool: tuple) -> dict:
    be = get_backend(backend)
    layers = {}
    for u, k in kinds.items():
        fmts = [f for f in pool if f in be.supported(k)]
        layers[u] = rng.choice(fmts)
    return layers


@pytest.fixture(scope="module")
def residual_ort():
    model, calib, x = zoo.build("residual")
    q = mixq.quantize(model, "int8", calib_data=calib, formats=("int4_wo",))
    return q, export_float_graph(q, calib[0]), x


@pytest.mark.parametrize("seed", range(4))
def test_latency_of_a_partial_plan_measures_exactly_the_plans_units(residual_ort, seed):
    q, g, x = residual_ort
    layers = _random_partial(random.Random(seed), g.kinds, "ort-cpu", ("int8", "int8", "fp32", "int4_wo"))
    measured: list[onnx.ModelProto] = []

    def session(model):
        measured.append(model)
        return build(model).session

    lat = OrtLatency(q, x, runs=1, warmup=0, session_factory=session, float_graph=g)
    assert lat(QuantPlan(default="fp32", layers=layers)) > 0 and len(measured) == 1
    model = measured[0]
    inits = {t.name for t in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    for unit, fmt in layers.items():
        node = by_name[g.unit_nodes[unit][0]]
        if g.kinds[unit] not in WEIGHTED_KINDS:
            continue
        weight_dq = [t for t in node.input[1:2] if t in prod and prod[t].op_type == "DequantizeLinear"]
        if fmt == "int4_wo":
            assert node.op_type == "MatMulNBits", unit
        elif fmt == "int8":
            assert len(weight_dq) == 1 and prod[weight_dq[0]].input[0] in inits, unit
        else:
            assert not weight_dq and node.input[1] in inits, unit  # a float weight, read as stored
    quantized = [u for u, f in layers.items() if f != "fp32"]
    kc = build(model).kernel_counts(g.unit_nodes, list(g.kinds))
    assert set(quantized) <= set(kc.units_integer), kc.summary()
    # Float convs are renamed by ORT's NCHWc layout pass (so reported unknown, not float): count kernels.
    assert not {u for u in g.kinds if layers[u] == "fp32" and g.kinds[u] in WEIGHTED_KINDS} & set(kc.units_integer)
    planned = {op: sum(1 for u, f in layers.items() if g.kinds[u] == k and f == fmt)
               for op, k, fmt in (("QLinearConv", "conv", "int8"), ("QGemm", "linear", "int8"),
                                  ("MatMulNBits", "linear", "int4_wo"))}
    assert {op: kc.integer.get(op, 0) for op in planned} == planned, kc.summary()
    assert_follows_simulation(build(model).run(x)[0], q, QuantPlan(default="fp32", layers=layers), x,
                              _graph_output_step(model))


def assert_follows_simulation(out: np.ndarray, q, plan: QuantPlan, x: torch.Tensor,
                              step: Optional[float] = None) -> None:
    """The engine is far closer to the simulation of ``plan`` than the simulation is to float (or, where
    the output is requantized, within one output step of it: a rounding tie flips a code).

    A unit quantized differently from the plan (or not at all) moves the engine by its share of the
    quantization error in every sample. Float rounding does not: measured ||engine - simulation|| /
    ||simulation - fp32|| <= 0.27 over the plans here (fp16 kernels of ORT round differently from
    torch's fp16 simulation, and a rounding tie can flip one code of a following quantized unit).
    """
    previous = q.mixq.plan
    try:
        mixq.set_plan(q, plan)
        with torch.no_grad():
            sim = q(x).numpy()
        mixq.set_plan(q, "fp32")
        with torch.no_grad():
            flt = q(x).numpy()
    finally:
        mixq.set_plan(q, previous)
    qerr = float(np.linalg.norm(sim - flt))
    if step is not None:
        assert np.abs(out - sim).max() <= 1.01 * step
    elif qerr == 0:
        assert np.abs(out - sim).max() <= 1e-6
    else:
        assert np.linalg.norm(out - sim) <= 0.35 * qerr, (plan.layers, np.linalg.norm(out - sim) / qerr)


# ------------------------------------------------------------------------------------------ mixed plans
MIXED = {"tensorrt": ("int8", "fp8_e4m3", "fp16", "int4_wo", "fp32"), "ort-cpu": ("int8", "int4_wo", "fp32")}
MODELS = ("residual", "attention", "decoder", "conv1d", "conv3d", "module_mode")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", list(MIXED))
def test_random_mixed_plans_export_and_verify(backend, name):
    model, calib, x = zoo.build(name)
    pool = MIXED[backend]
    q = mixq.quantize(model, "fp32", backend=backend, calib_data=calib, formats=[f for f in pool if f != "fp32"])
    g = export_float_graph(q, calib[0])
    evald = [(b, torch.zeros(len(b), dtype=torch.long)) for b in (x, *calib)]
    rng = random.Random(f"{backend}-{name}")
    seen = set()
    for _ in range(3):
        layers = _random_partial(rng, g.kinds, backend, pool)
        seen |= set(layers.values())
        plan = QuantPlan(backend=backend, default="fp32", layers=layers)
        res = verify(q, plan, evald, graph=g, kernels=False)
        assert res.passed, (layers, res.summary())
        model = apply_plan(g, q, plan)
        engine = build(model) if backend == "ort-cpu" else build(model, level="basic", qdq_fusion=False)
        xs = torch.cat([b for b, _ in evald])
        assert_follows_simulation(engine.run(xs)[0], q, plan, xs, _graph_output_step(model))
    assert len(seen) >= 2  # the plans do mix formats
