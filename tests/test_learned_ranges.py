"""Learned ranges (LSQ) for QAT, weight ranges that follow the weights, calibration in eval mode.

References: the LSQ / LSQ+ formulas written as differentiable torch expressions with a straight-through
round (``x + (round(x) - x).detach()``), differentiated by autograd: independent of the hand-written
backward passes in ``tensor_quant``.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mixq
from mixq.quant import tensor_quant as tq
from mixq.quant.descriptor import QuantDescriptor
from mixq.quant.quantizer import TensorQuantizer


def _round_ste(x):
    return x + (torch.round(x) - x).detach()


def _lsq_sym_reference(x, amax, num_bits, unsigned, narrow):
    lo, hi = tq.int_bounds(num_bits, unsigned, narrow)
    return torch.clamp(_round_ste(x * hi / amax), lo, hi) * amax / hi


def _lsq_affine_reference(x, scale, zp, num_bits):
    qmax = 2.0**num_bits - 1
    z = _round_ste(zp)
    return (torch.clamp(_round_ste(x / scale) + z, 0.0, qmax) - z) * scale


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2.0


@pytest.mark.parametrize("num_bits,unsigned,narrow", [(8, False, True), (8, False, False), (4, False, True),
                                                      (8, True, False)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_tensor_quant_forward_is_fake_tensor_quant_and_gradients_match_lsq(num_bits, unsigned, narrow,
                                                                              per_channel):
    x = _data((6, 5, 4))
    if unsigned:
        x = x.abs()
    amax0 = (torch.tensor([1.5, 0.7, 2.0, 3.0, 1.1, 0.9]).reshape(6, 1, 1) if per_channel
             else torch.tensor(1.7))  # below the data max: some inputs clip
    amax = amax0.clone().requires_grad_(True)
    xin = x.clone().requires_grad_(True)
    gs = 0.37
    out = tq.lsq_tensor_quant(xin, amax, num_bits, unsigned, narrow, grad_scale=gs)
    assert torch.equal(out, tq.fake_tensor_quant(x, amax0, num_bits, unsigned, narrow))
    w = _data(x.shape, seed=1)  # a non-uniform upstream gradient
    (out * w).sum().backward()

    ref_amax = amax0.clone().requires_grad_(True)
    ref_x = x.clone().requires_grad_(True)
    (_lsq_sym_reference(ref_x, ref_amax, num_bits, unsigned, narrow) * w).sum().backward()
    torch.testing.assert_close(amax.grad, ref_amax.grad * gs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xin.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    assert amax.grad.shape == amax0.shape and bool((amax.grad != 0).all())


@pytest.mark.parametrize("num_bits", [8, 4])
def test_lsq_affine_quant_forward_is_fake_affine_quant_and_gradients_match_lsq_plus(num_bits):
    x = _data((4, 50)) + 0.5
    scale0, zp0 = torch.tensor(0.011 * 2 ** (8 - num_bits)), torch.tensor(100.3 / 2 ** (8 - num_bits))
    scale, zp = scale0.clone().requires_grad_(True), zp0.clone().requires_grad_(True)
    xin = x.clone().requires_grad_(True)
    gs = 0.5
    out = tq.lsq_affine_quant(xin, scale, zp, num_bits, grad_scale=gs)
    assert torch.equal(out, tq.fake_affine_quant(x, scale0, zp0.round(), num_bits))
    w = _data(x.shape, seed=2)
    (out * w).sum().backward()

    rs, rz, rx = (t.clone().requires_grad_(True) for t in (scale0, zp0, x))
    (_lsq_affine_reference(rx, rs, rz, num_bits) * w).sum().backward()
    torch.testing.assert_close(scale.grad, rs.grad * gs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zp.grad, rz.grad * gs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xin.grad, rx.grad, rtol=1e-5, atol=1e-6)
    assert float(zp.grad) != 0.0  # the data clips on both sides


@pytest.mark.parametrize("asymmetric", [False, True])
def test_learned_quantizer_matches_calibrated_then_learns_and_round_trips_its_state_dict(asymmetric):
    desc = QuantDescriptor(num_bits=8, unsigned=asymmetric, narrow_range=not asymmetric, asymmetric=asymmetric,
                           learn_amax=True)
    x = _data((8, 16))
    q = TensorQuantizer(desc)
    q.enable_calib(), q.disable_quant()
    q(x)
    q.disable_calib(), q.enable_quant()
    q.load_calib_amax()
    assert q.learned
    names = {n for n, _ in q.named_parameters()}
    assert names == ({"_learned_scale", "_learned_zero_point"} if asymmetric else {"_learned_amax"})
    plain = TensorQuantizer(desc.replace(learn_amax=False))
    plain.load_state_dict({k: v for k, v in q.state_dict().items() if not k.startswith("_learned")})
    assert torch.equal(q(x), plain(x))  # learning starts from the calibrated range, same forward

    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    (q(x * 1.5) - x * 1.5).pow(2).sum().backward()
    assert all(p.grad is not None and bool((p.grad != 0).any()) for p in q.parameters())
    opt.step()
    with torch.no_grad():  # and inside the data's range, where clamp_learned keeps it
        for p in q.parameters():
            p.mul_(0.8)
    q.clamp_learned()  # as mixq.qat does after every step
    assert not torch.equal(q(x), plain(x))  # the range moved

    fresh = TensorQuantizer(desc)
    fresh.load_state_dict(q.state_dict())  # strict: the learned parameters are created to load into
    assert torch.equal(fresh(x), q(x))
    assert {n for n, _ in fresh.named_parameters()} == names
    if asymmetric:
        assert float(fresh.zero_point) == float(fresh.zero_point.round())  # an integer for the engine
    q.store_learned()
    assert not q.learned and torch.equal(q(x), fresh(x))


def test_weight_ranges_follow_the_weights():
    qmodel = mixq.quantize(nn.Sequential(nn.Linear(6, 4)), "int8", backend="tensorrt",
                           calib_data=[_data((3, 6))])
    lin = qmodel[0] if isinstance(qmodel, nn.Sequential) else qmodel.get_submodule("0")
    wq = lin.weight_quantizer
    before = wq.amax.clone()
    with torch.no_grad():
        lin.weight.mul_(3.0)
    wq.track_max = True
    qmodel(_data((2, 6)))
    expected = copy.deepcopy(lin)
    expected.calibrate_weights()  # what calibration makes of the new weights
    assert torch.equal(wq.amax, expected.weight_quantizer.amax)
    torch.testing.assert_close(wq.amax, before * 3.0)


class _BNDrop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.drop(torch.relu(self.bn(self.conv(x)))), 1))


def test_calibration_runs_in_eval_mode_and_restores_modes():
    torch.manual_seed(0)
    model = _BNDrop()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    data = [_data((4, 1, 8, 8), seed=s) for s in range(2)]
    ref = mixq.prepare(model.eval(), "ort-cpu", mode="module")
    mixq.add_formats(ref, ["int8"])
    mixq.calibrate(ref, data)
    q = mixq.prepare(model.eval(), "ort-cpu", mode="module")
    q.train()
    mixq.add_formats(q, ["int8"])
    stats = q.bn.running_mean.clone()
    mixq.calibrate(q, data)
    assert q.training and q.bn.training and q.drop.training
    assert torch.equal(q.bn.running_mean, stats)
    for (n, a), (_, b) in zip(ref.state_dict().items(), q.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("backend", ["ort-cpu", "tensorrt"])
def test_save_quantized_keeps_learned_ranges(backend, tmp_path):
    from zoo import ResidualNet

    torch.manual_seed(0)
    model = ResidualNet().eval()
    data = [_data((4, 1, 16, 16), seed=s) for s in range(2)]
    q = mixq.quantize(model, "int8", backend=backend, calib_data=data)
    acts = [qz for m in q.modules() if isinstance(m, mixq.quant.modules.QuantMixin)
            for _, qz in m.iter_activation_quantizers() if qz.is_calibrated]
    for qz in acts:
        qz.init_learn_amax()
    with torch.no_grad():
        for p in q.parameters():
            if ".quantizers." in "." + [n for n, t in q.named_parameters() if t is p][0]:
                p.mul_(0.8)
    mixq.save_quantized(q, tmp_path / "q")
    back = mixq.load_quantized(model, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(back(data[0]), q(data[0]))
    assert sum(1 for n, _ in back.named_parameters() if "_learned" in n) == sum(
        1 for n, _ in q.named_parameters() if "_learned" in n) > 0


@pytest.mark.parametrize("backend", ["ort-cpu", "tensorrt"])
def test_fold_bn_on_a_prepared_model_gives_the_eval_mode_graph(backend):
    from zoo import ResidualNet

    torch.manual_seed(0)
    model = ResidualNet()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
    data = [_data((4, 1, 16, 16), seed=s) for s in range(2)]
    q = mixq.quantize(model.train(), "int8", backend=backend, calib_data=data)  # train mode: BN kept
    assert any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    folded = mixq.fold_bn(q)
    assert len(folded) == 6 and not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert not q.mixq.calibrated
    mixq.calibrate(q, data)
    ref = mixq.quantize(model.eval(), "int8", backend=backend, calib_data=data)  # folded at prepare
    assert sorted(q.state_dict()) == sorted(ref.state_dict())
    q.eval()
    with torch.no_grad():
        assert torch.equal(q(data[0]), ref(data[0]))
        with mixq.applied(q, "fp32"), mixq.applied(ref, "fp32"):
            assert torch.equal(q(data[0]), ref(data[0]))


@pytest.mark.parametrize("asymmetric", [False, True])
def test_learned_ranges_stay_inside_the_calibration_data(asymmetric):
    desc = QuantDescriptor(num_bits=8, unsigned=asymmetric, narrow_range=not asymmetric, asymmetric=asymmetric,
                           learn_amax=True)
    x = torch.clamp(_data((8, 64)) * 3, 0.0, 6.0)  # a ReLU6 output: non-negative, saturating at 6
    q = TensorQuantizer(desc)
    q.enable_calib(), q.disable_quant()
    q(x)
    q.disable_calib(), q.enable_quant()
    q.load_calib_amax()
    calibrated = {n: p.detach().clone() for n, p in q.named_parameters()}
    with torch.no_grad():  # a step that widens the range past the data on both sides
        for p in q.parameters():
            p.add_(5.0 * p.abs() + 3.0)
    q.clamp_learned()
    for n, p in q.named_parameters():
        assert torch.equal(p, calibrated[n]), n  # back to max calibration's range, bit for bit (zero point 0)
    with torch.no_grad():
        for p in q.parameters():
            p.mul_(0.5)
    q.clamp_learned()
    assert float(q.scale) < float(calibrated.get("_learned_scale", calibrated.get("_learned_amax", 0)) / 1.9) or \
        not asymmetric  # shrinking stays allowed


@pytest.mark.parametrize("asymmetric", [False, True])
def test_a_step_through_zero_leaves_the_range_at_a_sixteenth_of_the_calibrated_one(asymmetric):
    """A too-large step once left a scale at 1e-6, which ONNX Runtime's QLinearGlobalAveragePool refused."""
    desc = QuantDescriptor(num_bits=8, unsigned=asymmetric, narrow_range=not asymmetric, asymmetric=asymmetric,
                           learn_amax=True)
    x = torch.clamp(_data((8, 64)) * 3, 0.0, 6.0)
    q = TensorQuantizer(desc)
    q.enable_calib(), q.disable_quant()
    q(x)
    q.disable_calib(), q.enable_quant()
    q.load_calib_amax()
    before = float(q.scale)
    with torch.no_grad():
        for n, p in q.named_parameters():
            if "zero_point" not in n:
                p.sub_(10.0 * p.abs())  # through zero
    q.clamp_learned()
    assert before / 16.5 < float(q.scale) <= before / 15.5
