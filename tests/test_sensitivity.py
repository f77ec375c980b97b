"""Sensitivity scans: the fast replay against full evaluations (bit for bit), the table against an
independent evaluation, the statistics against numpy references, resumability, and bad input."""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from mixq.errors import MixqError, UnknownFormatError, UnsupportedFormatError
from mixq.evaluate import EvaluationError
from mixq.plan import QuantPlan
from mixq.quantize import call_model, quantize, set_plan
from mixq.sensitivity import (LEAVE_ONE_OUT, ONE_AT_A_TIME, ScanError, SensitivityTable, StaleScanError,
                              paired_bootstrap_ci, scan, spearman)
from mixq.sensitivity.exact import ExactScanner
from mixq.sensitivity.graphrun import Cursor, Schedule
from mixq.sensitivity.proxies import proxy_scan
from mixq.sensitivity.api import _out_sqnr
from mixq.task import score


# --------------------------------------------------------------------------- small models
class TinyCNN(nn.Module):
    """Conv-BN-ReLU(inplace), a residual add, pooling and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = torch.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(self.pool(z), 1))


class TinyAttention(nn.Module):
    """Self-attention with explicit matmuls; the mask is used only at the very end (pooling)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Linear(d, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, mask):
        h = self.emb(x)
        a = torch.softmax(torch.matmul(self.q(h), self.k(h).transpose(-1, -2)) / 4.0, dim=-1)
        h = h + self.o(torch.matmul(a, self.v(h)))
        h = h + self.ff2(F.gelu(self.ff1(h)))
        w = mask.unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1)


class WithDeadUnit(nn.Module):
    """A unit whose output the model never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.unused = nn.Linear(6, 12), nn.Linear(12, 4), nn.Linear(6, 3)

    def forward(self, x):
        self.unused(x)
        return self.fc2(torch.relu(self.fc1(x)))


class Untraceable(nn.Module):
    """Data-dependent control flow: FX fails, mixq falls back to module mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 4)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:
            h = torch.relu(h)
        return self.fc2(h)


def _init(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _task(kind: str, n_eval: int = 3, batch: int = 16, seed: int = 0):
    """(model, calib batches, eval batches, metric); labels = float argmax with 25% replaced."""
    g = torch.Generator().manual_seed(seed)
    model = _init({"cnn": TinyCNN, "attn": TinyAttention, "dead": WithDeadUnit, "untraceable": Untraceable}[kind](), seed)

    def inputs():
        if kind == "cnn":
            return torch.randn(batch, 3, 8, 8, generator=g)
        if kind == "attn":
            mask = (torch.rand(batch, 6, generator=g) > 0.3).float()
            mask[:, 0] = 1.0
            return (torch.randn(batch, 6, 16, generator=g), mask)
        return torch.randn(batch, 6, generator=g)

    calib = [inputs() for _ in range(2)]
    evalb = []
    with torch.no_grad():
        for _ in range(n_eval):
            x = inputs()
            y = call_model(model, x).argmax(1)
            flip = torch.rand(y.shape, generator=g) < 0.25
            y = torch.where(flip, torch.randint(0, 4, y.shape, generator=g), y)
            evalb.append((x, y))
    return model, calib, evalb, accuracy


def accuracy(outputs, targets):
    pred = torch.cat([o.float() for o in outputs]).argmax(1)
    return (pred == torch.cat(targets)).double().numpy() * 100.0


def _prepared(kind: str, backend: str = "ort-cpu", formats=("int8",), **kw):
    model, calib, evalb, metric = _task(kind, **kw)
    q = quantize(model, QuantPlan.uniform("fp32", backend), calib_data=calib, formats=list(formats))
    return q, calib, evalb, metric


# --------------------------------------------------------------------------- fast == naive, bit for bit
@pytest.mark.parametrize("backend", ["ort-cpu", "tensorrt"])
@pytest.mark.parametrize("kind", ["cnn", "attn", "dead"])
@pytest.mark.parametrize("mode", [ONE_AT_A_TIME, LEAVE_ONE_OUT])
def test_fast_replay_equals_full_evaluation(kind, backend, mode):
    q, _, evalb, _ = _prepared(kind, backend)
    inputs = [b[0] for b in evalb]
    fast, naive = ExactScanner(q, inputs, "fast"), ExactScanner(q, inputs, "naive")
    assert fast.method == "fast" and naive.method == "naive"
    todo = {u: ["int8"] for u in q.mixq.kinds if "int8" in mixq.get_backend(backend).supported(q.mixq.kinds[u])}
    base = "fp32" if mode == ONE_AT_A_TIME else "int8"
    ref_f, _ = fast.reference(mode, base)
    ref_n, _ = naive.reference(mode, base)
    got = {(f.unit, f.fmt): f.outputs for f in fast.entries(mode, base, todo, ref_f)}
    want = {(f.unit, f.fmt): f.outputs for f in naive.entries(mode, base, todo, ref_n)}
    assert got.keys() == want.keys() == {(u, "int8") for u in todo}
    for key in want:
        for a, b in zip(got[key], want[key]):
            assert torch.equal(a, b), key
    for a, b in zip(ref_f, ref_n):
        assert torch.equal(a, b)


def test_fast_replay_matches_set_plan_and_forward():
    """Independent of the naive path: quantize the plan with set_plan and call the model."""
    q, _, evalb, _ = _prepared("cnn", formats=("int8", "int4_wo"))
    inputs = [b[0] for b in evalb]
    s = ExactScanner(q, inputs, "fast")
    ref, _ = s.reference(ONE_AT_A_TIME, "fp32")
    todo = {"conv2": ["int8"], "fc": ["int8", "int4_wo"]}
    got = {(f.unit, f.fmt): f.outputs for f in s.entries(ONE_AT_A_TIME, "fp32", todo, ref)}
    for (unit, fmt), outs in got.items():
        set_plan(q, QuantPlan("ort-cpu", "fp32", {unit: fmt}))
        with torch.no_grad():
            want = [call_model(q, x) for x in inputs]
        assert all(torch.equal(a, b) for a, b in zip(outs, want)), (unit, fmt)


def test_cursor_computes_only_what_frontiers_need():
    """The mask used at the end of the graph must not drag the whole network into the first step."""
    q, _, evalb, _ = _prepared("attn")
    s = ExactScanner(q, [b[0] for b in evalb], "fast")
    order = s.order(q.mixq.kinds)
    plans = [s.plan_of(u) for u in order]
    cur = Cursor(Schedule(s.runner, plans), evalb[0][0])
    cur.ensure(plans[0].frontier, 0)
    names = {n.name for n in cur.computed}
    assert "ff2" not in names and "o" not in names
    assert len(cur.computed) < len(s.runner.nodes) / 2


def test_inplace_relu_does_not_corrupt_the_cache():
    q, _, evalb, _ = _prepared("cnn")
    s = ExactScanner(q, [b[0] for b in evalb], "fast")
    assert s.runner.inplace, "the fixture should have an in-place ReLU"
    ref, _ = s.reference(ONE_AT_A_TIME, "fp32")
    set_plan(q, "fp32")
    with torch.no_grad():
        plain = [q(b[0]) for b in evalb]
    assert all(torch.equal(a, b) for a, b in zip(ref, plain))


# --------------------------------------------------------------------------- the table against an independent evaluation
def test_scan_table_matches_independent_evaluation(tmp_path):
    model, calib, evalb, metric = _task("cnn")
    t = scan(model, calib, evalb, metric, formats=["int8", "int4_wo"], modes="both", proxies=False,
             bootstrap=200, progress=False, store=tmp_path / "scan.jsonl")
    q = quantize(model, QuantPlan.uniform("fp32"), calib_data=calib, formats=["int8", "int4_wo"])

    def evaluate(plan):
        set_plan(q, plan)
        with torch.no_grad():
            return score(metric, [q(x) for x, _ in evalb], [y for _, y in evalb])

    fp32 = evaluate(QuantPlan.uniform("fp32"))
    assert t.reference["fp32"] == pytest.approx(fp32.mean(), abs=0)
    allq = evaluate(QuantPlan.uniform("int8"))
    assert t.reference["all:int8"] == pytest.approx(allq.mean(), abs=0)
    assert {(r.layer, r.format) for r in t.rows} == {(u, "int8") for u in q.mixq.kinds} | {("fc", "int4_wo")}
    for r in t.rows:
        s = evaluate(QuantPlan("ort-cpu", "fp32", {r.layer: r.format}))
        assert r.drop == pytest.approx(fp32.mean() - s.mean(), abs=1e-12)
        lo, hi = paired_bootstrap_ci(fp32 - s, 200, 0.95, 0)
        assert r.drop_ci == (lo, hi) and r.drop_noise == (lo <= 0 <= hi)
        if r.format == "int8":
            s = evaluate(QuantPlan("ort-cpu", "int8", {r.layer: "fp32"}))
            assert r.recovered == pytest.approx(s.mean() - allq.mean(), abs=1e-12)
    saved = SensitivityTable.load(tmp_path / "sensitivity.json")
    assert saved.to_dict() == t.to_dict()
    some = t.rows[0]
    assert t.predict({some.layer: some.format}) == pytest.approx(t.reference["fp32"] - some.drop)


def test_out_sqnr_reference():
    ref = [torch.tensor([[1.0, 2.0], [3.0, 4.0]])]
    out = [torch.tensor([[1.0, 2.5], [3.0, 3.0]])]
    assert _out_sqnr(ref, out) == pytest.approx(10 * math.log10(30.0 / 1.25))
    assert _out_sqnr(ref, ref) == math.inf


# --------------------------------------------------------------------------- statistics
def ref_bootstrap(diff, resamples, confidence, seed):
    """Independent numpy reference: one draw of all resamples, percentile interval."""
    d = np.asarray(diff, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(axis=1)
    a = (1 - confidence) / 2
    return tuple(np.quantile(means, [a, 1 - a]))


def test_bootstrap_against_reference_and_theory():
    rng = np.random.default_rng(3)
    diff = rng.normal(0.5, 2.0, size=400)
    got = paired_bootstrap_ci(diff, 500, 0.9, seed=7)
    assert got == pytest.approx(ref_bootstrap(diff, 500, 0.9, 7), abs=0)
    big = rng.normal(1.0, 1.0, size=4000)
    lo, hi = paired_bootstrap_ci(big, 1000, 0.95, seed=0)
    half = 1.96 * big.std() / math.sqrt(big.size)
    assert lo == pytest.approx(big.mean() - half, abs=0.01) and hi == pytest.approx(big.mean() + half, abs=0.01)
    assert paired_bootstrap_ci(np.full(10, 2.5)) == (2.5, 2.5)
    assert paired_bootstrap_ci(diff, 0) == (diff.mean(), diff.mean())


def test_spearman_against_scipy():
    from scipy.stats import spearmanr

    a, b = [3.0, 1.0, 2.0, 5.0, 4.0], [30.0, 12.0, 11.0, 50.0, 45.0]
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert spearman([1, 2, 3, float("nan"), 5], [2, 1, 3, 9, 5]) == pytest.approx(spearmanr([1, 2, 3, 5], [2, 1, 3, 5]).statistic)
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4]) is None
    assert spearman([1, 2], [2, 1]) is None


# --------------------------------------------------------------------------- proxies
def test_proxies_against_autograd_reference():
    q, calib, _, _ = _prepared("attn")
    s = ExactScanner(q, [], "fast")
    todo = {"ff1": ["int8"], "q": ["int8"], "emb": ["int8"]}
    res = proxy_scan(q, calib, todo, seed=5, runner=s.runner)
    mod_res = proxy_scan(q, calib, todo, seed=5, runner=None)  # module hooks: same numbers here
    for unit in todo:
        m = dict(q.named_modules())[unit]
        sig = noise = fisher = 0.0
        n = 0
        gen = torch.Generator().manual_seed(5)
        for batch in calib:
            set_plan(q, "fp32")
            seen = {}

            def hook(mod, inp, out):
                out.retain_grad()
                seen["x"], seen["y"] = inp[0].detach(), out

            h = m.register_forward_hook(hook)
            out = call_model(q, batch)
            h.remove()
            (out * torch.randn(out.shape, generator=gen)).sum().backward()
            y, g = seen["y"].detach(), seen["y"].grad
            m.set_format("int8")
            with torch.no_grad():
                delta = m(seen["x"]) - y
            m.set_format("fp32")
            q.zero_grad(set_to_none=True)
            sig += float((y**2).sum())
            noise += float((delta**2).sum())
            fisher += float(((g * delta).flatten(1).sum(1) ** 2).sum())
            n += out.shape[0]
        got = res.scores[(unit, "int8")]
        assert got["sqnr_db"] == pytest.approx(10 * math.log10(sig / noise), rel=1e-5)
        assert got["fisher"] == pytest.approx(fisher / n, rel=1e-4)
        assert mod_res.scores[(unit, "int8")]["fisher"] == pytest.approx(got["fisher"], rel=1e-4)
    assert all(p.requires_grad for p in q.parameters()), "parameters must be unfrozen again"


def test_proxy_micro_batches_give_the_same_layer_errors():
    """Splitting batches changes only the Fisher probes' draws, never the layer SQNR / MSE."""
    q, calib, _, _ = _prepared("attn")
    s = ExactScanner(q, [], "fast")
    todo = {"ff1": ["int8"], "q": ["int8"]}
    whole = proxy_scan(q, calib, todo, seed=5, runner=s.runner)
    n = calib[0][0].shape[0] if isinstance(calib[0], (tuple, list)) else calib[0].shape[0]
    split = proxy_scan(q, calib, todo, seed=5, runner=s.runner, micro_batch=max(1, n // 3))
    assert split.samples == whole.samples
    for key in whole.scores:
        assert split.scores[key]["sqnr_db"] == pytest.approx(whole.scores[key]["sqnr_db"], rel=1e-5)
        assert split.scores[key]["mse"] == pytest.approx(whole.scores[key]["mse"], rel=1e-5)
        assert split.scores[key]["fisher"] > 0


def test_proxy_includes_the_output_quantizer_behind_relu():
    """ort-cpu moves conv1's output quantizer behind the ReLU; the proxy measures after it."""
    q, calib, _, _ = _prepared("cnn")
    s = ExactScanner(q, [], "fast")
    site = s.runner.sites("conv1")[0]
    assert [n.op for n in site.nodes] == ["call_module"] * 3 and len(site.nodes) == 3
    res = proxy_scan(q, calib, {"conv1": ["int8"]}, runner=s.runner)
    assert math.isfinite(res.scores[("conv1", "int8")]["sqnr_db"])


# --------------------------------------------------------------------------- resumability and staleness
def _count_entries(monkeypatch):
    calls = []
    orig = ExactScanner.entries

    def counting(self, *a, **k):
        for f in orig(self, *a, **k):
            calls.append((f.unit, f.fmt))
            yield f

    monkeypatch.setattr(ExactScanner, "entries", counting)
    return calls


def test_interrupted_scan_resumes_without_redoing_finished_work(tmp_path, monkeypatch):
    import mixq.sensitivity.api as scan_mod
    from mixq.sensitivity.store import PartialFiles

    model, calib, evalb, metric = _task("cnn")
    store = tmp_path / "scan.jsonl"
    kw = dict(formats=["int8"], proxies=False, progress=False)
    full = scan(model, calib, evalb, metric, **kw)
    n_units, n_batches = len(full.rows), len(evalb)

    # 1) killed while computing: every finished (layer, format, batch) piece is on disk
    real_put, puts = PartialFiles.put, []

    def dying_put(self, *a):
        if len(puts) == 7:
            raise KeyboardInterrupt
        puts.append(a[:5])
        real_put(self, *a)

    monkeypatch.setattr(PartialFiles, "put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        scan(model, calib, evalb, metric, store=store, **kw)
    assert len(list((tmp_path / "scan.jsonl.partial").glob("*.pt"))) == 7
    monkeypatch.setattr(PartialFiles, "put", lambda self, *a: (puts.append(a[:5]), real_put(self, *a)))
    puts.clear()

    # 2) killed while scoring finished results: two are in the results file
    real_score, scored = scan_mod._score, []

    def dying_score(metric_fn, outputs, targets, n):
        scored.append(1)
        if len(scored) == 4:  # the reference, two results, then die
            raise KeyboardInterrupt
        return real_score(metric_fn, outputs, targets, n)

    monkeypatch.setattr(scan_mod, "_score", dying_score)
    with pytest.raises(KeyboardInterrupt):
        scan(model, calib, evalb, metric, store=store, **kw)
    assert len(puts) == n_units * n_batches - 7, "pieces finished before the kill are not recomputed"
    lines = store.read_text().splitlines()
    assert [json.loads(l)["type"] for l in lines] == ["header", "reference", "exact", "exact"]
    # a kill in the middle of a write leaves a torn line: it must be dropped, not break the file
    with open(store, "a") as f:
        f.write('{"type": "exact", "mode": "one-at-a-time", "layer": "co')
    monkeypatch.setattr(scan_mod, "_score", real_score)
    puts.clear()
    again = scan(model, calib, evalb, metric, store=store, **kw)
    assert puts == []
    assert [r.drop for r in again.rows] == [r.drop for r in full.rows]
    assert [r.out_sqnr_db for r in again.rows] == [r.out_sqnr_db for r in full.rows]
    assert not list((tmp_path / "scan.jsonl.partial").glob("*.pt")), "finished results leave no partial files"
    calls = _count_entries(monkeypatch)
    scan(model, calib, evalb, metric, store=store, **kw)
    assert calls == []
    # adding a format measures only the new format
    scan(model, calib, evalb, metric, store=store, **{**kw, "formats": ["int8", "int4_wo"]})
    assert calls == [("fc", "int4_wo")]


@pytest.mark.parametrize("change", ["model", "eval_data", "metric"])
def test_changed_inputs_refuse_stale_results(tmp_path, change):
    model, calib, evalb, metric = _task("dead")
    store = tmp_path / "scan.jsonl"
    scan(model, calib, evalb, metric, formats=["int8"], proxies=False, progress=False, store=store, bootstrap=0)
    if change == "model":
        with torch.no_grad():
            model.fc2.weight[0, 0] += 1.0
    elif change == "eval_data":
        evalb = evalb[:-1]
    else:
        def metric(outputs, targets):  # noqa: F811 - a different metric on purpose
            return accuracy(outputs, targets) * 0.5
    with pytest.raises(StaleScanError, match={"model": "the model", "eval_data": "the evaluation data",
                                              "metric": "the metric"}[change]):
        scan(model, calib, evalb, metric, formats=["int8"], proxies=False, progress=False, store=store)
    t = scan(model, calib, evalb, metric, formats=["int8"], proxies=False, progress=False, store=store, fresh=True,
             bootstrap=0)
    assert t.rows


def test_second_scan_on_the_same_folder_is_refused(tmp_path):
    from mixq.sensitivity.store import ScanStore

    with ScanStore(tmp_path / "scan.jsonl", {"model": "a"}):
        with pytest.raises(ScanError, match="another scan"):
            ScanStore(tmp_path / "scan.jsonl", {"model": "a"})


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_are_clear_errors():
    model, calib, evalb, metric = _task("cnn")
    kw = dict(proxies=False, progress=False, bootstrap=0)
    with pytest.raises(EvaluationError, match="yielded no batch"):
        scan(model, calib, [], metric, **kw)
    with pytest.raises(EvaluationError, match="not an \\(inputs, targets\\) pair"):
        scan(model, calib, [b[0] for b in evalb], metric, **kw)
    with pytest.raises(MixqError, match="NaN"):
        scan(model, calib, evalb, lambda o, t: np.full(sum(len(x) for x in t), np.nan), **kw)
    with pytest.raises(UnsupportedFormatError, match="cannot run format 'int4_wo' for layer 'conv1'"):
        scan(model, calib, evalb, metric, formats=["int4_wo"], layers=["conv1"], **kw)
    convnet = _init(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    with pytest.raises(UnsupportedFormatError, match="on any selected layer"):
        scan(convnet, calib, evalb, metric, formats=["int4_wo"], **kw)
    with pytest.raises(ScanError, match="unknown layer.*'conv_1'.*Did you mean 'conv1'"):
        scan(model, calib, evalb, metric, layers=["conv_1"], **kw)
    with pytest.raises(UnknownFormatError):
        scan(model, calib, evalb, metric, formats=["int3"], **kw)
    with pytest.raises(ScanError, match="fp32 is the reference"):
        scan(model, calib, evalb, metric, formats=["fp32"], **kw)
    with pytest.raises(ScanError, match="unknown scan mode"):
        scan(model, calib, evalb, metric, modes="sideways", **kw)
    with pytest.raises(ScanError, match="proxy_batch must be a positive number.*got 0"):
        scan(model, calib, evalb, metric, proxy_batch=0, **kw)
    with pytest.raises(MixqError, match="calibration loader yielded no batch"):
        scan(model, [], evalb, metric, **kw)
    with pytest.raises(EvaluationError, match="returned 47 score\\(s\\) for 48 evaluation samples"):
        flaky = iter([48, 48, 47, 48, 48, 48, 48, 48, 48, 48])  # right for the reference, one short later

        def short(o, t):
            return np.zeros(next(flaky))

        scan(model, calib, evalb, short, **kw)
    with pytest.raises(EvaluationError, match="returned 1 score\\(s\\) for 48 evaluation samples"):
        scan(model, calib, evalb, lambda o, t: float(accuracy(o, t).mean()), **kw)


def test_module_mode_falls_back_to_full_evaluations(recwarn):
    model, calib, evalb, metric = _task("untraceable")
    t = scan(model, calib, evalb, metric, progress=False, bootstrap=0)
    assert t.timing["method"] == "naive" and "module mode" in t.notes[0]
    assert {r.layer for r in t.rows} == {"fc1", "fc2"} and all(r.fisher is not None for r in t.rows)


def test_progress_bar_shows_layers_and_time_left(capsys):
    model, calib, evalb, metric = _task("dead")
    scan(model, calib, evalb, metric, formats=["int8"], proxies=False, bootstrap=0, progress=True)
    err = capsys.readouterr().err
    assert "3/3 layers" in err and "<" in err


# --------------------------------------------------------------------------- CLI and import direction
def test_cli_scan_writes_artifacts_and_report(tmp_path, monkeypatch):
    from mixq import cli
    from mixq.cli_scan import register

    pkg = tmp_path / "usertask.py"
    pkg.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_sensitivity import _task, accuracy
        _m, _c, _e, _ = _task("dead")
        def model(): return _m
        def calib(): return _c
        def evalset(): return _e
        def metric(o, t): return accuracy(o, t)
        def exploding(): raise AssertionError("data or model loaded before the bad option was refused")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    register(sub, cli._add_task_args, cli._task, cli._run_dir)
    run = tmp_path / "run"
    args = p.parse_args(["scan", "--model", "usertask:model", "--calib", "usertask:calib", "--eval", "usertask:evalset",
                         "--metric", "usertask:metric", "--formats", "int8", "--mode", "both", "--bootstrap", "50",
                         "--run-dir", str(run), "--no-progress"])
    assert args.func(args) == 0
    for f in ("scan.jsonl", "sensitivity.json", "report/report.md", "report/drops.png", "report/proxies.png"):
        assert (run / f).is_file(), f
    assert "leave-one-out" in (run / "report" / "report.md").read_text()
    # --method engine: the same scan on ONNX Runtime, in its own run folder; refused for a backend ORT does not run
    eng = tmp_path / "engine"
    args = p.parse_args(["scan", "--model", "usertask:model", "--calib", "usertask:calib", "--eval", "usertask:evalset",
                         "--metric", "usertask:metric", "--formats", "int8", "--method", "engine", "--bootstrap", "50",
                         "--run-dir", str(eng), "--no-progress"])
    assert args.func(args) == 0
    assert json.loads((eng / "sensitivity.json").read_text())["timing"]["method"] == "engine"
    args = p.parse_args(["scan", "--model", "usertask:exploding", "--calib", "usertask:exploding", "--eval",
                         "usertask:exploding", "--metric", "usertask:metric", "--backend", "tensorrt", "--method",
                         "engine", "--run-dir", str(tmp_path / "trt"), "--no-progress"])
    with pytest.raises(ScanError, match="method 'engine' runs each plan on ONNX Runtime"):
        args.func(args)


def test_sensitivity_does_not_import_onnx_or_optuna():
    code = ("import sys, mixq.sensitivity, mixq.cli_scan; bad = [m for m in ('onnx', 'optuna', 'onnxruntime') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- method "engine": entries on ONNX Runtime
def _probability(outputs, targets):
    """Softmax probability of the label, in percent: moves with every small change of the logits."""
    p = torch.cat([o.float() for o in outputs]).softmax(1)
    return p.gather(1, torch.cat(targets)[:, None])[:, 0].double().numpy() * 100.0


def test_engine_scan_measures_each_entry_on_onnx_runtime(tmp_path):
    import onnxruntime as ort

    from mixq.engine.ort import DEFAULT_DISABLED
    from mixq.export import apply_plan, export_float_graph

    model, calib, evalb, _ = _task("cnn")
    t = scan(model, calib, evalb, _probability, formats=["int8"], modes="both", proxies=True, bootstrap=0,
             progress=False, store=tmp_path / "scan.jsonl", method="engine")
    assert t.timing["method"] == "engine"
    q = quantize(model, QuantPlan.uniform("fp32"), calib_data=calib, formats=["int8"])
    graph = export_float_graph(q, calib[0])

    def on_ort(plan: QuantPlan) -> float:  # a plain session per plan (mixq's two optimizers off), scored directly
        s = ort.InferenceSession(apply_plan(graph, q, plan).SerializeToString(), providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(DEFAULT_DISABLED))
        name = s.get_inputs()[0].name
        outs = [torch.from_numpy(s.run(None, {name: x.numpy()})[0]) for x, _ in evalb]
        return float(_probability(outs, [y for _, y in evalb]).mean())

    with torch.no_grad():
        torch_fp32 = float(_probability([model(x) for x, _ in evalb], [y for _, y in evalb]).mean())
    assert t.reference["fp32"] == pytest.approx(on_ort(QuantPlan.uniform("fp32")), abs=1e-9)
    assert t.reference["fp32"] == pytest.approx(torch_fp32, abs=1e-3)  # float on the engine: the torch model
    allq = on_ort(QuantPlan.uniform("int8"))
    assert t.reference["all:int8"] == pytest.approx(allq, abs=1e-9)
    assert {r.layer for r in t.rows} == set(q.mixq.kinds) and all(r.drop != 0 for r in t.rows)
    for r in t.rows:
        assert r.drop == pytest.approx(t.reference["fp32"] - on_ort(QuantPlan("ort-cpu", "fp32", {r.layer: "int8"})),
                                       abs=1e-9)
        assert r.recovered == pytest.approx(on_ort(QuantPlan("ort-cpu", "int8", {r.layer: "fp32"})) - allq, abs=1e-9)
        assert r.fisher is not None  # the proxies stay PyTorch's
    # the simulation's drops are another measurement: its scan does not reuse (or mix with) the engine's store
    with pytest.raises(StaleScanError):
        scan(model, calib, evalb, _probability, formats=["int8"], proxies=False, progress=False,
             store=tmp_path / "scan.jsonl")
    with pytest.raises(ScanError, match="method 'engine' runs each plan on ONNX Runtime.*not 'tensorrt'"):
        scan(model, calib, evalb, _probability, backend="tensorrt", formats=["int8"], progress=False, method="engine")
    with pytest.raises(ScanError, match="method must be one of auto, fast, naive, engine, got 'engin'"):
        scan(model, calib, evalb, _probability, progress=False, method="engin")
