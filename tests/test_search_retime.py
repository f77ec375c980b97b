"""The fresh-process re-timing: every round times new ONNX Runtime sessions (a session's speed can sit ~30% off
another's of the same model for its whole life), each plan right after FP32."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import mixq.engine.ort
from mixq.search_retime import retime


def _matmul_model(path, k: int) -> str:
    w = numpy_helper.from_array(np.random.default_rng(k).standard_normal((16, 16)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h0"])]
    for i in range(k):  # k more MatMuls: a slower model
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("Identity", [f"h{k}"], ["y"]))
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return str(path)


def test_every_round_builds_new_sessions_and_ratios_follow_the_plans(tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.ones((1, 16), np.float32))
    built = []
    real = mixq.engine.ort.build

    def counting(path, *a, **kw):
        built.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(mixq.engine.ort, "build", counting)
    job = {"fp32": _matmul_model(tmp_path / "fp32.onnx", 40), "inputs": [str(tmp_path / "x.npy")],
           "plans": {"same": str(tmp_path / "fp32.onnx"), "small": _matmul_model(tmp_path / "small.onnx", 0)},
           "threads": 1, "runs": 20, "warmup": 2, "rounds": 3, "clock": "thread", "min_seconds": 0.0}
    out = retime(job)
    # one probe session, then per round one FP32 session and one per plan
    assert len(built) == 1 + 3 * (1 + 2)
    assert built.count(str(tmp_path / "small.onnx")) == 3
    for name in ("same", "small"):
        assert len(out["plans"][name]["rounds_ms"]) == len(out["plans"][name]["ratios"]) == 3
    assert out["plans"]["small"]["ratio"] < 0.5 < out["plans"]["same"]["ratio"]  # 1 MatMul vs 41
