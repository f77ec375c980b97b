"""Wiring of quantize / calibrate / set_plan: the chosen calibration method reaches every quantizer,
plans must match the model's calibration, and plan switches move the follower quantizers too."""
from __future__ import annotations

import pytest
import torch

import mixq
from mixq.errors import ConfigError, PlanError
from mixq.quant.graph import QuantFollower, followers, units
from mixq.quant.modules import QuantMixin
from mixq.quantize import applied, switched

from zoo import build


def _skewed_calib(n: int = 4) -> list[torch.Tensor]:
    """Heavy-tailed inputs (normal times log-normal): clipping methods pick ranges well inside the max."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 1, 16, 16, generator=g) * torch.exp(1.5 * torch.randn(8, 1, 16, 16, generator=g))
            for _ in range(n)]


def _ranges(q) -> dict[tuple[str, str, str], tuple]:
    """(module, format, role) -> (amax, scale, zero point) of every activation quantizer holding a range."""
    out = {}
    for name, m in q.named_modules():
        if not isinstance(m, QuantMixin):
            continue
        for fmt, qs in m.quantizers.items():
            for role, t in qs.items():
                if (role.startswith("input") or role == "output") and (t._amax is not None or t._scale is not None):
                    out[(name, fmt, role)] = (t._amax, t._scale, t._zero_point)
    return out


def _same(a: tuple, b: tuple) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


@pytest.mark.parametrize("backend, method, formats", [("ort-cpu", "mse", []),
                                                      ("tensorrt", "entropy", ["fp8_e4m3"])])
def test_calib_method_reaches_every_activation_quantizer(backend, method, formats):
    model, _, _ = build("residual")
    calib = _skewed_calib()
    ref = _ranges(mixq.quantize(model, "int8", backend=backend, calib_data=calib, formats=formats))
    via_quantize = mixq.quantize(model, "int8", backend=backend, calib_data=calib, calib_method=method,
                                 formats=formats)
    via_calibrate = mixq.quantize(model, "int8", backend=backend, calib_data=calib, formats=formats)
    assert mixq.calibrate(via_calibrate, calib, method=method) == len(calib)
    int_keys = [k for k in ref if k[1] == "int8"]
    assert len(int_keys) >= 10
    if backend == "ort-cpu":  # output quantizers moved behind a ReLU are calibrated too
        assert sum(isinstance(via_quantize.get_submodule(k[0]), QuantFollower) for k in int_keys) >= 3
    for q in (via_quantize, via_calibrate):
        got = _ranges(q)
        assert got.keys() == ref.keys()
        assert [k for k in int_keys if _same(ref[k], got[k])] == []  # every int8 range moved
        assert all(_same(ref[k], got[k]) for k in ref if k[1] == "fp8_e4m3")  # fp8 stays max, as documented
        assert q.mixq.calib_method == method and q.mixq.plan.calib_method == method
    a, b = _ranges(via_quantize), _ranges(via_calibrate)
    assert all(_same(a[k], b[k]) for k in a)


def test_recalibration_starts_from_fresh_statistics():
    model, _, _ = build("residual")
    calib = _skewed_calib()
    q = mixq.quantize(model, "int8", backend="tensorrt", calib_data=calib)
    first = _ranges(q)
    mixq.calibrate(q, calib[:2], method="percentile")
    mixq.calibrate(q, calib, method="max")
    again = _ranges(q)
    assert all(_same(first[k], again[k]) for k in first) and q.mixq.calib_method == "max"


def test_unknown_method_is_refused_before_any_work():
    model, calib, _ = build("residual")
    q = mixq.quantize(model, "int8", calib_data=calib)
    before = _ranges(q)

    def loader():
        raise AssertionError("the calibration data was read")
        yield

    with pytest.raises(ConfigError, match="unknown calib_method 'kl'.*max, entropy, percentile, mse"):
        mixq.calibrate(q, loader(), method="kl")
    assert all(_same(before[k], v) for k, v in _ranges(q).items()) and q.mixq.calib_method == "max"
    # quantize checks the name before preparing (a model without units would fail later otherwise).
    with pytest.raises(ConfigError, match="'entrpy'.*Did you mean 'entropy'"):
        mixq.quantize(torch.nn.Sequential(torch.nn.ReLU()), mixq.QuantPlan(), calib_data=calib,
                      calib_method="entrpy")


def test_set_plan_refuses_another_calibration_method():
    model, calib, x = build("residual")
    q = mixq.quantize(model, mixq.QuantPlan(calib_method="max"), calib_data=calib, calib_method="entropy")
    assert q.mixq.calib_method == "entropy" and q.mixq.plan.calib_method == "entropy"
    out = q(x)
    with pytest.raises(PlanError, match=r"'max' calibration but the model was calibrated with 'entropy'.*"
                                        r"mixq.calibrate\(qmodel, calib_data, method='max'\)"):
        mixq.set_plan(q, mixq.QuantPlan(default="fp32", calib_method="max"))
    with pytest.raises(PlanError, match="calibrated with 'entropy'"):
        with applied(q, {"default": "fp32", "calib_method": "max"}):
            pass
    assert torch.equal(q(x), out)  # nothing switched
    # A format name or a dict without calib_method takes the model's method.
    assert set(mixq.set_plan(q, "fp32").values()) == {"fp32"} and q.mixq.plan.calib_method == "entropy"
    mixq.set_plan(q, {"default": "int8"})
    assert torch.equal(q(x), out)
    # Recalibrating with another method carries the active plan along.
    mixq.calibrate(q, calib, method="max")
    assert q.mixq.plan.calib_method == "max"
    mixq.set_plan(q, mixq.QuantPlan(calib_method="max"))


def _follower_formats(q) -> dict[str, str]:
    return {f.owner: f.active_format for f in followers(q)}


def test_plan_switches_move_follower_quantizers():
    model, calib, x = build("residual")
    q = mixq.quantize(model, "int8", backend="ort-cpu", calib_data=calib)
    owners = sorted(_follower_formats(q))
    assert len(owners) >= 3 and set(_follower_formats(q).values()) == {"int8"}
    float_ref = mixq.prepare(model, "ort-cpu")(x)  # the same graph with no quantizer at all
    int8_out = q(x)

    mixq.set_plan(q, "fp32")
    assert set(_follower_formats(q).values()) == {"fp32"}
    assert torch.equal(q(x), float_ref)
    mixq.set_plan(q, mixq.QuantPlan(layers={owners[0]: "fp32"}))
    assert _follower_formats(q) == {o: "fp32" if o == owners[0] else "int8" for o in owners}
    mixq.set_plan(q, "int8")
    assert torch.equal(q(x), int8_out)

    with applied(q, "fp32"):
        assert set(_follower_formats(q).values()) == {"fp32"}
        assert torch.equal(q(x), float_ref)
    assert set(_follower_formats(q).values()) == {"int8"} and torch.equal(q(x), int8_out)

    with switched(q, {owners[1]: "fp32"}):
        assert _follower_formats(q) == {o: "fp32" if o == owners[1] else "int8" for o in owners}
    assert set(_follower_formats(q).values()) == {"int8"} and torch.equal(q(x), int8_out)
    assert units(q)[owners[1]].active_format == "int8"


def test_deepcopy_keeps_an_independent_quant_state():
    import copy

    model, calib, x = build("residual")
    q = mixq.quantize(model, "int8", calib_data=calib, calib_method="percentile")
    dup = copy.deepcopy(q)
    assert dup.mixq is not q.mixq and dup.mixq.calib_method == "percentile" and dup.mixq.kinds == q.mixq.kinds
    assert torch.equal(dup(x), q(x))
    mixq.set_plan(dup, "fp32")
    assert q.mixq.plan.default == "int8" and not torch.equal(dup(x), q(x))
