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
