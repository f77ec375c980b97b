"""Run an FX GraphModule node by node, so that a scan re-runs only what one layer changes.

Quantizing unit ``L`` changes only the nodes that depend on ``L`` (its *dirty* set: L's own call
sites, the output quantizers that follow it, and everything downstream). Every other node keeps
its base value. A ``SuffixPlan`` lists, for one unit, the dirty nodes in topological order and the
*frontier*: the clean nodes whose values the dirty ones read. Given cached base values of the
frontier, ``run_suffix`` recomputes exactly the dirty nodes and returns the model output; the
result is bit-identical to a full forward, because every node runs the same call on the same
tensors.

A ``Cursor`` holds the base values of one evaluation batch. As the scan moves through the units
(in graph order) it computes, on demand, the frontier of the current unit and what that needs,
and forgets every value that no later frontier and no value still to compute needs, so memory
stays near that of one forward per batch instead of every activation of the whole graph.
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import fx, nn

from mixq.quant.graph import QuantFollower
from mixq.quant.modules import QuantMixin

_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                  operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                  operator.irshift, operator.imatmul}


class NotReplayable(Exception):
    """The graph cannot be replayed piecewise (the scan falls back to full evaluations)."""


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCS or node.kwargs.get("inplace", False) is True:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("__")
    return False


def tensors_of(x: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in a (nested) output structure, in a fixed order."""
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, dict):
        return [t for k in sorted(x, key=str) for t in tensors_of(x[k])]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensors_of(v)]
    return []


@dataclass
class Site:
    """One call of a unit plus the output quantizer that follows it: ``nodes`` ends at ``output``."""

    nodes: list[fx.Node]
    inputs: list[fx.Node]

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]


@dataclass
class SuffixPlan:
    """What re-running one unit needs (see the module docstring)."""

    unit: str
    dirty: list[fx.Node]
    frontier: list[fx.Node]
    free_after: dict[int, list[fx.Node]]
    reaches_output: bool
    sites: list[Site] = field(default_factory=list)



class GraphRunner:
    """Executes a prepared ``fx.GraphModule`` one node at a time.

    Args:
        gm: a model prepared by ``mixq.quantize`` in FX mode.

    Raises:
        NotReplayable: the graph mutates a tensor that another node also reads (an in-place op
            whose input has several users), or its signature takes ``*args`` / ``**kwargs``.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        for i, n in enumerate(self.nodes):
            n.meta["_mixq_index"] = i
        self.modules = dict(gm.named_modules())
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.output = next(n for n in self.nodes if n.op == "output")
        self.last_user = {n: max((self.index(u) for u in n.users), default=self.index(n)) for n in self.nodes}
        self.inplace = {n for n in self.nodes if _is_inplace(n, self.modules)}
        for n in self.inplace:
            first = n.args[0] if n.args else None
            if isinstance(first, fx.Node) and len(first.users) > 1:
                raise NotReplayable(f"node {n.name!r} modifies {first.name!r} in place, which other nodes also read")
        if any(p.target.startswith("*") for p in self.placeholders):
            raise NotReplayable("the model's forward takes *args or **kwargs")
        self.follower_names: dict[str, list[str]] = {}
        for name, m in self.modules.items():
            if isinstance(m, QuantFollower):
                self.follower_names.setdefault(m.owner, []).append(name)

    @staticmethod
    def index(node: fx.Node) -> int:
        return node.meta["_mixq_index"]

    # ------------------------------------------------------------------ execution
    def bind(self, batch: Any) -> dict[fx.Node, Any]:
        """Placeholder values for one batch, exactly as ``call_model`` would pass it."""
        if isinstance(batch, dict):
            values = {p: batch[p.target] for p in self.placeholders if p.target in batch}
            unknown = set(batch) - {p.target for p in self.placeholders}
            if unknown:
                raise TypeError(f"forward() got unexpected keyword argument(s) {sorted(unknown)}")
        else:
            args = list(batch) if isinstance(batch, (tuple, list)) else [batch]
            if len(args) > len(self.placeholders):
                raise TypeError(f"forward() takes {len(self.placeholders)} input(s) but the batch has {len(args)}")
            values = dict(zip(self.placeholders, args))
        for p in self.placeholders:
            if p not in values:
                if not p.args:
                    raise TypeError(f"forward() is missing input {p.target!r}")
                values[p] = p.args[0]
        return values

    def run_node(self, node: fx.Node, lookup: Callable[[fx.Node], Any]) -> Any:
        """Compute one node from the values ``lookup`` returns for its inputs."""
        args = fx.node.map_arg(node.args, lookup)
        kwargs = fx.node.map_arg(node.kwargs, lookup)
        if node in self.inplace and args and isinstance(args[0], torch.Tensor):
            # Its input is a cached value other units read again: mutate a copy, never the cache.
            args = (args[0].clone(),) + tuple(args[1:])
        op = node.op
        if op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if op == "call_function":
            return node.target(*args, **kwargs)
        if op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if op == "get_attr":
            obj: Any = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        if op == "output":
            return args[0]
        raise NotReplayable(f"cannot run node {node.name!r} of op {op!r}")

    def run(self, batch: Any, node_seconds: Optional[list[float]] = None) -> Any:
        """A full forward (values freed after their last use); optionally time every node."""
        env = self.bind(batch)
        for i, n in enumerate(self.nodes):
            if n.op == "placeholder":
                continue
            t0 = time.perf_counter()
            env[n] = self.run_node(n, env.__getitem__)
            if node_seconds is not None:
                node_seconds[i] += time.perf_counter() - t0
            for a in n.all_input_nodes:
                if self.last_user[a] <= i:
                    env.pop(a, None)
        return env[self.output]

    # ------------------------------------------------------------------ analysis
    def unit_nodes(self, unit: str) -> list[fx.Node]:
        names = {unit, *self.follower_names.get(unit, ())}
        return [n for n in self.nodes if n.op == "call_module" and n.target in names]

    def suffix_plan(self, unit: str) -> SuffixPlan:
        """The dirty nodes and the frontier of ``unit`` (see the module docstring)."""
        start = self.unit_nodes(unit)
        dirty_set: set[fx.Node] = set()
        stack = list(start)
        while stack:
            n = stack.pop()
            if n in dirty_set:
                continue
            dirty_set.add(n)
            stack.extend(n.users)
        dirty = sorted(dirty_set, key=self.index)
        frontier = sorted({a for d in dirty for a in d.all_input_nodes if a not in dirty_set}, key=self.index)
        last_in_dirty: dict[fx.Node, int] = {}
        for pos, d in enumerate(dirty):
            for a in d.all_input_nodes:
                if a in dirty_set:
                    last_in_dirty[a] = pos
        free_after: dict[int, list[fx.Node]] = {}
        for n, pos in last_in_dirty.items():
            free_after.setdefault(pos, []).append(n)
        return SuffixPlan(unit, dirty, frontier, free_after, self.output in dirty_set, self.sites(unit))

    def sites(self, unit: str) -> list[Site]:
        """Each call of ``unit``, extended through a ReLU to the output quantizer moved behind it."""
        followers = set(self.follower_names.get(unit, ()))
        out = []
        for n in self.nodes:
            if n.op != "call_module" or n.target != unit:
                continue
            nodes = [n]
            if followers and len(n.users) == 1:
                act = next(iter(n.users))
                fol = [u for u in act.users if u.op == "call_module" and u.target in followers]
                if fol:
                    nodes += [act, fol[0]]
            inside = set(nodes)
            inputs = sorted({a for m in nodes for a in m.all_input_nodes if a not in inside}, key=self.index)
            out.append(Site(nodes, inputs))
        return out

    def run_suffix(self, plan: SuffixPlan, base: dict[fx.Node, Any]) -> Any:
        """Recompute ``plan``'s dirty nodes from the base values of its frontier; return the output."""
        local: dict[fx.Node, Any] = {}

        def lookup(n: fx.Node) -> Any:
            return local[n] if n in local else base[n]

        for pos, d in enumerate(plan.dirty):
            local[d] = self.run_node(d, lookup)
            for n in plan.free_after.get(pos, ()):
                if n is not self.output:
                    local.pop(n, None)
        return local[self.output]


class Schedule:
    """When a scan's cursors compute each base value and when they may forget it.

    Only ancestors of some frontier are ever computed, each at the first step whose frontier
    needs it (a mask used at the very end of the graph does not drag the whole network in).

    Args:
        runner: the graph runner.
        plans: the suffix plans of the units, in the order the scan visits them.
    """

    def __init__(self, runner: GraphRunner, plans: list[SuffixPlan]) -> None:
        self.runner = runner
        self.keep_until: dict[fx.Node, int] = {}
        for step, p in enumerate(plans):
            for n in p.frontier:
                self.keep_until[n] = step
        needed: set[fx.Node] = set()
        stack = [n for p in plans for n in p.frontier]
        while stack:
            n = stack.pop()
            if n not in needed:
                needed.add(n)
                stack.extend(n.all_input_nodes)
        self.needed = needed
        # users that the cursor will compute; a value is dropped once they all ran
        self.consumers = {n: sum(1 for u in n.users if u in needed) for n in needed}


class Cursor:
    """Base values of one batch, computed on demand and forgotten when no longer needed.

    Args:
        schedule: the shared ``Schedule``.
        batch: the batch's model inputs.
    """

    def __init__(self, schedule: Schedule, batch: Any) -> None:
        self.schedule = schedule
        self.runner = schedule.runner
        self.env: dict[fx.Node, Any] = self.runner.bind(batch)
        self.computed: set[fx.Node] = set(self.env)
        self.remaining = dict(schedule.consumers)

    def ensure(self, targets: Iterable[fx.Node], step: int) -> None:
        """Compute (with the model's current formats) every target not yet computed, and its inputs."""
        todo: set[fx.Node] = set()
        stack = [n for n in targets if n not in self.computed]
        while stack:
            n = stack.pop()
            if n in todo or n in self.computed:
                continue
            todo.add(n)
            stack.extend(n.all_input_nodes)
        keep = self.schedule.keep_until
        for n in sorted(todo, key=self.runner.index):
            self.env[n] = self.runner.run_node(n, self.env.__getitem__)
            self.computed.add(n)
            for a in n.all_input_nodes:
                self.remaining[a] -= 1
                if self.remaining[a] == 0 and keep.get(a, -1) < step:
                    self.env.pop(a, None)

    def release(self, step: int) -> None:
        """Forget values that no step after ``step`` reads and no value still to compute needs."""
        keep = self.schedule.keep_until
        for n in [n for n in self.env if keep.get(n, -1) <= step and self.remaining.get(n, 0) == 0]:
            del self.env[n]

    def nbytes(self) -> int:
        """Bytes held by the cached values (views of one storage counted once)."""
        storages = {}
        for v in self.env.values():
            for t in _all_tensors(v):
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())


def _all_tensors(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _all_tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _all_tensors(v)


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc only; elsewhere a no-op).

    glibc raises its mmap threshold after large frees, so later activations come from the heap,
    which then only grows: without this, a MiniLM scan's resident memory ended near 2.6x that of
    an FP32 evaluation although its live tensors were about 1.1x. The scan trims between stages
    and between the batches of a sweep, not after every forward: memory handed back is faulted
    in again by the next forward, which made a trimmed MNIST forward 1.5x slower.
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def unit_order(runner: GraphRunner, names: Iterable[str]) -> list[str]:
    """Units sorted by their first call in the graph (the order a cursor can follow)."""
    first = {}
    for n in runner.nodes:
        if n.op == "call_module" and n.target not in first:
            first[n.target] = runner.index(n)
    return sorted(names, key=lambda u: first.get(u, len(runner.nodes)))


def is_unit(m: nn.Module) -> bool:
    return isinstance(m, QuantMixin) and not isinstance(m, QuantFollower)
