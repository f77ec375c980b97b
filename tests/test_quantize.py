"""quantize / set_plan / calibrate: partial quantization, cheap plan switching, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mixq
from mixq.errors import CalibrationError, ModelError, PlanError
from mixq.quant.graph import units

from zoo import build


def test_partial_plan_leaves_named_layers_float():
    model, calib, x = build("residual")
    plan = mixq.QuantPlan(layers={"layer1.conv1": "fp32", "fc": "fp32"})
    q = mixq.quantize(model, plan, calib_data=calib)
    u = units(q)
    assert u["layer1.conv1"].active_format == "fp32" and u["fc"].active_format == "fp32"
    assert u["layer1.conv2"].active_format == "int8"
    # A float unit computes exactly what a float layer computes on the same input.
    inp = torch.randn(2, 8, 16, 16)
    assert torch.equal(u["layer1.conv1"](inp), torch.nn.functional.conv2d(inp, u["layer1.conv1"].weight,
                                                                          u["layer1.conv1"].bias, 1, 1))


@pytest.mark.parametrize("backend, formats", [("ort-cpu", ["int8"]), ("tensorrt", ["int8", "fp8_e4m3", "fp16"])])
def test_switching_plans_equals_quantizing_from_scratch(backend, formats):
    model, calib, x = build("residual")
    q = mixq.quantize(model, "int8", backend=backend, calib_data=calib, formats=formats)
    for fmt in formats:
        plan = mixq.QuantPlan(backend=backend, default=fmt, layers={"layer2.conv1": "fp32"})
        mixq.set_plan(q, plan)
        fresh = mixq.quantize(model, plan, calib_data=calib)
        torch.testing.assert_close(q(x), fresh(x), rtol=0, atol=0)


def test_set_plan_to_unprepared_format_is_an_error():
    model, calib, _ = build("residual")
    q = mixq.quantize(model, "int8", backend="tensorrt", calib_data=calib)
    with pytest.raises(PlanError, match="not prepared"):
        mixq.set_plan(q, mixq.QuantPlan(backend="tensorrt", default="fp8_e4m3"))
    with pytest.raises(PlanError, match="backend 'ort-cpu'"):
        mixq.set_plan(q, mixq.QuantPlan(backend="ort-cpu"))


def test_calibrator_choice_changes_ranges_not_structure():
    model, calib, x = build("functional")
    amax = {}
    for method in ("max", "entropy", "percentile", "mse"):
        q = mixq.quantize(model, "int8", backend="tensorrt", calib_data=calib, calib_method=method)
        amax[method] = float(units(q)["conv2"].input_quantizer.amax)
    assert amax["percentile"] <= amax["max"] and amax["mse"] <= amax["max"]


def test_weight_only_needs_no_calibration_data():
    model, _, x = build("attention")
    q = mixq.quantize(model, "int4_wo", backend="tensorrt")
    out = q(x)
    assert torch.isfinite(out).all()
    assert units(q)["q"].active_format == "int4_wo" and units(q)["matmul"].active_format == "fp32"


def test_bad_calibration_data():
    model, _, x = build("residual")
    with pytest.raises(CalibrationError, match="yielded no batch"):
        mixq.quantize(model, "int8", calib_data=[])
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        mixq.quantize(model, "int8", calib_data=[x, x * float("nan")])
    with pytest.raises(CalibrationError, match="calib_data is required"):
        mixq.quantize(model, "int8")


def test_model_without_quantizable_layers():
    with pytest.raises(ModelError, match="no quantizable layer"):
        mixq.quantize(nn.Sequential(nn.ReLU(), nn.Tanh()), "int8", calib_data=[torch.randn(2, 3)])


def test_multi_input_batches_as_tuples():
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    calib = [(torch.randn(3, 4), torch.randn(3, 4)) for _ in range(2)]
    q = mixq.quantize(TwoIn(), "int8", calib_data=calib)
    assert set(q.mixq.kinds) == {"a", "b", "add"}
    assert q(*calib[0]).shape == (3, 4)


def test_inventory_reports_shapes_params_and_macs():
    model, _, x = build("functional")
    inv = {l.name: l for l in mixq.inventory(model, x)}
    assert inv["conv1"].kind == "conv" and inv["conv1"].params == 1 * 4 * 9 + 4
    assert inv["conv1"].output_shape == [4, 4, 16, 16]
    assert inv["conv1"].macs == 4 * 4 * 16 * 16 * 9
    assert inv["fc"].macs == 4 * 5 * 128
    assert inv["fc"].formats == ["fp32", "int8", "int4_wo"]
