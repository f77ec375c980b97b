"""The command line on a user task given as module:function specs."""
from __future__ import annotations

import json

import pytest
import torch

from mixq.cli import main
from mixq.task import Task

SPECS = ["--model", "cli_task:model", "--calib", "cli_task:calib_data", "--eval", "cli_task:eval_data",
         "--metric", "cli_task:metric"]


def test_inventory_writes_json(tmp_path, capsys):
    assert main(["inventory", *SPECS, "--run-dir", str(tmp_path)]) == 0
    layers = json.loads((tmp_path / "inventory.json").read_text())["units"]
    assert {"stem", "layer1.add", "fc"} <= {l["name"] for l in layers}
    assert "units" in capsys.readouterr().out


def test_quantize_compares_calibrators(tmp_path):
    assert main(["quantize", *SPECS, "--run-dir", str(tmp_path), "--calib-methods", "max,percentile"]) == 0
    rows = json.loads((tmp_path / "quantize.json").read_text())["rows"]
    assert [r["calib_method"] for r in rows] == ["-", "max", "percentile"]
    assert rows[0]["metric"] == 100.0


def test_deploy_quantizes_verifies_and_times(tmp_path, capsys):
    assert main(["deploy", *SPECS, "--run-dir", str(tmp_path), "--runs", "5"]) == 0
    out = json.loads((tmp_path / "deploy.json").read_text())
    assert out["fp32_metric"] == 100.0 and "verify" in out and out["latency_ms"]["fp32"] > 0
    assert out["verify"]["noise_floor"]["samples"] == out["verify"]["engine"]["samples"]  # measured by default
    assert "[3/3]" in capsys.readouterr().out
    assert main(["deploy", *SPECS, "--run-dir", str(tmp_path), "--runs", "2", "--no-noise-floor"]) == 0
    assert json.loads((tmp_path / "deploy.json").read_text())["verify"]["noise_floor"] is None


@pytest.mark.parametrize("argv, message", [
    (["inventory", "--model", "cli_task:nope", "--calib", "x:y", "--eval", "x:y", "--metric", "x:y"], "no callable 'nope'"),
    (["inventory", "--model", "cli_task:model"], "go together"),
    (["inventory", "--example", "mnist"], "unknown example 'mnist'"),
    (["quantize", *SPECS, "--format", "int9"], "unknown format 'int9'"),
    (["quantize", *SPECS[:-1], "cli_task:nan_metric"], "NaN/Inf score"),
    (["quantize", *SPECS, "--plan", "/nonexistent/plan.json"], "does not exist"),
    (["scan", *SPECS[:-1], "cli_task:exploding_metric", "--split", "search"], "has no search split"),
])
def test_bad_input_is_a_one_line_error(argv, message, tmp_path, capsys):
    assert main([*argv, "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error:") and message in err


def test_deploy_exits_nonzero_when_verification_fails(tmp_path, monkeypatch, capsys):
    import mixq.verify

    real = mixq.verify.verify

    def strict(*a, **kw):  # the real engine and comparison, under a target no engine can meet (no floor to waive it)
        return real(*a, **{**kw, "targets": {"agreement": 1.01}, "noise_floor": False})

    monkeypatch.setattr(mixq.verify, "verify", strict)
    assert main(["deploy", *SPECS, "--run-dir", str(tmp_path), "--runs", "2"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "FAILED" in captured.err
    assert json.loads((tmp_path / "deploy.json").read_text())["passed"] is False


def test_flags_beside_a_plan_win_and_are_said(tmp_path, capsys):
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"backend": "ort-cpu", "default": "int8", "calib_method": "max"}))
    assert main(["quantize", *SPECS, "--run-dir", str(tmp_path), "--plan", str(plan),
                 "--backend", "tensorrt", "--calib-method", "percentile"]) == 0
    out = capsys.readouterr().out
    assert "--backend tensorrt overrides the plan's backend 'ort-cpu'" in out
    assert "--calib-method percentile overrides the plan's calib_method 'max'" in out
    result = json.loads((tmp_path / "quantize.json").read_text())
    assert result["backend"] == "tensorrt" and result["rows"][1]["calib_method"] == "percentile"
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["backend"] == "tensorrt" and saved["calib_method"] == "percentile"


@pytest.mark.parametrize("command", ["inventory", "quantize", "deploy", "run", "export", "verify", "scan"])
def test_a_bad_run_dir_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    import cli_task

    monkeypatch.setattr(cli_task, "model", lambda: pytest.fail("the model was built before the run folder was checked"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for bad, says in ((blocker, "is a file"), (blocker / "sub", "cannot create the run folder")):
        assert main([command, *SPECS, "--run-dir", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mixq: error:") and says in err and str(bad) in err


@pytest.mark.parametrize("argv, message", [
    (["deploy", "--example", "mnist_resnet", *SPECS], "are alternatives"),
    (["quantize", *SPECS, "--plan", "p.json", "--format", "int8"], "--format int8 and --plan p.json are alternatives"),
    (["export", *SPECS, "--plan", "p.json", "--format", "fp16"], "are alternatives"),
    (["quantize", *SPECS, "--calib-methods", "max,kl"], "unknown calibration method(s) ['kl']"),
])
def test_conflicting_options_are_errors(argv, message, tmp_path, capsys):
    assert main([*argv, "--run-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_export_writes_the_file_to_ship_and_verify_checks_that_very_file(tmp_path, capsys):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    assert main(["export", *SPECS, "--run-dir", str(tmp_path)]) == 0
    out = tmp_path / "model-ort-cpu-int8.onnx"
    assert out.is_file() and (tmp_path / "model-ort-cpu-int8.ort.onnx").is_file()
    assert "file to ship" in capsys.readouterr().out
    assert main(["verify", *SPECS, "--run-dir", str(tmp_path), "--onnx", str(out), "--no-noise-floor"]) == 0
    capsys.readouterr()
    # The same file with the classifier's weight scales negated: verify must run that file, and fail.
    m = onnx.load(str(out))
    init = next(i for i in m.graph.initializer if i.name == "fc.weight_scale")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(-1.0), init.name))
    bad = tmp_path / "perturbed.onnx"
    onnx.save(m, str(bad))
    assert main(["verify", *SPECS, "--run-dir", str(tmp_path), "--onnx", str(bad), "--no-noise-floor"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["export", *SPECS, "--batch-axis", "first"], "--batch-axis must be an input axis"),
    (["verify", *SPECS, "--onnx", "/nonexistent.onnx"], "is not a file"),
])
def test_bad_deploy_options(argv, message, tmp_path, capsys):
    assert main([*argv, "--run-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_quantize_says_what_was_realised_and_refuses_a_format_no_unit_runs_before_evaluating(tmp_path, capsys):
    assert main(["quantize", *SPECS, "--run-dir", str(tmp_path), "--format", "int4_wo"]) == 0
    out = capsys.readouterr().out
    assert "int4_wo on 1 of 10 units; 9 stay fp32 because ort-cpu runs int4_wo only on linear" in out
    row = json.loads((tmp_path / "quantize.json").read_text())["rows"][1]
    assert row["realised"]["counts"] == {"fp32": 9, "int4_wo": 1} and len(row["drop_ci"]) == 2
    argv = ["deploy", *SPECS[:-1], "cli_task:exploding_metric", "--run-dir", str(tmp_path), "--format", "fp8_e4m3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no unit of the model can run 'fp8_e4m3' on backend 'ort-cpu'" in err and "int8 on conv" in err


def test_search_reports_baselines_and_the_searched_plan_on_the_test_split(tmp_path, capsys):
    # --front: this model runs in about 0.05 ms, where a budget would be judged on timer noise
    argv = ["search", *SPECS, "--run-dir", str(tmp_path), "--front", "--trials", "6", "--runs", "3",
            "--retime-seconds", "0.02", "--no-progress"]
    assert main(argv) == 0
    out = json.loads((tmp_path / "search.json").read_text())
    names = [r["plan"] for r in out["rows"]]
    assert names[:3] == ["fp32", "all-int8", "weighted-only int8"] and "searched" not in names
    assert len(out["search"]["records"]) == 6 and out["search"]["records"][0]["source"] == "fp32"
    assert (tmp_path / "search.md").is_file() and "test split" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    ([], "give a latency budget"),
    (["--budget", "fast"], "budget 'fast' is not understood"),
    (["--budget", "0.5x", "--sampler", "tpee"], "unknown sampler 'tpee'"),
    (["--budget", "0.5x", "--trials", "0"], "must be at least 1"),
])
def test_search_refuses_bad_input_before_any_work(extra, message, tmp_path, capsys):
    argv = ["search", *SPECS[:-1], "cli_task:exploding_metric", "--run-dir", str(tmp_path), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_scan_on_the_search_split_measures_the_search_data(tmp_path, capsys, monkeypatch):
    import cli_task

    from mixq.sensitivity import SensitivityTable

    def search_data():
        g = torch.Generator().manual_seed(7)
        x = torch.randn(16, 1, 16, 16, generator=g)
        return [(x, cli_task.model()(x).argmax(1))]

    real = cli_task.eval_data
    monkeypatch.setattr("mixq.task.Task.from_specs", classmethod(lambda cls, *specs, name=None: Task(
        "cli_task", cli_task.model, cli_task.calib_data, real, cli_task.metric, search_data)))
    args = ["scan", *SPECS, "--formats", "int8", "--no-proxies", "--bootstrap", "0", "--no-progress"]
    assert main([*args, "--split", "search", "--run-dir", str(tmp_path / "s")]) == 0
    assert main([*args, "--run-dir", str(tmp_path / "e")]) == 0
    searched = SensitivityTable.load(tmp_path / "s" / "sensitivity.json")
    evaluated = SensitivityTable.load(tmp_path / "e" / "sensitivity.json")
    assert (searched.samples, evaluated.samples) == (16, 32)
