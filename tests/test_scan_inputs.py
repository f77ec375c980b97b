"""What a scan is handed: a prepared (already calibrated) model, calibration data that must reach the
fingerprint, and a run folder whose partial files may be corrupt or hostile."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

import mixq.sensitivity.api as scan_api
from mixq.plan import QuantPlan
from mixq.quantize import prepare, quantize
from mixq.sensitivity import ScanError, StaleScanError, scan
from mixq.sensitivity.store import PartialFiles, fingerprint, prepared_fingerprint
from test_sensitivity import _task

KW = dict(formats=["int8"], proxies=False, progress=False, bootstrap=50)


def _formats(q) -> dict:
    return {n: m.active_format for n, m in q.named_modules() if hasattr(m, "active_format")}


def _rows(t) -> list:
    return [(r.layer, r.format, r.metric, r.drop, r.drop_ci, r.out_sqnr_db, r.recovered, r.sqnr_db, r.fisher)
            for r in t.rows]


# --------------------------------------------------------------------------- a prepared model
def test_prepared_model_is_scanned_as_calibrated_without_recalibrating(monkeypatch):
    model, calib, evalb, metric = _task("cnn")
    want = scan(model, calib, evalb, metric, modes="both", **{**KW, "proxies": True})
    q = quantize(model, QuantPlan("ort-cpu", "int8", {"conv1": "fp32"}), calib_data=calib, formats=["int8"])
    before, plan = _formats(q), q.mixq.plan

    def no_calibration(*a, **k):
        raise AssertionError("a prepared model must not be recalibrated")

    monkeypatch.setattr(scan_api, "calibrate", no_calibration)
    monkeypatch.setattr(scan_api, "add_formats", no_calibration)
    got = scan(q, calib, evalb, metric, modes="both", **{**KW, "formats": None, "proxies": True})
    assert _rows(got) == _rows(want) and got.reference == want.reference
    assert _formats(q) == before and q.mixq.plan is plan, "the scan must give the model its plan back"
    # proxies on evaluation data need no calibration batches
    t = scan(q, None, evalb, metric, proxy_data="eval", **{**KW, "proxies": True})
    assert all(r.fisher is not None for r in t.rows)


def test_loaded_model_scans_like_the_saved_one(tmp_path):
    """A model saved after calibration and loaded back resumes the same scan (same fingerprint, same drops)."""
    checkpoint = pytest.importorskip("mixq.checkpoint", reason="save_quantized / load_quantized not merged yet")
    model, calib, evalb, metric = _task("cnn")
    q = quantize(model, "int8", calib_data=calib, calib_method="entropy", formats=["int8"])
    checkpoint.save_quantized(q, tmp_path / "q")
    loaded = checkpoint.load_quantized(model, tmp_path / "q")
    saved = scan(q, None, evalb, metric, **KW)
    first = scan(loaded, None, evalb, metric, store=tmp_path / "s" / "scan.jsonl", **KW)
    again = scan(loaded, None, evalb, metric, store=tmp_path / "s" / "scan.jsonl", **KW)
    assert _rows(saved) == _rows(first) == _rows(again)
    assert saved.fingerprint == first.fingerprint == again.fingerprint
    assert _rows(scan(model, calib, evalb, metric, calib_method="entropy", **KW)) == _rows(saved)


def test_prepared_model_that_does_not_fit_the_scan_is_a_clear_error():
    model, calib, evalb, metric = _task("cnn")
    q = quantize(model, "int8", calib_data=calib, calib_method="max")
    with pytest.raises(ScanError, match=r"backend 'tensorrt' \(the model is quantized for 'ort-cpu'\)"):
        scan(q, calib, evalb, metric, backend="tensorrt", **KW)
    with pytest.raises(ScanError, match=r"calib_method 'entropy' \(the model was calibrated with 'max'\)"):
        scan(q, calib, evalb, metric, calib_method="entropy", **KW)
    with pytest.raises(ScanError, match="concrete_args"):
        scan(q, calib, evalb, metric, concrete_args={}, **KW)
    with pytest.raises(ScanError, match=r"no calibrated int4_wo quantizers for 1 layer\(s\).*'fc'.*prepared for: int8"):
        scan(q, calib, evalb, metric, **{**KW, "formats": ["int8", "int4_wo"]})
    with pytest.raises(ScanError, match="calib_data is None"):
        scan(q, None, evalb, metric, **{**KW, "proxies": True})
    with pytest.raises(ScanError, match="not calibrated"):
        scan(prepare(model), calib, evalb, metric, **KW)
    with pytest.raises(ScanError, match="calib_data is None: a float model"):
        scan(model, None, evalb, metric, **KW)


# --------------------------------------------------------------------------- calibration data reaches the fingerprint
def test_fingerprint_changes_with_the_calibration_data():
    model, calib, evalb, metric = _task("dead")
    other = [c + 0.5 for c in calib]
    settings = {"backend": "ort-cpu", "calib_method": "max"}
    a, b = fingerprint(model, calib, evalb, metric, settings), fingerprint(model, other, evalb, metric, settings)
    assert [k for k in a if a[k] != b[k]] == ["calib_data"]
    qa = quantize(model, "int8", calib_data=calib)
    qb = quantize(model, "int8", calib_data=other)
    pa, pb = (prepared_fingerprint(q, None, evalb, metric, settings) for q in (qa, qb))
    assert [k for k in pa if pa[k] != pb[k]] == ["calib_data"]


@pytest.mark.parametrize("prepared", [False, True])
def test_resume_with_other_calibration_data_is_refused(tmp_path, prepared):
    model, calib, evalb, metric = _task("dead")
    other = [c * 1.5 for c in calib]
    if prepared:
        first = quantize(model, "int8", calib_data=calib)
        second = quantize(model, "int8", calib_data=other)
        data = (None, None)
    else:
        first = second = model
        data = (calib, other)
    store = tmp_path / "scan.jsonl"
    scan(first, data[0], evalb, metric, store=store, **KW)
    scan(first, data[0], evalb, metric, store=store, **KW)  # the same data resumes
    with pytest.raises(StaleScanError, match="the calibration data changed"):
        scan(second, data[1], evalb, metric, store=store, **KW)


# --------------------------------------------------------------------------- partial files from elsewhere
class _Evil:
    """Unpickling this creates a file: what a crafted partial file in a shared run folder would do."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _interrupted_scan(tmp_path, monkeypatch, model, calib, evalb, metric, pieces: int = 5):
    """A scan killed after ``pieces`` (layer, format, batch) outputs were written."""
    real_put, puts = PartialFiles.put, []

    def dying_put(self, *a):
        if len(puts) == pieces:
            raise KeyboardInterrupt
        puts.append(a[:5])
        real_put(self, *a)

    monkeypatch.setattr(PartialFiles, "put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        scan(model, calib, evalb, metric, store=tmp_path / "scan.jsonl", **KW)
    monkeypatch.setattr(PartialFiles, "put", real_put)
    files = sorted((tmp_path / "scan.jsonl.partial").glob("*.pt"))
    assert len(files) == pieces
    return files


def _counting_puts(monkeypatch) -> list:
    real_put, puts = PartialFiles.put, []
    monkeypatch.setattr(PartialFiles, "put", lambda self, *a: (puts.append(a[:5]), real_put(self, *a)))
    return puts


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_crafted_partial_file_is_not_executed_and_is_recomputed(tmp_path, monkeypatch, capsys, writer):
    model, calib, evalb, metric = _task("cnn")
    fresh = scan(model, calib, evalb, metric, **KW)
    files = _interrupted_scan(tmp_path, monkeypatch, model, calib, evalb, metric)
    marker = tmp_path / "pwned"
    with open(files[2], "wb") as f:
        pickle.dump(_Evil(marker), f) if writer == "pickle" else torch.save(_Evil(marker), f)
    puts = _counting_puts(monkeypatch)
    capsys.readouterr()
    again = scan(model, calib, evalb, metric, store=tmp_path / "scan.jsonl", **KW)
    assert not marker.exists(), "a partial file ran code when loaded"
    assert not files[2].exists() or files[2].stat().st_size > 0
    total = len(fresh.rows) * len(evalb)
    assert len(puts) == total - 4, "exactly the crafted piece is recomputed besides the missing ones"
    assert _rows(again) == _rows(fresh)
    err = capsys.readouterr().err
    assert "discarded 1 unreadable partial file(s)" in err and files[2].name in err


def test_truncated_partial_file_is_recomputed(tmp_path, monkeypatch, capsys):
    model, calib, evalb, metric = _task("cnn")
    fresh = scan(model, calib, evalb, metric, **KW)
    files = _interrupted_scan(tmp_path, monkeypatch, model, calib, evalb, metric)
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    (tmp_path / "scan.jsonl.partial" / "left.pt.tmp").write_bytes(b"half a write")
    puts = _counting_puts(monkeypatch)
    again = scan(model, calib, evalb, metric, store=tmp_path / "scan.jsonl", **KW)
    assert len(puts) == len(fresh.rows) * len(evalb) - 4
    assert _rows(again) == _rows(fresh)
    assert "discarded 1 unreadable partial file(s)" in capsys.readouterr().err
    assert not list((tmp_path / "scan.jsonl.partial").iterdir()), "no partial file (nor temporary) is left"
    lines = [json.loads(l) for l in (tmp_path / "scan.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "exact" for r in lines) == len(fresh.rows)
