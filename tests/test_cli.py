"""The command line on a user task given as module:function specs."""
from __future__ import annotations

import json

import pytest

from mixq.cli import main

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


def test_run_quantizes_verifies_and_times(tmp_path, capsys):
    assert main(["run", *SPECS, "--run-dir", str(tmp_path), "--runs", "5"]) == 0
    out = json.loads((tmp_path / "run.json").read_text())
    assert out["fp32_metric"] == 100.0 and "verify" in out and out["latency_ms"]["fp32"] > 0
    assert "[3/3]" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["inventory", "--model", "cli_task:nope", "--calib", "x:y", "--eval", "x:y", "--metric", "x:y"], "no callable 'nope'"),
    (["inventory", "--model", "cli_task:model"], "go together"),
    (["inventory", "--example", "mnist"], "unknown example 'mnist'"),
    (["quantize", *SPECS, "--format", "int9"], "unknown format 'int9'"),
    (["quantize", *SPECS[:-1], "cli_task:nan_metric"], "NaN/Inf score"),
    (["quantize", *SPECS, "--plan", "/nonexistent/plan.json"], "does not exist"),
])
def test_bad_input_is_a_one_line_error(argv, message, tmp_path, capsys):
    assert main([*argv, "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error:") and message in err
