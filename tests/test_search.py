"""The search core on plain callables: space, budget, baselines against brute force, the study's bookkeeping."""
from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from mixq.errors import ConfigError, UnknownFormatError
from mixq.latency.base import MeasuredLatency, RatioLatency
from mixq.search import Budget, SearchSpace, baselines, pareto_front, run_search
from mixq.search.study import TrialRecord

KINDS = {"conv1": "conv", "conv2": "conv", "add": "add", "conv3": "conv", "fc": "linear"}
DROPS = {"conv1": {"int8": 2.0}, "conv2": {"int8": 0.2}, "add": {"int8": 0.5}, "conv3": {"int8": 0.1},
         "fc": {"int8": 1.0, "int4_wo": 0.3}}
DELTAS = {"conv1": {"int8": -1.0}, "conv2": {"int8": -2.0}, "add": {"int8": -0.2}, "conv3": {"int8": -1.5},
          "fc": {"int8": -0.5, "int4_wo": -0.4}}


def additive_latency(a):
    return 10.0 + sum(DELTAS[u].get(f, 0.0) for u, f in a.items())


def additive_metric(a):
    return 90.0 - sum(DROPS[u].get(f, 0.0) for u, f in a.items())


def all_plans(space):
    names = [(units, choices) for _, units, choices in space.parameters()]
    for combo in itertools.product(*[c for _, c in names]):
        plan = {u: "fp32" for u in space.kinds}
        for (units, _), f in zip(names, combo):
            for u in units:
                plan[u] = f
        yield plan


def test_space_offers_what_the_backend_realises_plus_fp32():
    s = SearchSpace.build(KINDS, "ort-cpu")
    assert s.choices["conv1"] == ("int8", "fp32") and s.choices["fc"] == ("int8", "int4_wo", "fp32")
    assert s.size == 2 ** 4 * 3
    s8 = SearchSpace.build(KINDS, "ort-cpu", formats=["int8"])
    assert s8.choices["fc"] == ("int8", "fp32") and s8.size == 2 ** 5
    with pytest.raises(ConfigError, match="fp8_e4m3"):
        SearchSpace.build(KINDS, "ort-cpu", formats=["fp8_e4m3"])
    with pytest.raises(UnknownFormatError):
        SearchSpace.build(KINDS, "ort-cpu", formats=["int9"])


def test_ties_share_one_parameter_and_plans_round_trip():
    s = SearchSpace.build(KINDS, "ort-cpu", ties=[(("conv2", "add"), "inputs of an INT8 Add")])
    params = s.parameters()
    assert [p[0] for p in params] == ["conv1", "conv2", "conv3", "fc"] and params[1][1] == ("conv2", "add")

    class Fixed:  # an Optuna-like trial that always takes the first choice
        def suggest_categorical(self, name, choices):
            return choices[0]

    plan = s.suggest(Fixed())
    assert plan["add"] == plan["conv2"] == "int8"
    assert s.params_of(plan) == {"conv1": "int8", "conv2": "int8", "conv3": "int8", "fc": "int8"}
    with pytest.raises(ConfigError, match="splits the tied units"):
        s.params_of({**plan, "add": "fp32"})
    with pytest.raises(ConfigError, match="cannot take 'int4_wo'"):
        s.complete({"conv1": "int4_wo"})
    with pytest.raises(ConfigError, match="unknown unit"):
        s.complete({"conv9": "int8"})


@pytest.mark.parametrize("text, value, unit", [("6.5ms", 6.5, "ms"), ("6.5 ms", 6.5, "ms"), ("0.6x", 0.6, "x"),
                                               ("60%", 0.6, "x")])
def test_budget_parses(text, value, unit):
    b = Budget.parse(text)
    assert (b.value, b.unit) == (pytest.approx(value), unit)
    assert b.limit_ms(10.0) == pytest.approx(value if unit == "ms" else 10.0 * value)


def test_budget_margin_judges_ratio_budgets_on_the_ratio_and_ms_budgets_on_milliseconds():
    # A plan at 5.5 ms next to an FP32 run at 10 ms (ratio 0.55), where the session's FP32 was 9 ms.
    ok, ms, frac = Budget.parse("0.6x").margin(5.5, 0.55, 9.0)
    assert ok and ms == pytest.approx(0.05 * 9.0) and frac == pytest.approx(0.05 / 0.6)
    assert not Budget.parse("0.5x").margin(4.0, 0.55, 9.0)[0]  # 4 ms is fast, but the ratio decides
    ok, ms, frac = Budget.parse("5ms").margin(5.5, 0.4, 9.0)
    assert not ok and ms == pytest.approx(-0.5) and frac == pytest.approx(-0.1)
    assert Budget.parse("5ms").margin(5.0, 0.9, 9.0)[0]  # on the budget is within it


@pytest.mark.parametrize("text", ["6.5", "fast", "-1ms", "0x", "6.5 s"])
def test_bad_budget_names_the_valid_forms(text):
    with pytest.raises(ConfigError, match="6.5ms"):
        Budget.parse(text)


def test_ilp_is_the_brute_force_optimum_on_additive_numbers():
    s = SearchSpace.build(KINDS, "ort-cpu")
    for limit in (5.0, 6.0, 7.0, 8.5):
        feasible = [p for p in all_plans(s) if additive_latency(p) <= limit + 1e-9]
        best = max(additive_metric(p) for p in feasible)
        plan = baselines.ilp(s, DROPS, DELTAS, 10.0, limit)
        assert additive_latency(plan) <= limit + 1e-9 and additive_metric(plan) == pytest.approx(best)
    assert baselines.ilp(s, DROPS, DELTAS, 10.0, 1.0) is None


def test_weight_bits_respects_the_bits_budget_and_minimises_scores():
    s = SearchSpace.build(KINDS, "ort-cpu")
    params = {"conv1": 100, "conv2": 400, "add": 0, "conv3": 300, "fc": 1000}
    plan = baselines.weight_bits(s, DROPS, params, effective_bits=10.0)
    from mixq.formats import get_format

    bits = sum(params[u] * get_format(f).weight_bits for u, f in plan.items()) / sum(params.values())
    assert bits <= 10.0
    ok = [p for p in all_plans(s)
          if sum(params[u] * get_format(f).weight_bits for u, f in p.items()) <= 10.0 * sum(params.values())]
    assert additive_metric(plan) == pytest.approx(max(additive_metric(p) for p in ok))
    with pytest.raises(ConfigError, match="effective_bits"):
        baselines.weight_bits(s, DROPS, params, effective_bits=0)


def test_the_weight_bits_ladder_is_the_weight_bits_plan_at_each_level_once():
    from mixq.formats import get_format

    s = SearchSpace.build(KINDS, "ort-cpu", formats=["int8"])
    params = {"conv1": 100, "conv2": 400, "add": 0, "conv3": 300, "fc": 1000}
    ladder = baselines.weight_bits_ladder(s, DROPS, params, 8.0, fractions=(0.05, 0.1, 0.2, 0.5, 0.9))
    levels = [8.0 + f * 24.0 for f in (0.05, 0.1, 0.2, 0.5, 0.9)]
    expected = {}
    for b in levels:  # the reference: weight_bits at each level, a plan met again not repeated
        plan = baselines.weight_bits(s, DROPS, params, b)
        if plan not in expected.values():
            expected[f"weight-bits (Fisher) {b:.1f} bits, warm start"] = plan
    assert ladder == expected and 1 < len(ladder) < len(levels)
    bits = [sum(params[u] * get_format(f).weight_bits for u, f in p.items()) / sum(params.values())
            for p in ladder.values()]
    named = [float(n.split(") ")[1].split(" bits")[0]) for n in ladder]
    assert bits == sorted(bits) and all(b <= lv + 0.05 for b, lv in zip(bits, named))


def test_scan_guided_keeps_the_units_that_alone_cost_more_than_the_threshold_float():
    s = SearchSpace.build(KINDS, "ort-cpu", formats=["int8"])
    a = baselines.scan_guided(s, "int8", DROPS, 0.4)
    assert a == {"conv1": "fp32", "conv2": "int8", "add": "fp32", "conv3": "int8", "fc": "fp32"}
    assert baselines.scan_guided(s, "int8", DROPS, 5.0) == baselines.uniform(s, "int8")
    tied = SearchSpace.build(KINDS, "ort-cpu", formats=["int8"], ties=[(("conv2", "add"), "int8 add inputs")])
    assert baselines.scan_guided(tied, "int8", DROPS, 0.6)["conv2"] == "fp32", "a tie's drops add up"
    with pytest.raises(ConfigError, match="threshold must be >= 0"):
        baselines.scan_guided(s, "int8", DROPS, -1)


def test_greedy_reverts_the_most_sensitive_units_while_the_budget_holds():
    s = SearchSpace.build(KINDS, "ort-cpu", formats=["int8"])
    plan, reverted = baselines.greedy_fallback(s, "int8", DROPS, additive_latency, limit_ms=6.0)
    # all-int8 is 4.8 ms; conv1 (drop 2.0, +1.0 ms) fits, fc (+0.5) would make 6.3: skipped; add (+0.2) fits.
    assert reverted == ["conv1", "add"] and plan["fc"] == "int8" and additive_latency(plan) <= 6.0
    assert baselines.weighted_only(s, "int8")["add"] == "fp32"
    assert baselines.uniform(s, "int8") == {u: "int8" for u in KINDS}


def test_study_enqueues_baselines_spares_over_budget_plans_and_picks_a_feasible_best():
    s = SearchSpace.build(KINDS, "ort-cpu", formats=["int8"])
    calls = []

    def metric(a):
        calls.append(dict(a))
        return additive_metric(a)

    warm = {"all-int8": baselines.uniform(s, "int8"), "fp32": baselines.fp32(s)}
    res = run_search(s, metric, additive_latency, 25, Budget.parse("0.6x"), warm_start=warm, seed=1)
    assert [r.source for r in res.records[:2]] == ["all-int8", "fp32"]
    assert res.limit_ms == pytest.approx(6.0) and res.fp32_ms == pytest.approx(10.0)
    assert not any(additive_latency(a) > 6.0 * 1.05 for a in calls), "an over-budget plan was evaluated"
    assert res.records[1].metric is None and not res.records[1].feasible
    feasible = [r for r in res.records if r.feasible and r.metric is not None]
    assert res.best is not None and res.best.feasible and res.best.latency_ms <= 6.0
    assert res.best.metric == max(r.metric for r in feasible)
    assert len(calls) == len({tuple(c.values()) for c in calls}), "a plan was evaluated twice"
    assert res.timing["trials"] == 25


def test_front_mode_returns_non_dominated_plans():
    s = SearchSpace.build(KINDS, "ort-cpu", formats=["int8"])
    res = run_search(s, additive_metric, additive_latency, 20, front=True, sampler="random", seed=0)
    assert res.front
    for a in res.front:
        assert not any(b.metric >= a.metric and b.latency_ms < a.latency_ms for b in res.records if b.metric is not None)


def test_pareto_front_of_records():
    r = lambda n, ms, m: TrialRecord(n, "x", {"u": str(n)}, ms, m, True)
    front = pareto_front([r(0, 5.0, 80.0), r(1, 4.0, 70.0), r(2, 6.0, 79.0), r(3, 7.0, 85.0), r(4, 3.0, None)])
    assert [x.number for x in front] == [1, 0, 3]


def _rec(n, ms, metric, screened=False, plan=None):
    return TrialRecord(n, "tpe", plan or {"u": str(n)}, ms, metric, ms <= 10.0, screened=screened)


def test_candidates_are_the_near_best_plans_fastest_first_then_the_next_best():
    from mixq.search.choose import candidates

    recs = [_rec(0, 9.9, 90.0), _rec(1, 8.0, 89.95), _rec(2, 10.3, 90.02), _rec(3, 10.8, 95.0),  # 3: >5% over
            _rec(4, 7.0, 85.0), _rec(5, 6.0, None), _rec(6, 5.0, 99.0, screened=True), _rec(7, 9.0, 88.0),
            _rec(8, 8.0, 89.95, plan={"u": "1"})]  # the same plan as trial 1: listed once
    got = [r.number for r in candidates(recs, 10.0, tolerance=0.1, k=5, slack=0.05)]
    # within 0.1 of 90.02: trials 1 (8.0 ms), 0 (9.9), 2 (10.3, inside the 5% slack); then 7, 4 by metric
    assert got == [1, 0, 2, 7, 4]
    assert [r.number for r in candidates(recs, 10.0, tolerance=0.0, k=2)] == [2, 0]
    assert candidates([_rec(0, 20.0, 90.0)], 10.0) == []
    # 98.2 - 0.1 is 98.10000000000001 in floating point: 98.1 is still within the tolerance
    assert [r.number for r in candidates([_rec(0, 9.0, 98.2), _rec(1, 6.0, 98.1)], 10.0, 0.1, k=1)] == [1]
    with pytest.raises(ConfigError, match="k >= 1"):
        candidates(recs, 10.0, k=0)


def test_choose_takes_the_best_plan_that_meets_the_budget_when_re_timed():
    from mixq.search.choose import Retimed, choose

    a, b, c = _rec(0, 9.0, 90.0), _rec(1, 8.0, 89.95), _rec(2, 7.0, 88.0)
    d = _rec(3, 8.5, 90.0, plan={"u": "d"})
    key = lambda r: tuple(sorted(r.assignment.items()))
    timed = {key(a): Retimed(True, 9.8, 0.2), key(b): Retimed(True, 8.5, 1.5), key(c): Retimed(True, 7.0, 3.0),
             key(d): Retimed(True, 9.0, 1.0)}
    assert choose([a, b, c], timed).number == 0, "the best metric that meets the budget wins"
    assert choose([a, b, c, d], timed).number == 3, "an equal metric goes to the larger re-timed margin"
    timed[key(a)] = Retimed(False, 10.4, -0.4)
    timed[key(b)] = Retimed(False, 10.1, -0.1)
    assert choose([a, b, c], timed).number == 2, "plans over budget when re-timed are not chosen"
    timed[key(c)] = Retimed(False, 10.2, -0.2)
    assert choose([a, b, c], timed) is None


def test_bad_search_arguments():
    s = SearchSpace.build(KINDS, "ort-cpu")
    with pytest.raises(ConfigError, match="needs a latency budget"):
        run_search(s, additive_metric, additive_latency, 5)
    with pytest.raises(ConfigError, match="unknown sampler 'tpee'"):
        run_search(s, additive_metric, additive_latency, 5, Budget.parse("0.5x"), sampler="tpee")
    with pytest.raises(ConfigError, match="at least 1"):
        run_search(s, additive_metric, additive_latency, 0, Budget.parse("0.5x"))


def test_the_search_package_imports_no_torch():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch is blocked in this test')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import mixq.search, mixq.search.baselines, mixq.search.study, mixq.search.storage, mixq.search.records\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


# ----------------------------------------------------------------------------- a machine whose speed drifts
RATIO_DELTAS = {"conv1": 1.0, "conv2": 2.0, "add": 0.5, "conv3": 1.5, "fc": 3.0}  # ms saved by int8 of 10 ms


def true_ratio(a):
    return 1.0 - sum(RATIO_DELTAS[u] for u, f in a.items() if f != "fp32") / 10.0


class DriftingLatency(MeasuredLatency):
    """A measured engine on a machine that speeds up 2x as the session goes on (load going away): every
    measurement reads the plan's true cost times a factor falling from 2 to 1 over ``steps`` measurements."""

    def __init__(self, steps: int = 100) -> None:
        super().__init__(KINDS, "ort-cpu")
        self.steps, self.calls = steps, 0

    def _measure(self, a):
        factor = 2.0 * 0.5 ** min(self.calls / self.steps, 1.0)
        self.calls += 1
        return {"median_ms": 10.0 * true_ratio(a) * factor}


@pytest.mark.parametrize("mode", ["ratio", "absolute"])
def test_a_relative_budget_is_judged_on_the_ratio_to_fp32_timed_next_to_the_plan(mode):
    space = SearchSpace.build(KINDS, "ort-cpu", formats=["int8"])
    plans = list(all_plans(space))
    assert min(abs(true_ratio(p) - 0.62) for p in plans) > 0.02  # no plan within noise of the budget
    lat = DriftingLatency()
    fp32 = baselines.fp32(space)
    timed = RatioLatency(lat, fp32, rounds=3) if mode == "ratio" else lat
    res = run_search(space, additive_metric, timed, len(plans), Budget.parse("0.62x"), sampler="random",
                     warm_start={f"plan {i}": p for i, p in enumerate(plans)})
    assert len(res.records) == len(plans)
    wrong = [(true_ratio(r.assignment), r.latency_ms / res.fp32_ms) for r in res.records
             if r.feasible != (true_ratio(r.assignment) <= 0.62)]
    if mode == "absolute":  # FP32 timed at the slow start: plans timed later look faster than they are
        assert wrong, "the drift should fool one FP32 measurement made at the start"
        return
    assert not wrong, wrong
    assert res.fp32_ms == pytest.approx(20.0) and timed.reference_ms == res.fp32_ms  # FP32's first, slow reading
    for r in res.records:  # each plan: 3 rounds next to FP32, the order alternating; ms = ratio x the reference
        if r.assignment != fp32:
            st = timed.stats[tuple(sorted(r.assignment.items()))]
            assert len(st["ratios"]) == len(st["fp32_rounds_ms"]) == 3
            assert st["ratio"] == pytest.approx(true_ratio(r.assignment), rel=0.02)
            assert r.latency_ms == pytest.approx(st["ratio"] * 20.0)
    assert lat.calls == 1 + 6 * (len(plans) - 1)  # FP32 once for the reference, then a pair per round per plan
