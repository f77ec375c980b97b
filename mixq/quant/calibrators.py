"""Calibrators: collect statistics of a tensor and turn them into a range.

``MaxCalibrator`` keeps running min/max (per tensor or per channel). The histogram calibrators
(entropy, percentile, MSE) live in ``histogram.py``. Every calibrator answers two questions:
``compute_amax()`` for symmetric schemes and ``compute_range()`` for asymmetric ones.
"""
from __future__ import annotations

from typing import Optional

import torch

from mixq.errors import CalibrationError


def check_finite(x: torch.Tensor, where: str = "") -> None:
    """Raise CalibrationError if ``x`` holds NaN or Inf (they would poison every range)."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise CalibrationError(
            f"calibration data holds {bad} NaN/Inf value(s){' at ' + where if where else ''}; "
            "clean the calibration inputs (or the model producing them) so every value is finite."
        )


def reduce_dims(x: torch.Tensor, axis: Optional[int]) -> tuple[int, ...]:
    """Dims to reduce so that only ``axis`` remains (all dims for per-tensor)."""
    if axis is None:
        return tuple(range(x.dim()))
    axis = axis % x.dim()
    return tuple(d for d in range(x.dim()) if d != axis)


class Calibrator:
    """Base: subclasses implement ``collect``, ``compute_amax`` and ``compute_range``."""

    def __init__(self, axis: Optional[int] = None) -> None:
        self.axis = axis
        self.num_batches = 0

    def collect(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute_amax(self, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def compute_range(self, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        self.__init__(axis=self.axis)

    def _require_data(self) -> None:
        if self.num_batches == 0:
            raise CalibrationError(
                "the calibrator saw no data: run calibration batches through the model before computing ranges "
                "(is the calibration loader empty?)."
            )


class MaxCalibrator(Calibrator):
    """Running min and max, per tensor or along ``axis`` (kept as a broadcastable shape)."""

    def __init__(self, axis: Optional[int] = None) -> None:
        super().__init__(axis)
        self._min: Optional[torch.Tensor] = None
        self._max: Optional[torch.Tensor] = None

    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        check_finite(x)
        dims = reduce_dims(x, self.axis)
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        if self._min is None:
            self._min, self._max = lo, hi
        else:
            self._min, self._max = torch.minimum(self._min, lo), torch.maximum(self._max, hi)
        self.num_batches += 1

    def compute_amax(self, **kwargs) -> torch.Tensor:
        self._require_data()
        return torch.maximum(self._min.abs(), self._max.abs())

    def compute_range(self, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data()
        return self._min.clone(), self._max.clone()

    def observed_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) of everything collected."""
        return self.compute_range()


def make_calibrator(method: str, axis: Optional[int] = None, num_bins: int = 2048) -> Calibrator:
    """Return a fresh calibrator for ``method`` ("max" or a histogram method)."""
    if method == "max":
        return MaxCalibrator(axis)
    from mixq.quant.histogram import HistogramCalibrator

    return HistogramCalibrator(num_bins=num_bins, axis=axis)
