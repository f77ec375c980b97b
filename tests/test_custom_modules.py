"""Subclasses of supported layers are quantized around their own forward; a user's custom_modules map is honoured."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from mixq.checkpoint import load_quantized, save_quantized
from mixq.errors import CheckpointError, ModelError
from mixq.quant.graph import units
from mixq.quant.mixin import QuantMixin
from mixq.quantize import LeftFloatWarning, applied


class SamePadConv(nn.Conv2d):
    """EfficientNet's Conv2dStaticSamePadding, dynamic flavour: pad to 'same', then F.conv2d with no padding."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """Weight-standardized conv (timm's StdConv2d): folding a BatchNorm into it would be wrong."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class EffBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = SamePadConv(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = SamePadConv(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = StdConv(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu6(self.b1(self.c1(x)))
        x = F.relu6(self.b2(self.c2(x)))
        x = F.relu6(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


def _eff():
    torch.manual_seed(0)
    m = EffBlock().eval()
    for b in (m.b1, m.b2, m.b3):
        b.running_mean.uniform_(-0.5, 0.5)
        b.running_var.uniform_(0.5, 2.0)
    return m, [torch.randn(4, 3, 15, 15) for _ in range(3)], torch.randn(4, 3, 15, 15)


@pytest.mark.parametrize("mode", ["fx", "module"])
def test_conv_subclasses_are_quantized_around_their_own_forward(mode):
    model, calib, x = _eff()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeftFloatWarning)  # nothing compute-heavy is left float
        q = mixq.quantize(model, "int8", calib_data=calib, mode=mode)
    assert {n: k for n, k in q.mixq.kinds.items() if k != "add"} == {"c1": "conv", "c2": "conv", "c3": "conv",
                                                                      "fc": "linear"}
    left = {l.name: l.reason for l in q.mixq.left_float}
    if mode == "fx":  # SamePadConv folds its BatchNorm; the weight-standardizing StdConv fails the probe
        assert left["b1"].startswith("BatchNorm folded into 'c1'") and left["b2"].startswith("BatchNorm folded into 'c2'")
        assert "not folded: its input is not the single-use output" in left["b3"]
    else:
        assert all("module mode folds no BatchNorm" in r for r in left.values()) and len(left) == 3
    with applied(q, "fp32"):
        torch.testing.assert_close(q(x), model(x), rtol=0, atol=1e-6 if mode == "fx" else 0)
    # Independent reference for one unit: quantized input, padded as the subclass pads, quantized weight.
    u = units(q)["c2"]
    qs = u.quantizers["int8"]
    h = torch.randn(2, 8, 8, 8)
    ref = F.conv2d(F.pad(qs["input0"](h), [1, 1, 1, 1]), qs["weight"](u.weight), u.bias, 1, 0, 1, 8)
    ref = qs["output"](ref) if u.quantize_output else ref
    assert torch.equal(u(h), ref)
    assert not torch.equal(q(x), model(x))
    inv = mixq.inventory(model, x, mode=mode)
    assert {l.name: l.module_type for l in inv if l.params} == {"c1": "SamePadConv", "c2": "SamePadConv",
                                                                 "c3": "StdConv", "fc": "Linear"}


class ScaledLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        return F.linear(x, self.weight) * self.scale


class QuantScaledLinear(QuantMixin, ScaledLinear):
    kind = "linear"

    def forward(self, x):
        return self.quant_output(F.linear(self.quant_input(x), self.quant_weight(self.weight)) * self.scale)


class UsesScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = ScaledLinear(), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("mode", ["fx", "module"])
def test_custom_modules_map_a_users_class(mode, tmp_path):
    torch.manual_seed(0)
    model, calib, x = UsesScaled().eval(), [torch.randn(8, 6) for _ in range(3)], torch.randn(8, 6)
    with pytest.warns(LeftFloatWarning, match="a \\(ScaledLinear, 42 params\\).*custom_modules=\\{ScaledLinear"):
        plain = mixq.quantize(model, "int8", calib_data=calib, mode=mode)
    assert set(plain.mixq.kinds) <= {"b"}
    q = mixq.quantize(model, "int8", calib_data=calib, mode=mode, custom_modules={ScaledLinear: QuantScaledLinear})
    assert isinstance(q.get_submodule("a"), QuantScaledLinear) and q.mixq.kinds["a"] == "linear"
    assert q.mixq.left_float == [] and q.mixq.coverage.quantized == q.mixq.coverage.model == 42 + 21
    a = q.get_submodule("a")
    qs = a.quantizers["int8"]
    ref = F.linear(qs["input0"](x), qs["weight"](a.weight)) * a.scale
    assert torch.equal(a(x), qs["output"](ref) if a.quantize_output else ref)
    assert not torch.equal(a(x), model.a(x))
    kept = mixq.quantize(model, "int8", calib_data=calib, mode=mode, custom_modules={ScaledLinear: None})
    assert [(l.name, l.by_design) for l in kept.mixq.left_float] == [("a", True)]
    assert "custom_modules maps it to None" in kept.mixq.left_float[0].reason

    path = save_quantized(q, tmp_path / "q")
    with pytest.raises(CheckpointError, match="custom_modules"):
        load_quantized(model, path)
    back = load_quantized(model, path, custom_modules={ScaledLinear: QuantScaledLinear})
    assert torch.equal(back(x), q(x))


@pytest.mark.parametrize("bad, message", [
    ({ScaledLinear: nn.Linear}, "must be None \\(keep it float\\) or a quant class"),
    ({"ScaledLinear": QuantScaledLinear}, "keys must be nn.Module classes"),
    ({ScaledLinear: type("QBad", (QuantMixin, ScaledLinear), {"kind": "gemm"})}, "QBad.kind is 'gemm'"),
])
def test_bad_custom_modules_are_refused(bad, message):
    with pytest.raises(ModelError, match=message):
        mixq.prepare(UsesScaled(), custom_modules=bad)


def test_a_convolution_that_pads_itself_runs_as_an_integer_kernel_and_matches_the_simulation():
    import numpy as np

    from mixq.engine.ort import build
    from mixq.export import apply_plan, export_float_graph

    model, calib, x = _eff()
    q = mixq.quantize(model, "int8", calib_data=calib)
    g = export_float_graph(q, calib[0])
    plan = mixq.QuantPlan(layers={"c3": "fp32"})  # StdConv standardizes its weight in forward: no weight Q/DQ place
    onnx_model = apply_plan(g, q, plan)
    pads = [n for n in onnx_model.graph.node if n.op_type == "Pad"]
    assert len(pads) == 2 and all(n.input[2].endswith("zero_point") for n in pads)  # padding the uint8 codes
    engine = build(onnx_model)
    counts = engine.kernel_counts(g.unit_nodes, ["c1", "c2", "fc"]).to_dict()
    assert {"c1", "c2"} <= set(counts["units_integer"]), counts
    with applied(q, plan):
        want = q(x).detach().numpy()
    got = engine.run(x)[0]
    # Measured 0.0268 (6 output steps) both with the Pads on the codes and with the padded convolutions left in
    # float between Q/DQ pairs (before mixq.export.pad): moving the Pad changes no number.
    assert np.abs(got - want).max() <= 0.03, np.abs(got - want).max()
