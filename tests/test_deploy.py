"""The file to ship (``save_deployable``) gives mixq's engine numbers, bitwise, in a stock ONNX Runtime
session with default options; the exported model alone does not, for partial plans."""
from __future__ import annotations

import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import mixq
import zoo
from mixq.engine.deploy import check_deployable, guard_optimizers, save_deployable
from mixq.engine.ort import DEFAULT_DISABLED, EngineError, build
from mixq.export import apply_plan, export_float_graph
from mixq.plan import QuantPlan


def default_session_outputs(src, feed):
    """What a user gets: ``onnxruntime.InferenceSession(path)`` with default options."""
    return ort.InferenceSession(str(src) if not isinstance(src, bytes) else src).run(None, feed)


def max_gap(a, b):
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b))


def random_plans(name, n, seed=0):
    torch.manual_seed(0)
    model, calib, _ = zoo.build(name)
    q = mixq.quantize(model, "int8", calib_data=calib)
    graph = export_float_graph(q, calib[0])
    rng = random.Random(seed)
    be = mixq.get_backend("ort-cpu")
    units = [u for u, k in q.mixq.kinds.items() if "int8" in be.supported(k)]
    plans = [{u: rng.choice(["int8", "fp32"]) for u in units} for _ in range(n)]
    return [apply_plan(graph, q, QuantPlan(backend="ort-cpu", default="fp32", layers=p)) for p in plans], calib


@pytest.mark.parametrize("name", ["residual", "decoder", "functional"])
def test_shipped_file_in_a_default_session_equals_mixqs_engine_bitwise(name, tmp_path):
    models, calib = random_plans(name, 8)
    torch.manual_seed(5)
    fresh = zoo.ZOO[name][1]()  # inputs not used by save_deployable's own check, another batch size
    fresh = torch.cat([fresh, fresh[:1]])
    raw_gaps = []
    for k, m in enumerate(models):
        engine = build(m)
        feed = engine.feed(fresh)
        want = engine.run(fresh)
        raw_gaps.append(max_gap(want, default_session_outputs(m.SerializeToString(), feed)))
        path = save_deployable(m, tmp_path / f"{name}_{k}.onnx", example_inputs=calib[0])
        got = default_session_outputs(path, feed)
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b)  # bitwise: no tolerance
    # The exported file alone gives other numbers in a default session for some of these plans
    # (measured: up to 2.7e-3 on residual, 2.3e-3 on functional): the case this guards. The decoder's
    # differences came from its ConvTranspose, which ort-cpu no longer offers in int8 (no integer kernel).
    if name != "decoder":
        assert max(raw_gaps) > 1e-4, raw_gaps


def double_qdq_model() -> onnx.ModelProto:
    """x -> Q1 -> DQ1 -> Q2 -> DQ2 -> Relu, two pairs with different numbers (DoubleQDQPairsRemover's pattern)."""
    init = [numpy_helper.from_array(np.array(0.05, np.float32), "s1"),
            numpy_helper.from_array(np.array(128, np.uint8), "z1"),
            numpy_helper.from_array(np.array(0.031, np.float32), "s2"),
            numpy_helper.from_array(np.array(100, np.uint8), "z2")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["q1"], name="Q1"),
             helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["d1"], name="DQ1"),
             helper.make_node("QuantizeLinear", ["d1", "s2", "z2"], ["q2"], name="Q2"),
             helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["d2"], name="DQ2"),
             helper.make_node("Relu", ["d2"], ["y"], name="Relu")]
    g = helper.make_graph(nodes, "double_qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], init)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_double_qdq_pairs_are_kept_in_the_shipped_file(tmp_path):
    m = double_qdq_model()
    x = np.random.default_rng(0).normal(0, 3, (4, 16)).astype(np.float32)
    engine = build(m)
    want = engine.run(x)
    # reference: the two requantizations the graph says, in numpy
    q1 = np.clip(np.rint(x / np.float32(0.05)) + 128, 0, 255)
    d1 = ((q1 - 128) * np.float32(0.05)).astype(np.float32)
    q2 = np.clip(np.rint(d1 / np.float32(0.031)) + 100, 0, 255)
    ref = np.maximum(((q2 - 100) * np.float32(0.031)).astype(np.float32), 0)
    np.testing.assert_array_equal(want[0], ref)
    assert max_gap(want, default_session_outputs(m.SerializeToString(), {"x": x})) > 1e-3  # merged by default
    path = save_deployable(m, tmp_path / "d.onnx", example_inputs=x)
    y = np.random.default_rng(1).normal(0, 3, (7, 16)).astype(np.float32)
    np.testing.assert_array_equal(default_session_outputs(path, {"x": y})[0], engine.run(y)[0])
    shipped = onnx.load(str(path))
    assert [n.op_type for n in shipped.graph.node].count("DequantizeLinear") == 2


def test_the_raw_export_fails_the_check_and_nothing_is_written(tmp_path, monkeypatch):
    import mixq.engine.deploy as deploy

    m = double_qdq_model()
    x = np.random.default_rng(0).normal(0, 3, (4, 16)).astype(np.float32)
    engine = build(m)
    with pytest.raises(EngineError, match="differs from mixq's engine"):
        check_deployable(m.SerializeToString(), engine, engine.feed(x))
    monkeypatch.setattr(deploy, "guard_optimizers", lambda model, shapes=None: [])
    with pytest.raises(EngineError, match="max \\|diff\\|"):
        save_deployable(m, tmp_path / "d.onnx", example_inputs=x)
    assert not (tmp_path / "d.onnx").exists() and list(tmp_path.iterdir()) == []


def test_guard_rewrites_only_the_matched_dequantize_nodes():
    m = double_qdq_model()
    done = guard_optimizers(m, {"d1": (4, 16), "d2": (4, 16)})
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert done == ["DQ1"]
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    assert inits[dq[0].input[1]].shape == (16,) and np.all(inits[dq[0].input[1]] == np.float32(0.05))
    assert inits[dq[0].input[2]].dtype == np.uint8 and np.all(inits[dq[0].input[2]] == 128)
    assert inits[dq[1].input[1]].shape == ()  # DQ2 feeds Relu, not a Q: left as it was
    assert set(DEFAULT_DISABLED) == {"DoubleQDQPairsRemover", "WeightBiasQuantization"}
