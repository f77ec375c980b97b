"""save_quantized / load_quantized: bit-identical round trips under several plans, and stale files refused."""
from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch

import mixq
from mixq.checkpoint import META, TENSORS, load_quantized, save_quantized
from mixq.errors import CheckpointError, StaleCheckpointError
from mixq.fingerprint import data_digest
from mixq.quant.graph import followers

from zoo import build

CASES = {
    # backend, extra formats, calib method, plans (besides the one quantized with)
    "residual": ("ort-cpu", ["int4_wo"], "entropy",
                 ["int8", "fp32", {"default": "int8", "layers": {"stem": "fp32", "fc": "int4_wo"}}]),
    "attention": ("tensorrt", ["fp8_e4m3", "fp16", "int4_wo"], "max",
                  ["int8", "fp8_e4m3", "fp32", {"default": "fp8_e4m3", "layers": {"q": "int4_wo", "matmul": "int8",
                                                                                  "o": "fp16", "inp": "fp32"}}]),
    "control_flow": ("ort-cpu", [], "percentile", ["int8", "fp32", {"default": "int8", "layers": {"a": "fp32"}}]),
}


def _quantized(name: str):
    backend, formats, method, _ = CASES[name]
    model, calib, x = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # control_flow falls back to module mode
        q = mixq.quantize(model, "int8", backend=backend, calib_data=calib, calib_method=method, formats=formats)
    return model, calib, x, q


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_identical_under_every_plan(name, tmp_path):
    model, calib, x, q = _quantized(name)
    save_quantized(q, tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == sorted([META, TENSORS])  # no temporaries left
    fresh_model, _, _ = build(name)  # another instance with the same weights
    loaded = load_quantized(fresh_model, tmp_path / "q", calib_data=calib)
    st, st2 = q.mixq, loaded.mixq
    assert (st2.backend, st2.mode, st2.formats, st2.calib_method, st2.calib_digest, st2.kinds) == \
        (st.backend, st.mode, st.formats, st.calib_method, st.calib_digest, st.kinds)
    assert st2.plan == st.plan and st2.mode == ("module" if name == "control_flow" else "fx")
    assert torch.equal(loaded(x), q(x))
    for plan in CASES[name][3]:
        mixq.set_plan(q, plan)
        mixq.set_plan(loaded, plan)
        assert [f.active_format for f in followers(loaded)] == [f.active_format for f in followers(q)]
        assert torch.equal(loaded(x), q(x)), plan
    # Not a tautology: the same model calibrated on other data gives other outputs.
    other = mixq.quantize(model, "int8", backend=CASES[name][0], calib_data=[c * 3 for c in calib],
                          calib_method=CASES[name][2], mode=loaded.mixq.mode)
    mixq.set_plan(loaded, "int8")
    assert not torch.equal(loaded(x), other(x))


def test_stale_or_damaged_files_are_refused(tmp_path):
    model, calib, x, q = _quantized("residual")
    path = save_quantized(q, tmp_path / "q")
    changed, _, _ = build("residual")
    with torch.no_grad():
        changed.layer1.conv1.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(StaleCheckpointError, match="model weights: sha256 .* now, .* when saved"):
        load_quantized(changed, path)
    with pytest.raises(StaleCheckpointError, match=r"calibration data: sha256 .* given, .* when saved \(4 batches\)"):
        load_quantized(model, path, calib_data=calib[:3])
    assert load_quantized(model, path, calib_digest=data_digest(calib)).mixq.calib_digest == q.mixq.calib_digest

    meta = json.loads((path / META).read_text())
    meta["versions"]["torch"] = "0.0.1"
    (path / META).write_text(json.dumps(meta))
    with pytest.raises(StaleCheckpointError, match=r"torch version: saved with 0.0.1, running"):
        load_quantized(model, path)

    save_quantized(q, path)
    data = bytearray((path / TENSORS).read_bytes())
    data[-20] ^= 0xFF
    (path / TENSORS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match mixq.json"):
        load_quantized(model, path)
    with pytest.raises(CheckpointError, match="holds no saved quantized model"):
        load_quantized(model, tmp_path / "nowhere")
    with torch.no_grad():
        q.fc.weight[0, 0] += 1.0  # as fine-tuning would
    with pytest.raises(CheckpointError, match="weights changed after it was prepared"):
        save_quantized(q, tmp_path / "tuned")


class _Plant:
    def __reduce__(self):
        return (open, ("PLANTED", "w"))


def test_tensor_file_is_loaded_without_running_code(tmp_path, monkeypatch):
    model, calib, x, q = _quantized("residual")
    path = save_quantized(q, tmp_path / "q")
    monkeypatch.chdir(tmp_path)
    evil = pickle.dumps({"x": _Plant()}, protocol=2)
    (path / TENSORS).write_bytes(evil)
    meta = json.loads((path / META).read_text())
    import hashlib

    meta["tensors_sha256"] = hashlib.sha256(evil).hexdigest()
    (path / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a plain tensor file"):
        load_quantized(model, path)
    assert not (tmp_path / "PLANTED").exists()
