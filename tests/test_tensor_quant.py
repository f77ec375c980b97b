"""Fake-quant functions against hand-computed codes, numpy references and torch's own fake-quant ops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mixq.quant import tensor_quant as tq

X = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.1, 0.3, 0.49, 0.75, 1.0, 1.5])


# --------------------------------------------------------------------------- independent references
def ref_fake_quant(x: np.ndarray, amax: np.ndarray, num_bits: int, unsigned: bool, narrow: bool) -> np.ndarray:
    """Symmetric fake quant in float32 numpy; np.rint rounds half to even like torch.round."""
    x, amax = np.asarray(x, np.float32), np.asarray(amax, np.float32)
    hi = np.float32(2.0 ** (num_bits - 1 + int(unsigned)) - 1)
    lo = np.float32(0.0) if unsigned else (-hi if narrow else -hi - np.float32(1.0))
    scale = hi / amax
    return (np.clip(np.rint(x * scale), lo, hi) / scale).astype(np.float32)


def e4m3_table() -> np.ndarray:
    """The 127 non-negative finite E4M3 (fn) values in code order: subnormals, then normals up to 448."""
    vals = [m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7) for e in range(16) for m in range(8)]
    return np.array(vals[:-1], np.float64)  # exponent 15, mantissa 7 is NaN


def ref_e4m3_round(a: np.ndarray) -> np.ndarray:
    """Round to the nearest E4M3 value, ties to the even code (inputs already within +-448)."""
    t = e4m3_table()
    mag = np.abs(a).astype(np.float64)
    hi = np.clip(np.searchsorted(t, mag), 1, len(t) - 1)
    lo = hi - 1
    d_lo, d_hi = mag - t[lo], t[hi] - mag
    idx = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (np.sign(a) * t[idx]).astype(np.float32)


def ref_fake_fp8(x: np.ndarray, amax: float) -> np.ndarray:
    scale = np.float32(448.0) / np.float32(amax)
    scaled = np.clip(np.asarray(x, np.float32) * scale, -448.0, 448.0).astype(np.float32)
    return (ref_e4m3_round(scaled) / scale).astype(np.float32)


def ref_block_quant(w: np.ndarray, num_bits: int, block: int) -> np.ndarray:
    rows, n = w.shape
    wp = np.pad(w.astype(np.float32), ((0, 0), (0, (-n) % block))).reshape(rows, -1, block)
    amax = np.abs(wp).max(-1, keepdims=True)
    out = np.where(amax == 0, 0.0, ref_fake_quant(wp, np.where(amax == 0, 1.0, amax), num_bits, False, True))
    return out.reshape(rows, -1)[:, :n].astype(np.float32)


def codes(out: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    return torch.round(out / scale)


# --------------------------------------------------------------------------- exact reference codes
def test_int8_narrow_codes():
    out = tq.fake_tensor_quant(X, 1.0, 8)
    assert codes(out, 1 / 127).tolist() == [-127, -64, -32, 0, 13, 38, 62, 95, 127, 127]


def test_int4_codes():
    out = tq.fake_tensor_quant(X, 1.0, 4)
    assert codes(out, 1 / 7).tolist() == [-7, -4, -2, 0, 1, 2, 3, 5, 7, 7]


def test_full_range_reaches_minus_128():
    out = tq.fake_tensor_quant(torch.tensor([-1.5, -1.0]), 1.0, 8, narrow_range=False)
    assert codes(out, 1 / 127).tolist() == [-128, -127]
    narrow = tq.fake_tensor_quant(torch.tensor([-1.5]), 1.0, 8, narrow_range=True)
    assert codes(narrow, 1 / 127).tolist() == [-127]


def test_unsigned_8bit_codes():
    out = tq.fake_tensor_quant(torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0]), 1.0, 8, unsigned=True)
    assert codes(out, 1 / 255).tolist() == [0, 64, 128, 255, 255]


def test_quant_codes_match_fake_quant():
    c, scale = tq.quant_codes(X, torch.tensor(1.0), 8)
    assert c.tolist() == [-127, -64, -32, 0, 13, 38, 62, 95, 127, 127]
    assert torch.equal(c / scale, tq.fake_tensor_quant(X, 1.0, 8))


def test_e4m3_reference_values():
    out = tq.fake_fp8_e4m3_quant(torch.tensor([1.0, 1.2, 1.4, 1.6, 1.8]), 2.0)
    expected = torch.tensor([1.0, 1.1429, 1.4286, 1.5714, 1.8571])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_int_bounds():
    assert tq.int_bounds(8, False, True) == (-127.0, 127.0)
    assert tq.int_bounds(8, False, False) == (-128.0, 127.0)
    assert tq.int_bounds(8, True, True) == (0.0, 255.0)
    assert tq.int_bounds(4, False, True) == (-7.0, 7.0)


# --------------------------------------------------------------------------- numpy reference, zero tolerance
@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("narrow_range", [False, True])
def test_per_tensor_matches_numpy(num_bits, unsigned, narrow_range):
    g = torch.Generator().manual_seed(num_bits * 7 + unsigned * 3 + narrow_range)
    x = torch.randn(64, 33, generator=g) * 2
    amax = 2.5
    out = tq.fake_tensor_quant(x, amax, num_bits, unsigned, narrow_range)
    ref = ref_fake_quant(x.numpy(), amax, num_bits, unsigned, narrow_range)
    np.testing.assert_array_equal(out.numpy(), ref)


@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("narrow_range", [False, True])
def test_per_channel_matches_numpy(num_bits, unsigned, narrow_range):
    g = torch.Generator().manual_seed(100 + num_bits * 7 + unsigned * 3 + narrow_range)
    x = torch.randn(6, 5, 7, generator=g) * torch.arange(1, 7).float().view(6, 1, 1)
    amax = x.abs().amax(dim=(1, 2), keepdim=True) * 0.8  # some values are clipped
    out = tq.fake_tensor_quant(x, amax, num_bits, unsigned, narrow_range)
    ref = ref_fake_quant(x.numpy(), amax.numpy(), num_bits, unsigned, narrow_range)
    np.testing.assert_array_equal(out.numpy(), ref)


# --------------------------------------------------------------------------- agreement with torch's fake-quant
@pytest.mark.parametrize("num_bits,unsigned,narrow_range", [(8, False, True), (8, False, False), (4, False, True),
                                                            (8, True, False)])
def test_symmetric_matches_torch_per_tensor(num_bits, unsigned, narrow_range):
    x = torch.randn(500, generator=torch.Generator().manual_seed(1)) * 3
    amax = 4.0
    lo, hi = tq.int_bounds(num_bits, unsigned, narrow_range)
    scale = amax / hi
    ours = tq.fake_tensor_quant(x, amax, num_bits, unsigned, narrow_range)
    theirs = torch.fake_quantize_per_tensor_affine(x, scale, 0, int(lo), int(hi))
    assert torch.equal(codes(ours, scale), codes(theirs, scale))


@pytest.mark.parametrize("num_bits,unsigned,narrow_range", [(8, False, True), (4, False, True), (8, True, False)])
def test_symmetric_matches_torch_per_channel(num_bits, unsigned, narrow_range):
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(2)) * torch.tensor([[0.1], [1.0], [3.0], [10.0]])
    amax = x.abs().amax(1) * 0.9
    lo, hi = tq.int_bounds(num_bits, unsigned, narrow_range)
    scale = amax / hi
    ours = tq.fake_tensor_quant(x, amax.view(4, 1), num_bits, unsigned, narrow_range)
    theirs = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(4, dtype=torch.int32), 0, int(lo), int(hi))
    assert torch.equal(codes(ours, scale.view(4, 1)), codes(theirs, scale.view(4, 1)))


def test_affine_matches_torch_per_tensor():
    x = torch.rand(500, generator=torch.Generator().manual_seed(3)) * 5 - 1.0  # [-1, 4): zero point above 0
    scale, zp = tq.affine_qparams(x.min() * 0.9, x.max() * 0.9)
    assert 0 < zp < 255
    ours = tq.fake_affine_quant(x, scale, zp, 8)
    theirs = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), 0, 255)
    assert torch.equal(codes(ours, scale), codes(theirs, scale))


def test_affine_matches_torch_per_channel():
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(4)) + torch.tensor([[0.0], [2.0], [-1.0]])
    scale, zp = tq.affine_qparams(x.amin(1), x.amax(1))
    ours = tq.fake_affine_quant(x, scale.view(3, 1), zp.view(3, 1), 8)
    theirs = torch.fake_quantize_per_channel_affine(x, scale, zp.to(torch.int32), 0, 0, 255)
    assert torch.equal(codes(ours, scale.view(3, 1)), codes(theirs, scale.view(3, 1)))


def test_affine_qparams_make_zero_exact():
    scale, zp = tq.affine_qparams(torch.tensor(-0.3), torch.tensor(2.0))
    assert float(tq.fake_affine_quant(torch.tensor([0.0]), scale, zp)) == 0.0
    assert zp == torch.round(0.3 / scale)


# --------------------------------------------------------------------------- gradients and dead ranges
def test_ste_gradient_symmetric():
    x = torch.tensor([-3.0, -0.9, -0.2, 0.0, 0.4, 0.99, 1.5, 8.0], requires_grad=True)
    tq.fake_tensor_quant(x, 1.0, 8).sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0, 0]


def test_ste_gradient_affine():
    x = torch.tensor([-5.0, -0.5, 0.0, 1.0, 2.9, 9.0], requires_grad=True)
    scale, zp = tq.affine_qparams(torch.tensor(-1.0), torch.tensor(3.0))
    tq.fake_affine_quant(x, scale, zp).sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 0]


def test_ste_gradient_fp8():
    x = torch.tensor([-3.0, -0.5, 0.7, 2.0, 2.5], requires_grad=True)
    tq.fake_fp8_e4m3_quant(x, 2.0).sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0]


@pytest.mark.parametrize("amax", [0.0, 1e-9, 2.0**-25])
def test_dead_amax_gives_zeros_and_finite_grads(amax):
    x = torch.randn(10, requires_grad=True)
    for fn in (lambda t: tq.fake_tensor_quant(t, amax, 8), lambda t: tq.fake_tensor_quant(t, amax, 8, True),
               lambda t: tq.fake_fp8_e4m3_quant(t, amax)):
        x.grad = None
        out = fn(x)
        assert torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_dead_channel_is_zero_others_quantized():
    x = torch.randn(3, 8, requires_grad=True)
    amax = torch.tensor([[1.0], [0.0], [2.0]])
    out = tq.fake_tensor_quant(x, amax, 8)
    assert torch.equal(out[1], torch.zeros(8))
    np.testing.assert_array_equal(out[0].detach().numpy(), ref_fake_quant(x[0].detach().numpy(), 1.0, 8, False, True))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert not torch.isnan(out).any()


# --------------------------------------------------------------------------- fp8, block, float cast
def test_fp8_matches_table_reference():
    g = torch.Generator().manual_seed(5)
    # Wide dynamic range: subnormals, normals and clipped values.
    x = torch.randn(2000, generator=g) * torch.exp(torch.randn(2000, generator=g) * 3)
    amax = 3.0
    out = tq.fake_fp8_e4m3_quant(x, amax)
    np.testing.assert_array_equal(out.numpy(), ref_fake_fp8(x.numpy(), amax))


def test_fp8_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = torch.randn(2000, generator=torch.Generator().manual_seed(6)) * 2
    amax = 5.0
    scale = np.float32(448.0) / np.float32(amax)
    scaled = np.clip(x.numpy() * scale, -448.0, 448.0)
    ref = scaled.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) / scale
    np.testing.assert_array_equal(tq.fake_fp8_e4m3_quant(x, amax).numpy(), ref)


def test_e4m3_table_is_the_format():
    t = e4m3_table()
    assert len(t) == 127 and t.max() == 448.0 and t[1] == 2.0**-9
    assert np.all(np.diff(t) > 0)
    exact = torch.from_numpy(t.astype(np.float32))
    assert torch.equal(exact.to(torch.float8_e4m3fn).float(), exact)


@pytest.mark.parametrize("shape,block", [((3, 10), 4), ((2, 8), 4), ((4, 5), 8)])
def test_block_quant_matches_numpy(shape, block):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    out = tq.fake_block_quant(w, num_bits=4, block_size=block)
    np.testing.assert_array_equal(out.numpy(), ref_block_quant(w.numpy(), 4, block))


def test_block_quant_zero_block_and_amax_shape():
    w = torch.randn(2, 8)
    w[0, :4] = 0
    amax = tq.block_amax(w, 4)
    assert amax.shape == (2, 2) and amax[0, 0] == 0
    out = tq.fake_block_quant(w, 4, 4)
    assert torch.equal(out[0, :4], torch.zeros(4)) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_float_cast(dtype):
    x = torch.randn(100, requires_grad=True)
    out = tq.fake_float_cast(x, dtype)
    assert torch.equal(out, x.detach().to(dtype).float())
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones(100))


def test_fake_float_cast_half_matches_half_float():
    x = torch.randn(1000) * 100
    assert torch.equal(tq.fake_float_cast(x, torch.float16), x.half().float())
