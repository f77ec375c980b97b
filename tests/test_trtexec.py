"""trtexec JSON import: files in trtexec's own output format (tests/data/trtexec/).

The profile and times files follow ``Profiler::exportJSONProfile`` / ``exportJSONTrace`` in
NVIDIA/TensorRT ``samples/common/sampleReporting.cpp`` byte for byte in layout (``{ "count" : N }``
first, ``, { "name" : ... }`` lines, lower-case ``H2d`` / ``D2h`` keys); ``*_trt8`` lacks
``medianMs`` like older versions. The names-only layer info is TensorRT 10's ``--exportLayerInfo``
layout; the detailed one is TensorRT 11's (``I/O Tensors`` instead of ``Bindings``), with layer
bodies shaped like NVIDIA's engine-inspector documentation.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mixq.latency.model import UnitGraph
from mixq.latency.trtexec import (OTHER, TrtexecFormatError, TrtexecLatency, layer_precision, layer_units,
                                  load_layer_info, load_profile, load_times, node_units, onnx_names_in,
                                  table_from_files, unit_of_path)

DATA = Path(__file__).parent / "data" / "trtexec"
UNITS = ["conv1", "maxpool", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.add", "avgpool", "fc"]


def _raw(name: str):
    return json.loads((DATA / name).read_text())


def test_profile_parses_count_and_layers_with_median():
    p = load_profile(DATA / "tiny_int8_profile.json")
    raw = _raw("tiny_int8_profile.json")
    assert p.count == raw[0]["count"] == 9730
    assert [layer.name for layer in p.layers] == [r["name"] for r in raw[1:]]
    assert [layer.ms for layer in p.layers] == [r["medianMs"] for r in raw[1:]]
    assert p.layers[0].is_reformat and not p.layers[1].is_reformat


def test_old_profile_without_median_uses_average():
    p = load_profile(DATA / "tiny_fp32_profile_trt8.json")
    raw = _raw("tiny_fp32_profile_trt8.json")
    assert all(layer.median_ms is None for layer in p.layers)
    assert [layer.ms for layer in p.layers] == [r["averageMs"] for r in raw[1:]]


def test_times_summary_matches_numpy_reference():
    raw = _raw("tiny_int8_times.json")
    assert {"startH2dMs", "endD2hMs", "computeMs", "latencyMs"} <= set(raw[0])
    t = load_times(DATA / "tiny_int8_times.json")
    comp = np.array([r["computeMs"] for r in raw])
    assert t.count == len(raw)
    assert t.median_compute_ms == pytest.approx(float(np.median(comp)))
    assert t.median_latency_ms == pytest.approx(float(np.median([r["latencyMs"] for r in raw])))
    assert t.p25_compute_ms <= t.median_compute_ms <= t.p75_compute_ms


@pytest.mark.parametrize("bad", [{"Layers": []}, [], [{"count": 3}, {"nom": "x"}], "not json"])
def test_profile_rejects_other_formats(tmp_path, bad):
    f = tmp_path / "p.json"
    f.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(TrtexecFormatError, match="trtexec profile"):
        load_profile(f)


def test_times_reject_a_profile():
    with pytest.raises(TrtexecFormatError, match="exportTimes"):
        load_times(DATA / "tiny_int8_profile.json")


@pytest.mark.parametrize("layer,names", [
    ("/conv1/Conv + /relu/Relu", ["/conv1/Conv", "/relu/Relu"]),
    ("PWN(PWN(/Sub), PWN(/Div))", ["/Sub", "/Div"]),
    ("Reformatting CopyNode for Input Tensor 0 to /conv1/Conv + /relu/Relu", ["/conv1/Conv", "/relu/Relu"]),
    ("{ForeignNode[/encoder/layer.0/attention/self/query/MatMul.../encoder/layer.0/output/LayerNorm/Add_1]}",
     ["/encoder/layer.0/attention/self/query/MatMul", "/encoder/layer.0/output/LayerNorm/Add_1"]),
])
def test_onnx_names_in_engine_layer_names(layer, names):
    assert onnx_names_in(layer) == names


@pytest.mark.parametrize("node,unit", [
    ("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"),
    ("/layer1/layer1.0/Add", "layer1.0.add"),
    ("/layer1/layer1.0/relu_1/Relu", None),
    ("/fc/weight_quantizer/QuantizeLinear_clone_0", "fc"),
    ("/Flatten", None),
    ("reshape_before_/fc/Gemm", None),
])
def test_unit_of_torchscript_style_names(node, unit):
    assert unit_of_path(node, UNITS) == unit


def test_unit_of_container_children():
    assert unit_of_path("/layer2/layer2.0/downsample/downsample.0/Conv", ["layer2.0.downsample.0"]) == \
        "layer2.0.downsample.0"
    assert unit_of_path("/encoder/layer.0/attention/self/query/MatMul", ["encoder.layer.0.attention.self.query"]) == \
        "encoder.layer.0.attention.self.query"


def test_fused_layer_maps_to_every_unit_in_it():
    name = "/layer1/layer1.0/conv2/weight_quantizer/QuantizeLinear_clone_0 + /layer1/layer1.0/conv2/Conv + " \
           "/layer1/layer1.0/Add + /layer1/layer1.0/relu_1/Relu"
    assert layer_units(name, UNITS) == ["layer1.0.conv2", "layer1.0.add"]


def test_node_units_reads_dynamo_name_scopes():
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    def node(op, name, scopes, inputs, outputs):
        n = helper.make_node(op, inputs, outputs, name=name)
        p = n.metadata_props.add()
        p.key, p.value = "pkg.torch.onnx.name_scopes", repr(scopes)
        return n

    nodes = [node("Relu", "node_Conv_3", ["", "layer1", "layer1.0", "layer1.0.conv1", "conv2d"], ["x"], ["a"]),
             node("Relu", "node_add", ["", "layer1", "layer1.0", "layer1.0.add", "add"], ["a"], ["b"]),
             node("Relu", "node_relu", ["", "layer1", "layer1.0", "layer1.0.relu", "relu"], ["b"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    m = node_units(helper.make_model(g), UNITS)
    assert m == {"node_Conv_3": "layer1.0.conv1", "a": "layer1.0.conv1", "node_add": "layer1.0.add",
                 "b": "layer1.0.add"}
    assert layer_units("node_Conv_3 + node_add + node_relu", UNITS, m) == ["layer1.0.conv1", "layer1.0.add"]


def test_table_attributes_every_millisecond():
    table = table_from_files(UNITS, {"fp32": DATA / "tiny_fp32_profile.json", "int8": DATA / "tiny_int8_profile.json"})
    for fmt, src in (("fp32", "tiny_fp32_profile.json"), ("int8", "tiny_int8_profile.json")):
        prof = load_profile(DATA / src)
        assert sum(table.ms[fmt].values()) == pytest.approx(prof.total_ms)
        assert table.totals[fmt] == pytest.approx(prof.total_ms)
    # The fused conv2 + add layer is split between its two units.
    conv2_add = [x for x in load_profile(DATA / "tiny_fp32_profile.json").layers if "conv2" in x.name][0]
    assert table.ms["fp32"]["layer1.0.conv2"] == pytest.approx(conv2_add.ms / 2)
    assert table.ms["fp32"]["layer1.0.add"] == pytest.approx(conv2_add.ms / 2)
    # The input reformat and the standalone input Q belong to conv1 (through its quantizer's name).
    assert table.reformat_ms["int8"]["conv1"] > 0
    # The output reformat names only a reshape: no unit owns it.
    assert table.ms["int8"][OTHER] > 0 and any("Output Tensor" in n for n in table.unmatched["int8"])


def test_table_scales_layers_to_the_times_file():
    times = {"fp32": DATA / "tiny_fp32_times.json", "int8": DATA / "tiny_int8_times.json"}
    table = table_from_files(UNITS, {"fp32": DATA / "tiny_fp32_profile.json", "int8": DATA / "tiny_int8_profile.json"},
                             times)
    for fmt in ("fp32", "int8"):
        assert sum(table.ms[fmt].values()) == pytest.approx(load_times(times[fmt]).median_compute_ms)


def test_trtexec_latency_predicts_uniform_plans_exactly_and_mixes_additively():
    times = {"fp32": DATA / "tiny_fp32_times.json", "int8": DATA / "tiny_int8_times.json"}
    table = table_from_files(UNITS, {"fp32": DATA / "tiny_fp32_profile.json", "int8": DATA / "tiny_int8_profile.json"},
                             times)
    graph = UnitGraph(units=tuple(UNITS), kinds={u: "conv" for u in UNITS})
    lat = TrtexecLatency(graph, table, backend=None)
    for fmt in ("fp32", "int8"):
        assert lat({u: fmt for u in UNITS}) == pytest.approx(table.totals[fmt])
    mixed = {"conv1": "int8", "fc": "int8"}
    expected = sum(table.ms["int8" if u in mixed else "fp32"][u] for u in UNITS) + \
        (5 / 7) * table.ms["fp32"][OTHER] + (2 / 7) * table.ms["int8"][OTHER]
    assert lat(mixed) == pytest.approx(expected)
    assert table.totals["int8"] < lat(mixed) < table.totals["fp32"]
    assert lat.deltas()[("conv1", "int8")] == pytest.approx(table.ms["int8"]["conv1"] - table.ms["fp32"]["conv1"])


def test_trtexec_latency_names_missing_formats():
    table = table_from_files(UNITS, {"fp32": DATA / "tiny_fp32_profile.json"})
    lat = TrtexecLatency(UnitGraph(units=tuple(UNITS), kinds={u: "conv" for u in UNITS}), table, backend=None)
    with pytest.raises(Exception, match="no trtexec profile for format 'int8'"):
        lat({"conv1": "int8"})


def test_layer_info_names_only_trt10():
    layers = load_layer_info(DATA / "tiny_int8_layers_names_trt10.json")
    assert layers[1] == {"Name": "/conv1/input_quantizer/QuantizeLinear"}
    assert all(layer_precision(x) == "unknown" for x in layers)


def test_layer_info_detailed_trt11_precisions():
    layers = {x["Name"]: x for x in load_layer_info(DATA / "tiny_mixed_layers_detailed_trt11.json")}
    assert "I/O Tensors" in _raw("tiny_mixed_layers_detailed_trt11.json")
    prec = {n: layer_precision(x) for n, x in layers.items()}
    assert prec["/conv1/weight_quantizer/QuantizeLinear_clone_0 + /conv1/Conv + /relu/Relu"] == "int8"
    assert prec["/layer1/layer1.0/conv1/Conv + /layer1/layer1.0/relu/Relu"] == "fp16"
    assert prec["/fc/Gemm"] == "fp32"
    assert prec["/conv1/input_quantizer/QuantizeLinear"] == "fp32"  # reads float, writes int8


def test_precision_report_flags_layers_that_stayed_float():
    from mixq.latency.tensorrt import precision_report

    raw = load_layer_info(DATA / "tiny_mixed_layers_detailed_trt11.json")
    layers = [{"name": x["Name"], "type": x.get("LayerType", ""), "precision": layer_precision(x),
               "units": layer_units(x["Name"], UNITS)} for x in raw]
    plan = {u: "fp32" for u in UNITS} | {"conv1": "int8", "fc": "int8"}
    rep = precision_report(layers, plan)
    assert rep["units"]["conv1"]["observed"] == ["fp32", "int8"]  # its input Q layer, then the int8 conv
    assert rep["mismatches"] == ["fc"]  # planned int8, ran fp32
    assert "layer1.0.conv1" not in rep["mismatches"]  # fp16 is float: matches its fp32 plan


TINY = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(self.relu(self.conv1(x))) + x)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(Block(16))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer1(self.maxpool(self.relu(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def model():
    torch.manual_seed(0)
    return TinyNet().eval()


def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
'''


@pytest.fixture
def tiny_module(tmp_path, monkeypatch):
    (tmp_path / "mixq_tiny_model.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mixq_tiny_model"


def bench_args(*argv):
    import argparse

    from mixq import cli, cli_bench

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    cli_bench.register(sub, cli._add_task_args, cli._task, cli._run_dir)
    return p.parse_args(["bench", *argv])


def test_bench_cli_reads_trtexec_files(tiny_module, tmp_path):
    args = bench_args("--model", f"{tiny_module}:model", "--calib", f"{tiny_module}:calib", "--backend", "tensorrt",
                      "--trtexec", f"fp32={DATA / 'tiny_fp32_profile.json'},{DATA / 'tiny_fp32_times.json'}",
                      "--trtexec", f"int8={DATA / 'tiny_int8_profile.json'},{DATA / 'tiny_int8_times.json'}",
                      "--random", "2", "--run-dir", str(tmp_path / "run"), "--report", str(tmp_path / "r.md"))
    assert args.func(args) == 0
    out = json.loads((tmp_path / "run" / "bench.json").read_text())
    rows = {r["plan"]: r for r in out["rows"]}
    assert rows["fp32"]["median_ms"] == pytest.approx(load_times(DATA / "tiny_fp32_times.json").median_compute_ms)
    assert rows["all-int8"]["median_ms"] == pytest.approx(load_times(DATA / "tiny_int8_times.json").median_compute_ms)
    assert len(out["rows"]) == 5 and "| fp32 |" in (tmp_path / "r.md").read_text()
    assert {r["unit"] for r in out["per_unit_ms"]} >= set(UNITS)


def test_bench_cli_rejects_a_malformed_trtexec_spec(tiny_module, tmp_path):
    args = bench_args("--model", f"{tiny_module}:model", "--calib", f"{tiny_module}:calib", "--backend", "tensorrt",
                      "--trtexec", "int8", "--run-dir", str(tmp_path))
    with pytest.raises(Exception, match="FMT=PROFILE"):
        args.func(args)
