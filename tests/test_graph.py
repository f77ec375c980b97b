"""FX graph mode on a zoo of model shapes, BN folding, and the backend placement rules."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mixq
from mixq.quant.graph import QuantFollower, fold_batchnorm, prepare_fx, trace, units
from mixq.quant.modules import QuantAdd, QuantCat, QuantMatMul, QuantMaxPool
from mixq.quantize import FallbackWarning

from zoo import ZOO, build

EXPECTED_KINDS = {
    "functional": {"conv", "maxpool", "linear"},
    "residual": {"conv", "add", "avgpool", "linear"},
    "concat": {"conv", "cat"},
    "attention": {"linear", "matmul", "add"},
    "decoder": {"linear", "conv_transpose"},
    "lstm": {"lstm", "linear"},
    "reused": {"linear"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
@pytest.mark.parametrize("backend", ["ort-cpu", "tensorrt"])
def test_fx_mode_quantizes_every_unit_kind(name, backend):
    model, calib, x = build(name)
    q = mixq.quantize(model, "int8", backend=backend, calib_data=calib)
    assert q.mixq.mode == "fx"
    assert {m.kind for m in units(q).values()} == EXPECTED_KINDS[name]
    ref, out = model(x), q(x)
    assert out.shape == ref.shape
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.15, f"{name}: int8 relative error {rel:.3f}"
    mixq.set_plan(q, "fp32")
    torch.testing.assert_close(q(x), ref, rtol=1e-4, atol=1e-5)  # only BN folding differs from float


def test_functional_calls_become_units_named_after_their_module():
    model, calib, _ = build("residual")
    q = mixq.quantize(model, "int8", calib_data=calib)
    assert isinstance(q.get_submodule("layer1.add"), QuantAdd)
    assert isinstance(q.get_submodule("layer2.add"), QuantAdd)
    model, calib, _ = build("attention")
    q = mixq.quantize(model, "int8", calib_data=calib)
    assert [n for n, m in units(q).items() if isinstance(m, QuantMatMul)] == ["matmul", "matmul_1"]
    model, calib, _ = build("functional")
    q = mixq.quantize(model, "int8", calib_data=calib)
    assert sum(isinstance(m, QuantMaxPool) for m in units(q).values()) == 2
    model, calib, _ = build("concat")
    assert isinstance(units(mixq.quantize(model, "int8", calib_data=calib))["cat"], QuantCat)


def test_adds_of_constants_and_masks_stay_float():
    model, calib, _ = build("attention")
    q = mixq.quantize(model, "int8", calib_data=calib)
    adds = [n for n, k in q.mixq.kinds.items() if k == "add"]
    assert adds == ["add"], adds  # the residual add; the mask add (scores + mask) is not a unit


def test_reused_module_is_one_unit_called_twice():
    model, _, x = build("reused")
    inv = {l.name: l for l in mixq.inventory(model, x)}
    assert inv["shared"].calls == 2 and inv["out"].calls == 1
    assert inv["shared"].macs == 2 * 4 * 8 * 8


def test_control_flow_falls_back_to_module_mode_with_reason():
    model, calib, x = build("control_flow")
    with pytest.warns(FallbackWarning, match="control flow"):
        q = mixq.quantize(model, "int8", calib_data=calib)
    assert q.mixq.mode == "module" and "control flow" in q.mixq.fallback_reason
    assert set(q.mixq.kinds) == {"a", "b"}
    assert q(x).shape == (4, 2)
    with pytest.raises(mixq.MixqError, match="FX tracing failed"):
        mixq.quantize(model, "int8", calib_data=calib, mode="fx")


def test_concrete_args_let_a_branchy_model_trace():
    class Flag(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x, double: bool = False):
            y = self.l(x)
            return y + y if double else y

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = mixq.quantize(Flag(), "int8", calib_data=[{"x": torch.randn(2, 4), "double": True}],
                          concrete_args={"double": True})
    assert q.mixq.mode == "fx" and "add" in q.mixq.kinds


def test_preserved_attributes_survive_tracing():
    model, calib, _ = build("functional")
    model.labels = ["a", "b"]
    q = mixq.quantize(model, "int8", calib_data=calib, preserved_attributes=["labels"])
    assert q.labels == ["a", "b"]


@pytest.mark.parametrize("name", ["residual", "functional"])
def test_bn_folding_preserves_outputs(name):
    model, _, x = build(name)
    gm = trace(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(gm) == n_bn
    gm.recompile()
    gm.delete_all_unused_submodules()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules() if m is not gm) or n_bn == 0
    ref = model(x)
    torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_training_mode_keeps_batchnorm_for_qat():
    model, calib, _ = build("residual")
    q = prepare_fx(model.train())
    assert any(isinstance(m, nn.BatchNorm2d) for m in q.modules())


def test_original_model_is_untouched():
    model, calib, x = build("residual")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(x)
    mixq.quantize(model, "int8", calib_data=calib)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m).__module__.startswith("torch.nn") or m is model or type(m).__module__ == "zoo"
               for m in model.modules())
    torch.testing.assert_close(model(x), ref)


def test_ort_output_quantizer_moves_behind_relu():
    model, calib, _ = build("residual")
    q = mixq.quantize(model, "int8", backend="ort-cpu", calib_data=calib)
    owners = {f.owner for f in q.modules() if isinstance(f, QuantFollower)}
    assert {"stem", "layer1.conv1", "layer1.add", "layer2.add"} <= owners
    assert not units(q)["stem"].quantize_output and units(q)["fc"].quantize_output
    # TensorRT only quantizes inputs.
    q = mixq.quantize(model, "int8", backend="tensorrt", calib_data=calib)
    assert not any(isinstance(f, QuantFollower) for f in q.modules())
    assert not any(m.quantize_output for m in units(q).values())


def test_tensorrt_residual_add_quantizes_only_the_skip_input():
    model, calib, _ = build("residual")
    q = mixq.quantize(model, "int8", backend="tensorrt", calib_data=calib)
    # layer1: conv2 output (fused) + identity (quantized); layer2: conv2 + downsample conv -> first conv input fused
    assert units(q)["layer1.add"].input_mask == [False, True]
    assert units(q)["layer2.add"].input_mask == [False, True]
    assert units(mixq.quantize(model, "int8", backend="ort-cpu", calib_data=calib))["layer1.add"].input_mask == [True, True]


def test_follower_tracks_owner_format():
    model, calib, x = build("residual")
    q = mixq.quantize(model, "int8", calib_data=calib)
    mixq.set_plan(q, mixq.QuantPlan(layers={"stem": "fp32"}))
    fol = [f for f in q.modules() if isinstance(f, QuantFollower) and f.owner == "stem"][0]
    assert fol.active_format == "fp32"
    mixq.set_plan(q, "int8")
    assert fol.active_format == "int8"


def test_zoo_covers_the_issue_list():
    assert set(ZOO) >= {"functional", "residual", "concat", "attention", "decoder", "lstm", "reused", "control_flow"}


def test_reused_module_keeps_its_own_output_quantizer_on_ort():
    model, calib, x = build("reused")
    q = mixq.quantize(model, "int8", backend="ort-cpu", calib_data=calib)
    assert units(q)["shared"].quantize_output
    assert not any(isinstance(f, QuantFollower) and f.owner == "shared" for f in q.modules())
