"""One statistics type and one timing loop for engine and latency, and saved measurements that know
(and check) what they were measured with."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import mixq
from mixq.latency import stats as stats_mod
from mixq.latency.base import LatencyError, MeasuredLatency
from mixq.latency.stats import LatencyStats, MeasurementSetup, time_runs


class FakeTime:
    """perf_counter advances by ``wall`` seconds and thread_time by ``cpu`` seconds per timed run."""

    def __init__(self, wall, cpu):
        self.wall, self.cpu, self.t_wall, self.t_cpu, self.k = list(wall), list(cpu), 0.0, 0.0, 0

    def run(self):
        self.t_wall += self.wall[self.k % len(self.wall)]
        self.t_cpu += self.cpu[self.k % len(self.cpu)]
        self.k += 1

    def perf_counter(self):
        return self.t_wall

    def thread_time(self):
        return self.t_cpu


@pytest.mark.parametrize("clock", ["wall", "thread"])
def test_time_runs_against_numpy_on_a_scripted_clock(monkeypatch, clock):
    wall = [0.004, 0.001, 0.003, 0.010, 0.002]
    cpu = [0.002, 0.001, 0.001, 0.003, 0.002]
    fake = FakeTime(wall, cpu)
    monkeypatch.setattr(stats_mod, "time", fake)
    st = time_runs(fake.run, runs=5, warmup=5, clock=clock, batch=3, threads=1)
    ref = np.asarray(wall if clock == "wall" else cpu) * 1e3
    assert isinstance(st, LatencyStats) and fake.k == 10  # 5 untimed + 5 timed
    assert st.median_ms == pytest.approx(np.median(ref)) and st.mean_ms == pytest.approx(ref.mean())
    assert st.p25_ms == pytest.approx(np.percentile(ref, 25)) and st.p75_ms == pytest.approx(np.percentile(ref, 75))
    assert st.min_ms == pytest.approx(ref.min()) and st.iqr_ms == pytest.approx(st.p75_ms - st.p25_ms)
    assert st.wall_median_ms == pytest.approx(3.0) and st.cpu_median_ms == pytest.approx(2.0)
    assert (st.runs, st.warmup, st.clock, st.batch, st.threads) == (5, 5, clock, 3, 1)


def test_stats_read_as_attributes_or_keys_and_round_trip():
    st = LatencyStats.from_times([1.0, 2.0, 3.0, 4.0, 100.0], warmup=2, clock="wall", batch=1)
    assert (st.median_ms, st.p25_ms, st.p75_ms, st.mean_ms, st.min_ms) == (3.0, 2.0, 4.0, 22.0, 1.0)
    assert st["median_ms"] == 3.0 and st["iqr_ms"] == 2.0 and dict(st)["batch"] == 1
    assert LatencyStats.from_dict(json.loads(json.dumps(st.to_dict()))) == st
    with pytest.raises(KeyError):
        st["p25"]
    with pytest.raises(LatencyError):
        LatencyStats.from_times([])
    for bad in ({"runs": 0, "warmup": 0}, {"runs": 3, "warmup": -1}, {"runs": 3, "warmup": 0, "clock": "cpu"}):
        with pytest.raises(LatencyError):
            time_runs(lambda: None, **bad)


def test_setup_differences_name_the_fields():
    a = MeasurementSetup("onnxruntime 1.0", "cpu X", 1, "time.perf_counter", "all", ("B", "A"), {"x": (1, 3)})
    assert a.disabled_optimizers == ("A", "B") and a.input_shapes == {"x": [1, 3]}
    assert MeasurementSetup.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    b = MeasurementSetup("onnxruntime 1.1", "cpu X", 2, "time.perf_counter", "all", ("A", "B"), {"x": [1, 3]})
    assert set(a.differences(b)) == {"engine", "threads"}


# ------------------------------------------------------------------------------ on ONNX Runtime
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    return mixq.quantize(Net().eval(), "int8", backend="ort-cpu", calib_data=calib), calib


def test_engine_and_latency_open_sessions_through_one_builder(qmodel, monkeypatch):
    import mixq.engine.ort as eng_mod
    from mixq.latency.ort import OrtLatency

    q, calib = qmodel
    calls = []
    real = eng_mod.session

    def counting(*args, **kwargs):
        calls.append(args[1:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(eng_mod, "session", counting)
    lat = OrtLatency(q, calib[0][:2], runs=3, warmup=1, threads=1, level="extended")
    st = lat.details({"conv": "int8"})
    assert calls == [(1, "extended", list(eng_mod.DEFAULT_DISABLED))]
    assert st["runs"] == 3 and st["warmup"] == 1 and st["batch"] == 2 and st["clock"] == "thread"
    assert set(st) >= set(LatencyStats.from_times([1.0]).to_dict())  # the one type's fields, by their names
    engine = eng_mod.build(lat.onnx_model({"conv": "int8"}), example_inputs=calib[0][:2])
    est = engine.latency(batch=2, runs=3, warmup=1)
    assert isinstance(est, LatencyStats) and (est.batch, est.threads, est.clock) == (2, 1, "wall")
    assert len(calls) == 2
    import onnxruntime

    setup = engine.setup(clock="thread", batch=5)
    assert setup.engine == f"onnxruntime {onnxruntime.__version__}" and setup.clock == "time.thread_time"
    assert setup.input_shapes == {engine.input_names[0]: [5, 3, 8, 8]} and setup.level == "all"
    assert setup.disabled_optimizers == tuple(sorted(eng_mod.DEFAULT_DISABLED)) and setup.threads == 1


def test_saved_measurements_carry_their_setup_and_refuse_another(qmodel, tmp_path):
    from mixq.latency.ort import OrtLatency

    q, calib = qmodel
    example = calib[0][:1]
    lat = OrtLatency(q, example, runs=2, warmup=0)
    lat({"conv": "int8"})
    path = lat.save(tmp_path / "lat.json")
    saved = json.loads(path.read_text())["setup"]
    import onnxruntime

    assert saved["engine"] == f"onnxruntime {onnxruntime.__version__}" and saved["threads"] == 1
    assert saved["clock"] == "time.thread_time" and saved["level"] == "all"
    assert saved["disabled_optimizers"] == sorted(["DoubleQDQPairsRemover", "WeightBiasQuantization"])
    assert saved["input_shapes"] == {"input0": [1, 3, 8, 8]} and saved["device"] == stats_mod.cpu_model()

    same = OrtLatency(q, example, runs=5, warmup=1)
    assert same.load(path) == 1 and same.records()[0][1] == lat.records()[0][1]
    others = {
        "threads": OrtLatency(q, example, threads=2, clock="thread"),
        "clock": OrtLatency(q, example, clock="wall"),
        "disabled_optimizers": OrtLatency(q, example, disabled_optimizers=()),
        "level": OrtLatency(q, example, level="extended"),
        "input_shapes": OrtLatency(q, calib[0][:2]),
    }
    for field, other in others.items():
        with pytest.raises(LatencyError, match=field):
            other.load(path)
        assert other.stats == {}
    for field, value in (("engine", "onnxruntime 0.0.1"), ("device", "another CPU")):
        data = json.loads(path.read_text())
        data["setup"][field] = value
        (tmp_path / f"{field}.json").write_text(json.dumps(data))
        with pytest.raises(LatencyError, match=field):
            OrtLatency(q, example).load(tmp_path / f"{field}.json")
    data = json.loads(path.read_text())
    del data["setup"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(LatencyError, match="setup"):
        OrtLatency(q, example).load(tmp_path / "old.json")


def test_a_measured_latency_without_a_known_setup_loads_only_its_own_kind(tmp_path):
    class Fixed(MeasuredLatency):
        def __init__(self) -> None:
            super().__init__({"a": "linear"}, "ort-cpu")

        def _measure(self, assignment):
            return LatencyStats.from_times([2.0, 4.0])

    a = Fixed()
    assert a({"a": "int8"}) == 3.0
    a.save(tmp_path / "f.json")
    assert Fixed().load(tmp_path / "f.json") == 1
    b = Fixed()
    b.setup = MeasurementSetup("x 1", "cpu")
    with pytest.raises(LatencyError, match="setup"):
        b.load(tmp_path / "f.json")
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(LatencyError, match="not a file written"):
        Fixed().load(tmp_path / "junk.json")
