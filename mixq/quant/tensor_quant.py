"""Fake-quantization functions with straight-through gradients.

Formulas follow pytorch-quantization so its users get the same codes:
``scale = bound / amax``, ``code = clamp(round_half_even(x * scale), min_bound, bound)``,
``x_hat = code / scale``. The gradient passes straight through inside the clipping range and is
zero outside it. An ``amax`` below 2^-24 (a dead channel) quantizes to zero, never NaN.

Engines compute ``round(x / step)`` with the float32 ``step = amax / bound`` instead of
``round(x * (bound / amax))``; the two differ by one code only where ``x * bound / amax`` lands
within a float32 rounding of a .5 tie. The reference codes users check against are
pytorch-quantization's, so mixq keeps its formula; ``mixq verify`` reports the difference in steps.
"""
from __future__ import annotations

from typing import Optional

import torch

_TINY = 2.0**-24
FP8_E4M3_MAX = 448.0


def int_bounds(num_bits: int, unsigned: bool, narrow_range: bool) -> tuple[float, float]:
    """Return (min_code, max_code) of a symmetric integer grid."""
    max_bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    if unsigned:
        return 0.0, max_bound
    return (-max_bound if narrow_range else -max_bound - 1.0), max_bound


def _safe_amax(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace tiny amax by 1 (to avoid 1/0) and return the mask of the dead entries."""
    dead = amax.abs() < _TINY
    return torch.where(dead, torch.ones_like(amax), amax.abs()), dead


def _bound_over(bound: float, amax: torch.Tensor) -> torch.Tensor:
    """``bound / amax`` correctly rounded (``float / tensor`` in torch multiplies by ``1 / amax``)."""
    return torch.full_like(amax, bound) / amax


def quant_codes(inputs: torch.Tensor, amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
                narrow_range: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (integer codes as float, scale) of symmetric quantization, without gradient."""
    amax = torch.as_tensor(amax, dtype=torch.float32, device=inputs.device)
    lo, hi = int_bounds(num_bits, unsigned, narrow_range)
    safe, dead = _safe_amax(amax)
    scale = _bound_over(hi, safe)
    # In place on the one fresh tensor: on CPU a fake-quantized activation costs about a quarter
    # of the out-of-place chain (same values, fewer allocations).
    codes = (inputs.float() * scale).round_().clamp_(lo, hi)
    return _zero_dead(codes, dead), scale


def _zero_dead(x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``x`` with the entries of dead channels (``dead`` broadcasts to ``x``) set to zero."""
    return x.masked_fill_(dead, 0.0) if bool(dead.any()) else x


class _FakeTensorQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, amax, num_bits, unsigned, narrow_range):
        amax = torch.as_tensor(amax, dtype=torch.float32, device=inputs.device)
        codes, scale = quant_codes(inputs, amax, num_bits, unsigned, narrow_range)
        lo, hi = int_bounds(num_bits, unsigned, narrow_range)
        ctx.save_for_backward(inputs, amax)
        ctx.bounds = (lo, hi)
        out = codes.div_(scale).to(inputs.dtype)
        return _zero_dead(out, amax.abs() < _TINY)

    @staticmethod
    def backward(ctx, grad):
        inputs, amax = ctx.saved_tensors
        lo, hi = ctx.bounds
        safe, _ = _safe_amax(amax)
        scaled = inputs * _bound_over(hi, safe)
        # Straight-through inside the representable range, zero where the input was clipped.
        inside = (scaled >= lo - 0.5) & (scaled <= hi + 0.5)
        return grad * inside.to(grad.dtype), None, None, None, None


def fake_tensor_quant(inputs: torch.Tensor, amax: torch.Tensor | float, num_bits: int = 8,
                      unsigned: bool = False, narrow_range: bool = True) -> torch.Tensor:
    """Symmetric fake quantization (quantize then dequantize) with a straight-through gradient.

    Args:
        inputs: any float tensor.
        amax: absolute maximum; a scalar, or a tensor broadcastable to ``inputs`` for per-channel.
        num_bits: bits of the integer grid.
        unsigned: use [0, 2^b - 1] (inputs must be non-negative to be represented).
        narrow_range: drop the most negative code so the grid is symmetric ([-127, 127] for 8 bits).

    Returns:
        A tensor like ``inputs`` holding dequantized values.
    """
    return _FakeTensorQuant.apply(inputs, amax, num_bits, unsigned, narrow_range)


def affine_qparams(min_val: torch.Tensor, max_val: torch.Tensor, num_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale, zero_point) of unsigned asymmetric quantization covering [min, max] and 0.

    The range is widened to include zero so that zero (padding, ReLU outputs) is exact, as ONNX
    Runtime's QDQ tools require.
    """
    qmax = 2.0**num_bits - 1.0
    lo = torch.clamp(torch.as_tensor(min_val, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(max_val, dtype=torch.float32), min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale < _TINY, torch.ones_like(scale), scale)
    zero_point = torch.clamp(torch.round(-lo / scale), 0.0, qmax)
    return scale, zero_point


class _FakeAffineQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, scale, zero_point, qmin, qmax):
        q = (inputs / scale).round_().add_(zero_point).clamp_(qmin, qmax)  # in place: see quant_codes
        ctx.save_for_backward(inputs, scale, zero_point)
        ctx.bounds = (qmin, qmax)
        return q.sub_(zero_point).mul_(scale).to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad):
        inputs, scale, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        lo = (qmin - zero_point) * scale
        hi = (qmax - zero_point) * scale
        inside = (inputs >= lo - 0.5 * scale) & (inputs <= hi + 0.5 * scale)
        return grad * inside.to(grad.dtype), None, None, None, None


def fake_affine_quant(inputs: torch.Tensor, scale: torch.Tensor | float, zero_point: torch.Tensor | float,
                      num_bits: int = 8) -> torch.Tensor:
    """Unsigned asymmetric fake quantization: ``(clamp(round(x/s) + z, 0, 2^b-1) - z) * s``.

    Args:
        inputs: any float tensor.
        scale: positive step size (scalar or broadcastable tensor).
        zero_point: integer-valued zero point in [0, 2^b - 1].
        num_bits: bits of the unsigned grid.

    Returns:
        Dequantized tensor; gradient is straight-through inside the representable range.
    """
    scale = torch.as_tensor(scale, dtype=torch.float32, device=inputs.device)
    zero_point = torch.as_tensor(zero_point, dtype=torch.float32, device=inputs.device)
    return _FakeAffineQuant.apply(inputs, scale, zero_point, 0.0, 2.0**num_bits - 1.0)


class _FakeFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, amax):
        amax = torch.as_tensor(amax, dtype=torch.float32, device=inputs.device)
        safe, dead = _safe_amax(amax)
        scale = _bound_over(FP8_E4M3_MAX, safe)
        scaled = torch.clamp(inputs.float() * scale, -FP8_E4M3_MAX, FP8_E4M3_MAX)
        out = (scaled.to(torch.float8_e4m3fn).float() / scale).to(inputs.dtype)
        ctx.save_for_backward(inputs, safe)
        return torch.where(dead, torch.zeros_like(out), out)

    @staticmethod
    def backward(ctx, grad):
        inputs, safe = ctx.saved_tensors
        return grad * (inputs.abs() <= safe).to(grad.dtype), None


def fake_fp8_e4m3_quant(inputs: torch.Tensor, amax: torch.Tensor | float) -> torch.Tensor:
    """FP8 E4M3 fake quantization with a per-tensor (or broadcastable) scale ``448 / amax``.

    Values are scaled so that ``amax`` maps to 448, clipped, rounded to the nearest E4M3 value
    (ties to even), and scaled back.
    """
    return _FakeFP8.apply(inputs, amax)


def fake_block_quant(weight: torch.Tensor, num_bits: int = 4, block_size: int = 128,
                     amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block-wise symmetric weight fake quantization along the last dimension (int4 weight-only).

    Args:
        weight: 2-D (out, in) weight; other ranks are flattened to (shape[0], -1).
        num_bits: bits per weight.
        block_size: consecutive input elements sharing one scale; the last block may be short.
        amax: per-block amax of shape (out, n_blocks); computed from the weight when None.

    Returns:
        The dequantized weight, same shape.
    """
    shape = weight.shape
    w = weight.reshape(shape[0], -1)
    n = w.shape[1]
    pad = (-n) % block_size
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(shape[0], -1, block_size)
    if amax is None:
        amax = block_amax(weight, block_size)
    out = fake_tensor_quant(wp, amax.unsqueeze(-1), num_bits, False, True)
    return out.reshape(shape[0], -1)[:, :n].reshape(shape)


def block_amax(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """Return the (out, n_blocks) absolute maxima of a weight split in blocks along its last dim."""
    w = weight.detach().reshape(weight.shape[0], -1)
    pad = (-w.shape[1]) % block_size
    return torch.nn.functional.pad(w, (0, pad)).reshape(w.shape[0], -1, block_size).abs().amax(-1)


def fake_float_cast(inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a tensor through a lower float dtype (fp16/bf16) with an identity gradient."""
    return inputs + (inputs.to(dtype).to(inputs.dtype) - inputs).detach()


# ----------------------------------------------------------------- learned ranges (LSQ)
def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dims a tensor of ``shape`` was broadcast along (the gradient of a broadcast)."""
    if len(shape) == 0:
        return t.sum()
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead > 0 else t
    dims = tuple(d for d, n in enumerate(shape) if n == 1 and t.shape[d] != 1)
    return (t.sum(dim=dims, keepdim=True) if dims else t).reshape(shape)


class _LSQTensorQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, amax, num_bits, unsigned, narrow_range, grad_scale):
        codes, scale = quant_codes(inputs, amax.detach(), num_bits, unsigned, narrow_range)
        ctx.save_for_backward(inputs, amax)
        ctx.bounds = (*int_bounds(num_bits, unsigned, narrow_range), grad_scale)
        out = codes.div_(scale).to(inputs.dtype)  # the same arithmetic as _FakeTensorQuant: same codes
        return _zero_dead(out, amax.abs() < _TINY)

    @staticmethod
    def backward(ctx, grad):
        inputs, amax = ctx.saved_tensors
        lo, hi, grad_scale = ctx.bounds
        safe, _ = _safe_amax(amax.detach())
        scaled = inputs.float() * _bound_over(hi, safe)
        rounded = torch.round(scaled)
        # x_hat = clamp(round(u), lo, hi) * amax / hi with u = x * hi / amax and a straight-through round:
        # d x_hat / dx = 1 where round(u) is representable; d x_hat / d amax = (round(u) - u) / hi there,
        # and (clamped code) / hi where the input was clipped (LSQ, Esser et al. 2020, in amax units).
        inside = (rounded >= lo) & (rounded <= hi)
        d_amax = torch.where(inside, rounded - scaled, rounded.clamp(lo, hi)) / hi
        g_in = grad * inside.to(grad.dtype)
        g_amax = _sum_to(grad.float() * d_amax, amax.shape) * grad_scale
        return g_in, g_amax.to(amax.dtype), None, None, None, None


def lsq_tensor_quant(inputs: torch.Tensor, amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
                     narrow_range: bool = True, grad_scale: float = 1.0) -> torch.Tensor:
    """``fake_tensor_quant`` (same output, bit for bit) with a learned-step-size gradient for ``amax``.

    Args:
        inputs: any float tensor.
        amax: the range, a tensor that may require grad (scalar or broadcastable per-channel).
        num_bits / unsigned / narrow_range: as for ``fake_tensor_quant``.
        grad_scale: factor on amax's gradient (LSQ uses ``1 / sqrt(elements per amax * max code)``).

    Returns:
        The dequantized tensor. Gradients: straight-through to ``inputs`` where ``round(x * hi / amax)``
        is a code of the grid; to ``amax``, ``(round(u) - u) / hi`` there and ``code / hi`` where clipped.
    """
    return _LSQTensorQuant.apply(inputs, amax, num_bits, unsigned, narrow_range, grad_scale)


class _LSQAffineQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, scale, zero_point, qmin, qmax, grad_scale):
        s = scale.detach()
        zp = zero_point.detach().round().clamp(qmin, qmax)
        q = (inputs / s).round_().add_(zp).clamp_(qmin, qmax)  # the arithmetic of _FakeAffineQuant
        ctx.save_for_backward(inputs, s, zp)
        ctx.bounds = (qmin, qmax, grad_scale, scale.shape, zero_point.shape)
        return q.sub_(zp).mul_(s).to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad):
        inputs, s, zp = ctx.saved_tensors
        qmin, qmax, grad_scale, s_shape, z_shape = ctx.bounds
        v = inputs.float() / s
        code = torch.round(v) + zp
        # x_hat = (clamp(round(v) + z, qmin, qmax) - z) * s, v = x / s, round straight-through (LSQ+,
        # Bhalgat et al. 2020, with an integer zero point): inside the grid d/ds = round(v) - v and
        # d/dz = 0; where clipped d/ds = code - z and d/dz = -s.
        inside = (code >= qmin) & (code <= qmax)
        d_s = torch.where(inside, torch.round(v) - v, code.clamp(qmin, qmax) - zp)
        d_z = torch.where(inside, torch.zeros_like(v), -s.expand_as(v))
        g = grad.float()
        g_in = grad * inside.to(grad.dtype)
        g_s = _sum_to(g * d_s, s_shape) * grad_scale
        g_z = _sum_to(g * d_z, z_shape) * grad_scale
        return g_in, g_s, g_z, None, None, None


def lsq_affine_quant(inputs: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, num_bits: int = 8,
                     grad_scale: float = 1.0) -> torch.Tensor:
    """``fake_affine_quant`` with learned-step-size gradients for ``scale`` and ``zero_point``.

    The zero point is a float parameter rounded (and clamped to the grid) in the forward pass, so the
    forward is bit-identical to ``fake_affine_quant`` with ``round(zero_point)`` and an engine gets an
    integer zero point.

    Args:
        inputs: any float tensor.
        scale: positive step (tensor that may require grad).
        zero_point: zero point as a float tensor (may require grad).
        num_bits: bits of the unsigned grid.
        grad_scale: factor on the gradients of scale and zero point.
    """
    return _LSQAffineQuant.apply(inputs, scale, zero_point, 0.0, 2.0**num_bits - 1.0, grad_scale)
