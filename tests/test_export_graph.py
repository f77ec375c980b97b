"""The float graph: the batch axis it is traced and exported along, one graph shared by export and
verify, and a default format that no unit can run."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import mixq
import zoo
from mixq.engine.ort import build
from mixq.errors import UnsupportedFormatError
from mixq.export import ExportError, ExportWarning, apply_plan, export, export_float_graph, qdq_summary
from mixq.plan import QuantPlan
from mixq.verify import _graph_output_step, verify


def dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def sim(q, x, plan) -> np.ndarray:
    mixq.set_plan(q, plan)
    with torch.no_grad():
        return q(x).numpy()


@pytest.fixture(scope="module")
def time_major():
    model, calib, x = zoo.build("cell_time_major")  # (time 5, batch 4, features 6)
    return mixq.quantize(model, "int8", calib_data=calib), calib, x


# ------------------------------------------------------------------------------------------ batch axis
def test_time_major_model_fails_on_dim_0_with_the_cause_and_the_option(time_major):
    q, calib, _ = time_major
    with pytest.raises(ExportError, match=r"\(5, 4, 6\) -> \(1, 4, 6\).*axis 0 is the batch.*batch_axis=1"):
        export_float_graph(q, calib[0])


def test_batch_axis_1_traces_one_sample_and_keeps_that_axis_dynamic(time_major):
    q, calib, x = time_major
    g = export_float_graph(q, calib[0], batch_axis=1)
    assert g.batch_axis == 1 and g.example_shapes == [(5, 4, 6)] and g.traced_shapes == [(5, 1, 6)]
    model = apply_plan(g, q, "int8")
    assert dims(model.graph.input[0]) == [5, "batch", 6] and dims(model.graph.output[0])[0] == "batch"
    engine = build(model)
    assert engine.kernel_counts(g.unit_nodes, list(g.kinds)).units_integer == ["cell", "fc"]
    x8 = torch.cat([x, -x], 1)  # a batch of 8: not the example's 4
    out = engine.run(x8)[0]
    assert out.shape == (8, 3)
    # ort-cpu requantizes the output: at most one output step apart (a float tie), as in test_export
    assert np.abs(out - sim(q, x8, "int8")).max() <= 1.01 * _graph_output_step(model)


def test_batch_axis_none_traces_the_example_as_given(time_major):
    q, calib, x = time_major
    g = export_float_graph(q, calib[0], batch_axis=None)
    assert g.traced_shapes == g.example_shapes == [(5, 4, 6)]
    model = apply_plan(g, q, QuantPlan(layers={"fc": "fp32"}))
    assert dims(model.graph.input[0]) == [5, 4, 6] and dims(model.graph.output[0]) == [4, 3]
    # QGemm (the cell's int8 Gemm with a float output) scales the integer sum once: measured 1.03e-5 after 5 steps
    np.testing.assert_allclose(build(model).run(x)[0], sim(q, x, QuantPlan(layers={"fc": "fp32"})), atol=2e-5)


def test_batch_axis_must_be_an_axis_of_every_input(time_major):
    q, calib, _ = time_major
    with pytest.raises(ExportError, match="batch_axis=3 is not an axis"):
        export_float_graph(q, calib[0], batch_axis=3)
    with pytest.raises(ExportError, match="must be an int or None"):
        export_float_graph(q, calib[0], batch_axis="1")


def test_time_major_lstm_warns_that_dim_0_is_not_the_batch():
    model, calib, x = zoo.build("lstm_time_major")  # nn.LSTM(batch_first=False): (time 7, batch 4, 6)
    q = mixq.quantize(model, "int8", calib_data=calib)
    with pytest.warns(ExportWarning, match="not the batch"):
        export_float_graph(q, calib[0])
    g = export_float_graph(q, calib[0], batch_axis=1)
    model1 = apply_plan(g, q, "int8")
    assert dims(model1.graph.input[0]) == [7, "batch", 6] and dims(model1.graph.output[0]) == ["batch", 3]
    x2 = torch.cat([x, x, x], 1)
    np.testing.assert_allclose(build(model1).run(x2)[0], sim(q, x2, "int8"), atol=1e-6)


def test_verify_and_export_of_a_time_major_model_share_one_graph(time_major):
    q, calib, x = time_major
    evald = [(x, torch.zeros(4, dtype=torch.long)), (calib[1], torch.zeros(4, dtype=torch.long))]
    g = export_float_graph(q, calib[0], batch_axis=1)
    res = verify(q, "int8", evald, graph=g, output_kind="classifier")
    assert res.passed, res.summary()
    assert res.graph == g.describe() and res.graph["batch_axis"] == 1
    res2 = verify(q, "int8", evald, batch_axis=1)  # exported here, from the first batch, along axis 1
    assert res2.graph["traced_shapes"] == [[5, 1, 6]] and res2.graph["digest"] == g.digest
    assert export(q, "int8", graph=g).SerializeToString() == apply_plan(g, q, "int8").SerializeToString()


# ------------------------------------------------------------------------------------------ one graph
def test_export_with_a_graph_refuses_options_that_contradict_it():
    model, calib, x = zoo.build("residual")
    q = mixq.quantize(model, "int8", calib_data=calib)
    g = export_float_graph(q, calib[0])
    assert export(q, "int8", example_inputs=calib[0], graph=g).SerializeToString() == \
        apply_plan(g, q, "int8").SerializeToString()
    with pytest.raises(ExportError, match=r"example inputs of shape \[\(2, 1, 16, 16\)\]"):
        export(q, "int8", example_inputs=calib[0][:2], graph=g)
    with pytest.raises(ExportError, match="opset 13"):
        export(q, "int8", graph=g, opset=13)
    res = verify(q, "int8", [(x, torch.zeros(4, dtype=torch.long))], graph=g)
    assert res.graph["digest"] == g.digest and res.graph["example_shapes"] == [[4, 1, 16, 16]]
    assert res.to_dict()["graph"]["traced_shapes"] == [[1, 1, 16, 16]]


# ------------------------------------------------------------------------------------------ uniform formats
def test_a_default_format_no_unit_can_run_is_an_error_naming_what_runs():
    model, calib, _ = zoo.build("concat")  # convs and a cat: no Linear/MatMul for int4 weight-only
    q = mixq.quantize(model, "int8", calib_data=calib)
    g = export_float_graph(q, calib[0])
    with pytest.raises(UnsupportedFormatError, match=r"can run 'int4_wo' on backend 'ort-cpu' \(the model's units: "
                                                    r"conv \(3\), cat \(1\)\); ort-cpu runs: int8 on conv, cat"):
        apply_plan(g, q, "int4_wo")
    with pytest.raises(UnsupportedFormatError, match="'fp8_e4m3'"):
        export(q, "fp8_e4m3", graph=g)
    with pytest.raises(UnsupportedFormatError, match="the 1 unit\\(s\\) the plan leaves to its default: cat"):
        apply_plan(g, q, QuantPlan(default="int4_wo", layers={"a": "int8", "b": "int8", "head": "fp32"}))
    # A plan that names every unit leaves nothing to its default; fp32 is never refused.
    named = QuantPlan(default="int4_wo", layers={u: "int8" for u in g.kinds})
    assert qdq_summary(apply_plan(g, q, named)) == qdq_summary(apply_plan(g, q, "int8"))
    assert "QuantizeLinear" not in qdq_summary(apply_plan(g, q, "fp32"))


def test_a_default_format_some_unit_runs_is_kept_where_it_runs():
    model, calib, _ = zoo.build("functional")  # convs + fc: int4_wo runs on fc only
    q = mixq.quantize(model, "int4_wo", calib_data=calib)
    g = export_float_graph(q, calib[0])
    assert qdq_summary(apply_plan(g, q, "int4_wo")) == {"MatMulNBits": 1}
