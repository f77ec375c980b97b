"""`mixq run`: the whole pipeline on a small real model, its stage records, resumption, partial runs and bad input.

The task (tests/pipeline_task.py) is an MLP whose INT8 Linear layers run faster than FP32 on ONNX Runtime, so the
search has a budget to meet. Stages run as subprocesses (as a user's command would).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixq.cli import main

TESTS = str(Path(__file__).parent)
SPECS = ["--model", "pipeline_task:model", "--calib", "pipeline_task:calib_data", "--eval", "pipeline_task:eval_data",
         "--metric", "pipeline_task:metric", "--train", "pipeline_task:train_data"]
CONFIG = """
budget = "0.9x"
[search]
trials = 6
rounds = 3
[qat]
epochs = 1
lr = 1e-5
[latency]
rounds = 3
min_seconds = 0.05
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS, env.get("PYTHONPATH", "")])
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixq.cli", "run", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    (d / "run.toml").write_text(CONFIG)
    res = _run(["--config", "run.toml", *SPECS, "--run-dir", "run"], d)
    return d, res


def _records(d: Path) -> dict:
    return json.loads((d / "run" / "pipeline.json").read_text())["stages"]


@pytest.mark.slow
def test_the_whole_pipeline_writes_every_artifact_and_the_report(done):
    d, res = done
    assert res.returncode == 0, res.stderr[-3000:]
    rec = _records(d)
    assert list(rec) == ["inventory", "scan", "search", "qat", "export", "verify", "latency", "report"]
    assert all(len(r["fingerprint"]) == 64 and r["files"] for r in rec.values())
    assert rec["export"]["passed"] and rec["verify"]["passed"]
    # the deployed model is the QAT one, of the searched plan
    assert "--qat" in res.stdout and (d / "run/qat/qat-search-best").is_dir()
    assert Path(rec["export"]["onnx"]).name == "model-qat-search-best.onnx"
    md = (d / "run/report/report.md").read_text()
    for row in ("| fp32 |", "| all-int8 |", "| searched |", "| searched + QAT |"):
        assert row in md
    assert "verification passed" in md and "mixq run --config run.toml" in md
    html = (d / "run/report/report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html
    lat = json.loads((d / "run/latency/latency.json").read_text())
    assert {"all-int8", "searched", "deployed"} <= set(lat["plans"]) and lat["fp32_ms"] > 0
    assert f"report: {d / 'run/report/report.md'}" in res.stdout


@pytest.mark.slow
def test_the_same_command_again_skips_every_current_stage(done):
    d, _ = done
    before = _records(d)
    res = _run(["--config", "run.toml", *SPECS, "--run-dir", "run"], d)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count(": current (") == 8 and "no stage (all current)" in res.stdout
    assert {k: v["finished"] for k, v in _records(d).items()} == {k: v["finished"] for k, v in before.items()}


@pytest.mark.slow
def test_a_changed_setting_reruns_its_stage_and_what_follows_only(done):
    d, _ = done
    before = _records(d)
    (d / "run2.toml").write_text(CONFIG.replace("lr = 1e-5", "lr = 2e-5"))
    res = _run(["--config", "run2.toml", *SPECS, "--run-dir", "run"], d)
    assert res.returncode == 0, res.stderr[-2000:]
    after = _records(d)
    for stage in ("inventory", "scan", "search"):
        assert after[stage]["finished"] == before[stage]["finished"], stage
    for stage in ("qat", "export", "verify", "latency", "report"):
        assert after[stage]["fingerprint"] != before[stage]["fingerprint"], stage


@pytest.mark.slow
def test_a_file_changed_behind_the_pipeline_reruns_its_stage(done):
    d, _ = done
    before = _records(d)
    Path(before["export"]["onnx"]).write_bytes(b"not an onnx file")
    res = _run(["--config", "run2.toml", *SPECS, "--run-dir", "run", "--until", "export"], d)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[5/8] export: ONNX" in res.stdout and "[4/8] qat: current" in res.stdout
    assert Path(before["export"]["onnx"]).read_bytes()[:4] != b"not "


@pytest.mark.slow
def test_a_killed_run_continues_where_it_stopped(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    argv = [sys.executable, "-m", "mixq.cli", "run", "--config", "run.toml", *SPECS, "--run-dir", "run"]
    p = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    journal = tmp_path / "run/search/search-study.journal"
    t0 = time.monotonic()
    while not journal.is_file() and p.poll() is None and time.monotonic() - t0 < 300:
        time.sleep(0.05)
    assert p.poll() is None, "the pipeline ended before the search started"
    os.killpg(p.pid, signal.SIGKILL)  # the pipeline and the stage it runs
    p.wait()
    rec = _records(tmp_path)
    assert "scan" in rec and "search" not in rec
    res = _run(["--config", "run.toml", *SPECS, "--run-dir", "run"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[2/8] scan: current" in res.stdout and "[3/8] search: Optuna" in res.stdout
    assert (tmp_path / "run/report/report.html").is_file()


@pytest.mark.slow
def test_a_failed_check_still_writes_the_report_and_exits_1(done, monkeypatch, capsys):
    """Verification run in this process under a target no engine can meet, without the noise floor (which would
    waive a target the float64 simulation misses too): the report says FAIL, the exit is 1."""
    import mixq.pipeline
    import mixq.verify

    d, _ = done
    real_verify, real_call = mixq.verify.verify, mixq.pipeline.Pipeline.call
    monkeypatch.setattr(mixq.verify, "verify", lambda *a, **kw: real_verify(
        *a, **{**kw, "targets": {"agreement": 1.01}, "noise_floor": False}))
    monkeypatch.setattr(mixq.pipeline.Pipeline, "call",
                        lambda self, args: main(args) if args[0] == "verify" else real_call(self, args))
    monkeypatch.syspath_prepend(TESTS)
    monkeypatch.chdir(d)
    assert main(["run", "--config", "run2.toml", *SPECS, "--run-dir", "run", "--from", "verify"]) == 1
    err = capsys.readouterr().err
    assert "check(s) failed in verify" in err
    md = (d / "run/report/report.md").read_text()
    assert "does NOT pass verification" in md and "**FAIL**" in md


@pytest.mark.parametrize("toml, message", [
    ("[search]\ntrails = 5\n", "unknown key search.trails. Did you mean 'search.trials'?"),
    ("trials = 5\n", "unknown key 'trials'. Did you mean 'search.trials'?"),
    ("[serach]\ntrials = 5\n", "unknown section [serach]. Did you mean 'search"),
    ("[search]\ntrials = \"many\"\n", "search.trials = 'many' must be int"),
    ("budget = 0.8\n", "budget = 0.8 must be a string"),
    ("[qat\n", "is not valid TOML"),
    ("budget = \"0.8\"\n", "budget"),
    ("budget = \"1.5x\"\n", "at or above FP32"),
    ("[search]\nsampler = \"cmaes\"\n", "unknown sampler 'cmaes'"),
    ("[search]\nevaluate = \"engin\"\n", "search.evaluate = 'engin' is not valid; choose from simulation, engine. Did you mean 'engine'?"),
    ("[scan]\ncalib_method = \"kl\"\n", "kl"),
    ("[scan]\nmethod = \"engin\"\n", "scan.method = 'engin' is not valid; choose from auto, fast, naive, engine. "
     "Did you mean 'engine'?"),
    ("[qat]\nenabled = true\n", "states no training recipe"),
])
def test_bad_configuration_is_refused_before_any_work(toml, message, tmp_path, monkeypatch, capsys):
    import pipeline_task

    monkeypatch.setattr(pipeline_task, "model", lambda: pytest.fail("the model was built before the config was checked"))
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml)
    assert main(["run", "--config", str(cfg), *SPECS, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error:") and message in err, err
    assert not (tmp_path / "run" / "pipeline.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--from", "qat", "--until", "scan"], "--from qat comes after --until scan"),
    (["--from", "search"], "the stage 'inventory' has not finished"),
    (["--config", "/nonexistent.toml"], "is not a file"),
    (["--example", "mnist_resnet"], "are alternatives"),
])
def test_bad_command_lines(argv, message, tmp_path, capsys, monkeypatch):
    import pipeline_task

    monkeypatch.setattr(pipeline_task, "model", lambda: pytest.fail("the model was built before the input was checked"))
    (tmp_path / "run.toml").write_text(CONFIG)
    config = [] if "--config" in argv else ["--config", str(tmp_path / "run.toml")]
    assert main(["run", *config, *SPECS, "--run-dir", str(tmp_path / "run"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_flags_override_the_configuration_and_say_so(tmp_path, capsys):
    from mixq.cli import build_parser
    from mixq.cli_run import config_of

    cfg = tmp_path / "run.toml"
    cfg.write_text('budget = "0.7x"\n[search]\ntrials = 12\n')
    args = build_parser().parse_args(["run", "--config", str(cfg), "--trials", "20"])
    c = config_of(args)
    assert c.get("search", "trials") == 20 and c.get("", "budget") == "0.7x"
    assert "--trials 20 overrides search.trials = 12" in capsys.readouterr().out


def test_the_search_stage_passes_the_search_settings_on(tmp_path):
    from types import SimpleNamespace

    from mixq.pipeline import Pipeline
    from mixq.run_config import RunConfig

    task = SimpleNamespace(name="t", search_fn=None, train_fn=None, train_recipe=None)
    default = Pipeline(RunConfig.build(), tmp_path, ["--example", "x"], task, ["run"]).args_of("search")
    # the baseline is on and plans are simulated unless asked otherwise (and old runs stay current)
    assert "--no-random-baseline" not in default and "--evaluate" not in default
    cfg = RunConfig.build({"budget": "0.7x", "search": {"trials": 12, "random_baseline": False, "sampler": "random",
                                                        "evaluate": "engine"}})
    args = Pipeline(cfg, tmp_path, ["--example", "x"], task, ["run"]).args_of("search")
    assert "--no-random-baseline" in args
    assert args[args.index("--trials") + 1] == "12" and args[args.index("--budget") + 1] == "0.7x"
    assert args[args.index("--sampler") + 1] == "random" and args[args.index("--evaluate") + 1] == "engine"
    # the scan on the engine too ([scan] method), parsed by the scan's own command line
    from mixq.cli import build_parser

    assert "--method" not in Pipeline(RunConfig.build(), tmp_path, ["--example", "x"], task, ["run"]).args_of("scan")
    cfg = RunConfig.build({"batch_axis": "none", "scan": {"method": "engine"}})
    ns = build_parser().parse_args(Pipeline(cfg, tmp_path, ["--example", "x"], task, ["run"]).args_of("scan"))
    assert ns.method == "engine" and ns.batch_axis == "none"


def test_a_stage_is_current_only_with_its_fingerprint_and_its_files_unchanged(tmp_path):
    """The record logic alone (no stage runs): fingerprints chain through the files earlier stages wrote."""
    from types import SimpleNamespace

    from mixq.pipeline import Pipeline, _files
    from mixq.run_config import RunConfig

    task = SimpleNamespace(name="t", search_fn=None, train_fn=None, train_recipe=None)
    p = Pipeline(RunConfig.build(), tmp_path, ["--example", "x"], task, ["run"])
    p.task_fp = "a" * 64
    out = tmp_path / "scan" / "sensitivity.json"
    out.parent.mkdir()
    out.write_text("{}")
    fp = p.fingerprint("scan", ["scan", "--seed", "0"])
    assert fp == p.fingerprint("scan", ["scan", "--seed", "0", "--fresh"])  # --fresh is how, not what
    assert fp != p.fingerprint("scan", ["scan", "--seed", "1"])
    p.records["scan"] = {"fingerprint": fp, "files": _files([out])}
    assert p.current("scan", fp) and not p.current("scan", "b" * 64)
    search_fp = p.fingerprint("search", ["search"])
    out.write_text('{"changed": 1}')
    assert not p.current("scan", fp)  # a file changed behind the pipeline
    p.records["scan"]["files"] = _files([out])
    assert p.fingerprint("search", ["search"]) != search_fp  # what the scan wrote changed: the search is stale
    p.task_fp = "c" * 64
    assert p.fingerprint("scan", ["scan", "--seed", "0"]) != fp  # other weights or calibration data
    out.unlink()
    assert not p.current("scan", p.records["scan"]["fingerprint"])


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_the_shipped_configurations_are_valid(path):
    from mixq.run_config import RunConfig

    cfg = RunConfig.load(path)
    assert cfg.get("", "example") and cfg.get("", "run_dir")
