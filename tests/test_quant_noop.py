"""A quantization that does not happen is never reported as one.

The first test reproduces the issue on PyTorch's own nn.TransformerEncoder with mixq's rebuild
turned off (what mixq did before it): module mode swaps linear1/linear2, the native fast path never
calls them, and the "int8" output equals FP32 bit for bit.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from mixq.errors import ConfigError, QuantNotAppliedError
from mixq.plan import QuantPlan
from mixq.quantize import QuantNotAppliedWarning, check_applied

quantize_module = sys.modules["mixq.quantize"]


def transformer_encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def calib(n: int = 3, shape=(8, 10, 32)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.fixture
def without_rebuild(monkeypatch):
    """mixq as it was before it rebuilt PyTorch's attention modules."""
    monkeypatch.setattr(quantize_module, "decompose_attention", lambda model, keep=(): model)


def test_the_fast_path_that_skips_every_quant_module_is_an_error(without_rebuild):
    enc = transformer_encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FallbackWarning, LeftFloatWarning
        with pytest.raises(QuantNotAppliedError, match=r"none of the 4 unit\(s\) the plan quantizes ran during "
                                                       r"calibration.*'layers.0.linear1'.*bypassed: "
                                                       r"nn.TransformerEncoderLayer 'layers.0', 'layers.1'.*fast path"):
            mixq.quantize(enc, "int8", calib_data=calib(), mode="module")
        with pytest.warns(QuantNotAppliedWarning, match="none of the 4"):
            q = mixq.quantize(enc, "int8", calib_data=calib(), on_noop="warn", mode="module")
    st = q.mixq
    assert st.mode == "module" and set(st.kinds) == {f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)}
    assert all(n.bypassed and n.caller == n.unit.rsplit(".", 1)[0] for n in st.not_run)
    x = calib(1)[0]
    with torch.no_grad():
        assert torch.equal(q(x), enc(x))  # the issue: the "int8" model computes FP32 exactly
    real = st.realisation
    assert real.counts == {"fp32": 4} and real.by_default == 0 and not real.complete
    assert real.summary() == ("int8 on 0 of 4 units; 4 quantized by the plan never ran during calibration and "
                              "count as fp32 (layers.0.linear1, layers.0.linear2, layers.1.linear1 and 1 more)")


def test_with_the_rebuild_the_same_encoder_quantizes_and_passes_the_checks():
    enc = transformer_encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = mixq.quantize(enc, "int8", calib_data=calib())
    assert not q.mixq.not_run and q.mixq.realisation.complete
    x = calib(1)[0]
    with torch.no_grad():
        assert not torch.equal(q(x), enc(x))


class Block(nn.Module):
    """Reads its Linear's weight itself (as a fast path does): the quant module is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return torch.relu(F.linear(x, self.fc.weight, self.fc.bias))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(8, 16)
        self.block = Block()
        self.aux = nn.Sequential(nn.Linear(16, 4))  # never called (a training-only head, say)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_a_unit_bypassed_by_the_module_around_it_fails_and_an_unused_one_warns():
    data = calib(2, (4, 8))
    with pytest.raises(QuantNotAppliedError, match=r"2 of the 4 unit\(s\) the plan quantizes never ran.*"
                                                   r"'block.fc' \(bypassed: Block 'block' ran without calling"):
        mixq.quantize(Net().eval(), "int8", calib_data=data, mode="module")
    # Keeping the bypassed unit fp32 is the way out; the unused one is only a warning, named with its cause.
    with pytest.warns(QuantNotAppliedWarning, match=r"1 of the 3 unit\(s\) .*'aux.0' \(never called: "
                                                    r"nn.Sequential 'aux' around them never ran"):
        q = mixq.quantize(Net().eval(), {"layers": {"block.fc": "fp32"}}, calib_data=data, mode="module")
    real = q.mixq.realisation
    assert real.not_run.keys() == {"aux.0"} and real.counts == {"int8": 2, "fp32": 2}
    assert real.summary() == ("int8 on 2 of 4 units; fp32 on 1 named in the plan; 1 quantized by the plan never "
                              "ran during calibration and count as fp32 (aux.0)")
    assert {n.unit: n.bypassed for n in q.mixq.not_run} == {"block.fc": True, "aux.0": False}


def test_calibrate_names_units_that_never_ran():
    q = mixq.prepare(Net().eval(), mode="module")
    mixq.add_formats(q, ["int8"])
    with pytest.warns(QuantNotAppliedWarning, match=r"2 unit\(s\) never ran during calibration.*'block.fc'.*'aux.0'"):
        mixq.calibrate(q, calib(2, (4, 8)))


def test_a_unit_inside_a_branch_that_never_ran_is_not_reached_not_bypassed():
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.out = Gate(), nn.Linear(8, 2)

        def forward(self, x):
            return self.out(x)

    with pytest.warns(QuantNotAppliedWarning, match=r"'gate.fc' \(never called: Gate 'gate' around them never ran"):
        q = mixq.quantize(Gated().eval(), "int8", calib_data=calib(1, (4, 8)), mode="module")
    assert [(n.unit, n.caller, n.bypassed) for n in q.mixq.not_run] == [("gate.fc", "gate", False)]


class Discards(nn.Module):
    """Runs its Linear but returns something computed without it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.used = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        self.fc(x)
        return x * 2 + self.used(x).sum() * 0  # multiplying by zero: a used output that changes nothing


def test_an_output_bit_identical_to_float_is_an_error_by_default():
    data = calib(2, (4, 8))
    with pytest.raises(QuantNotAppliedError, match=r"bit-identical to its output with every unit fp32 on the first "
                                                   r"calibration batch, although 2 quantized unit\(s\) ran"):
        mixq.quantize(Discards().eval(), "int8", calib_data=data)
    with pytest.warns(QuantNotAppliedWarning, match="bit-identical"):
        q = mixq.quantize(Discards().eval(), "int8", calib_data=data, on_noop="warn")
    assert q.mixq.realisation.complete  # every unit ran and is quantized; only the output does not show it
    with pytest.raises(QuantNotAppliedError, match="bit-identical"):
        check_applied(q, data[0])


def test_plans_that_quantize_nothing_or_outputs_without_floats_pass():
    data = calib(2, (4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = mixq.quantize(Discards().eval(), "fp32", calib_data=data)  # an all-fp32 plan quantizes nothing
        check_applied(q, data[0])

    class ArgMax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(x).argmax(1)  # no float tensor to compare: cannot tell, so no error

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixq.quantize(ArgMax().eval(), "int8", calib_data=data)


def test_a_plan_whose_only_quantized_units_never_run_is_an_error():
    data = calib(2, (4, 8))
    plan = QuantPlan(default="fp32", layers={"aux.0": "int8"})
    with pytest.raises(QuantNotAppliedError, match=r"none of the 1 unit\(s\) the plan quantizes ran.*'aux.0'"):
        mixq.quantize(Net().eval(), plan, calib_data=data, mode="module")


def test_the_output_check_restores_the_modules_modes():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    model[2].eval()  # a mixed state must come back as it was
    q = mixq.quantize(model, "int8", calib_data=calib(2, (4, 8)), mode="module")
    assert [m.training for m in q] == [True, True, False] and q.training


def test_bad_on_noop_is_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"unknown on_noop 'ignore'; valid values are error, warn"):
        mixq.quantize(Net().eval(), "int8", calib_data=None, on_noop="ignore")


def test_realisation_counts_units_that_never_ran_as_fp32():
    kinds = {"a": "linear", "b": "linear", "c": "conv"}
    r = QuantPlan(default="int8", layers={"b": "int8"}).realisation(kinds, {"b": "why", "c": "why"})
    assert r.counts == {"int8": 1, "fp32": 2} and r.named == {} and r.not_run == {"b": "why", "c": "why"}
    assert r.by_default == 1 and r.label == "int8 on 1 of 3 units"
    assert r.to_dict()["not_run"] == {"b": "why", "c": "why"}
    plain = QuantPlan(default="int8").realisation(kinds)
    assert plain.not_run == {} and plain.complete


def test_a_saved_model_remembers_the_units_that_never_ran(tmp_path):
    data = calib(2, (4, 8))
    with pytest.warns(QuantNotAppliedWarning):
        q = mixq.quantize(Net().eval(), {"layers": {"block.fc": "fp32"}}, calib_data=data, mode="module")
    mixq.save_quantized(q, tmp_path / "q")
    back = mixq.load_quantized(Net().eval(), tmp_path / "q", calib_data=data)
    assert back.mixq.not_run == q.mixq.not_run
    assert back.mixq.realisation == q.mixq.realisation and back.mixq.realisation.not_run.keys() == {"aux.0"}
