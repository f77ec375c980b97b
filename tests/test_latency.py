"""LatencyModel plumbing, unit graphs, and the predictors (on synthetic latencies with known structure)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import mixq
from mixq.errors import PlanError, UnknownFormatError, UnsupportedFormatError
from mixq.latency.base import LatencyError, LatencyModel, MeasuredLatency, assignment_of, plan_key
from mixq.latency.graph_edges import unit_graph
from mixq.latency.model import AdditiveLatency, BoundaryLatency, UnitGraph, mape

KINDS = {"a": "conv", "b": "conv", "c": "add", "d": "linear"}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        y = self.conv2(x) + x  # residual: conv1 -> add (skip), conv2 -> add
        z = self.conv3(self.norm(y))  # GroupNorm computes in float: no edge add -> conv3
        return self.fc(torch.flatten(z.mean((2, 3)), 1))


# ----------------------------------------------------------------------------- plans and caching
def test_assignment_forms_agree():
    full = assignment_of({"a": "int8"}, KINDS, "ort-cpu")
    assert full == {"a": "int8", "b": "fp32", "c": "fp32", "d": "fp32"}
    plan = mixq.QuantPlan(backend="ort-cpu", default="fp32", layers={"a": "int8"})
    assert assignment_of(plan, KINDS, "ort-cpu") == full
    assert assignment_of(plan.to_dict(), KINDS, "ort-cpu") == full
    assert assignment_of(mixq.QuantPlan.uniform("int8"), KINDS) == {k: "int8" for k in KINDS}
    assert plan_key(full) == plan_key(dict(reversed(list(full.items()))))


def test_assignment_errors_name_the_problem():
    with pytest.raises(PlanError, match="'aa'.*Did you mean 'a'"):
        assignment_of({"aa": "int8"}, KINDS)
    with pytest.raises(UnknownFormatError):
        assignment_of({"a": "int9"}, KINDS)
    with pytest.raises(UnsupportedFormatError, match="ort-cpu"):
        assignment_of({"a": "fp16"}, KINDS, "ort-cpu")
    with pytest.raises(PlanError, match="for backend 'tensorrt'"):
        assignment_of(mixq.QuantPlan(backend="tensorrt"), KINDS, "ort-cpu")


class CountingLatency(MeasuredLatency):
    def __init__(self) -> None:
        super().__init__(KINDS, "ort-cpu")
        self.calls = 0

    def _measure(self, assignment):
        self.calls += 1
        return {"median_ms": 10.0 + sum(f == "int8" for f in assignment.values()), "p25_ms": 9.0}


def test_measured_latency_caches_by_resolved_plan(tmp_path):
    lat = CountingLatency()
    assert isinstance(lat, LatencyModel)
    seen = []
    lat.listeners.append(lambda a, ms: seen.append((a["a"], ms)))
    plan = mixq.QuantPlan(backend="ort-cpu", default="fp32", layers={"a": "int8"})
    assert lat(plan) == 11.0
    assert lat({"a": "int8"}) == 11.0 and lat({"a": "int8", "b": "fp32"}) == 11.0
    assert lat.calls == 1 and seen == [("int8", 11.0)]
    assert lat.measure_many([{}, {"a": "int8"}, {"b": "int8"}]) == [10.0, 11.0, 11.0]
    assert lat.calls == 3
    assert lat.details({"a": "int8"})["p25_ms"] == 9.0
    lat.save(tmp_path / "m.json")
    again = CountingLatency()
    assert again.load(tmp_path / "m.json") == 3
    assert again({"b": "int8"}) == 11.0 and again.calls == 0
    assert [ms for _, ms in again.records()] == [11.0, 10.0, 11.0]


def test_measured_latency_rejects_a_missing_median():
    class Bad(CountingLatency):
        def _measure(self, assignment):
            return {"mean_ms": 1.0}

    with pytest.raises(LatencyError, match="median_ms"):
        Bad()({})


# ----------------------------------------------------------------------------- unit graph
@pytest.fixture(scope="module")
def block_graph():
    model = Block().eval()
    q = mixq.prepare(model, "ort-cpu")
    return unit_graph(q, torch.randn(2, 3, 8, 8))


def test_unit_graph_edges_follow_data_through_views_only(block_graph):
    g = block_graph
    assert set(g.units) == {"conv1", "conv2", "add", "conv3", "fc"}
    assert set(g.edges) == {("conv1", "conv2"), ("conv1", "add"), ("conv2", "add")}
    assert g.float_inputs == {"conv1", "conv3", "fc"}  # graph input, GroupNorm, mean
    assert g.float_outputs == {"add", "conv3", "fc"}
    assert g.sizes["conv1"] == 2 * 8 * 8 * 8 and g.sizes["fc"] == 2 * 4
    assert ("conv1", ("conv2", "add")) in g.input_groups
    assert UnitGraph.from_dict(g.to_dict()) == g


def test_unit_graph_in_module_mode_traces_with_units_as_leaves():
    model = Block().eval()
    q = mixq.prepare(model, "ort-cpu", mode="module")
    g = unit_graph(q)
    assert set(g.units) == {"conv1", "conv2", "conv3", "fc"}
    assert ("conv1", "conv2") in g.edges  # the residual add is float in module mode: no edge to it


# ----------------------------------------------------------------------------- predictors
def chain_graph(n: int = 8) -> UnitGraph:
    units = tuple(f"u{i}" for i in range(n))
    edges = tuple((units[i], units[i + 1]) for i in range(n - 1)) + ((units[1], units[4]),)
    return UnitGraph(units=units, kinds={u: "conv" for u in units}, edges=edges,
                     sizes={u: 1000 * (1 + i % 3) for i, u in enumerate(units)})


def true_latency(g: UnitGraph, a: dict) -> float:
    """A known ground truth: per-unit savings plus a cost on every float/int8 boundary."""
    own = sum((-1.0 - 0.3 * i) * (a[u] == "int8") for i, u in enumerate(g.units))
    bound = sum(0.8 + 0.2 * (i % 2) for i, (p, c) in enumerate(g.edges) if a[p] != a[c])
    return 30.0 + own + bound


def all_plans(g: UnitGraph):
    for bits in itertools.product(("fp32", "int8"), repeat=len(g.units)):
        yield dict(zip(g.units, bits))


def test_additive_is_exact_on_single_layer_plans_and_wrong_on_partial_ones():
    g = chain_graph()
    base = {u: "fp32" for u in g.units}
    recs = [(base, true_latency(g, base))]
    recs += [(dict(base, **{u: "int8"}), true_latency(g, dict(base, **{u: "int8"}))) for u in g.units]
    add = AdditiveLatency.from_records(g, base, recs)
    for a, ms in recs:
        assert add.predict(a) == pytest.approx(ms)
    plans = list(all_plans(g))
    err = mape([add.predict(a) for a in plans], [true_latency(g, a) for a in plans])
    assert err > 10  # double-counts the boundaries of neighbours quantized together
    with pytest.raises(LatencyError, match="no measured delta"):
        AdditiveLatency(g, base, 1.0, {}).predict(dict(base, u0="int8"))


def test_boundary_model_recovers_a_boundary_cost_structure():
    g = chain_graph()
    plans = list(all_plans(g))
    rng = np.random.default_rng(0)
    train = [plans[i] for i in rng.choice(len(plans), 60, replace=False)]
    b = BoundaryLatency(g).fit([(a, true_latency(g, a)) for a in train])
    pred = [b.predict(a) for a in plans]
    assert mape(pred, [true_latency(g, a) for a in plans]) < 1.0
    coef = b.coefficients()
    assert all(w >= 0 for w in coef["edge"].values())
    assert b({"u3": "int8"}) == pytest.approx(b.predict(dict({u: "fp32" for u in g.units}, u3="int8")))


def test_boundary_model_is_robust_to_noise_and_refits_as_plans_arrive():
    g = chain_graph()
    rng = np.random.default_rng(1)
    plans = list(all_plans(g))
    b = BoundaryLatency(g)
    with pytest.raises(LatencyError, match="no measured plan"):
        b({})
    for i in rng.choice(len(plans), 80, replace=False):
        a = plans[i]
        b.observe(a, true_latency(g, a) * (1 + 0.03 * rng.standard_normal()))
    assert b.num_records == 80
    assert mape([b.predict(a) for a in plans], [true_latency(g, a) for a in plans]) < 3.0
    with pytest.raises(LatencyError, match="fp8_e4m3"):
        b.predict({u: "fp8_e4m3" for u in g.units})
    with pytest.raises(LatencyError, match="positive"):
        b.observe(plans[0], float("nan"))


def test_mape_reference():
    assert mape([110, 90], [100, 100]) == pytest.approx(10.0)
    with pytest.raises(LatencyError):
        mape([], [])


# ----------------------------------------------------------------------------- measured on ONNX Runtime
@pytest.fixture(scope="module")
def ort_latency():
    from mixq.latency.ort import OrtLatency

    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    q = mixq.quantize(Block().eval(), "int8", backend="ort-cpu", calib_data=calib)
    return OrtLatency(q, calib[0][:1], runs=5, warmup=1)


def test_ort_latency_measures_a_plan_once(ort_latency):
    lat = ort_latency
    ms = lat(mixq.QuantPlan.uniform("int8"))
    st = lat.details({u: "int8" for u in lat.kinds})
    assert ms > 0 and st["runs"] == 5 and st["clock"] == "thread"
    assert st["p25_ms"] <= st["median_ms"] <= st["p75_ms"] and st["wall_median_ms"] > 0
    n = len(lat.stats)
    assert lat({u: "int8" for u in lat.kinds}) == ms and len(lat.stats) == n


def test_ort_latency_exports_what_the_plan_says(ort_latency):
    m = ort_latency.onnx_model({"conv1": "int8"})
    ops = [n.op_type for n in m.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert not any(op.endswith("QuantizeLinear") for op in (n.op_type for n in ort_latency.onnx_model({}).graph.node))


def test_ort_latency_rounds_keep_the_median(ort_latency):
    out = ort_latency.measure_many([{"fc": "int8"}, {"conv3": "int8"}], rounds=3)
    st = ort_latency.details({"fc": "int8"})
    assert len(st["rounds_ms"]) == 3 and out[0] == pytest.approx(float(np.median(st["rounds_ms"])))


def test_ort_latency_rejects_other_backends():
    from mixq.latency.ort import OrtLatency

    q = mixq.prepare(Block().eval(), "tensorrt")
    with pytest.raises(LatencyError, match="ort-cpu"):
        OrtLatency(q, torch.randn(1, 3, 8, 8))


def test_time_runs_reference():
    from mixq.latency.ort import time_runs

    st = time_runs(lambda: sum(range(2000)), runs=7, warmup=1, clock="wall")
    assert st["runs"] == 7 and st["min_ms"] <= st["median_ms"] and st["clock"] == "wall"
    with pytest.raises(LatencyError, match="clock"):
        time_runs(lambda: None, 1, 0, clock="cpu")


def test_bench_cli_measures_a_latency_table(tmp_path, monkeypatch):
    import argparse
    import json

    from mixq import cli, cli_bench

    (tmp_path / "mixq_bench_model.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def model():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 12 * 12, 4)).eval()\n"
        "def calib():\n    return [torch.randn(2, 3, 16, 16) for _ in range(2)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = argparse.ArgumentParser()
    cli_bench.register(p.add_subparsers(dest="command"), cli._add_task_args, cli._task, cli._run_dir)
    args = p.parse_args(["bench", "--model", "mixq_bench_model:model", "--calib", "mixq_bench_model:calib",
                         "--runs", "3", "--warmup", "1", "--random", "1", "--run-dir", str(tmp_path / "run")])
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "run" / "bench.json").read_text())["rows"]
    assert [r["plan"] for r in rows][:3] == ["fp32", "all-int8", "int8, first and last layer fp32"]
    assert rows[0]["low_units"] == 0 and rows[1]["low_units"] == rows[1]["units"] == 3
    assert rows[2]["low_units"] == 1 and rows[0]["speedup"] == pytest.approx(1.0)
    assert "| all-int8 | 3/3 |" in (tmp_path / "run" / "bench.md").read_text()


def test_absorption_is_chosen_only_when_the_engine_shows_it():
    g = chain_graph()
    b0 = BoundaryLatency(g)
    enclosed = {"u2", "u3"}  # u1 also feeds u4, u4 has two producers; u0 / u7 touch the graph edge
    assert set(b0._enclosed) >= enclosed and "u0" not in b0._enclosed and "u7" not in b0._enclosed
    a = {u: "int8" for u in g.units} | {"u2": "fp32"}
    assert b0.effective(a)["u2"] == "int8"  # read from and written to int8 units only
    assert b0.effective(a | {"u3": "fp32"})["u2"] == "fp32"

    def absorbing(a):
        return true_latency(g, b0.effective(a))

    rng = np.random.default_rng(2)
    plans = list(all_plans(g))
    train = [plans[i] for i in rng.choice(len(plans), 80, replace=False)]
    for truth, expect in ((absorbing, True), (lambda a: true_latency(g, a), False)):
        b = BoundaryLatency(g).fit([(a, truth(a)) for a in train])
        assert b.chosen["absorb"] is expect
        assert mape([b.predict(a) for a in plans], [truth(a) for a in plans]) < 1.0


def test_prior_pulls_unit_terms_when_data_are_few():
    g = chain_graph(5)
    prior = {(u, "int8"): -2.0 for u in g.units}
    base = {u: "fp32" for u in g.units}
    recs = [(base, 30.0), ({u: "int8" for u in g.units}, 20.0)]
    with_prior = BoundaryLatency(g, prior=prior, absorb=(False,)).fit(recs)
    without = BoundaryLatency(g, absorb=(False,)).fit(recs)
    one = dict(base, u2="int8")
    assert with_prior.coefficients()["unit"]["u2"]["int8"] == pytest.approx(-2.0, abs=0.5)
    assert abs(with_prior.predict(one) - 28.0) < abs(without.predict(one) - 28.0)


def test_measure_many_shuffled_rounds_per_plan():
    lat = CountingLatency()
    out = lat.measure_many([{"a": "int8"}, {"b": "int8"}, {}], rounds=[1, 3, 1], shuffle=True, seed=1)
    assert out == [11.0, 11.0, 10.0] and lat.calls == 5
    assert len(lat.details({"b": "int8"})["rounds_ms"]) == 3 and "rounds_ms" not in lat.details({})
    with pytest.raises(LatencyError, match="rounds"):
        lat.measure_many([{"c": "int8"}], rounds=[1, 2])
