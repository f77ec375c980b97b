"""The numbers ONNX stores, from mixq's quantizers: activation Q/DQ parameters, quantized weights
(int8 / fp8 / int4 initializers), int32 biases and fp16 / bf16 initializers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from onnx import TensorProto

from mixq.errors import CalibrationError
from mixq.export.errors import ExportError
from mixq.quant import tensor_quant as tq

_F8 = TensorProto.FLOAT8E4M3FN
_FLOAT_TYPES = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
_TYPE_NAME = {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}


@dataclass(frozen=True)
class _QParams:
    """Per-tensor activation quantization as ONNX writes it."""

    elem: int
    scale: np.ndarray  # float32 scalar
    zero_point: np.ndarray  # scalar of the quantized type

    @property
    def key(self) -> tuple:
        return (self.elem, self.scale.tobytes(), self.zero_point.tobytes())


def _activation_qparams(q, where: str) -> _QParams:
    d = q.desc
    if not q.is_calibrated:
        raise CalibrationError(f"{where}: the quantizer was never calibrated; calibrate the model "
                               "(mixq.quantize(..., calib_data=...) or mixq.calibrate) before exporting.")
    if d.axis is not None:
        raise ExportError(f"{where}: per-channel activation quantization cannot be exported (axis={d.axis}).")
    scale = q.scale.detach().float().reshape(-1)
    if scale.numel() != 1:
        raise ExportError(f"{where}: expected one activation scale, got {scale.numel()}.")
    s = np.float32(max(float(scale[0]), 2.0**-24) if float(scale[0]) > 0 else 1.0)
    if d.fp8:
        return _QParams(_F8, np.array(s, np.float32), np.zeros((), _ml_dtypes().float8_e4m3fn))
    if d.num_bits != 8:
        raise ExportError(f"{where}: {d.num_bits}-bit activations cannot be exported (8-bit only).")
    if d.asymmetric:
        zp = np.array(int(q.zero_point.reshape(-1)[0]), np.uint8)
        return _QParams(TensorProto.UINT8, np.array(s, np.float32), zp)
    if d.unsigned:
        return _QParams(TensorProto.UINT8, np.array(s, np.float32), np.zeros((), np.uint8))
    return _QParams(TensorProto.INT8, np.array(s, np.float32), np.zeros((), np.int8))


def _ml_dtypes():
    import ml_dtypes

    return ml_dtypes


@dataclass
class _WeightQ:
    """A quantized weight in the ONNX layout."""

    codes: np.ndarray  # int8 / ml_dtypes int4 / float8
    scale: np.ndarray  # float32: scalar, per-channel 1-D, or blocked (same rank as codes)
    zero_point: Optional[np.ndarray]
    axis: Optional[int]
    block_size: Optional[int]
    torch_codes: Optional[torch.Tensor] = None  # int4: codes in the torch layout (for MatMulNBits)
    torch_scale: Optional[torch.Tensor] = None


def _safe_amax(amax: torch.Tensor) -> torch.Tensor:
    """``amax`` with (near-)zero entries replaced by 1, so that their scale stays finite."""
    return torch.where(amax < 2.0**-24, torch.ones_like(amax), amax)


def _quantize_weight(q, w: torch.Tensor, perm: Optional[tuple], where: str) -> _WeightQ:
    """Quantize ``w`` exactly as the simulation does; return codes and scales in the ONNX layout."""
    d = q.desc
    w = w.detach().float()
    ml = _ml_dtypes()

    def onnx_layout(t: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(t.transpose(perm)) if perm else t

    if d.block_size is not None:
        amax = tq.block_amax(w, d.block_size)  # (out, n_blocks)
        shape = w.shape
        wf = w.reshape(shape[0], -1)
        n = wf.shape[1]
        pad = (-n) % d.block_size
        wp = torch.nn.functional.pad(wf, (0, pad)).reshape(shape[0], -1, d.block_size)
        codes, _ = tq.quant_codes(wp, amax.unsqueeze(-1), d.num_bits, False, True)
        _, hi = tq.int_bounds(d.num_bits, False, True)
        safe = _safe_amax(amax)
        scale = (safe / hi).float()
        codes2d = codes.reshape(shape[0], -1)[:, :n]
        if len(shape) != 2:
            raise ExportError(f"{where}: block-wise weights must be 2-D, got shape {tuple(shape)}.")
        c = codes2d.to(torch.int8).numpy()
        if perm:
            return _WeightQ(onnx_layout(c).astype(ml.int4), onnx_layout(scale.numpy()), None, 0, d.block_size,
                            codes2d.to(torch.int8), scale)
        return _WeightQ(c.astype(ml.int4), scale.numpy(), None, 1, d.block_size, codes2d.to(torch.int8), scale)
    if not q.is_calibrated:
        raise CalibrationError(f"{where}: the weight quantizer was never calibrated; calibrate the model first.")
    amax = q.amax.detach().float()
    if d.fp8:
        safe = _safe_amax(amax)
        scaled = torch.clamp(w * (tq.FP8_E4M3_MAX / safe), -tq.FP8_E4M3_MAX, tq.FP8_E4M3_MAX)
        codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8).numpy().view(ml.float8_e4m3fn)
        s = (safe / tq.FP8_E4M3_MAX).reshape(-1).numpy().astype(np.float32)
        if s.size != 1:
            raise ExportError(f"{where}: fp8 weights must have one per-tensor scale.")
        return _WeightQ(onnx_layout(codes), s.reshape(()), np.zeros((), ml.float8_e4m3fn), None, None)
    if d.num_bits != 8 or d.asymmetric:
        raise ExportError(f"{where}: only 8-bit symmetric weights (or int4 block-wise) can be exported.")
    codes, _ = tq.quant_codes(w, amax, d.num_bits, d.unsigned, d.narrow_range)
    _, hi = tq.int_bounds(d.num_bits, d.unsigned, d.narrow_range)
    safe = _safe_amax(amax.abs())
    scale = (safe / hi).float().reshape(-1).numpy()
    dtype = np.uint8 if d.unsigned else np.int8
    c = onnx_layout(codes.numpy().astype(dtype))
    if d.axis is None or scale.size == 1 and w.dim() == 0:
        return _WeightQ(c, scale.reshape(()).astype(np.float32), np.zeros((), dtype), None, None)
    axis = perm.index(d.axis % w.dim()) if perm else d.axis % w.dim()
    return _WeightQ(c, scale.astype(np.float32), np.zeros(scale.shape, dtype), axis, None)


INT32_BIAS_LIMIT = 2**30  # |bias code| kept below this (half of int32: room for the accumulator's own sum)


def bias_weight_scale(bias: np.ndarray, x_scale: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """The weight scale the int32 bias needs: ``w_scale``, raised where ``bias / (s_x * s_w)`` overflows.

    A channel whose weights are (nearly) all zero gets a tiny weight scale, and its bias in units of
    ``s_x * s_w`` no longer fits in int32: the engine would saturate it (seen on EfficientNet-Lite0: biases
    of -0.4 .. -1.8 on dead channels, 1e10 codes). Raising that channel's weight scale until the bias fits
    changes only weights that are ~1e-7 in size (they requantize to a few codes), and keeps the bias exact.
    """
    b = np.abs(bias.astype(np.float64))
    ws = np.broadcast_to(np.asarray(w_scale, np.float64), b.shape) if np.ndim(w_scale) else np.asarray(w_scale, np.float64)
    need = b / (float(np.asarray(x_scale).reshape(-1)[0]) * INT32_BIAS_LIMIT)
    return np.maximum(ws, need).astype(np.float32) if ws.ndim else np.float32(max(float(ws), float(need.max(initial=0))))


def _quantize_bias(bias: np.ndarray, x_scale: np.ndarray, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias codes and their scale ``s_x * s_w`` (per output channel where the weight is).

    Codes are computed and clipped in float64: float32 cannot hold 2**31 - 1, and a value clipped to it
    would overflow the int32 cast. ``bias_weight_scale`` gives the weight scale that avoids clipping.
    """
    bias = bias.astype(np.float32)
    bscale = (x_scale * w_scale).astype(np.float32)
    bscale = np.broadcast_to(bscale, bias.shape).astype(np.float32) if bscale.ndim else bscale
    codes = np.clip(np.round(bias.astype(np.float64) / bscale.astype(np.float64)), -(2**31), 2**31 - 1)
    return codes.astype(np.int32), bscale


def _version_key(t: Optional[torch.Tensor]) -> tuple:
    """Identity of a tensor's current contents (recalibration replaces or edits it)."""
    return (None,) if t is None else (id(t), t._version)


def _to_float_type(a: np.ndarray, elem: int) -> np.ndarray:
    if elem == TensorProto.FLOAT16:
        return a.astype(np.float16)
    return a.astype(_ml_dtypes().bfloat16)
