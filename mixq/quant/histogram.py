"""Histogram calibration: entropy (KL divergence), percentile and MSE ranges from a histogram of |x|.

``HistogramCalibrator`` accumulates a histogram of absolute values over ``[0, running amax]``
the way pytorch-quantization's calibrator does, and its entropy search is pytorch-quantization's
(TensorRT's) KL search, so their users get the same entropy ranges. Percentile and MSE return the
right edge of the chosen bin. The histogram:

- the first non-zero batch fixes the bin width (``amax / num_bins``);
- a later batch with a larger ``amax`` extends the edges with the same width, so the old counts
  keep their bins and nothing is re-estimated;
- if that would make more than ``_GROWTH_FACTOR * num_bins`` bins, neighbouring bins are merged
  ``k`` at a time (the coarse edges are a subset of the fine ones, so the merge is exact too) and
  the histogram is back to at most ``num_bins`` bins.

The searches over candidate ranges (about 1,900 for 2,048 bins) are vectorised: the KL divergence
or squared error of every candidate comes from prefix sums over its quantization levels instead of
a Python loop over its bins.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from mixq.errors import CalibrationError, did_you_mean
from mixq.quant.calibrators import Calibrator, check_finite
from mixq.quant.tensor_quant import fake_tensor_quant

HISTOGRAM_METHODS = ("entropy", "percentile", "mse", "max")

# Bins may grow to this many times ``num_bins`` (by extension) before neighbours are merged.
_GROWTH_FACTOR = 4
# Elements per block in the vectorised candidate searches (bounds memory to a few tens of MB).
_BLOCK = 1 << 20


class HistogramCalibrator(Calibrator):
    """Histogram of |x| for the entropy, percentile and MSE calibration methods (per tensor only).

    Args:
        num_bins: bins of the first histogram; the range grows with the same bin width afterwards.
        axis: must be None; histogram calibration is per tensor.

    Raises:
        CalibrationError: ``axis`` is not None, or ``num_bins`` is not a positive integer.
    """

    def __init__(self, num_bins: int = 2048, axis: Optional[int] = None) -> None:
        if axis is not None:
            raise CalibrationError(
                f"histogram calibration is per-tensor, but got axis={axis}; use calib_method 'max' "
                "for per-channel ranges (or axis=None for a per-tensor histogram)."
            )
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise CalibrationError(f"num_bins must be a positive integer (2048 is usual), but got {num_bins!r}.")
        super().__init__(axis)
        self.num_bins = num_bins
        self._hist: Optional[np.ndarray] = None  # float64 counts; bin k holds |x| in [k*w, (k+1)*w)
        self._width = 0.0
        self._zeros = 0.0  # |x| == 0 values seen before a non-zero value fixed the bin width
        self._min = math.inf
        self._max = -math.inf

    def observed_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) of everything collected."""
        return torch.tensor(float(self._min)), torch.tensor(float(self._max))

    def reset(self) -> None:
        """Forget everything collected, keeping ``num_bins``."""
        self.__init__(num_bins=self.num_bins, axis=self.axis)

    # ----------------------------------------------------------------- the histogram
    @property
    def hist(self) -> np.ndarray:
        """A copy of the counts (empty when only zeros or nothing were seen)."""
        return np.zeros(0) if self._hist is None else self._hist.copy()

    @property
    def bin_edges(self) -> np.ndarray:
        """Edges of the bins of ``hist`` (``len(hist) + 1`` values starting at 0)."""
        n = 0 if self._hist is None else self._hist.size
        return np.arange(n + 1, dtype=np.float64) * self._width

    @property
    def bin_width(self) -> float:
        """Width of every bin (0 before the first non-zero value)."""
        return self._width

    def collect(self, x: torch.Tensor) -> None:
        """Add the absolute values of ``x`` to the histogram; empty tensors are ignored.

        Args:
            x: any float tensor (any device); only |x| goes into the histogram.

        Raises:
            CalibrationError: ``x`` holds NaN or Inf.
        """
        x = x.detach()
        if x.numel() == 0:
            return
        check_finite(x)
        x = x.float()
        lo, hi = float(x.min()), float(x.max())
        self._min, self._max = min(self._min, lo), max(self._max, hi)
        amax = max(-lo, hi)
        self.num_batches += 1
        if amax == 0.0:
            if self._hist is None:
                self._zeros += x.numel()
            else:
                self._hist[0] += x.numel()
            return
        if self._hist is None:
            self._width = amax / self.num_bins
            self._hist = np.zeros(self.num_bins, dtype=np.float64)
            self._hist[0] += self._zeros
            self._zeros = 0.0
        elif amax > self._hist.size * self._width:
            self._grow(amax)
        n = self._hist.size
        idx = torch.clamp(torch.floor(x.abs().flatten() / self._width), 0, n - 1).long()
        self._hist += torch.bincount(idx, minlength=n).cpu().numpy()

    def _grow(self, amax: float) -> None:
        """Extend the range to cover ``amax`` with the same bin width, merging bins if there get too many."""
        n_old = self._hist.size
        needed = _bins_to_cover(amax, self._width)
        if needed <= _GROWTH_FACTOR * self.num_bins:
            self._hist = np.concatenate([self._hist, np.zeros(needed - n_old)])
            return
        k = math.ceil(needed / self.num_bins)
        self._width *= k
        n = _bins_to_cover(amax, self._width)
        self._hist = np.bincount(np.arange(n_old) // k, weights=self._hist, minlength=n)

    # ----------------------------------------------------------------- ranges
    def compute_amax(self, method: str = "entropy", num_bits: int = 8, unsigned: bool = False,
                     percentile: float = 99.99, start_bin: int = 128, stride: int = 1, **ignored) -> torch.Tensor:
        """Return the symmetric range chosen by ``method`` from the histogram.

        Args:
            method: "entropy" (min KL divergence, TensorRT's method), "percentile", "mse" or "max".
            num_bits: bits of the integer grid the range is chosen for (entropy and mse).
            unsigned: unsigned grid (2^b levels instead of 2^(b-1)) for entropy and mse.
            percentile: the percentage of |x| that must fall below the range ("percentile").
            start_bin: smallest candidate, in bins kept (entropy and mse).
            stride: step between candidates, in bins (entropy and mse).
            ignored: other calibration options, accepted so one set of options fits every calibrator.

        Returns:
            A 0-dim float32 tensor; a bin edge for the histogram methods, 0 if only zeros were seen.

        Raises:
            CalibrationError: unknown method, an option out of range, or no data collected.
        """
        _check_options(method, num_bits, percentile, start_bin, stride)
        self._require_data()
        if method == "max":
            return torch.tensor(max(-self._min, self._max), dtype=torch.float32)
        if self._hist is None:  # only zeros so far
            return torch.tensor(0.0)
        if method == "percentile":
            amax = _percentile_amax(self._hist, self._width, percentile)
        elif method == "entropy":
            amax = _entropy_amax(self._hist, self._width, num_bits, unsigned, start_bin, stride)
        else:
            amax = _mse_amax(self._hist, self._width, num_bits, unsigned, start_bin, stride)
        return torch.tensor(float(amax), dtype=torch.float32)

    def compute_range(self, method: str = "entropy", num_bits: int = 8,
                      **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (min, max) for asymmetric schemes.

        "max" gives the running signed min and max; the histogram methods clip them to
        ``[-amax, amax]`` with ``amax`` chosen on |x| for a signed grid of ``num_bits``.

        Args:
            method: as in ``compute_amax``.
            num_bits: bits of the grid.
            kwargs: options of ``compute_amax`` (``unsigned`` is ignored: |x| is signed data's magnitude).

        Returns:
            Two 0-dim float32 tensors, min <= max.

        Raises:
            CalibrationError: as ``compute_amax``.
        """
        kwargs.pop("unsigned", None)
        amax = self.compute_amax(method=method, num_bits=num_bits, unsigned=False, **kwargs)
        lo = torch.tensor(self._min, dtype=torch.float32)
        hi = torch.tensor(self._max, dtype=torch.float32)
        if method == "max":
            return lo, hi
        return torch.maximum(lo, -amax), torch.minimum(hi, amax)


def _check_options(method: str, num_bits: int, percentile: float, start_bin: int, stride: int) -> None:
    if method not in HISTOGRAM_METHODS:
        raise CalibrationError(
            f"unknown calibration method {method!r}; valid methods are {', '.join(HISTOGRAM_METHODS)}."
            + did_you_mean(str(method), HISTOGRAM_METHODS)
        )
    if not 2 <= num_bits <= 16:
        raise CalibrationError(f"num_bits must be between 2 and 16, but got {num_bits}.")
    if not 0.0 < percentile <= 100.0:
        raise CalibrationError(f"percentile must be in (0, 100], but got {percentile}.")
    if start_bin < 1 or stride < 1:
        raise CalibrationError(f"start_bin and stride must be >= 1, but got start_bin={start_bin}, stride={stride}.")


def _bins_to_cover(amax: float, width: float) -> int:
    """Smallest n with n * width >= amax (guarding against rounding in the division)."""
    n = max(1, math.ceil(amax / width))
    return n + 1 if n * width < amax else n


def _candidates(n: int, start_bin: int, stride: int) -> np.ndarray:
    """Numbers of bins kept by the candidate ranges (pytorch-quantization's ``range(start, n + 1, stride)``)."""
    return np.arange(min(start_bin, n), n + 1, stride)


def _percentile_amax(hist: np.ndarray, width: float, percentile: float) -> float:
    """Right edge of the first bin whose cumulative count reaches ``percentile`` % of all counts."""
    cum = np.cumsum(hist)
    # Compare counts * 100 with percentile * total: exact for integer counts, unlike a normalised CDF.
    idx = int(np.searchsorted(cum * 100.0, percentile * cum[-1], side="left"))
    return min(idx + 1, hist.size) * width


def _entropy_amax(hist: np.ndarray, width: float, num_bits: int, unsigned: bool,
                  start_bin: int, stride: int) -> float:
    """The range (a bin's right edge) whose clipped-and-quantized histogram has the least KL divergence."""
    bins = hist.astype(np.float64)
    if bins.size > 1:
        # pytorch-quantization's heuristic: bin 0 is dominated by exact zeros (ReLU, padding) that
        # every grid represents exactly; giving it its neighbour's count keeps them from steering the KL.
        bins[0] = bins[1]
    cand = _candidates(bins.size, start_bin, stride)
    if bins.sum() == 0.0:
        return float(cand[-1]) * width
    kl = _kl_divergences(bins, cand, 1 << (num_bits - 1 + int(unsigned)))
    # The last of the (numerically) smallest divergences, as pytorch-quantization picks.
    best = kl.min()
    tol = 1e-12 * max(1.0, abs(best)) if np.isfinite(best) else 0.0
    return float(cand[np.flatnonzero(kl <= best + tol)[-1]]) * width


def _kl_divergences(bins: np.ndarray, cand: np.ndarray, levels: int) -> np.ndarray:
    """KL(p || q) for every candidate number of kept bins ``i`` in ``cand`` (inf where q misses p's mass).

    The reference ``p`` is ``bins[:i]`` with the outliers ``bins[i:]`` added to its last bin; ``q`` merges
    ``bins[:i]`` into ``levels`` levels and spreads each level's count evenly over its non-empty bins
    (empty bins stay empty). With ``S_l`` / ``K_l`` the count / non-empty bins of level l, ``P`` the
    bins of ``p`` and ``N`` the total count::

        KL(p || q) = (sum P log P - sum_l S_l log(S_l / K_l) - outliers * log q_last) / N
                     - log N + log(sum bins[:i])

    so each candidate costs one pass over its levels, from prefix sums of counts, of non-empty bins
    and of ``count * log(count)``, instead of a pass over its bins.
    """
    total = bins.sum()
    c = np.concatenate([[0.0], np.cumsum(bins)])
    z = np.concatenate([[0], np.cumsum(bins > 0)])
    blogb = np.concatenate([[0.0], np.cumsum(bins * np.log(np.where(bins > 0, bins, 1.0)))])
    with np.errstate(divide="ignore", invalid="ignore"):
        b_last = bins[cand - 1]
        outliers = total - c[cand]
        p_last = b_last + outliers
        plogp = blogb[cand - 1] + p_last * np.log(np.where(p_last > 0, p_last, 1.0))
        # Level of the last kept bin (bin j is in level floor(j * levels / i)) and q's value there.
        lvl = ((cand - 1) * levels) // cand
        first = -((-lvl * cand) // levels)
        q_last = (c[cand] - c[first]) / np.maximum(z[cand] - z[first], 1)
        cross = outliers * np.log(np.where(q_last > 0, q_last, 1.0))
        # With i <= levels every level holds at most one bin, so q = bins[:i] and the level sum is sum b log b.
        fine = cand <= levels
        cross[fine] += blogb[cand[fine]]
        coarse = np.flatnonzero(~fine)
        l_idx = np.arange(levels + 1)
        rows = max(1, _BLOCK // (levels + 1))
        for s in range(0, coarse.size, rows):
            at = coarse[s:s + rows]
            edges = -((-l_idx * cand[at, None]) // levels)  # first bin of each level: ceil(l * i / levels)
            sums = np.diff(c[edges], axis=1)
            nonzero = np.diff(z[edges], axis=1)
            cross[at] += np.sum(
                np.where(sums > 0, sums * np.log(np.where(sums > 0, sums, 1.0) / np.maximum(nonzero, 1)), 0.0),
                axis=1,
            )
        kl = (plogp - cross) / total - math.log(total) + np.log(np.where(c[cand] > 0, c[cand], 1.0))
    # p has mass where q has none: outliers folded into an empty last bin.
    kl[(outliers > 0) & (b_last == 0)] = np.inf
    return kl


def _mse_amax(hist: np.ndarray, width: float, num_bits: int, unsigned: bool,
              start_bin: int, stride: int) -> float:
    """The range (a bin's right edge) minimising the count-weighted squared error of fake-quantizing bin centers."""
    cand = _candidates(hist.size, start_bin, stride)
    return float(cand[int(np.argmin(_mse_errors(hist, cand, num_bits, unsigned)))]) * width


def _mse_errors(hist: np.ndarray, cand: np.ndarray, num_bits: int, unsigned: bool) -> np.ndarray:
    """Count-weighted squared error of fake-quantizing the bin centers with ``amax = i`` bins, for each i in cand.

    Everything is in units of the bin width (center ``j + 0.5``, ``amax = i``); the errors scale by
    width^2, which does not move the argmin. Centers are non-negative, so they take codes 0..hi of the
    symmetric narrow grid (or of the unsigned grid), dequantized to ``code * i / hi``.

    When the grid has fewer codes than there are bins, the bins taking code L form a contiguous run,
    ``j >= ceil(((2L - 1) i - hi) / (2 hi))`` (code hi taking the clipped tail too), so each candidate
    costs one pass over its codes with prefix sums of ``w``, ``w c`` and ``w c^2``. Otherwise the
    centers are fake-quantized directly, one candidate per row.
    """
    hi = (1 << (num_bits - 1 + int(unsigned))) - 1
    m = hist.size
    centers = np.arange(m) + 0.5
    errors = np.empty(cand.size)
    if hi + 1 >= m:
        keep = np.flatnonzero(hist > 0)
        c = torch.from_numpy(centers[keep]).float()
        counts = torch.from_numpy(hist[keep]).double()
        rows = max(1, _BLOCK // max(1, keep.size))
        with torch.no_grad():
            for s in range(0, cand.size, rows):
                amax = torch.from_numpy(cand[s:s + rows, None]).float()
                err = (fake_tensor_quant(c[None, :], amax, num_bits, unsigned, True) - c).double()
                errors[s:s + rows] = ((err * err) @ counts).numpy()
        return errors
    w0 = np.concatenate([[0.0], np.cumsum(hist)])
    w1 = np.concatenate([[0.0], np.cumsum(hist * centers)])
    w2 = np.concatenate([[0.0], np.cumsum(hist * centers * centers)])
    codes = np.arange(hi + 1)
    rows = max(1, _BLOCK // (hi + 2))
    for s in range(0, cand.size, rows):
        i = cand[s:s + rows, None]
        first = np.clip(-((hi - (2 * codes - 1) * i) // (2 * hi)), 0, m)  # first bin taking each code
        bounds = np.concatenate([first, np.full((i.shape[0], 1), m)], axis=1)
        n0, n1, n2 = (np.diff(w[bounds], axis=1) for w in (w0, w1, w2))
        value = codes * (i / hi)
        errors[s:s + rows] = np.sum(n2 - 2.0 * value * n1 + value * value * n0, axis=1)
    return errors
