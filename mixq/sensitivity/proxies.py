"""Proxy scores: the output error of each quantized layer and a second-order estimate, in one pass.

One forward-backward pass of the float model over the proxy data gives, for every (layer, format):

- ``sqnr_db`` / ``mse``: error of the layer's own output when only its computation is quantized,
  ``delta = Q(y) - y``, measured on the float inputs the layer sees. In FX mode a layer's
  output includes the output quantizer moved behind its ReLU (ort-cpu), so ``y`` is what the
  next layer actually reads.
- ``fisher``: ``mean over samples of (dL/dy . delta)^2``, the second-order Taylor / diagonal-Fisher
  term of the loss change. The loss must work for any metric, and the metric is not differentiable,
  so it is the output-distillation loss ``L = 1/2 ||f_q(x) - f(x)||^2`` against the float model's
  own outputs; its curvature at the float point is ``J^T J`` (Gauss-Newton), and
  ``E_v[(v^T J delta)^2] = ||J delta||^2`` for a standard normal probe ``v`` in output space. So each
  sample backpropagates ``L_v = v . f(x)`` with a fresh seeded ``v``, and the score estimates how far
  the layer's quantization error moves the model's output, linearised. (The plain distillation
  gradient would be zero at the float point; the random probe is what makes it informative.)

The backward pass computes only activation gradients: parameters are frozen for the pass and a
``_Tap`` on each layer output makes the graph differentiable from there on, so there is no
weight-gradient work and no parameter ``.grad`` memory. The quantized output of a layer is
recomputed inside the backward hook from its saved float inputs, so no ``delta`` is held
between forward and backward.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx, nn

from mixq.evaluate import batch_size
from mixq.plan import QuantPlan
from mixq.quant.graph import followers, units
from mixq.quantize import applied, call_model
from mixq.sensitivity.graphrun import GraphRunner, release_free_memory, tensors_of
from mixq.sensitivity.table import output_sqnr_db


@dataclass
class _Acc:
    signal: float = 0.0
    noise: float = 0.0
    elements: int = 0
    fisher: float = 0.0
    samples: int = 0


class _Tap(torch.autograd.Function):
    """Identity whose backward hands the incoming gradient to a probe."""

    @staticmethod
    def forward(ctx, y, anchor, probe):
        ctx.probe = probe
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        ctx.probe(grad)
        return grad, None, None


@dataclass
class _Probe:
    unit: str
    y: torch.Tensor
    recompute: Callable[[str], torch.Tensor]
    formats: Sequence[str]
    accs: dict
    batch: Optional[int] = None
    fired: bool = False

    def __call__(self, grad: Optional[torch.Tensor]) -> None:
        if self.fired:  # a second gradient of the same tap cannot happen; guard anyway
            return
        self.fired = True
        y = self.y.float().reshape(-1)
        sig = float(torch.dot(y, y))
        per_sample = bool(self.batch) and self.y.dim() > 0 and self.y.shape[0] == self.batch
        g = None
        if grad is not None:
            g = grad.float().reshape(self.batch if per_sample else 1, 1, -1)
        with torch.no_grad():
            for fmt in self.formats:
                delta = self.recompute(fmt).float().reshape(-1) - y
                acc = self.accs[(self.unit, fmt)]
                acc.signal += sig
                acc.noise += float(torch.dot(delta, delta))
                acc.elements += delta.numel()
                if g is not None:
                    # per-sample dot products dL/dy . delta in one batched matmul
                    dots = torch.bmm(g, delta.reshape(g.shape[0], -1, 1))
                    acc.fisher += float(torch.dot(dots.reshape(-1), dots.reshape(-1)))
        self.recompute = None  # drop the saved inputs
        self.y = None


@dataclass
class ProxyResult:
    """Proxy scores per (unit, format) and the seconds the pass took."""

    scores: dict = field(default_factory=dict)
    seconds: float = 0.0
    samples: int = 0


@contextlib.contextmanager
def _switched(mods: list[nn.Module], fmt: str):
    """``mods`` (a unit and its followers, found once per pass) in ``fmt`` inside the block.

    Not ``mixq.quantize.switched``: that one finds the units and followers of the whole model on
    every call (0.65 ms on the MNIST ResNet, 1.7 ms on MiniLM, against 0.01 ms here), and this pass
    switches once per (layer, format, micro-batch): with it the proxy pass took 4% (MNIST ResNet)
    and 11% (MiniLM) longer (medians, one thread). The exact scan switches once per (layer, format,
    batch) around a whole suffix replay, where it costs under 1%, so it uses ``switched``.
    """
    before = [m.active_format for m in mods]
    try:
        for m in mods:
            m.set_format(fmt)
        yield
    finally:
        for m, f in zip(mods, before):
            m.active_format = f


def split_batch(batch: Any, size: Optional[int]) -> list:
    """Cut a batch into pieces of at most ``size`` samples along dim 0 (every tensor of that length)."""
    n = batch_size(batch)
    if not size or n is None or n <= size:
        return [batch]

    def take(x: Any, sl: slice) -> Any:
        if isinstance(x, torch.Tensor):
            return x[sl] if x.dim() and x.shape[0] == n else x
        if isinstance(x, dict):
            return {k: take(v, sl) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(take(v, sl) for v in x)
        return x

    return [take(batch, slice(i, i + size)) for i in range(0, n, size)]


def proxy_scan(qmodel: nn.Module, batches: Sequence[Any], todo: dict[str, list[str]], seed: int = 0,
               runner: Optional[GraphRunner] = None, micro_batch: Optional[int] = None) -> ProxyResult:
    """Compute sqnr_db, mse and fisher for every (unit, format) in ``todo`` in one pass.

    Args:
        qmodel: a calibrated model prepared for every format in ``todo``.
        batches: model inputs (no targets are needed).
        todo: {unit: [formats]}.
        seed: seed of the output-space probes.
        runner: a ``GraphRunner`` for FX models (None: module hooks, each unit on its own).
        micro_batch: run the forward-backward on at most this many samples at a time (a backward
            holds several times the activations of a forward; the scores are sums over samples).

    Returns:
        A ``ProxyResult``; ``fisher`` is 0 for a layer the output does not depend on.
    """
    owners, fols = units(qmodel), followers(qmodel)
    mods_of = {u: [owners[u]] + [f for f in fols if f.owner == u] for u in todo}
    accs = {(u, f): _Acc() for u, fs in todo.items() for f in fs}
    params = [p for p in qmodel.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    anchor = torch.zeros((), requires_grad=True)
    gen = torch.Generator().manual_seed(seed)
    hooks = []
    t0 = time.perf_counter()
    samples = 0
    probes: list[_Probe] = []  # the hooks append to this very list, so it is cleared, never replaced
    stack = contextlib.ExitStack()
    fp32 = QuantPlan.uniform("fp32", qmodel.mixq.backend, qmodel.mixq.calib_method)
    try:
        stack.enter_context(applied(qmodel, fp32))
        for batch in (piece for b in batches for piece in split_batch(b, micro_batch)):
            probes.clear()
            with torch.enable_grad():
                if runner is not None:
                    out = _forward_fx(runner, batch, todo, mods_of, accs, anchor, probes)
                else:
                    if not hooks:
                        hooks = _install_hooks(owners, todo, mods_of, accs, anchor, probes)
                    out = call_model(qmodel, batch)
                outs = tensors_of(out)
                size = outs[0].shape[0] if outs and outs[0].dim() > 0 else 1
                samples += size
                for p in probes:
                    p.batch = size
                live = [t for t in outs if t.requires_grad]
                if live:
                    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in live)
                    loss.backward()
            for p in probes:
                if not p.fired:
                    p(None)
            probes.clear()
    finally:
        stack.close()
        for h in hooks:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    release_free_memory()
    res = ProxyResult(seconds=time.perf_counter() - t0, samples=samples)
    for key, a in accs.items():
        if a.elements == 0:
            continue
        res.scores[key] = {"sqnr_db": output_sqnr_db(a.signal, a.noise), "mse": a.noise / a.elements,
                           "fisher": a.fisher / max(samples, 1)}
    return res


def _forward_fx(runner: GraphRunner, batch: Any, todo: dict, mods_of: dict, accs: dict, anchor: torch.Tensor,
                probes: list) -> Any:
    site_at: dict[fx.Node, list] = {}
    site_start: dict[fx.Node, list] = {}
    for u in todo:
        for site in runner.sites(u):
            site_at.setdefault(site.output, []).append((u, site))
            site_start.setdefault(site.nodes[0], []).append(site)
    env = runner.bind(batch)
    saved_inputs: dict[int, dict] = {}
    for i, n in enumerate(runner.nodes):
        if n.op == "placeholder":
            continue
        for site in site_start.get(n, ()):
            # the site's inputs may be freed before its last node (behind a ReLU) runs
            saved_inputs[id(site)] = {a: _detached(env[a]) for a in site.inputs}
        env[n] = runner.run_node(n, env.__getitem__)
        for u, site in site_at.get(n, ()):
            y = env[n]
            saved = saved_inputs.pop(id(site))
            if not isinstance(y, torch.Tensor) or not y.is_floating_point():
                continue
            probe = _Probe(u, y.detach(), _site_recompute(runner, site, saved, mods_of[u]), todo[u], accs)
            probes.append(probe)
            env[n] = _Tap.apply(y, anchor, probe)
        for a in n.all_input_nodes:
            if runner.last_user[a] <= i:
                env.pop(a, None)
    return env[runner.output]


def _site_recompute(runner: GraphRunner, site, saved: dict, mods: list) -> Callable[[str], torch.Tensor]:
    def recompute(fmt: str) -> torch.Tensor:
        with _switched(mods, fmt):
            local: dict = {}
            for n in site.nodes:
                local[n] = runner.run_node(n, lambda a: local[a] if a in local else saved[a])
            return local[site.output]

    return recompute


def _install_hooks(owners: dict, todo: dict, mods_of: dict, accs: dict, anchor: torch.Tensor, probes: list):
    hooks = []
    for u in todo:
        m = owners[u]

        def hook(mod, inputs, output, u=u, m=m):
            y = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(y, torch.Tensor) or not y.is_floating_point():
                return None
            saved = tuple(_detached(x) for x in inputs)

            def recompute(fmt: str) -> torch.Tensor:
                with _switched(mods_of[u], fmt):
                    q = m.forward(*saved)
                return q[0] if isinstance(q, (tuple, list)) else q

            probe = _Probe(u, y.detach(), recompute, todo[u], accs)
            probes.append(probe)
            tapped = _Tap.apply(y, anchor, probe)
            if isinstance(output, tuple):
                return (tapped,) + tuple(output[1:])
            if isinstance(output, list):
                return [tapped] + list(output[1:])
            return tapped

        hooks.append(m.register_forward_hook(hook))
    return hooks


def _detached(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(_detached(v) for v in x)
    return x
