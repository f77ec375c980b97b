"""Calibrators: max (per tensor / per channel) and histogram (entropy, percentile, mse).

Numerics are checked against small, independent numpy references: a per-candidate loop written the
way pytorch-quantization writes it (with ``scipy.stats.entropy``) for the KL search, a brute-force
loop for the MSE search, and ``np.histogram`` / ``np.percentile`` for the histogram itself.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from mixq.errors import CalibrationError
from mixq.quant.calibrators import MaxCalibrator, make_calibrator
from mixq.quant.descriptor import QuantDescriptor
from mixq.quant.histogram import HISTOGRAM_METHODS, HistogramCalibrator, _candidates, _kl_divergences, _mse_errors
from mixq.quant.quantizer import TensorQuantizer
from mixq.quant.tensor_quant import affine_qparams

HIST_METHODS = ("entropy", "percentile", "mse")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(kind: str, n: int = 50_000, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    if kind == "normal":
        return torch.randn(n, generator=g)
    if kind == "relu":
        return torch.relu(torch.randn(n, generator=g))
    if kind == "laplace":
        u = torch.rand(n, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    if kind == "uniform_outlier":
        return torch.cat([torch.rand(n, generator=g), torch.tensor([10.0])])
    raise ValueError(kind)


# ----------------------------------------------------------------- numpy references
def ref_kl(bins: np.ndarray, i: int, levels: int) -> float:
    """KL(p || q) for ``i`` kept bins, written as pytorch-quantization's loop body."""
    p = bins[:i].copy()
    p[-1] += bins[i:].sum()
    level = np.digitize(np.arange(i), np.linspace(0, i, levels + 1)) - 1
    nonzero = bins[:i] > 0
    sums = np.bincount(level, weights=bins[:i], minlength=levels)
    count = np.bincount(level[nonzero], minlength=levels)
    q = np.where(nonzero, sums[level] / np.maximum(count[level], 1), 0.0)
    return float(scipy_entropy(p, q))


def ref_entropy_amax(hist: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool,
                     start_bin: int, stride: int) -> tuple[float, np.ndarray]:
    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    levels = 2 ** (num_bits - 1 + int(unsigned))
    cands = list(range(start_bin, len(bins) + 1, stride))
    kls = np.array([ref_kl(bins, i, levels) for i in cands])
    last_argmin = len(kls) - 1 - int(np.argmin(kls[::-1]))
    return float(edges[cands[last_argmin]]), kls


def ref_mse_errors(hist: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool,
                   start_bin: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    centers = (edges[:-1] + edges[1:]) / 2
    hi = 2 ** (num_bits - 1 + int(unsigned)) - 1
    lo = 0 if unsigned else -hi
    amaxes = edges[start_bin::stride]
    errors = []
    for amax in amaxes:
        step = amax / hi
        errors.append(np.sum(hist * (np.clip(np.round(centers / step), lo, hi) * step - centers) ** 2))
    return amaxes, np.array(errors)


def ref_percentile_amax(hist: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    idx = np.flatnonzero(np.cumsum(hist) >= percentile / 100 * hist.sum())[0]
    return float(edges[idx + 1])


def _calibrated(x: torch.Tensor, num_bins: int = 2048, *more: torch.Tensor) -> HistogramCalibrator:
    calib = HistogramCalibrator(num_bins=num_bins)
    for batch in (x, *more):
        calib.collect(batch)
    return calib


# ----------------------------------------------------------------- max calibrator
def test_max_calibrator_per_tensor_matches_numpy() -> None:
    batches = [torch.randn(8, 3, 5, generator=_gen(s)) * (s + 1) for s in range(3)]
    calib = MaxCalibrator()
    for b in batches:
        calib.collect(b)
    ref = np.stack([b.numpy() for b in batches])
    assert calib.num_batches == 3
    assert calib.compute_amax().item() == np.abs(ref).max()
    lo, hi = calib.compute_range()
    assert (lo.item(), hi.item()) == (ref.min(), ref.max())


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_max_calibrator_per_channel_matches_numpy(axis: int) -> None:
    batches = [torch.randn(4, 3, 5, generator=_gen(s)) * torch.arange(1.0, 6.0) for s in range(3)]
    calib = MaxCalibrator(axis=axis)
    for b in batches:
        calib.collect(b)
    ref = np.stack([b.numpy() for b in batches])  # batch dim in front: reduce it too
    others = tuple(d for d in range(ref.ndim) if d != (axis % 3) + 1)
    amax = calib.compute_amax()
    assert amax.dim() == 3 and amax.numel() == batches[0].shape[axis]  # broadcastable against the input
    np.testing.assert_array_equal(amax.flatten().numpy(), np.abs(ref).max(axis=others))
    lo, hi = calib.compute_range()
    np.testing.assert_array_equal(lo.flatten().numpy(), ref.min(axis=others))
    np.testing.assert_array_equal(hi.flatten().numpy(), ref.max(axis=others))


# ----------------------------------------------------------------- failures
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("make", [MaxCalibrator, lambda: MaxCalibrator(axis=0), HistogramCalibrator])
def test_non_finite_input_raises(make, bad: float) -> None:
    calib = make()
    x = torch.randn(4, 6, generator=_gen())
    x[2, 3] = bad
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        calib.collect(x)
    assert calib.num_batches == 0  # nothing half-collected


@pytest.mark.parametrize("make", [MaxCalibrator, lambda: MaxCalibrator(axis=0), HistogramCalibrator])
def test_empty_calibrator_raises(make) -> None:
    calib = make()
    if isinstance(calib, HistogramCalibrator):
        calib.collect(torch.empty(0))  # an empty batch is not data
    with pytest.raises(CalibrationError, match="saw no data"):
        calib.compute_amax()
    with pytest.raises(CalibrationError, match="saw no data"):
        calib.compute_range()


@pytest.mark.parametrize("method", HIST_METHODS)
def test_histogram_is_per_tensor_only(method: str) -> None:
    with pytest.raises(CalibrationError, match="per-tensor.*'max'"):
        make_calibrator(method, axis=0)


def test_make_calibrator_kinds() -> None:
    assert isinstance(make_calibrator("max", axis=1), MaxCalibrator)
    calib = make_calibrator("entropy", num_bins=512)
    assert isinstance(calib, HistogramCalibrator) and calib.num_bins == 512


def test_unknown_method_lists_valid_ones() -> None:
    calib = _calibrated(torch.randn(100, generator=_gen()))
    with pytest.raises(CalibrationError) as info:
        calib.compute_amax(method="entropi")
    assert "'entropi'" in str(info.value) and "Did you mean 'entropy'" in str(info.value)
    assert all(m in str(info.value) for m in HISTOGRAM_METHODS)


@pytest.mark.parametrize("options", [dict(percentile=0.0), dict(percentile=100.5), dict(start_bin=0),
                                     dict(stride=0), dict(num_bits=1)])
def test_bad_options_raise(options: dict) -> None:
    calib = _calibrated(torch.randn(100, generator=_gen()))
    with pytest.raises(CalibrationError):
        calib.compute_amax(method="entropy", **options)


@pytest.mark.parametrize("num_bins", [0, -3, 2.5, True])
def test_bad_num_bins_raises(num_bins) -> None:
    with pytest.raises(CalibrationError, match="num_bins"):
        HistogramCalibrator(num_bins=num_bins)


# ----------------------------------------------------------------- the histogram
def test_histogram_counts_match_numpy() -> None:
    x = _data("normal", 20_000)
    calib = _calibrated(x, 512)
    ref, edges = np.histogram(x.abs().numpy(), bins=512, range=(0.0, float(x.abs().max())))
    np.testing.assert_allclose(calib.bin_edges, edges, rtol=1e-6)  # numpy makes float32 edges
    # float32 division may move a value sitting on an edge into the neighbouring bin; nothing more.
    assert calib.hist.sum() == x.numel()
    assert np.abs(calib.hist - ref).sum() <= 1e-3 * x.numel()


@pytest.mark.parametrize("scale", [3.0, 500.0])  # 3x: edges extended; 500x: neighbours merged
def test_growing_range_matches_one_batch(scale: float) -> None:
    small = torch.randn(20_000, generator=_gen(1))
    big = torch.randn(20_000, generator=_gen(2)) * scale
    first_width = _calibrated(small).bin_width
    grown = _calibrated(small, 2048, big)
    whole = _calibrated(torch.cat([small, big]))
    assert grown.hist.sum() == whole.hist.sum() == 40_000
    if scale == 3.0:
        assert grown.bin_width == first_width and len(grown.hist) > 2048
    else:
        assert len(grown.hist) <= 2048
    width = max(grown.bin_width, whole.bin_width)
    for p in (50.0, 90.0, 99.0, 99.9):
        a = grown.compute_amax("percentile", percentile=p).item()
        b = whole.compute_amax("percentile", percentile=p).item()
        assert abs(a - b) <= width * 1.001, (p, a, b, width)
    assert grown.compute_amax("max").item() == whole.compute_amax("max").item()


def test_extension_keeps_old_counts_exactly() -> None:
    small = torch.rand(5_000, generator=_gen(1))
    big = torch.rand(5_000, generator=_gen(2)) * 2.5
    calib = _calibrated(small)
    before = calib.hist
    calib.collect(big)
    after_big_only = np.histogram(big.numpy(), bins=calib.bin_edges)[0]
    assert np.abs(calib.hist[: before.size] - before - after_big_only[: before.size]).sum() <= 5
    assert calib.hist.sum() == 10_000


def test_zeros_then_data() -> None:
    calib = _calibrated(torch.zeros(10))
    assert all(calib.compute_amax(m).item() == 0.0 for m in HISTOGRAM_METHODS)
    calib.collect(torch.tensor([0.0, 1.0, -2.0]))
    assert calib.hist[0] == 11 and calib.hist.sum() == 13
    assert calib.compute_amax("max").item() == 2.0
    assert calib.compute_amax("percentile", percentile=100.0).item() == pytest.approx(2.0)


def test_reset_keeps_num_bins() -> None:
    calib = _calibrated(torch.randn(100, generator=_gen()), 256)
    calib.reset()
    assert calib.num_bins == 256 and calib.num_batches == 0 and calib.hist.size == 0


# ----------------------------------------------------------------- percentile
def test_percentile_of_arange() -> None:
    calib = _calibrated(torch.arange(100.0))
    assert calib.compute_amax("percentile", percentile=90.0).item() == pytest.approx(89.0, abs=1.0)


@pytest.mark.parametrize("percentile", [50.0, 99.0, 99.99, 100.0])
def test_percentile_matches_numpy(percentile: float) -> None:
    x = _data("laplace", 20_000)
    calib = _calibrated(x)
    amax = calib.compute_amax("percentile", percentile=percentile)
    assert amax.dim() == 0 and amax.dtype == torch.float32
    assert amax.item() == pytest.approx(ref_percentile_amax(calib.hist, calib.bin_edges, percentile), rel=1e-6)
    assert abs(amax.item() - np.percentile(x.abs().numpy(), percentile)) <= calib.bin_width * 1.001


# ----------------------------------------------------------------- entropy
def test_entropy_ignores_a_lone_outlier() -> None:
    calib = _calibrated(_data("uniform_outlier", 100_000))
    amax = calib.compute_amax("entropy").item()
    assert 0.9 < amax < 1.1


@pytest.mark.parametrize("kind", ["normal", "relu", "laplace", "uniform_outlier"])
@pytest.mark.parametrize("num_bits,unsigned,start_bin,stride",
                         [(8, False, 128, 1), (4, True, 16, 3), (6, False, 100, 7), (10, False, 64, 5)])
def test_entropy_matches_reference_loop(kind: str, num_bits: int, unsigned: bool, start_bin: int, stride: int) -> None:
    calib = _calibrated(_data(kind, 20_000), 512)
    ref_amax, ref_kls = ref_entropy_amax(calib.hist, calib.bin_edges, num_bits, unsigned, start_bin, stride)
    bins = calib.hist
    bins[0] = bins[1]
    kls = _kl_divergences(bins, _candidates(bins.size, start_bin, stride), 2 ** (num_bits - 1 + int(unsigned)))
    np.testing.assert_allclose(kls, ref_kls, rtol=1e-7, atol=1e-12)
    amax = calib.compute_amax("entropy", num_bits=num_bits, unsigned=unsigned, start_bin=start_bin, stride=stride)
    assert amax.item() == pytest.approx(ref_amax, rel=1e-6)


# ----------------------------------------------------------------- mse
@pytest.mark.parametrize("outlier", [256.0, 300.0])
def test_mse_clips_a_lone_outlier_and_keeps_the_bulk(outlier: float) -> None:
    # 51,200 values spread evenly over 0..255 plus one outlier. Covering the outlier costs every value
    # a coarser step (error ~ step^2 / 12 each, 51k times); clipping it costs (outlier - amax)^2 once.
    # So MSE clips it and lands within a step (255 / 127 ~ 2) of the bulk's top, 255, while "max"
    # returns the outlier.
    x = torch.cat([torch.arange(256.0).repeat(200), torch.tensor([outlier])])
    calib = _calibrated(x)
    amax = calib.compute_amax("mse").item()
    assert calib.compute_amax("max").item() == outlier
    assert 253.0 <= amax <= 255.5
    amaxes, errors = ref_mse_errors(calib.hist, calib.bin_edges, 8, False, 128, 1)
    assert errors[np.argmin(np.abs(amaxes - amax))] <= errors.min() * (1 + 1e-5)


@pytest.mark.parametrize("kind", ["normal", "relu", "uniform_outlier"])
# 8 and 4 bits: fewer codes than bins (errors summed per code); 10 bits: 1023 codes > 512 bins (direct).
@pytest.mark.parametrize("num_bits,unsigned,start_bin,stride", [(8, False, 128, 1), (4, True, 16, 3), (10, False, 64, 5)])
def test_mse_matches_reference_loop(kind: str, num_bits: int, unsigned: bool, start_bin: int, stride: int) -> None:
    calib = _calibrated(_data(kind, 20_000), 512)
    amax = calib.compute_amax("mse", num_bits=num_bits, unsigned=unsigned, start_bin=start_bin, stride=stride).item()
    amaxes, errors = ref_mse_errors(calib.hist, calib.bin_edges, num_bits, unsigned, start_bin, stride)
    ours = _mse_errors(calib.hist, _candidates(calib.hist.size, start_bin, stride), num_bits, unsigned)
    np.testing.assert_allclose(ours * calib.bin_width**2, errors, rtol=1e-5)
    chosen = int(np.argmin(np.abs(amaxes - amax)))
    assert amaxes[chosen] == pytest.approx(amax, rel=1e-6)  # a candidate edge
    assert errors[chosen] <= errors.min() * (1 + 1e-5)      # and the best one, up to float32 near-ties


# ----------------------------------------------------------------- asymmetric ranges
@pytest.mark.parametrize("method", HISTOGRAM_METHODS)
def test_compute_range_clips_min_max_to_amax(method: str) -> None:
    x = torch.cat([torch.randn(20_000, generator=_gen()) + 1.0, torch.tensor([-30.0])])
    calib = _calibrated(x)
    lo, hi = calib.compute_range(method=method, percentile=99.9)
    assert lo.dim() == hi.dim() == 0
    if method == "max":
        assert (lo.item(), hi.item()) == (x.min().item(), x.max().item())
        return
    amax = calib.compute_amax(method=method, percentile=99.9, unsigned=False).item()
    assert amax < 30.0 or method == "mse"
    assert lo.item() == pytest.approx(max(x.min().item(), -amax))
    assert hi.item() == pytest.approx(min(x.max().item(), amax))


# ----------------------------------------------------------------- TensorQuantizer end to end
@pytest.mark.parametrize("asymmetric", [False, True], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("method", HIST_METHODS)
def test_tensor_quantizer_histogram_calibration(method: str, asymmetric: bool) -> None:
    desc = QuantDescriptor(calib_method=method, asymmetric=asymmetric, unsigned=asymmetric, percentile=99.9)
    quantizer = TensorQuantizer(desc)
    batches = [torch.randn(64, 32, generator=_gen(s)) + (0.5 if asymmetric else 0.0) for s in range(3)]
    quantizer.enable_calib()
    quantizer.disable_quant()
    for b in batches:
        assert torch.equal(quantizer(b), b)  # calibration passes the tensor through
    quantizer.load_calib_amax()
    quantizer.disable_calib()
    quantizer.enable_quant()

    reference = HistogramCalibrator()
    for b in batches:
        reference.collect(b)
    x = torch.cat(batches)
    y = quantizer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    if asymmetric:
        lo, hi = reference.compute_range(method=method, num_bits=8, percentile=99.9)
        scale, zero_point = affine_qparams(lo, hi, 8)
        assert torch.allclose(quantizer.scale, scale) and torch.equal(quantizer.zero_point, zero_point)
        codes = y / scale + zero_point
        assert codes.min() >= -1e-3 and codes.max() <= 255 + 1e-3
    else:
        amax = reference.compute_amax(method=method, num_bits=8, percentile=99.9)
        assert quantizer.amax.item() == amax.item()
        scale = amax / 127
        codes = y / scale
        assert codes.abs().max() <= 127 + 1e-3
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the integer grid
    inside = (y - x).abs() <= scale / 2 + 1e-6
    assert inside.float().mean() > 0.99  # only the clipped tail is off by more than half a step
    assert ((y - x) ** 2).mean() < 0.01 * (x**2).mean()
