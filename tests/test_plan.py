"""QuantPlan: JSON round trip, resolution against a model, and the errors users see."""
from __future__ import annotations

import json

import pytest
import torch

import mixq
from mixq.errors import PlanError, UnknownBackendError, UnknownFormatError, UnsupportedFormatError
from mixq.plan import QuantPlan

from zoo import build


def test_json_round_trip(tmp_path):
    plan = QuantPlan(backend="tensorrt", default="fp8_e4m3", layers={"fc": "int4_wo", "stem": "fp32"},
                     calib_method="entropy")
    path = plan.save(tmp_path / "plan.json")
    assert QuantPlan.load(path) == plan
    assert json.loads(path.read_text()) == {"backend": "tensorrt", "default": "fp8_e4m3",
                                            "layers": {"fc": "int4_wo", "stem": "fp32"}, "calib_method": "entropy"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_default_applies_only_where_the_backend_can_run_it():
    model, _, x = build("residual")
    kinds = {l.name: l.kind for l in mixq.inventory(model, x)}
    resolved = QuantPlan(default="int4_wo").resolve(kinds)
    assert resolved["fc"] == "int4_wo"
    assert all(f == "fp32" for n, f in resolved.items() if n != "fc")


def test_missing_layer_suggests_nearest_names():
    model, calib, _ = build("residual")
    with pytest.raises(PlanError, match=r"'layer1\.conv3' \(Did you mean 'layer1\.conv2', 'layer1\.conv1'"):
        mixq.quantize(model, QuantPlan(layers={"layer1.conv3": "fp32"}), calib_data=calib)


def test_explicit_unsupported_format_names_layer_and_options():
    model, calib, _ = build("residual")
    with pytest.raises(UnsupportedFormatError, match=r"'int4_wo' for layer 'stem'.*supports fp32, int8"):
        mixq.quantize(model, QuantPlan(layers={"stem": "int4_wo"}), calib_data=calib)


@pytest.mark.parametrize("bad, err, match", [
    ({"default": "int9"}, UnknownFormatError, "known formats are fp32, fp16, bf16, int8, fp8_e4m3, int4_wo"),
    ({"backend": "tensorrtt"}, UnknownBackendError, "Did you mean 'tensorrt'"),
    ({"layers": {"fc": "fp9"}}, UnknownFormatError, "unknown format 'fp9'"),
    ({"calib_method": "kl"}, PlanError, "valid methods are max, entropy, percentile, mse"),
    ({"default": "int8", "extra": 1}, PlanError, "unknown plan key"),
])
def test_bad_plan_values(bad, err, match):
    with pytest.raises(err, match=match):
        QuantPlan.from_dict(bad)


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(PlanError, match="not valid JSON"):
        QuantPlan.from_json("{nope")
    with pytest.raises(PlanError, match="does not exist"):
        QuantPlan.load(tmp_path / "absent.json")
    with pytest.raises(PlanError, match="JSON object"):
        QuantPlan.from_json("[1, 2]")


def _residual_kinds() -> dict[str, str]:
    model, _, x = build("residual")
    return {l.name: l.kind for l in mixq.inventory(model, x)}


def test_realisation_says_what_a_plan_runs_and_why_units_fall_back():
    kinds = _residual_kinds()
    assert list(kinds.values()).count("conv") == 6 and len(kinds) == 10
    r = QuantPlan(default="int4_wo").realisation(kinds)
    assert r.summary() == "int4_wo on 1 of 10 units; 9 stay fp32 because ort-cpu runs int4_wo only on linear"
    assert r.label == "int4_wo on 1 of 10 units" and not r.complete
    assert r.counts == {"fp32": 9, "int4_wo": 1}
    assert set(r.fallback) == set(kinds) - {"fc"}
    assert r.fallback["layer1.add"] == "ort-cpu cannot run int4_wo on add units"

    r = QuantPlan(default="int8").realisation(kinds)
    assert (r.summary(), r.label, r.counts, r.fallback) == ("int8 on all 10 units", "all-int8", {"int8": 10}, {})

    r = QuantPlan(default="int4_wo", layers={"stem": "int8", "layer1.add": "fp32"}).realisation(kinds)
    assert r.summary() == ("int4_wo on 1 of 10 units; fp32 on 1 named in the plan; int8 on 1 named in the plan; "
                           "7 stay fp32 because ort-cpu runs int4_wo only on linear")
    assert r.counts == {"fp32": 8, "int8": 1, "int4_wo": 1}

    r = QuantPlan(backend="tensorrt", default="fp8_e4m3").realisation(kinds)
    assert r.summary() == ("fp8_e4m3 on 9 of 10 units; 1 stays fp32 because tensorrt runs fp8_e4m3 only on "
                           "conv, conv_transpose, linear, matmul, add")
    assert r.fallback == {"pool": "tensorrt cannot run fp8_e4m3 on avgpool units"}
    d = json.loads(json.dumps(r.to_dict()))
    assert d["label"] == "fp8_e4m3 on 9 of 10 units" and d["counts"] == {"fp32": 1, "fp8_e4m3": 9}


RUNS = ("no unit of the model can run '{f}' on backend 'ort-cpu' (the model's units: conv (6), add (2), avgpool (1), "
        "linear (1)); ort-cpu runs: int8 on conv, add, avgpool, linear; int4_wo on linear. Choose one of those "
        "formats or another backend.")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp16", "bf16"])
def test_uniform_format_no_unit_can_run_is_an_error(fmt):
    model, calib, _ = build("residual")
    with pytest.raises(UnsupportedFormatError) as err:
        mixq.quantize(model, fmt, backend="ort-cpu", calib_data=calib)
    assert str(err.value) == RUNS.format(f=fmt)
    q = mixq.quantize(model, "int8", calib_data=calib, formats=["int4_wo"])
    with pytest.raises(UnsupportedFormatError, match="ort-cpu runs: int8 on conv"):
        mixq.set_plan(q, fmt)
    assert q.mixq.realisation.label == "all-int8"
    mixq.set_plan(q, "int4_wo")
    assert q.mixq.realisation.summary() == "int4_wo on 1 of 10 units; 9 stay fp32 because ort-cpu runs int4_wo only on linear"
    with pytest.raises(UnsupportedFormatError, match="no unit of the model can run"):
        QuantPlan(default=fmt, layers={"fc": "int8"}).resolve(_residual_kinds())
