"""QuantDescriptor: how one tensor is quantized (the name pytorch-quantization users know)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from mixq.calib_methods import CALIB_METHODS, check_calib_method  # noqa: F401 (re-exported)
from mixq.errors import ConfigError
from mixq.formats import TensorScheme

@dataclass(frozen=True)
class QuantDescriptor:
    """Describes the quantization of one tensor.

    Attributes:
        num_bits: integer bits (8 or 4); ignored when ``fp8``.
        axis: per-channel axis (0 for conv/linear weights) or None for per-tensor.
        unsigned: unsigned integer grid.
        narrow_range: symmetric grid without the most negative code.
        amax: fixed amax; when set, calibration is not needed.
        calib_method: "max", "entropy", "percentile" or "mse" ("histogram" means "entropy").
        learn_amax: make amax a trainable parameter (for QAT).
        asymmetric: calibrate a [min, max] range with a zero point (unsigned grid).
        fp8: FP8 E4M3 with a per-tensor scale instead of an integer grid.
        block_size: block-wise scales along the last dimension (weight-only int4).
        percentile: the percentile used by ``calib_method="percentile"``.
        num_bins: histogram bins for the histogram methods.
    """

    num_bits: int = 8
    axis: Optional[int] = None
    unsigned: bool = False
    narrow_range: bool = True
    amax: Optional[float] = None
    calib_method: str = "max"
    learn_amax: bool = False
    asymmetric: bool = False
    fp8: bool = False
    block_size: Optional[int] = None
    percentile: float = 99.99
    num_bins: int = 2048

    def __post_init__(self) -> None:
        if self.calib_method == "histogram":
            object.__setattr__(self, "calib_method", "entropy")
        if self.calib_method not in CALIB_METHODS:
            raise ConfigError(
                f"unknown calib_method {self.calib_method!r}; valid methods are {', '.join(CALIB_METHODS)}."
            )
        if not self.fp8 and not 2 <= self.num_bits <= 16:
            raise ConfigError(f"num_bits must be between 2 and 16, but got {self.num_bits}.")
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], but got {self.percentile}.")

    @classmethod
    def from_scheme(cls, scheme: TensorScheme, calib_method: str = "max") -> "QuantDescriptor":
        """Build the descriptor a backend scheme asks for."""
        return cls(num_bits=scheme.num_bits, axis=scheme.axis, unsigned=scheme.unsigned or scheme.asymmetric,
                   narrow_range=scheme.narrow_range, calib_method=calib_method, asymmetric=scheme.asymmetric,
                   fp8=scheme.fp8, block_size=scheme.block_size)

    def replace(self, **changes) -> "QuantDescriptor":
        """Return a copy with some fields changed."""
        return replace(self, **changes)


QUANT_DESC_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8)
QUANT_DESC_8BIT_CONV_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)
QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW = QuantDescriptor(num_bits=8, axis=0)
