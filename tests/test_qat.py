"""mixq.qat: training under the plan, distillation loss, checkpoints that resume after a kill, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mixq
from mixq.errors import ConfigError, StaleCheckpointError
from mixq.qat import (CKPT, QATConfig, distillation_loss, finish_qat, load_trained, qat, save_trained)
from mixq.quant.modules import QuantMixin

ROOT = Path(__file__).resolve().parents[1]


def _setup(backend="ort-cpu", n=6, seed=0):
    from zoo import ResidualNet

    torch.manual_seed(seed)
    model = nn.Sequential(ResidualNet(), nn.Dropout(0.3)).eval()  # dropout: a resumed run must repeat it
    g = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(8, 1, 16, 16, generator=g) for _ in range(n)]
    train = [(x, torch.randint(0, 10, (8,), generator=g)) for x in xs]
    q = mixq.quantize(model, "int8", backend=backend, calib_data=xs[:2])
    return model, q, train


def _quantizers(q):
    for name, m in q.named_modules():
        if isinstance(m, QuantMixin):
            for fmt, qs in m.quantizers.items():
                for role, tq in qs.items():
                    yield f"{name}.{fmt}.{role}", m, role, tq


@pytest.mark.parametrize("backend", ["ort-cpu", "tensorrt"])
def test_qat_learns_ranges_and_weights_and_the_trained_model_round_trips(backend, tmp_path):
    model, q, train = _setup(backend)
    before = {k: (tq.amax if tq.amax is not None else tq.scale).detach().clone()
              for k, _, role, tq in _quantizers(q) if tq.is_calibrated and role != "weight"}
    w0 = {n: p.detach().clone() for n, p in q.named_parameters()}
    seen = {}

    def step(student, teacher, batch):  # the default loss, recording the parameters being trained
        seen["learned"] = sorted(n for n, p in student.named_parameters() if "_learned_" in n)
        out = student(batch[0])
        for _, m, role, tq in _quantizers(student):  # weight ranges follow the weights at every step
            if role == "weight" and tq is m.weight_quantizer:
                w = m.weight.detach().abs()
                assert torch.equal(tq.amax.reshape(-1), w.reshape(w.shape[0], -1).amax(1))
        return distillation_loss(out, teacher(batch[0]), batch[1])

    res = qat(q, model, train, QATConfig(epochs=2, lr=1e-3), step_fn=step, progress=False, log=None)
    assert [r["epoch"] for r in res.history] == [1, 2]
    expected = "_learned_scale" if backend == "ort-cpu" else "_learned_amax"
    assert seen["learned"] and all(n.endswith(expected) or n.endswith("_learned_zero_point") for n in seen["learned"])
    # Training is over: ranges are plain buffers again, moved from calibration; weights moved too.
    assert not any("_learned_" in n for n, _ in q.named_parameters())
    after = {k: (tq.amax if tq.amax is not None else tq.scale) for k, _, role, tq in _quantizers(q) if k in before}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(w0[n], p) for n, p in q.named_parameters())
    # Weight ranges are the max of the final weights.
    for _, m, role, tq in _quantizers(q):
        if role == "weight" and tq.desc.block_size is None:
            w = m.weight.detach().abs()
            assert torch.equal(tq.amax.reshape(-1), w.reshape(w.shape[0], -1).amax(1))
    save_trained(q, tmp_path / "m")
    back = load_trained(model, tmp_path / "m")
    x = train[0][0]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert back.mixq.plan.to_dict() == q.mixq.plan.to_dict()


def test_unfolded_batchnorm_is_frozen():
    from zoo import ResidualNet

    torch.manual_seed(0)
    model = ResidualNet()  # train mode: BatchNorm is not folded at prepare
    xs = [torch.randn(8, 1, 16, 16) for _ in range(3)]
    q = mixq.quantize(model, "int8", calib_data=xs)
    bns = [m for m in q.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    stats = [b.running_mean.clone() for b in bns]
    qat(q, model.eval(), xs, QATConfig(epochs=1, lr=1e-3), progress=False, log=None)
    assert all(torch.equal(b.running_mean, s) for b, s in zip(bns, stats))


def test_distillation_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.tensor([0, 3, 6, 2, 2])
    T = 2.0

    def log_softmax(a):
        a = a - a.max(1, keepdims=True)
        return a - np.log(np.exp(a).sum(1, keepdims=True))

    ls, lt = log_softmax(s.numpy().astype(np.float64) / T), log_softmax(t.numpy().astype(np.float64) / T)
    kl = (np.exp(lt) * (lt - ls)).sum() / 5 * T * T
    ce = -log_softmax(s.numpy().astype(np.float64))[np.arange(5), y.numpy()].mean()
    assert float(distillation_loss(s, t, None, temperature=T)) == pytest.approx(kl, rel=1e-5)
    assert float(distillation_loss(s, t, y, temperature=T, task_weight=0.5)) == pytest.approx(kl + 0.5 * ce, rel=1e-5)
    assert float(distillation_loss(s, t, y.float(), temperature=T)) == pytest.approx(kl, rel=1e-5)  # not labels
    e_s, e_t = nn.functional.normalize(s, dim=1), nn.functional.normalize(t, dim=1)  # unit rows: embeddings
    cos = 1 - (e_s.numpy() * e_t.numpy()).sum(1)
    assert float(distillation_loss(e_s, e_t, y)) == pytest.approx(cos.mean(), rel=1e-5)


def test_bad_config_is_refused_naming_the_value():
    with pytest.raises(ConfigError, match="epochs must be .* got 0"):
        QATConfig(epochs=0)
    with pytest.raises(ConfigError, match="lr must be .* got -1"):
        QATConfig(lr=-1)
    assert QATConfig.from_original(90, 0.1) == QATConfig(epochs=9, lr=0.001)
    assert QATConfig.from_recipe({"epochs": 90, "lr": 0.1}) == QATConfig(epochs=9, lr=0.001)
    assert QATConfig.from_recipe({"epochs": 1, "lr": 2e-5, "qat_lr": 1e-4}, seed=3) == QATConfig(lr=1e-4, seed=3)
    with pytest.raises(ConfigError, match="needs 'epochs' and 'lr'.*'lr'"):
        QATConfig.from_recipe({"lr": 0.1})
    model, q, _ = _setup()
    with pytest.raises(ConfigError, match="no batch"):
        qat(q, model, [], progress=False, log=None)


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_qat import _setup
    from mixq.qat import QATConfig, qat
    model, q, train = _setup()
    def die(epoch, record):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    qat(q, model, train, QATConfig(epochs=3, lr=1e-3), checkpoint_dir={ckpt!r}, on_epoch_end=die, progress=False)
""")


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = _KILLED_RUN.format(tests=str(ROOT / "tests"), ckpt=str(tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = torch.load(tmp_path / "killed" / CKPT, weights_only=True)  # weights only, readable as such
    assert state["epoch"] == 1
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.endswith(".tmp")]

    model, q, train = _setup()
    torch.manual_seed(1234)  # the caller's random state differs from the killed process's: the run must not care
    res = qat(q, model, train, QATConfig(epochs=3, lr=1e-3), checkpoint_dir=tmp_path / "killed", progress=False,
              log=None)
    assert res.resumed_from == 1 and [r["epoch"] for r in res.history] == [1, 2, 3]
    model2, ref, _ = _setup()
    qat(ref, model2, train, QATConfig(epochs=3, lr=1e-3), checkpoint_dir=tmp_path / "straight", progress=False,
        log=None)
    for (n, a), (_, b) in zip(q.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_checkpoint_of_another_run_is_refused_unless_restarting(tmp_path):
    model, q, train = _setup(n=2)
    qat(q, model, train, QATConfig(epochs=1, lr=1e-3), checkpoint_dir=tmp_path, progress=False, log=None)
    model, q, train = _setup(n=2)
    res = qat(q, model, train, QATConfig(epochs=1, lr=1e-3), checkpoint_dir=tmp_path, progress=False, log=None)
    assert res.resumed_from == 1  # finished: nothing to train again
    model, q, train = _setup(n=2)
    with pytest.raises(StaleCheckpointError, match="another plan"):
        qat(q, model, train, QATConfig(epochs=1, lr=2e-3), checkpoint_dir=tmp_path, progress=False, log=None)
    model, q, train = _setup(n=2)
    q2 = mixq.quantize(model, "int8", backend="tensorrt", calib_data=[b[0] for b in train])
    with pytest.raises(StaleCheckpointError):
        qat(q2, model, train, QATConfig(epochs=1, lr=1e-3), checkpoint_dir=tmp_path, progress=False, log=None)
    res = qat(q, model, train, QATConfig(epochs=1, lr=2e-3), checkpoint_dir=tmp_path, restart=True, progress=False,
              log=None)
    assert res.resumed_from == 0


def _cli(*argv, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mixq.cli", *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_cli_refuses_bad_input_before_work(tmp_path):
    r = _cli("qat", "--example", "mnist_resnet", "--epochs", "0", "--run-dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "--epochs: must be a whole number > 0, but got '0'" in r.stderr
    r = _cli("qat", "--example", "mnist_resnet", "--plan", str(tmp_path / "nope.json"), "--run-dir", str(tmp_path),
             cwd=tmp_path)
    assert r.returncode == 2 and "nope.json" in r.stderr and "does not exist" in r.stderr
    plan = tmp_path / "other.json"
    plan.write_text(json.dumps({"backend": "ort-cpu", "default": "int8", "layers": {"encoder.0.fc": "fp32"}}))
    r = _cli("qat", "--example", "mnist_resnet", "--plan", str(plan), "--run-dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "encoder.0.fc" in r.stderr, r.stderr[-1000:]
    assert not list(tmp_path.glob("qat-*/ckpt.pt"))


def test_cli_qat_then_export_and_verify_the_trained_model(tmp_path):
    r = _cli("qat", "--example", "mnist_resnet", "--train-batches", "3", "--epochs", "1", "--run-dir", str(tmp_path),
             "--dry-config", cwd=tmp_path)
    assert r.returncode == 2  # no such flag: argparse says so
    from mixq.cli_qat import _config
    from mixq.task import Task

    class A:
        epochs = lr = None
        seed = 0
    cfg = _config(A(), Task.example("mnist_resnet"))
    assert (cfg.epochs, cfg.lr) == (1, pytest.approx(3e-5))  # 10% of 8 epochs, 1% of 3e-3
    # A large learning rate moves the metric away from PTQ's, so verify is seen to use the trained model.
    r = _cli("qat", "--example", "mnist_resnet", "--train-batches", "3", "--lr", "0.05", "--run-dir", str(tmp_path),
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "qat-ort-cpu-int8.json").read_text())
    assert summary["config"]["epochs"] == 1 and summary["qat"] != summary["ptq"]
    assert {"fp32", "ptq", "qat", "history"} <= set(summary)
    trained = tmp_path / "qat-ort-cpu-int8"
    r = _cli("verify", "--example", "mnist_resnet", "--qat", str(trained), "--no-noise-floor", "--run-dir",
             str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "verify-qat-ort-cpu-int8.json").read_text())
    assert res["engine"]["metric_ref"] == pytest.approx(summary["qat"])  # the trained model, not a fresh PTQ one
    r = _cli("export", "--example", "mnist_resnet", "--qat", str(trained), "--format", "fp8_e4m3", "--backend",
             "tensorrt", "--run-dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "another plan" in r.stderr


@pytest.mark.parametrize("backend", ["ort-cpu", "tensorrt"])
def test_ranges_stay_valid_for_an_engine_under_a_large_learning_rate(backend):
    model, q, train = _setup(backend)
    lowest = []

    def step(student, teacher, batch):  # ranges as the forward pass meets them, at every step
        lowest.append(min(float(p.detach().min()) for n, p in student.named_parameters()
                          if n.endswith(("_learned_amax", "_learned_scale"))))
        return distillation_loss(student(batch[0]), teacher(batch[0]), batch[1])

    qat(q, model, train, QATConfig(epochs=2, lr=0.5), step_fn=step, progress=False, log=None)
    assert min(lowest) > 0
    for k, _, role, tq in _quantizers(q):
        if tq.is_calibrated and role != "weight":
            r = tq.scale
            assert bool((r > 0).all()), (k, r)
            if tq.zero_point is not None:
                z = tq.zero_point
                assert bool(((z >= 0) & (z <= 255) & (z == z.round())).all()), (k, z)


@pytest.mark.parametrize("backend", ["ort-cpu", "tensorrt"])
def test_the_trained_model_exports_to_the_same_graph_as_ptq(backend):
    from mixq.export import apply_plan, export_float_graph

    model, ptq, train = _setup(backend)
    _, q, _ = _setup(backend)
    qat(q, model, train, QATConfig(epochs=2, lr=1e-2), progress=False, log=None)
    x = train[0][0]
    graphs = [apply_plan(export_float_graph(m, x), m, m.mixq.plan).graph for m in (ptq, q)]
    nodes = [[(n.op_type, tuple(n.input), tuple(n.output)) for n in g.node] for g in graphs]
    assert nodes[0] == nodes[1]  # no requantization added: same engine graph, same latency
    assert any(not np.array_equal(np.frombuffer(a.raw_data, np.uint8), np.frombuffer(b.raw_data, np.uint8))
               for a, b in zip(graphs[0].initializer, graphs[1].initializer))  # with trained numbers


class _Relu6Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.act1, self.act2 = nn.ReLU6(), nn.ReLU6()
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.act2(self.c2(self.act1(self.c1(x)))), 1))


def test_onnx_runtime_optimizes_the_trained_model_as_the_ptq_one():
    """ORT fuses a ReLU6 into the quantization only when the grid lies within [0, 6]: learned ranges keep it."""
    import collections

    from mixq.engine.ort import build
    from mixq.export import apply_plan, export_float_graph

    torch.manual_seed(0)
    model = _Relu6Net().eval()
    with torch.no_grad():
        model.c1.weight.mul_(8.0)  # outputs saturate at 6
    xs = [torch.randn(8, 1, 8, 8) for _ in range(4)]
    train = [(x, torch.randint(0, 10, (8,))) for x in xs]
    ptq = mixq.quantize(model, "int8", calib_data=xs[:2])
    q = mixq.quantize(model, "int8", calib_data=xs[:2])

    def widening(student, teacher, batch):  # a loss whose gradient pushes every range outwards
        grow = sum(p.sum() for n, p in student.named_parameters() if n.endswith("_learned_scale"))
        return distillation_loss(student(batch[0]), teacher(batch[0]), batch[1]) - grow

    qat(q, model, train, QATConfig(epochs=3, lr=0.05), step_fn=widening, progress=False, log=None)
    ops = []
    for m in (ptq, q):
        opt = build(apply_plan(export_float_graph(m, xs[0]), m, m.mixq.plan), 1).optimized_model()
        ops.append(collections.Counter(n.op_type for n in opt.graph.node))
    assert ops[0] == ops[1], (ops[0], ops[1])
