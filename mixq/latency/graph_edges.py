"""Which quantizable unit feeds which: the edges a boundary-aware latency predictor needs.

A float/int8 boundary costs a conversion (Q or DQ, a reformat on TensorRT) only where one unit's
output reaches another unit through ops that do not compute (reshape, transpose, ReLU, getitem,
the output quantizer moved behind a ReLU). An op that computes in float (LayerNorm, softmax,
GELU, an unquantized mul) ends the path: the tensor is float there whatever the plan says, so a
conversion on it costs the same in every plan and belongs to the unit's own term.

The result is a ``UnitGraph`` (plain data, defined in ``mixq.latency.model``), built from the FX
graph of a model prepared by ``mixq.prepare`` / ``mixq.quantize``.
"""
from __future__ import annotations

import operator
import warnings
from collections import defaultdict
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from mixq.errors import MixqError
from mixq.latency.model import UnitGraph
from mixq.quant.graph import QuantFollower, units
from mixq.quant.modules import QuantMixin
from mixq.quantize import call_model

# Ops that move or view data without computing on it (or ReLU, which every engine fuses into the
# producer): a boundary across them is still a boundary between the two units.
PASS_METHODS = {"view", "reshape", "flatten", "unflatten", "transpose", "permute", "contiguous", "squeeze",
                "unsqueeze", "relu", "relu_", "chunk", "split", "t", "expand", "expand_as", "view_as", "reshape_as"}
PASS_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                  torch.unsqueeze, torch.chunk, torch.split, torch.t, F.relu, torch.relu, torch.relu_, F.dropout}
PASS_MODULES = (QuantFollower, nn.ReLU, nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten)


def _is_pass(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in PASS_METHODS
    if node.op == "call_function":
        return node.target in PASS_FUNCTIONS
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), PASS_MODULES)
    return False


def unit_graph(qmodel: nn.Module, example: Any = None) -> UnitGraph:
    """Return the units of a prepared model with the edges between them.

    Args:
        qmodel: a model returned by ``mixq.prepare`` or ``mixq.quantize``. FX graph mode gives its
            own graph; a module-mode model is traced here with its units as leaves (if that fails
            too, the result has units but no edges, and a predictor falls back to per-unit terms).
        example: one input batch; when given, the model runs once (in its current plan) to record
            each unit's output size, which scales the boundary terms.

    Returns:
        A ``UnitGraph`` with units in execution order.

    Raises:
        MixqError: the model was not prepared by mixq.
    """
    st = getattr(qmodel, "mixq", None)
    if st is None:
        raise MixqError("unit_graph needs a model prepared by mixq: call mixq.prepare or mixq.quantize first.")
    owners = units(qmodel)
    kinds = dict(st.kinds)
    sizes = _output_sizes(qmodel, owners, example) if example is not None else {}
    graph = qmodel.graph if isinstance(qmodel, fx.GraphModule) else _trace_with_unit_leaves(qmodel)
    if graph is None:
        return UnitGraph(units=tuple(kinds), kinds=kinds, sizes=sizes)
    unit_of = {n: n.target for n in graph.nodes if n.op == "call_module" and n.target in owners}
    order = list(dict.fromkeys(unit_of.values()))
    edges: list[tuple[str, str]] = []
    float_out: set[str] = set()
    for node, name in unit_of.items():
        reached, hit_float = _reach(qmodel, node, unit_of)
        edges += [(name, v) for v in reached]
        if hit_float:
            float_out.add(name)
    float_in: set[str] = set()
    readers: dict[fx.Node, list[str]] = defaultdict(list)
    for node, name in unit_of.items():
        for arg in _data_args(node):
            src = _source(qmodel, arg)
            if src not in unit_of:
                float_in.add(name)
            if name not in readers[src]:
                readers[src].append(name)
    groups = tuple((unit_of.get(src, f"float:{src.name}"), tuple(us)) for src, us in readers.items() if len(us) > 1)
    order += [n for n in kinds if n not in order]  # units FX never called (unused modules)
    return UnitGraph(units=tuple(order), kinds=kinds, edges=tuple(dict.fromkeys(edges)),
                     float_inputs=frozenset(float_in), float_outputs=frozenset(float_out), sizes=sizes,
                     input_groups=groups)


class _UnitLeafTracer(fx.Tracer):
    """Traces through everything but units; proxies buffers so slicing them by a traced size works."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantMixin) or super().is_leaf_module(m, qualname)


def _trace_with_unit_leaves(qmodel: nn.Module) -> Optional[fx.Graph]:
    try:
        return _UnitLeafTracer().trace(qmodel)
    except Exception as e:  # torch.fx raises many types; edges are an optional refinement
        warnings.warn(f"cannot trace {type(qmodel).__name__} to find edges between units "
                      f"({type(e).__name__}: {e}); boundary terms are left out.", stacklevel=3)
        return None


def _data_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    for a in node.args:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [x for x in a if isinstance(x, fx.Node)]
    return out


def _reach(root: nn.Module, start: fx.Node, unit_of: dict) -> tuple[list[str], bool]:
    """Units reached from ``start``'s output through pass-through ops, and whether a float op is too."""
    found: list[str] = []
    hit_float = False
    stack, seen = list(start.users), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in unit_of:
            found.append(unit_of[n])
        elif _is_pass(root, n):
            stack += list(n.users)
        elif n.op == "call_method" and n.target in ("size", "dim"):
            continue  # shape queries read metadata, not data
        else:
            hit_float = True
    return list(dict.fromkeys(found)), hit_float


def _source(root: nn.Module, node: fx.Node) -> fx.Node:
    """The node whose data ``node`` carries: walk back through pass-through ops."""
    while _is_pass(root, node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _output_sizes(qmodel: nn.Module, owners: dict, example: Any) -> dict[str, int]:
    sizes: dict[str, int] = defaultdict(int)
    hooks = []

    def hook(name: str):
        def record(_m, _inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor):
                sizes[name] += t.numel()
        return record

    for name, m in owners.items():
        hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            call_model(qmodel, example)
    finally:
        for h in hooks:
            h.remove()
    return dict(sizes)


def edges_of(qmodel: nn.Module) -> list[tuple[str, str]]:
    """Producer -> consumer pairs between units (see ``unit_graph``)."""
    return list(unit_graph(qmodel).edges)
