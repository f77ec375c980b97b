"""Paired statistics on per-sample scores (numpy only: no torch, so tables and reports can use it).

A quantized model and its FP32 reference are scored on the same evaluation samples, so their
difference is judged on the per-sample differences (a paired test): the samples both get right
or both get wrong cancel, and the interval reflects only the samples the quantization changed.
"""
from __future__ import annotations

import numpy as np

from mixq.errors import ConfigError, MixqError


def check_bootstrap(resamples: int, confidence: float) -> None:
    """Raise ConfigError unless ``resamples >= 0`` and ``0 < confidence < 1``."""
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 0 \
            or not 0.0 < confidence < 1.0:
        raise ConfigError(f"`resamples >= 0` and `0 < confidence < 1` must hold, but got "
                          f"(resamples={resamples!r}, confidence={confidence!r}).")


def paired_bootstrap_ci(diff: np.ndarray, resamples: int = 1000, confidence: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of per-sample differences, by resampling samples.

    Args:
        diff: per-sample paired differences (e.g. FP32 score - quantized score).
        resamples: bootstrap resamples; 0 gives the degenerate interval (mean, mean).
        confidence: coverage of the interval.
        seed: the same seed draws the same resamples for every layer, so intervals are comparable.

    Returns:
        (low, high).

    Raises:
        ConfigError: ``resamples < 0`` or ``confidence`` outside (0, 1).
        MixqError: no difference to resample.
    """
    check_bootstrap(resamples, confidence)
    d = np.asarray(diff, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise MixqError("a bootstrap needs at least one per-sample score.")
    if resamples == 0 or np.all(d == d[0]):
        m = float(d.mean())
        return m, m
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, min(resamples, 2_000_000 // d.size))
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        means[start:start + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
