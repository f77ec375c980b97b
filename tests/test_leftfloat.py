"""Weighted modules left float are listed with their reason, in inventory and in quantize's warning."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import mixq
from mixq.inventory import inventory_json, inventory_table
from mixq.leftfloat import left_float
from mixq.quantize import LeftFloatWarning


class ScaledLinear(nn.Module):
    """A user's layer with its own Parameters, used in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return F.linear(x, self.weight) * self.scale


class SamePadConv(nn.Conv2d):
    """Like EfficientNet's Conv2dStaticSamePadding: pads, then F.conv2d."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0)


class PlainSubLinear(nn.Linear):
    pass


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)             # 80
        self.scaled = ScaledLinear()               # 72
        self.ln = nn.LayerNorm(8)                  # 16
        self.sub = PlainSubLinear(8, 8)            # 72
        self.same = SamePadConv(1, 2, 3)           # 20
        self.conv = nn.Conv2d(2, 4, 3, bias=False)  # 72
        self.bn = nn.BatchNorm2d(4)                # 8
        self.fc = nn.Linear(8, 3)                  # 27
        self.ndq = NonDynamicallyQuantizableLinear(8, 8)  # 72, a Linear subclass defined inside torch

    def forward(self, idx, img):
        h = self.ndq(self.sub(self.ln(self.scaled(self.emb(idx))))).mean(1)
        c = F.relu(self.bn(self.conv(self.same(img)))).mean((1, 2, 3))
        return self.fc(h) + c[:, None]


CUSTOM = ("mixq wraps subclasses of conv, linear and pooling layers from user code only (pass "
          "custom_modules={NonDynamicallyQuantizableLinear: QuantClass} to quantize it)")


def _inputs():
    torch.manual_seed(0)
    return torch.randint(0, 10, (2, 5)), torch.randn(2, 1, 6, 6)


@pytest.mark.parametrize("mode, bn_reason", [
    ("fx", "BatchNorm folded into 'conv'"),
    ("module", "normalization layer (nn.BatchNorm2d) kept float by design: not compute-heavy (not folded: module mode"),
])
def test_every_weighted_module_left_float_is_listed_with_its_reason(mode, bn_reason):
    model = Mixed().eval()
    inv = mixq.inventory(model, _inputs(), mode=mode)
    # Subclasses from user code are units (wrapped around their own forward), exact types too.
    assert [(l.name, l.module_type) for l in inv if l.params] == [("sub", "PlainSubLinear"), ("same", "SamePadConv"),
                                                                 ("conv", "Conv2d"), ("fc", "Linear")]
    got = {l.name: (l.type, l.params, l.by_design) for l in inv.left_float}
    assert got == {"emb": ("nn.Embedding", 80, False), "scaled": ("ScaledLinear", 72, False),
                   "ln": ("nn.LayerNorm", 16, True), "ndq": ("nn.NonDynamicallyQuantizableLinear", 72, False),
                   "bn": ("nn.BatchNorm2d", 8, True)}
    reasons = {l.name: l.reason for l in inv.left_float}
    assert reasons["emb"] == "no quant module for nn.Embedding (a table lookup: no multiply-accumulates; its table stays float)"
    assert reasons["scaled"] == ("parameters of a module mixq does not know (ScaledLinear uses them in its own "
                                 "forward; pass custom_modules={ScaledLinear: QuantClass} to quantize it)")
    assert reasons["ndq"] == f"subclass of nn.Linear (defined inside torch): {CUSTOM}"
    assert reasons["ln"].startswith("normalization layer (nn.LayerNorm) kept float by design: not compute-heavy")
    assert reasons["bn"].startswith(bn_reason)
    # Totals add up, each counted independently: unit params + left-float params = model params.
    unit_params = sum(l.params for l in inv)
    assert unit_params == 72 + 20 + 72 + 27
    assert inv.coverage.model == sum(p.numel() for p in model.parameters()) == 439
    assert inv.coverage.quantized == unit_params and unit_params + inv.coverage.left_float == inv.coverage.model

    table = inventory_table(inv)
    assert "left float: 5 modules, 248 params (model 439 params: 191 in quantized units)" in table
    assert f"  ndq (nn.NonDynamicallyQuantizableLinear, 72 params): subclass of nn.Linear (defined inside torch)" in table
    data = json.loads(inventory_json(inv))
    assert [u["name"] for u in data["units"]] == [l.name for l in inv]
    assert {d["name"] for d in data["left_float"]} == set(got)
    assert data["params"] == {"model": 439, "quantized": 191, "left_float": 248}


def test_quantize_warns_about_modules_left_float_not_by_design():
    model = Mixed().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = mixq.quantize(model, "int8", calib_data=[_inputs()])
    msgs = [str(w.message) for w in caught if issubclass(w.category, LeftFloatWarning)]
    assert len(msgs) == 1
    assert msgs[0].startswith("3 weighted module(s) stay float (224 of 439 params): emb (nn.Embedding, 80 params)")
    assert "ndq (nn.NonDynamicallyQuantizableLinear, 72 params): subclass of nn.Linear (defined inside torch)" in msgs[0]
    assert "ln (" not in msgs[0] and "bn (" not in msgs[0]
    assert [l.name for l in q.mixq.left_float] == ["emb", "scaled", "ln", "bn", "ndq"]


def test_a_fully_covered_model_warns_nothing_and_shared_weights_count_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 6, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.emb(idx))

    model = Tied().eval()
    q = mixq.prepare(model)
    left = left_float(model, q)
    assert [(l.name, l.params) for l in left] == [("emb", 0)]  # its weight is counted in the head unit
    cov = q.mixq.coverage
    assert (cov.model, cov.quantized, cov.left_float) == (24, 24, 0)
    from zoo import build

    res, calib, _ = build("residual")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeftFloatWarning)
        mixq.quantize(res, "int8", calib_data=calib)  # folded BatchNorm only: no warning
