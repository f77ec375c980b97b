"""TensorQuantizer: a module that fake-quantizes, calibrates, or passes a tensor through.

Modes (pytorch-quantization's names): ``enable_calib()`` collects statistics, ``enable_quant()``
fake-quantizes, ``disable()`` passes through. ``load_calib_amax()`` turns statistics into the
range stored in buffers, so a calibrated quantizer is saved and loaded with the ``state_dict``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from mixq.errors import CalibrationError
from mixq.quant import tensor_quant as tq
from mixq.quant.calibrators import Calibrator, MaxCalibrator, make_calibrator, reduce_dims
from mixq.quant.descriptor import QuantDescriptor, check_calib_method


_LEARNED = ("_learned_amax", "_learned_scale", "_learned_zero_point")
_MIN_RANGE = 1e-6  # the smallest learned amax / scale kept (below it a range would quantize everything to 0)
# A learned range stays at least 1/16 of the calibrated one: one large step can push an LSQ scale through zero (it
# was clamped to _MIN_RANGE, after which ONNX Runtime refused the model: QLinearGlobalAveragePool accepts an
# input/output scale ratio below 256 only), and a clip at 1/16 of the data's range is far past what LSQ gains from.
_MAX_SHRINK = 16.0


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor as its ``QuantDescriptor`` says.

    Args:
        desc: the descriptor; defaults to 8-bit signed per-tensor with max calibration.
    """

    def __init__(self, desc: Optional[QuantDescriptor] = None) -> None:
        super().__init__()
        self.desc = desc or QuantDescriptor()
        self._disabled = False
        self._if_quant = True
        self._if_calib = False
        self._calibrator: Optional[Calibrator] = None
        # amax for symmetric / fp8 schemes; (scale, zero_point) for asymmetric ones.
        self.register_buffer("_amax", None if self.desc.amax is None else torch.tensor(float(self.desc.amax)))
        self.register_buffer("_scale", None)
        self.register_buffer("_zero_point", None)
        # Learned ranges (QAT): amax for symmetric schemes; scale and zero point for asymmetric ones.
        for name in _LEARNED:
            self.register_parameter(name, None)
        self._learn_bounds = None  # (min, max) of the calibration data: learned ranges stay inside it
        # When set, the range is the max of each input (weights: the range follows them during training).
        self.track_max = False

    # ----------------------------------------------------------------- modes
    def enable(self) -> None:
        self._disabled = False

    def disable(self) -> None:
        self._disabled = True

    @property
    def enabled(self) -> bool:
        return not self._disabled

    def enable_quant(self) -> None:
        self._if_quant = True

    def disable_quant(self) -> None:
        self._if_quant = False

    def enable_calib(self) -> None:
        if self._calibrator is None:
            axis = self.desc.axis
            method = "max" if (self.desc.fp8 or axis is not None) else self.desc.calib_method
            self._calibrator = make_calibrator(method, axis, self.desc.num_bins)
        self._if_calib = True

    def disable_calib(self) -> None:
        self._if_calib = False

    def use_calib_method(self, method: str) -> None:
        """Calibrate with ``method`` from the next statistics on (collected statistics are dropped).

        FP8 and per-channel quantizers always calibrate with max (their scales are per-tensor max
        or per-channel max by design), so they keep ``"max"``.

        Raises:
            ConfigError: an unknown method.
        """
        method = check_calib_method(method)
        effective = "max" if (self.desc.fp8 or self.desc.axis is not None) else method
        if effective != self.desc.calib_method:
            self.desc = self.desc.replace(calib_method=effective)
        self._calibrator = None

    # ----------------------------------------------------------------- ranges
    @property
    def is_calibrated(self) -> bool:
        return self._amax is not None or self._scale is not None or self.desc.block_size is not None

    @property
    def learned(self) -> bool:
        """Is the range a trainable parameter (``init_learn_amax``)?"""
        return self._learned_amax is not None or self._learned_scale is not None

    @property
    def amax(self) -> Optional[torch.Tensor]:
        if self._learned_amax is not None:
            return self._learned_amax
        return self._amax

    @property
    def scale(self) -> Optional[torch.Tensor]:
        """The dequantization step the engine will use (per tensor or per channel)."""
        if self.desc.asymmetric:
            return self._learned_scale.detach() if self._learned_scale is not None else self._scale
        if self.amax is None:
            return None
        if self.desc.fp8:
            return self.amax.detach() / tq.FP8_E4M3_MAX
        _, hi = tq.int_bounds(self.desc.num_bits, self.desc.unsigned, self.desc.narrow_range)
        return self.amax.detach() / hi

    @property
    def zero_point(self) -> Optional[torch.Tensor]:
        if not self.desc.asymmetric:
            return None
        if self._learned_zero_point is not None:  # the integer the forward pass uses
            return self._learned_zero_point.detach().round().clamp(0.0, 2.0**self.desc.num_bits - 1.0)
        return self._zero_point

    def load_calib_amax(self, method: Optional[str] = None, **kwargs) -> None:
        """Compute the range from collected statistics and store it.

        Args:
            method: override the descriptor's calib_method for histogram calibrators.
            kwargs: passed to the calibrator (for example ``percentile=99.9``).

        Raises:
            CalibrationError: no statistics were collected.
        """
        if self._calibrator is None:
            raise CalibrationError("load_calib_amax() called before any calibration: call enable_calib() and run data.")
        method = method or self.desc.calib_method
        if isinstance(self._calibrator, MaxCalibrator) and method != "max":
            raise CalibrationError(
                f"calib method {method!r} needs histogram statistics, but this quantizer collected max statistics "
                f"({'per-channel' if self.desc.axis is not None else 'fp8' if self.desc.fp8 else 'max'}); "
                "recalibrate with a descriptor whose calib_method is the one you want.")
        kwargs.setdefault("percentile", self.desc.percentile)
        if self.desc.asymmetric:
            lo, hi = self._calibrator.compute_range(method=method, num_bits=self.desc.num_bits, **kwargs)
            scale, zp = tq.affine_qparams(lo, hi, self.desc.num_bits)
            self._scale, self._zero_point = self._per_tensor_scalar(scale), self._per_tensor_scalar(zp)
        else:
            amax = self._calibrator.compute_amax(method=method, num_bits=self.desc.num_bits,
                                                 unsigned=self.desc.unsigned, **kwargs)
            self._amax = self._per_tensor_scalar(amax.detach().float().clone())
        if self.desc.learn_amax:
            self.init_learn_amax()

    def _per_tensor_scalar(self, t: torch.Tensor) -> torch.Tensor:
        # A keepdim (1, 1, ...) range would broadcast a lower-rank input up to its rank.
        return t.reshape(()) if self.desc.axis is None and t.numel() == 1 else t

    def set_amax(self, amax: torch.Tensor | float) -> None:
        """Set a symmetric range directly (for weights, or ranges computed elsewhere)."""
        self._amax = torch.as_tensor(amax, dtype=torch.float32).detach().clone()

    def set_range(self, min_val: torch.Tensor | float, max_val: torch.Tensor | float) -> None:
        """Set an asymmetric range directly."""
        self._scale, self._zero_point = tq.affine_qparams(min_val, max_val, self.desc.num_bits)

    def init_learn_amax(self) -> None:
        """Turn the calibrated range into trainable parameters, starting from the calibrated values.

        Symmetric integer schemes learn amax and asymmetric ones learn scale and zero point, with
        LSQ / LSQ+ gradients (``tensor_quant.lsq_tensor_quant`` / ``lsq_affine_quant``); FP8 learns amax
        through a clip (PACT). The forward pass is unchanged until the parameters move. The (min, max) of
        the calibration data is kept: ``clamp_learned`` keeps the learned grid inside it.

        Raises:
            CalibrationError: the quantizer has no calibrated range yet, or is block-wise (ranges from the weights).
        """
        if self.desc.block_size is not None:
            raise CalibrationError("block-wise quantizers compute their ranges from the weights; they cannot learn them.")
        cal = self._calibrator
        self._learn_bounds = cal.observed_range() if cal is not None and cal.num_batches > 0 else None
        if self.desc.asymmetric:
            if self._scale is None:
                raise CalibrationError("learn_amax needs a calibrated range first: calibrate, then init_learn_amax().")
            self._learned_scale = nn.Parameter(self._scale.detach().clone())
            self._learned_zero_point = nn.Parameter(self._zero_point.detach().clone())
            return
        if self._amax is None:
            raise CalibrationError("learn_amax needs a calibrated amax first: calibrate, then init_learn_amax().")
        self._learned_amax = nn.Parameter(self._amax.detach().clone())

    @torch.no_grad()
    def clamp_learned(self) -> None:
        """Project learned ranges back to what an engine accepts: amax and scale > 0, zero point on the grid.

        A training step can push a range through zero (the LSQ gradient has no barrier there); call this
        after every optimizer step (``mixq.qat`` does).
        """
        bounds = getattr(self, "_learn_bounds", None)
        if self._learned_amax is not None:
            self._learned_amax.clamp_(min=_MIN_RANGE)
            if bounds is not None:
                top = float(torch.maximum(bounds[0].abs(), bounds[1].abs()).max())
                self._learned_amax.clamp_(min=top / _MAX_SHRINK, max=top)
        if self._learned_scale is not None:
            qmax = 2.0**self.desc.num_bits - 1.0
            self._learned_scale.clamp_(min=_MIN_RANGE)
            self._learned_zero_point.clamp_(0.0, qmax)
            if bounds is not None:
                span = float(max(bounds[1].max(), 0.0) - min(bounds[0].min(), 0.0))
                self._learned_scale.clamp_(min=span / qmax / _MAX_SHRINK)
                # The grid stays inside the data's range (widened to hold 0): [-z*s, (qmax-z)*s] within [lo, hi].
                # Beyond it codes are wasted, and an engine fuses an activation's clip (ReLU, ReLU6) into the
                # quantization only when the grid lies within the clip; with z = 0 the largest scale is the
                # one max calibration computes, bit for bit.
                lo, hi = float(min(bounds[0].min(), 0.0)), float(max(bounds[1].max(), 0.0))
                zp = self._learned_zero_point
                zp.clamp_(max=math.floor(-lo / float(self._learned_scale.min()) + 1e-6))
                z = zp.round()
                if bool((z == 0).all()):
                    cap, _ = tq.affine_qparams(torch.tensor(0.0), torch.tensor(hi), self.desc.num_bits)
                else:
                    cap = torch.tensor(hi) / (qmax - z)
                self._learned_scale.copy_(torch.minimum(self._learned_scale, cap.to(self._learned_scale)))

    def store_learned(self) -> None:
        """Copy the learned range into the calibrated buffers and drop the parameters (training is over)."""
        self.clamp_learned()
        if self._learned_amax is not None:
            self._amax = self._learned_amax.detach().clone()
        if self._learned_scale is not None:
            self._scale, self._zero_point = self.scale.clone(), self.zero_point.clone()
        for name in _LEARNED:
            setattr(self, name, None)

    def reset_calibration(self) -> None:
        self._calibrator = None
        for name in _LEARNED:
            setattr(self, name, None)
        self._amax = self._scale = self._zero_point = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Ranges are None until calibration; a calibrated state_dict fills them in whatever their shape.
        for name in ("_amax", "_scale", "_zero_point"):
            key = prefix + name
            if key in state_dict:
                self._buffers[name] = state_dict[key].detach().clone()
        # Learned ranges are parameters that exist only once learning started: create them to load into.
        for name in _LEARNED:
            key = prefix + name
            if key in state_dict and self._parameters.get(name) is None:
                self._parameters[name] = nn.Parameter(torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ----------------------------------------------------------------- forward
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self._disabled:
            return inputs
        if self._if_calib:
            self._calibrator.collect(inputs)
        if not self._if_quant:
            return inputs
        if self.track_max and self.desc.block_size is None and not self.learned:
            self.refresh_max(inputs)
        return self.fake_quant(inputs)

    def refresh_max(self, inputs: torch.Tensor) -> None:
        """Set the range to the max of ``inputs`` (per channel on ``axis``), as max calibration would."""
        x = inputs.detach().float()
        if self.desc.asymmetric:
            dims = reduce_dims(x, self.desc.axis)
            self.set_range(self._per_tensor_scalar(x.amin(dim=dims, keepdim=True)),
                           self._per_tensor_scalar(x.amax(dim=dims, keepdim=True)))
        else:
            amax = x.abs().amax(dim=reduce_dims(x, self.desc.axis), keepdim=True)
            self._amax = self._per_tensor_scalar(amax)

    def _grad_scale(self, inputs: torch.Tensor, ranges: torch.Tensor) -> float:
        """LSQ's gradient scale ``1 / sqrt(elements per range * max code)``."""
        per_range = max(1, inputs.numel() // max(1, ranges.numel()))
        d = self.desc
        top = 2.0**d.num_bits - 1.0 if d.asymmetric else tq.int_bounds(d.num_bits, d.unsigned, d.narrow_range)[1]
        return float((per_range * top) ** -0.5)

    def fake_quant(self, inputs: torch.Tensor) -> torch.Tensor:
        """Apply fake quantization with the stored range."""
        d = self.desc
        if d.block_size is not None:
            return tq.fake_block_quant(inputs, d.num_bits, d.block_size)
        if not self.is_calibrated:
            raise CalibrationError(
                "quantizer used before calibration: calibrate the model (mixq.quantize(..., calib_data=...)) "
                "or set a fixed amax in its QuantDescriptor."
            )
        if d.asymmetric:
            if self._learned_scale is not None:
                return tq.lsq_affine_quant(inputs, self._learned_scale, self._learned_zero_point, d.num_bits,
                                           self._grad_scale(inputs, self._learned_scale))
            return tq.fake_affine_quant(inputs, self._scale, self._zero_point, d.num_bits)
        amax = self.amax
        if self._learned_amax is not None and not d.fp8:
            return tq.lsq_tensor_quant(inputs, amax, d.num_bits, d.unsigned, d.narrow_range,
                                       self._grad_scale(inputs, amax))
        if d.fp8:
            if self._learned_amax is not None:  # clip with a gradient to amax (PACT), then quantize
                inputs = torch.minimum(torch.maximum(inputs, -amax), amax)
            return tq.fake_fp8_e4m3_quant(inputs, amax)
        return tq.fake_tensor_quant(inputs, amax, d.num_bits, d.unsigned, d.narrow_range)

    def extra_repr(self) -> str:
        d = self.desc
        kind = "fp8_e4m3" if d.fp8 else (f"{d.num_bits}bit" + (" asym" if d.asymmetric else "") +
                                         (" unsigned" if d.unsigned and not d.asymmetric else ""))
        axis = f" axis={d.axis}" if d.axis is not None else (f" block={d.block_size}" if d.block_size else " per-tensor")
        state = "disabled" if self._disabled else ("calib" if self._if_calib else "") + (" quant" if self._if_quant else "")
        return f"{kind}{axis} {state.strip()}"
