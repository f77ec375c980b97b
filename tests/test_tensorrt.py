"""TensorRT engines: build from mixq's tensorrt-flavour ONNX, serialize, time, profile, inspect.

These run only where ``tensorrt`` imports and a CUDA device is usable; elsewhere they are skipped
with the reason (the pure-JSON parts of the inspector are tested in test_trtexec.py everywhere).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mixq.latency import tensorrt as mtrt

OK, WHY = mtrt.available()
needs_trt = pytest.mark.skipif(not OK, reason=f"needs TensorRT >= 10 and a CUDA GPU: {WHY}")
pytestmark = [pytest.mark.gpu]


def test_missing_tensorrt_raises_with_install_hint(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(mtrt.TensorRTUnavailableError, match="pip install"):
        mtrt.build_engine(b"")
    ok, why = mtrt.available()
    assert not ok and "TensorRT is not installed" in why


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x)) + x
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import mixq
    from mixq.export import apply_plan, export_float_graph, save_onnx

    torch.manual_seed(0)
    model = Small().eval()
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    q = mixq.quantize(model, "int8", backend="tensorrt", calib_data=calib)
    graph = export_float_graph(q, calib[0][:1])
    d = tmp_path_factory.mktemp("trt")
    paths = {}
    for name, plan in (("fp32", "fp32"), ("int8", "int8"),
                       ("mixed", mixq.QuantPlan(backend="tensorrt", default="int8", layers={"conv2": "fp32"}))):
        paths[name] = save_onnx(apply_plan(graph, q, plan), d / f"{name}.onnx")
    return q, graph, paths, calib[0][:1].numpy()


@needs_trt
def test_build_serialize_run_and_time(exported, tmp_path):
    q, graph, paths, x = exported
    eng = mtrt.Engine.from_onnx(paths["int8"])
    out = eng.run({graph.input_names[0]: x})
    ref = q(torch.from_numpy(x)).detach().numpy()
    assert next(iter(out.values())).shape == ref.shape
    eng.save(tmp_path / "int8.plan")
    again = mtrt.Engine.load(tmp_path / "int8.plan")
    assert next(iter(again.run({graph.input_names[0]: x}).values())).shape == ref.shape
    st = eng.latency(runs=20, warmup=5)
    assert st["runs"] == 20 and st["p25_ms"] <= st["median_ms"] <= st["p75_ms"]
    prof = eng.profile(runs=5, warmup=2)
    assert prof and all(p["median_ms"] >= 0 for p in prof)


@needs_trt
def test_inspector_confirms_int8_and_float_layers(exported):
    q, graph, paths, _ = exported
    node_map = {n: u for u, nodes in graph.unit_nodes.items() for n in nodes}
    assert node_map
    for name, expect_low in (("int8", {"conv1", "conv2", "fc"}), ("mixed", {"conv1", "fc"}), ("fp32", set())):
        eng = mtrt.Engine.from_onnx(paths[name])
        info = eng.inspect()
        assert "Layers" in info and ("Bindings" in info or "I/O Tensors" in info)
        plan = {u: ("int8" if u in expect_low else "fp32") for u in q.mixq.kinds}
        rep = eng.precision_report(plan, node_map=node_map)
        low = {u for u, r in rep["units"].items() if any(p in mtrt.LOW_PRECISIONS for p in r["observed"])}
        assert expect_low <= low | set(rep["mismatches"])
        assert not rep["mismatches"], rep


@needs_trt
def test_weak_typing_only_on_tensorrt_10(exported):
    _, _, paths, _ = exported
    major, _ = mtrt.trt_version()
    if major >= 11:
        with pytest.raises(mtrt.EngineBuildError, match="strongly typed"):
            mtrt.build_engine(paths["int8"], strongly_typed=False)
    else:
        assert mtrt.build_engine(paths["int8"], strongly_typed=False)


@needs_trt
def test_tensorrt_latency_model_measures_and_caches(exported):
    import mixq
    from mixq.export import apply_plan

    q, graph, _, x = exported
    lat = mtrt.TensorRTLatency(lambda a: apply_plan(graph, q, mixq.QuantPlan(backend="tensorrt", default="fp32",
                                                                             layers=a)).SerializeToString(),
                               q.mixq.kinds, runs=20, warmup=5)
    a = lat(mixq.QuantPlan(backend="tensorrt", default="int8"))
    assert a > 0 and lat(mixq.QuantPlan(backend="tensorrt", default="int8")) == a


# ------------------------------------------------------------------ API differences, with a stand-in module
class _Flags:
    def __init__(self, **members):
        for k, v in members.items():
            setattr(self, k, v)


def fake_tensorrt(version: str):
    """A minimal stand-in for the ``tensorrt`` module with the 10.x or 11.x enum surface."""
    import types

    calls = {"create_network": [], "set_flag": [], "profiles": []}
    major = int(version.split(".")[0])
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version
    nf = {"STRONGLY_TYPED": 5} | ({"EXPLICIT_BATCH": 0} if major < 11 else {})
    mod.NetworkDefinitionCreationFlag = _Flags(**nf)
    bf = {"TF32": 7, "REFIT": 8} | ({"INT8": 1, "FP16": 0, "BF16": 17} if major < 11 else {})
    mod.BuilderFlag = _Flags(**bf)
    mod.ProfilingVerbosity = _Flags(DETAILED="detailed", LAYER_NAMES_ONLY="names")
    mod.MemoryPoolType = _Flags(WORKSPACE="ws")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Tensor:
        name, shape = "x", (1, 3, 8, 8)

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return Tensor()

    class Config:
        def __init__(self):
            self.profiling_verbosity = None

        def set_flag(self, f):
            calls["set_flag"].append(f)

        def set_memory_pool_limit(self, pool, n):
            calls["workspace"] = n

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            calls["create_network"].append(flags)
            return Network()

        def create_builder_config(self):
            calls["config"] = Config()
            return calls["config"]

        def build_serialized_network(self, network, config):
            return b"PLAN"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse(self, data):
            return True

    mod.Logger, mod.Builder, mod.OnnxParser = Logger, Builder, OnnxParser
    return mod, calls


@pytest.mark.parametrize("version", ["10.13.0.35", "11.4.0.106"])
def test_build_flags_follow_the_tensorrt_version(monkeypatch, version):
    import sys

    mod, calls = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    assert mtrt.trt_version() == tuple(int(p) for p in version.split(".")[:2])
    assert mtrt.build_engine(b"onnx", workspace_mb=64) == b"PLAN"
    strong = calls["create_network"][-1]
    # 10.x: strong typing is opt-in through the creation flag; 11.x: always on, the flag is not passed.
    assert strong == (1 << 5 if version.startswith("10") else 0)
    assert calls["set_flag"] == [] and calls["config"].profiling_verbosity == "detailed"
    assert calls["workspace"] == 64 << 20
    if version.startswith("10"):
        mtrt.build_engine(b"onnx", strongly_typed=False)
        assert calls["create_network"][-1] == 0 and calls["set_flag"] == [1, 0]  # INT8, FP16
    else:
        with pytest.raises(mtrt.EngineBuildError, match="strongly typed"):
            mtrt.build_engine(b"onnx", strongly_typed=False)


def test_engine_latency_is_the_shared_stats_type_on_cuda_events():
    """Engine.latency / setup on a stand-in device (no GPU here): CUDA-event times -> LatencyStats."""
    import types

    import numpy as np

    from mixq.latency.stats import LatencyStats

    times = iter([2.0, 1.0, 4.0, 3.0, 5.0])
    enqueued = []
    eng = object.__new__(mtrt.Engine)
    eng.trt = types.SimpleNamespace(__version__="10.13.0.35")
    eng.io = [mtrt._IO("x", True, np.dtype(np.float32), (4, 3, 8, 8)), mtrt._IO("y", False, np.dtype(np.float32), (4, 10))]
    eng._fill_random = lambda seed=0: None
    eng._enqueue = lambda: enqueued.append(1)
    eng.cuda = types.SimpleNamespace(synchronize=lambda: None, time_ms=lambda fn: (fn(), next(times))[1],
                                     device_name=lambda: "Fake GPU")
    st = eng.latency(runs=5, warmup=2)
    assert isinstance(st, LatencyStats) and len(enqueued) == 7
    assert (st.median_ms, st.p25_ms, st.p75_ms, st.min_ms, st.mean_ms) == (3.0, 2.0, 4.0, 1.0, 3.0)
    assert (st.runs, st.warmup, st.clock, st.batch) == (5, 2, "cuda_event", 4)
    with pytest.raises(mtrt.LatencyError, match="runs"):
        eng.latency(runs=0)
    setup = eng.setup({"workspace_mb": 64, "optimization_level": 5, "timing_cache": "/tmp/x"})
    assert setup.engine == "tensorrt 10.13.0.35" and setup.device == "Fake GPU" and setup.clock == "cuda_event"
    assert setup.level == "5" and setup.input_shapes == {"x": [4, 3, 8, 8]} and setup.options == {"workspace_mb": 64}
