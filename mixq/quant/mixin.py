"""QuantMixin: the machinery every quant module shares (per-format quantizers, calibration, forward helpers).

Each quant module keeps one set of quantizers per format it was prepared for, all calibrated in
the same pass, and runs in whichever format ``active_format`` names. Switching a calibrated
model to another plan is therefore only an attribute change per layer (``"fp32"`` runs float).

``input_quantizer`` / ``weight_quantizer`` return the active format's quantizers, the names a
pytorch-quantization user expects.
"""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch
from torch import nn

from mixq.formats import DEFAULT_BACKEND, get_backend, get_format, schemes_for
from mixq.quant.descriptor import QuantDescriptor
from mixq.quant.quantizer import TensorQuantizer
from mixq.quant.tensor_quant import fake_float_cast

_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _wkey(param_name: str) -> str:
    """Key of a weight quantizer in a format's ModuleDict (dots are not allowed there)."""
    return param_name.replace(".", "_")


class QuantMixin:
    """Shared machinery of every quant module (used as the first base class).

    Class attributes:
        kind: the inventory kind ("conv", "linear", "add" ...), which decides supported formats.
        num_inputs: how many activation inputs get an input quantizer.
        weight_names: parameters that get a weight quantizer (empty for functional ops).
        weight_axis: the output-channel axis of the weights for per-channel scales.
    """

    kind: ClassVar[str] = ""
    num_inputs: ClassVar[int] = 1
    weight_names: ClassVar[tuple[str, ...]] = ("weight",)
    weight_axis: ClassVar[int] = 0
    _default_desc_input: ClassVar[Optional[QuantDescriptor]] = None
    _default_desc_weight: ClassVar[Optional[QuantDescriptor]] = None

    def init_quantizer(self, backend: str = DEFAULT_BACKEND, formats: Sequence[str] = ("int8",),
                       calib_method: str = "max", quant_desc_input: Optional[QuantDescriptor] = None,
                       quant_desc_weight: Optional[QuantDescriptor] = None) -> None:
        """Create quantizers for ``formats`` on ``backend``; the first format becomes active.

        Args:
            backend: backend name whose scheme the quantizers follow.
            formats: format names to prepare (float formats need no quantizers).
            calib_method: activation calibration method.
            quant_desc_input / quant_desc_weight: explicit descriptors that override the scheme
                for integer formats (as in pytorch-quantization's constructors).
        """
        self.backend = get_backend(backend).name
        self.quantizers = nn.ModuleDict()
        self.quantize_output = get_backend(backend).quantize_outputs
        self.input_mask = [True] * self.num_inputs
        self.calibrating = False
        self.active_format = "fp32"
        self._desc_overrides = (quant_desc_input or type(self)._default_desc_input,
                                quant_desc_weight or type(self)._default_desc_weight)
        for name in formats:
            self.add_format(name, calib_method)
        if formats:
            self.active_format = get_format(formats[0]).name

    # ---------------------------------------------------------------- formats
    def add_format(self, fmt: str, calib_method: str = "max") -> None:
        """Prepare quantizers for one more format (no-op for float formats or if present)."""
        f = get_format(fmt)
        if f.is_float or f.name in self.quantizers:
            return
        act, wt = schemes_for(f, self.backend)
        d_in, d_w = self._desc_overrides if f.kind == "int" and not f.weight_only else (None, None)
        qs = nn.ModuleDict()
        if act is not None:
            desc = d_in or QuantDescriptor.from_scheme(act, calib_method if not act.fp8 else "max")
            for i in range(self.num_inputs):
                qs[f"input{i}"] = TensorQuantizer(desc)
            qs["output"] = TensorQuantizer(desc)
        if wt is not None:
            for wname in self.weight_names:
                desc = d_w or QuantDescriptor.from_scheme(wt)
                if desc.axis is not None:
                    desc = desc.replace(axis=self.weight_axis)
                qs[_wkey(wname)] = TensorQuantizer(desc)
        self.quantizers[f.name] = qs

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(self.quantizers.keys())

    def set_format(self, fmt: str) -> None:
        """Run this layer in ``fmt`` (must be a float format or one prepared by add_format)."""
        f = get_format(fmt)
        if not f.is_float and f.name not in self.quantizers:
            from mixq.errors import PlanError

            raise PlanError(f"format {f.name!r} was not prepared for this layer (prepared: "
                            f"{', '.join(self.formats) or 'none'}); pass it in formats= when quantizing.")
        self.active_format = f.name

    def _active(self) -> Optional[nn.ModuleDict]:
        return self.quantizers[self.active_format] if self.active_format in self.quantizers else None

    @property
    def input_quantizer(self) -> Optional[TensorQuantizer]:
        qs = self._active()
        return qs["input0"] if qs is not None and "input0" in qs else None

    @property
    def weight_quantizer(self) -> Optional[TensorQuantizer]:
        qs = self._active()
        key = _wkey(self.weight_names[0]) if self.weight_names else None
        return qs[key] if qs is not None and key in qs else None

    @property
    def output_quantizer(self) -> Optional[TensorQuantizer]:
        qs = self._active()
        return qs["output"] if qs is not None and "output" in qs else None

    # ---------------------------------------------------------------- calibration
    def iter_activation_quantizers(self):
        for qs in self.quantizers.values():
            for key, q in qs.items():
                if key.startswith("input") or key == "output":
                    yield key, q

    def begin_calibration(self, method: Optional[str] = None) -> None:
        """Start collecting fresh activation statistics, with ``method`` for every activation quantizer.

        Args:
            method: calibration method for every prepared format (None: each quantizer keeps its
                descriptor's). FP8 and per-channel quantizers always use max.
        """
        self.calibrating = True
        for _, q in self.iter_activation_quantizers():
            q.use_calib_method(method or q.desc.calib_method)
            q.enable_calib()
            q.disable_quant()

    def end_calibration(self) -> None:
        """Turn statistics into ranges (with the method chosen at ``begin_calibration``); weights too."""
        self.calibrating = False
        for key, q in self.iter_activation_quantizers():
            q.disable_calib()
            q.enable_quant()
            if q._calibrator is not None and q._calibrator.num_batches > 0:
                q.load_calib_amax()
        self.calibrate_weights()

    def calibrate_weights(self) -> None:
        """Weights are static: their per-channel max is their range."""
        for qs in self.quantizers.values():
            for wname in self.weight_names:
                key = _wkey(wname)
                if key in qs and qs[key].desc.block_size is None:
                    w = self.get_parameter(wname).detach()
                    q = qs[key]
                    q.reset_calibration()
                    q.enable_calib()
                    q._calibrator.collect(w)
                    q.disable_calib()
                    q.load_calib_amax("max")

    # ---------------------------------------------------------------- forward helpers
    def _float_dtype(self) -> Optional[torch.dtype]:
        f = get_format(self.active_format)
        return _FLOAT_DTYPES.get(f.float_dtype) if f.is_float else None

    def quant_input(self, x: torch.Tensor, i: int = 0) -> torch.Tensor:
        if self.calibrating:
            for qs in self.quantizers.values():
                if f"input{i}" in qs and self.input_mask[i]:
                    qs[f"input{i}"](x)
            return x
        dt = self._float_dtype()
        if dt is not None:
            return fake_float_cast(x, dt)
        qs = self._active()
        if qs is None or f"input{i}" not in qs or not self.input_mask[i]:
            return x
        return qs[f"input{i}"](x)

    def quant_weight(self, w: torch.Tensor, name: str = "weight") -> torch.Tensor:
        if self.calibrating:
            return w
        dt = self._float_dtype()
        if dt is not None:
            return fake_float_cast(w, dt)
        qs = self._active()
        key = _wkey(name)
        if qs is None or key not in qs:
            return w
        return qs[key](w)

    def quant_output(self, y: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            if self.quantize_output:
                for qs in self.quantizers.values():
                    if "output" in qs:
                        qs["output"](y)
            return y
        dt = self._float_dtype()
        if dt is not None:
            return fake_float_cast(y, dt)
        qs = self._active()
        if qs is None or not self.quantize_output or "output" not in qs:
            return y
        return qs["output"](y)

    @classmethod
    def set_default_quant_desc_input(cls, desc: QuantDescriptor) -> None:
        cls._default_desc_input = desc

    @classmethod
    def set_default_quant_desc_weight(cls, desc: QuantDescriptor) -> None:
        cls._default_desc_weight = desc

    def extra_repr(self) -> str:  # shown after the float module's own repr
        base = super().extra_repr() if hasattr(super(), "extra_repr") else ""
        return f"{base}, format={self.active_format}, backend={self.backend}".lstrip(", ")


def _quant_kwargs(kwargs: dict) -> dict:
    keys = ("backend", "formats", "calib_method", "quant_desc_input", "quant_desc_weight")
    return {k: kwargs.pop(k) for k in keys if k in kwargs}


