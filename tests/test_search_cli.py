"""``mixq search`` end to end: resume after SIGKILL, fingerprints, bad input, re-timing, deployable plan.

A small constructed problem on plain callables (one unit whose INT8 costs accuracy, one whose INT8 costs
time, float/int8 boundaries that cost time) is checked against brute force; the command runs on a small
convolutional model defined here (random weights, labels = its own FP32 predictions), whose all-INT8
plan is about 0.4x of FP32 on ONNX Runtime, so a 0.8x budget is met with a wide margin.
"""
from __future__ import annotations

import itertools
import re
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mixq.cli import main
from mixq.errors import ConfigError
from mixq.search import Budget, SearchSpace, baselines, open_storage, run_search
from mixq.search.storage import check_fingerprint, mask_url

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SPECS = ["--model", "test_search_cli:model", "--calib", "test_search_cli:calib_data", "--eval",
         "test_search_cli:eval_data", "--metric", "test_search_cli:metric"]


# ----------------------------------------------------------------------------- a small task (module:function specs)
def model():
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 32, 3, padding=1)
            self.c2 = nn.Conv2d(32, 64, 3, padding=1)
            self.c3 = nn.Conv2d(64, 64, 3, padding=1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = torch.relu(self.c1(x))
            x = torch.relu(self.c2(x))
            x = torch.relu(self.c3(x))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    return Net().eval()


def calib_data():
    import torch

    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]


def _labelled(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 3, 32, 32, generator=g)
    with torch.no_grad():
        return [(x, model()(x).argmax(1))]


def eval_data():
    return _labelled(1)


def other_eval_data():
    return _labelled(3)


def metric(outputs, targets):
    return np.concatenate([100.0 * (o.argmax(1) == t).numpy() for o, t in zip(outputs, targets)])


def probability(outputs, targets):
    """The softmax probability of the label, in percent: a score that moves with every small change of the logits."""
    return np.concatenate([100.0 * o.softmax(1).gather(1, t[:, None])[:, 0].numpy() for o, t in zip(outputs, targets)])


def exploding_metric(outputs, targets):
    raise AssertionError("the metric ran: an evaluation happened before the bad input was refused")


# ----------------------------------------------------------------------------- the constructed problem
UNITS = {"stem": "conv", "acc": "conv", "b1": "conv", "slow": "conv", "b2": "conv", "head": "linear"}


def c_latency(a):
    """FP32 1 ms per unit, INT8 0.5 ms (``slow``: 1.6 ms), 0.1 ms per float/int8 boundary (input and output too)."""
    seq = ["fp32", *a.values(), "fp32"]
    units = sum((1.6 if u == "slow" else 0.5) if f == "int8" else 1.0 for u, f in a.items())
    return units + 0.1 * sum(x != y for x, y in zip(seq, seq[1:]))


def c_metric(a):
    """INT8 on ``acc`` costs 6 points; every other INT8 unit 0.05."""
    return 90.0 - sum((6.0 if u == "acc" else 0.05) for u, f in a.items() if f == "int8")


def c_space():
    return SearchSpace.build(UNITS, "ort-cpu", ["int8"])


def c_warm(space):
    drops = {u: {"int8": 6.0 if u == "acc" else 0.05} for u in UNITS}
    greedy, _ = baselines.greedy_fallback(space, "int8", drops, c_latency, 4.8)
    return {"fp32": baselines.fp32(space), "all-int8": baselines.uniform(space, "int8"), "greedy fallback": greedy}


def test_the_search_finds_the_known_best_of_the_constructed_problem(tmp_path):
    space = c_space()
    plans = [dict(zip(UNITS, c)) for c in itertools.product(["int8", "fp32"], repeat=len(UNITS))]
    feasible = [p for p in plans if c_latency(p) <= 4.8 + 1e-9]
    top = max(c_metric(p) for p in feasible)
    winners = [p for p in feasible if c_metric(p) == top]
    assert len(winners) == 1 and winners[0]["acc"] == winners[0]["slow"] == "fp32"
    warm = c_warm(space)
    assert all(p != winners[0] for p in warm.values()), "a baseline is already the answer"
    storage = open_storage(None, tmp_path / "s.journal")
    res = run_search(space, c_metric, c_latency, 40, Budget.parse("0.8x"), warm_start=warm, storage=storage,
                     study_name="constructed", seed=0)
    assert res.limit_ms == pytest.approx(4.8)
    assert res.best.assignment == winners[0] and res.best.metric == pytest.approx(top)
    # the best of the baselines is worse: the search beat them
    assert max(c_metric(p) for p in warm.values() if c_latency(p) <= 4.8) < top


SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_search_cli import c_latency, c_metric, c_space, c_warm
from mixq.search import Budget, open_storage, run_search

log = open({log!r}, "a")

def metric(a):
    time.sleep(0.12)
    log.write(json.dumps([os.getpid(), a]) + "\\n")
    log.flush()
    return c_metric(a)

space = c_space()
res = run_search(space, metric, c_latency, 20, Budget.parse("0.95x"), warm_start=c_warm(space),
                 storage=open_storage({journal!r}, Path({journal!r}), exclusive={exclusive}), study_name="s",
                 exclusive={exclusive},
                 fingerprint={{"problem": "constructed"}}, sampler="random")
print(json.dumps(res.resumed))
"""


def _trials(journal: Path, name: str = "s"):
    import optuna

    st = optuna.load_study(study_name=name, storage=open_storage(str(journal), journal))
    return st.get_trials(deepcopy=False)


def _kill_when(proc, journal: Path, study: str, complete: int, timeout: float = 90.0) -> None:
    """SIGKILL ``proc`` once ``study`` has ``complete`` finished trials and one RUNNING."""
    from optuna.trial import TrialState

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the search ended before it was killed: {proc.stdout.read()[-2000:]}")
        try:
            ts = _trials(journal, study)
        except (KeyError, ValueError):
            ts = []
        states = [t.state for t in ts]
        if states.count(TrialState.COMPLETE) >= complete and TrialState.RUNNING in states:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the study did not reach the kill point in time")


@pytest.mark.parametrize("exclusive", [True, False], ids=["run-folder-locked", "shared-storage"])
def test_a_study_killed_mid_trial_resumes_without_losing_a_finished_trial(tmp_path, exclusive):
    """Locked run folder: every RUNNING trial is a dead process's. Shared storage: the trial's recorded worker
    (host, pid, start time) is checked."""
    from optuna.trial import TrialState

    journal, log = tmp_path / "s.journal", tmp_path / "evaluated.jsonl"
    code = SCRIPT.format(tests=str(TESTS), log=str(log), journal=str(journal), exclusive=exclusive)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    _kill_when(proc, journal, "s", complete=6)
    before = {t.number: (t.params, t.values) for t in _trials(journal) if t.state == TrialState.COMPLETE}
    running = [t.number for t in _trials(journal) if t.state == TrialState.RUNNING]
    assert len(before) >= 6 and running
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = json.loads(res.stdout.strip().splitlines()[-1])
    assert resumed["finished_before"] == len(before) and resumed["stale_failed"] == running
    after = _trials(journal)
    done = {t.number: (t.params, t.values) for t in after if t.state == TrialState.COMPLETE}
    assert len(done) == 20, "finished trials count towards --trials"
    assert all(done[n] == v for n, v in before.items()), "a finished trial was lost or changed"
    assert all(t.state == TrialState.FAIL for t in after if t.number in running)
    labels = [t.user_attrs.get("baseline") for t in after if t.state == TrialState.COMPLETE]
    assert sorted(x for x in labels if x) == ["all-int8", "fp32", "greedy fallback"], "a baseline ran twice"
    evaluated = [json.loads(line) for line in log.read_text().splitlines()]
    first_pid = evaluated[0][0]
    first = {json.dumps(a) for pid, a in evaluated if pid == first_pid}
    second = [json.dumps(a) for pid, a in evaluated if pid != first_pid]
    assert len(first) >= 4 and second, "too few evaluations to tell"
    assert len(set(second) & first) <= 1, "plans evaluated before the kill were evaluated again"


def test_fingerprint_check_refuses_another_search():
    import optuna

    st = optuna.create_study(directions=["maximize"])
    assert check_fingerprint(st, {"model": "a", "backend": "ort-cpu"}, "memory")
    assert not check_fingerprint(st, {"model": "a", "backend": "ort-cpu"}, "memory")
    with pytest.raises(ConfigError, match=r"the model \(weights or code\): study 'a', now 'b'"):
        check_fingerprint(st, {"model": "b", "backend": "ort-cpu"}, "memory")


def test_sqlite_storage_works_and_bad_storages_are_named_without_their_password(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", tmp_path / "unused.journal")
    space = c_space()
    res = run_search(space, c_metric, c_latency, 6, Budget.parse("0.8x"), storage=storage, study_name="q")
    again = run_search(space, c_metric, c_latency, 8, Budget.parse("0.8x"), storage=storage, study_name="q")
    assert len(res.records) == 6 and len(again.records) == 8 and again.resumed["finished_before"] == 6
    assert mask_url("postgresql://me:s3cret@db.example/x") == "postgresql://me:***@db.example/x"
    for url, message in [("postgresql://me:s3cret@localhost:1/db", "psycopg2"),
                         ("foo://me:s3cret@host/db", "unknown scheme 'foo'"),
                         (f"sqlite:///{tmp_path}/no/such/dir/s.db", "does not exist"),
                         (str(tmp_path / "missing" / "s.journal"), "does not exist")]:
        with pytest.raises(ConfigError, match=message) as e:
            open_storage(url, tmp_path / "x.journal")
        assert "s3cret" not in str(e.value) and "valid storages" in str(e.value)


# ----------------------------------------------------------------------------- the command
def _search(run_dir: Path, *extra: str, specs=SPECS) -> list[str]:
    return ["search", *specs, "--run-dir", str(run_dir), "--runs", "20", "--rounds", "2", "--retime-seconds",
            "0.05", "--no-progress", *extra]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One search at 0.8x on the small model (all-INT8 is about 0.4x of FP32 here)."""
    d = tmp_path_factory.mktemp("search")
    assert main(_search(d, "--budget", "0.8x", "--trials", "10")) == 0
    return d


def test_the_command_writes_every_artifact_and_a_report(searched):
    out = json.loads((searched / "search.json").read_text())
    names = [r["plan"] for r in out["rows"]]
    assert names[:3] == ["fp32", "all-int8", "weighted-only int8"] and "searched" in names
    assert any(n.startswith("weight-bits (Fisher)") for n in names) and any(n.startswith("random search") for n in names)
    trials = json.loads((searched / "search-trials.json").read_text())
    studies = {t["study"] for t in trials}
    assert studies == {"test_search_cli-0.8x", "test_search_cli-0.8x-random"}
    assert sum(t["study"] == "test_search_cli-0.8x-random" for t in trials) == 10, "random search: same trial count"
    # the study starts from the baselines, then from Fisher-ranked weight-bits plans (the random search from neither)
    ladder = [t for t in trials if "bits, warm start" in str(t["source"])]
    assert ladder and all(t["study"] == "test_search_cli-0.8x" for t in ladder)
    csv_lines = (searched / "search-trials.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[:6] == ["study", "number", "source", "latency_ms", "metric", "feasible"]
    assert len(csv_lines) == len(trials) + 1
    md = (searched / "search.md").read_text()
    for png in ("search-pareto.png", "search-precision.png", "search-history.png"):
        assert (searched / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in md
    assert "storage" in md and "optuna-dashboard" in md and "mixq search --model test_search_cli:model" in md
    # a relative budget: the study timed each plan next to FP32 and judged it on the ratio (said in both)
    assert out["latency_mode"]["mode"] == "ratio" and out["latency_mode"]["rounds"] == 3
    assert out["latency_mode"]["reference_ms"] == pytest.approx(out["fp32_ms"])
    assert "back to back with FP32 in 3 alternating rounds" in md
    for t in trials:
        assert t["feasible"] == (t["latency_ms"] <= 0.8 * out["fp32_ms"] * (1 + 1e-9)), t
    # the weight-bits plan at the searched plan's effective bits has those bits or fewer
    params = out["sensitivity"]["weights"]
    best = next(r for r in out["rows"] if r["plan"] == "searched")
    wb = next(r for r in out["rows"] if "at the searched plan's" in r["plan"])
    assert baselines.effective_bits(wb["assignment"], params) <= baselines.effective_bits(best["assignment"], params)


def test_every_reported_plan_is_re_timed_in_a_fresh_process_and_the_best_meets_the_budget(searched):
    out = json.loads((searched / "search.json").read_text())
    job = json.loads((searched / "search-final" / "retime-job.json").read_text())
    assert Path(job["fp32"]).is_file() and all(Path(p).is_file() for p in job["plans"].values())
    for r in out["rows"]:
        assert r["within_budget"] == (r["ratio"] <= 0.8) and len(r["ratios"]) == 2
        assert r["margin_ms"] == pytest.approx((0.8 - r["ratio"]) * out["retime"]["fp32_ms"])
    best = next(r for r in out["rows"] if r["plan"] == "searched")
    assert best["within_budget"] and best["margin_ms"] > 0, best


def test_the_plan_is_chosen_among_re_timed_candidates(searched):
    out = json.loads((searched / "search.json").read_text())
    sel = out["selection"]["searched"]
    assert 1 <= len(sel) <= 5 and sum(r["chosen"] for r in sel) == 1
    chosen = next(r for r in sel if r["chosen"])
    assert chosen["meets"] and chosen["trial"] == out["chosen_trial"]
    trials = {r["number"]: r for r in out["search"]["records"]}
    best = next(r for r in out["rows"] if r["plan"] == "searched")
    assert trials[chosen["trial"]]["assignment"] == best["assignment"]
    # candidates: the best search metric first (within the tolerance), and the chosen one is the best that met it
    top = max(r["metric"] for r in sel)
    assert chosen["metric"] >= max(r["metric"] for r in sel if r["meets"]) - out["metric_tolerance"]
    assert top == max(r["metric"] for r in out["search"]["records"] if r["feasible"] and r["metric"] is not None)
    assert (searched / "search-final" / "candidates" / "retime.json").is_file()
    assert "How the plan was chosen" in (searched / "search.md").read_text()


def test_a_sensitivity_table_of_mixq_scan_replaces_the_search_s_scan_and_another_is_refused(tmp_path, capsys):
    scan = ["scan", "--formats", "int8", "--no-progress", "--bootstrap", "50"]
    assert main([*scan, *SPECS, "--run-dir", str(tmp_path / "scan")]) == 0
    other = [*SPECS[:5], "test_search_cli:other_eval_data", *SPECS[6:]]
    assert main([*scan, *other, "--run-dir", str(tmp_path / "scan-other")]) == 0
    capsys.readouterr()
    table = tmp_path / "scan-other" / "sensitivity.json"
    assert main(_search(tmp_path / "s1", "--budget", "0.8x", "--sensitivity", str(table))) == 2
    err = capsys.readouterr().err
    assert "was made for another model, data, metric" in err and str(table) in err
    assert not (tmp_path / "s1" / "search-cache" / "calibrated").exists(), "refused after expensive work"
    assert main(_search(tmp_path / "s2", "--budget", "0.8x", "--trials", "3", "--no-random-baseline",
                        "--sensitivity", str(tmp_path / "scan" / "sensitivity.json"))) == 0
    out = capsys.readouterr().out
    assert "sensitivity from" in out and not (tmp_path / "s2" / "search-cache" / "scan.jsonl").exists()
    drops = json.loads((tmp_path / "s2" / "search.json").read_text())["sensitivity"]["drops"]
    rows = json.loads((tmp_path / "scan" / "sensitivity.json").read_text())["rows"]
    assert drops == {r["layer"]: {"int8": r["drop"]} for r in rows if r["drop"] is not None}
    assert main(_search(tmp_path / "s3", "--budget", "0.8x", "--sensitivity", str(tmp_path / "nope.json"))) == 2
    assert "is not a file" in capsys.readouterr().err


def test_the_best_plan_deploys_with_mixq_export(searched, tmp_path):
    plan = json.loads((searched / "search-best.json").read_text())
    out = json.loads((searched / "search.json").read_text())
    best = next(r for r in out["rows"] if r["plan"] == "searched")
    assert plan["layers"] == {u: f for u, f in best["assignment"].items() if f != "fp32"}
    onnx_path = tmp_path / "best.onnx"
    assert main(["export", *SPECS, "--run-dir", str(tmp_path), "--plan", str(searched / "search-best.json"),
                 "--out", str(onnx_path)]) == 0
    info = json.loads((tmp_path / "export.json").read_text())
    assert sorted(info["kernels"]["units_integer"]) == sorted(plan["layers"]), info["kernels"]


def test_rerunning_the_command_resumes_and_reuses_every_cache(searched, tmp_path, capsys):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(searched, d)
    before = json.loads((d / "search.json").read_text())
    assert main(_search(d, "--budget", "0.8x", "--trials", "12")) == 0
    out = capsys.readouterr().out
    assert "calibrated model from" in out and "latencies reused" in out
    after = json.loads((d / "search.json").read_text())
    assert after["search"]["resumed"]["finished_before"] == 10 and len(after["search"]["records"]) == 12
    assert after["search"]["resumed"]["baselines_enqueued"] == [], "baselines enqueued twice"
    assert after["search"]["records"][:10] == before["search"]["records"]
    assert after["fp32_ms"] == before["fp32_ms"], "the FP32 latency the budget is relative to changed on resume"


def test_another_seed_and_study_in_the_same_run_folder_reuse_the_caches(searched, tmp_path, capsys):
    """bench/bench_search.py runs seeds and budgets as studies of one run folder: none may re-scan or refuse."""
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(searched, d)
    # the test-split scores of the plans already evaluated are reused: a planted score shows it
    cache = d / "search-cache" / "test-scores-simulation.json"
    scores = json.loads(cache.read_text())
    row = next(r for r in json.loads((d / "search.json").read_text())["rows"] if r["plan"] == "all-int8")
    key = ",".join(f"{u}={f}" for u, f in sorted(row["assignment"].items()))
    assert key in scores and "fp32 reference" in scores
    scores[key] = [100.0 - 100.0 * (i % 2) for i in range(len(scores[key]))]  # a metric of exactly 50
    cache.write_text(json.dumps(scores))
    assert main(_search(d, "--budget", "0.8x", "--trials", "3", "--seed", "7", "--study", "other",
                        "--no-random-baseline")) == 0
    out = capsys.readouterr().out
    assert "calibrated model from" in out and "latencies reused" in out
    rows = {r["plan"]: r for r in json.loads((d / "search.json").read_text())["rows"]}
    assert rows["all-int8"]["test_metric"] == 50.0 and rows["all-int8"]["drop"] == pytest.approx(
        rows["fp32"]["test_metric"] - 50.0)


def test_evaluate_engine_measures_the_study_and_the_final_figures_on_onnx_runtime(searched, tmp_path, capsys,
                                                                                  monkeypatch):
    import shutil

    from mixq.evaluate import EngineRunner

    d = tmp_path / "copy"
    shutil.copytree(searched, d)
    ran = []
    real = EngineRunner.model
    monkeypatch.setattr(EngineRunner, "model", lambda self, plan: ran.append(plan) or real(self, plan))
    # the simulation's study is not continued with engine metrics: they do not compare
    assert main(_search(d, "--budget", "0.8x", "--trials", "12", "--evaluate", "engine")) == 2
    assert "how a plan's metric is measured" in capsys.readouterr().err and not ran
    assert main(_search(d, "--budget", "0.8x", "--trials", "4", "--study", "eng", "--no-random-baseline",
                        "--evaluate", "engine")) == 0
    out = json.loads((d / "search.json").read_text())
    assert out["evaluate"] == "engine" and "run on ONNX Runtime" in (d / "search.md").read_text()
    evaluated = sum(r["metric"] is not None for r in out["search"]["records"])
    distinct = len({json.dumps(r["assignment"], sort_keys=True) for r in out["rows"]})
    units = list(out["space"]["choices"])
    assert len(ran) >= evaluated + distinct + len(units) + 1, (len(ran), evaluated, distinct)  # + the FP32 reference
    assert "calibrated model from" in capsys.readouterr().out  # the simulation's caches serve it
    # the sensitivity is the engine's too: each unit alone on ONNX Runtime against FP32 there, Fisher from torch
    sens = out["sensitivity"]
    assert sens["source"].startswith("ONNX Runtime") and "ONNX Runtime (one unit" in (d / "search.md").read_text()
    singles = [dict(p.layers) for p in ran if len(p.layers) == 1]
    assert all({u: "int8"} in singles for u in units)
    simulated = json.loads((searched / "search.json").read_text())["sensitivity"]
    assert sens["fisher"] == simulated["fisher"]


def test_evaluate_engine_scans_each_unit_on_onnx_runtime(tmp_path, monkeypatch):
    """The drops the baselines rank units by are engine measurements: checked against plain ONNX Runtime sessions."""
    specs = [*SPECS[:-1], "test_search_cli:probability"]  # a continuous score: every unit's INT8 moves it
    assert main(_search(tmp_path, "--budget", "0.8x", "--trials", "2", "--no-random-baseline", "--evaluate",
                        "engine", specs=specs)) == 0
    out = json.loads((tmp_path / "search.json").read_text())
    sens, units = out["sensitivity"], list(out["space"]["choices"])
    assert sens["source"].startswith("ONNX Runtime") and set(sens["drops"]) == set(units)
    # an independent account of one unit's drop: plain ONNX Runtime sessions of the float and single-unit models
    import onnxruntime as ort
    import torch

    from mixq.checkpoint import load_quantized
    from mixq.evaluate import evaluate
    from mixq.export import apply_plan, export_float_graph
    from mixq.plan import QuantPlan

    q = load_quantized(model(), tmp_path / "search-cache" / "calibrated", calib_data=calib_data())
    graph = export_float_graph(q, calib_data()[0], None, batch_axis=0)
    u = max(units, key=lambda u: abs(sens["drops"][u]["int8"]))

    def on_ort(layers: dict) -> float:
        onnx_model = apply_plan(graph, q, QuantPlan(backend="ort-cpu", default="fp32", layers=layers))
        s = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name

        def run(x):
            return torch.from_numpy(s.run(None, {name: x.numpy()})[0])
        return evaluate(run, eval_data(), probability).metric

    # FP32 on the engine scores what the torch model scores
    assert on_ort({}) == pytest.approx(evaluate(model(), eval_data(), probability).metric, abs=1e-4)
    assert sens["drops"][u]["int8"] == pytest.approx(on_ort({}) - on_ort({u: "int8"}), abs=1e-9)
    assert any(per["int8"] != 0 for per in sens["drops"].values()), "a table of zeros tests nothing"
    # measured once: a rerun (here a new study) reads every entry back from the scan's store, measuring none again
    from mixq.evaluate import EngineRunner

    ran, real = [], EngineRunner.model
    monkeypatch.setattr(EngineRunner, "model", lambda self, plan: ran.append(plan) or real(self, plan))
    assert main(_search(tmp_path, "--budget", "0.8x", "--trials", "2", "--no-random-baseline", "--evaluate",
                        "engine", "--study", "again", specs=specs)) == 0
    assert ran and not any(len(p.layers) == 1 and p.default == "fp32" for p in ran)
    assert json.loads((tmp_path / "search.json").read_text())["sensitivity"]["drops"] == sens["drops"]


@pytest.mark.parametrize("extra, message", [
    ([], "give a latency budget"),
    (["--budget", "fast"], "budget 'fast' is not understood"),
    (["--budget", "1.2x"], "trivially|FP32 itself meets it"),
    (["--budget", "0.5x", "--sampler", "tpee"], "unknown sampler 'tpee'; valid samplers are tpe, nsga2, gp, random"),
    (["--budget", "0.5x", "--trials", "0"], "--trials must be at least 1, but got 0"),
    (["--budget", "0.5x", "--storage", "foo://me:s3cret@h/db"], "unknown scheme 'foo'"),
    (["--budget", "0.5x", "--storage", "postgresql://me:s3cret@localhost:1/db"], "psycopg2"),
    (["--budget", "0.5x", "--storage", "/no/such/folder/s.journal"], "does not exist"),
    (["--budget", "0.5x", "--formats", "fp8_e4m3"], "fp8_e4m3 run on no unit kind of ort-cpu; formats it runs: "),
])
def test_bad_input_is_refused_before_any_work(extra, message, tmp_path, capsys):
    specs = [*SPECS[:-1], "test_search_cli:exploding_metric"]
    assert main(_search(tmp_path, *extra, specs=specs)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error:") and "s3cret" not in err
    import re

    assert re.search(message, err), err


def test_a_search_of_another_model_or_data_is_refused_by_fingerprint(searched, tmp_path, capsys):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(searched, d)
    other = [*SPECS[:5], "test_search_cli:other_eval_data", *SPECS[6:-1], "test_search_cli:exploding_metric"]
    assert main(_search(d, "--budget", "0.8x", specs=other)) == 2
    err = capsys.readouterr().err
    assert "the search-split data" in err and "the metric" in err and "--fresh" in err
    # the same study in a shared storage, from another run folder (no cache there): refused by the study's fingerprint
    assert main(_search(tmp_path / "elsewhere", "--budget", "0.8x", "--storage", str(d / "search-study.journal"),
                        specs=other)) == 2
    err = capsys.readouterr().err
    assert "study 'test_search_cli-0.8x'" in err and "the search-split data" in err


def test_budgets_no_plan_can_meet_or_every_plan_meets_are_refused_with_the_plans(searched, tmp_path, capsys):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(searched, d)
    assert main(_search(d, "--budget", "0.001ms")) == 2
    err = capsys.readouterr().err
    assert "below the fastest plan measured" in err and re.search(r"at \d+\.\d+ ms", err)
    assert main(_search(d, "--budget", "1000ms")) == 2
    err = capsys.readouterr().err
    assert "trivially met by FP32" in err and "all-int8" in err


def test_the_command_killed_mid_study_resumes_when_run_again(tmp_path):
    from optuna.trial import TrialState

    d = tmp_path / "run"
    argv = [sys.executable, "-m", "mixq.cli", *_search(d, "--front", "--trials", "14", "--no-random-baseline")]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    journal = d / "search-study.journal"
    _kill_when(proc, journal, "test_search_cli-front", complete=4, timeout=120)
    first = {t.number: (t.params, t.values) for t in _trials(journal, "test_search_cli-front")
             if t.state == TrialState.COMPLETE}
    res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "calibrated model from" in res.stdout, "the calibration was not reused"
    trials = _trials(journal, "test_search_cli-front")
    done = {t.number: (t.params, t.values) for t in trials if t.state == TrialState.COMPLETE}
    assert len(done) == 14 and all(done[n] == v for n, v in first.items())
    assert [t.state for t in trials].count(TrialState.FAIL) == 1, "the trial running at the kill is marked failed"
    labels = [t.user_attrs.get("baseline") for t in trials if t.state == TrialState.COMPLETE]
    assert len([x for x in labels if x]) == len(set(x for x in labels if x)), "a baseline ran twice"
    out = json.loads((d / "search.json").read_text())
    assert out["search"]["resumed"]["finished_before"] == len(first)
    front = json.loads((d / "search-front.json").read_text())
    assert front and (d / "search-front.csv").is_file() and not (d / "search-best.json").exists()


def test_the_report_module_runs_without_torch(searched, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, _NoTorch())
        import json
        from pathlib import Path
        from mixq.search_report import write_artifacts
        summary = json.loads(Path({str(searched / 'search.json')!r}).read_text())
        paths = write_artifacts(summary, Path({str(tmp_path)!r}))
        assert "torch" not in sys.modules
        print(sorted(paths))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "search.md").read_text() == (searched / "search.md").read_text()


def test_fresh_discards_a_stale_cache_and_study_and_starts_over(searched, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(searched, d)
    other = [*SPECS[:5], "test_search_cli:other_eval_data", *SPECS[6:]]
    assert main(_search(d, "--budget", "0.8x", "--trials", "6", "--fresh", "--no-random-baseline", specs=other)) == 0
    out = json.loads((d / "search.json").read_text())
    assert out["search"]["resumed"]["finished_before"] == 0 and len(out["search"]["records"]) == 6
    assert out["random"] is None and not any(r["plan"].startswith("random") for r in out["rows"])


def test_a_trial_s_worker_is_known_dead_only_when_its_process_is_gone():
    from mixq.search.storage import is_dead, worker_id

    me = worker_id()
    assert is_dead(me) is False
    child = subprocess.Popen([sys.executable, "-c", "import json, sys; sys.path.insert(0, %r); "
                              "from mixq.search.storage import worker_id; print(json.dumps(worker_id()))" % str(ROOT)],
                             stdout=subprocess.PIPE, text=True)
    gone = json.loads(child.communicate()[0])
    assert gone["pid"] != me["pid"] and is_dead(gone) is True
    assert is_dead({**me, "start": "1"}) is True, "a reused pid is another process"
    assert is_dead({**me, "host": "elsewhere"}) is None and is_dead(None) is None
