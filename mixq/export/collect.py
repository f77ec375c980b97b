"""Marks -> sites: read the marks of the exported float graph into ``Site`` records, fold the exporter's
weight transposes and initializer aliases, and map each unit to the ONNX nodes that compute it."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from mixq.export.float_graph import _MARK_DOMAIN, _WEIGHT_OPS, FloatGraph, Site
from mixq.quant.graph import QuantFollower


def _collect(model: onnx.ModelProto, backend: str, opset: int, kinds: dict, mods: dict, in_names: list,
             out_names: list, versions: dict) -> FloatGraph:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    _inline_initializer_identities(g, inits)
    consumers = _consumers(g)
    drop: set[int] = set()
    sites: list[Site] = []
    unsupported: dict[str, str] = {}
    weights: dict[str, str] = {}
    for i, n in enumerate(g.node):
        if n.domain != _MARK_DOMAIN:
            continue
        attrs = {a.name: a.s.decode() for a in n.attribute}
        module, role = attrs["module"], attrs["role"]
        m = mods.get(module)
        unit = m.owner if isinstance(m, QuantFollower) else module
        src, dst, perm = n.input[0], n.output[0], None
        is_weight = not (role.startswith("input") or role == "output")
        if is_weight:
            users = consumers.get(dst, [])
            if src not in inits:
                unsupported[unit] = f"its weight {role!r} is computed in the graph, not stored"
            elif len(users) == 1 and g.node[users[0]].op_type == "Transpose":
                # Fold the exporter's weight transpose (Linear on 3-D inputs -> MatMul) into the initializer.
                tr = g.node[users[0]]
                rank = len(inits[src].dims)
                perm = tuple(next((list(a.ints) for a in tr.attribute if a.name == "perm"), range(rank - 1, -1, -1)))
                new = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[src]).transpose(perm)),
                                              f"{src}.T")
                g.initializer.append(new)
                inits[new.name] = new
                n.input[0] = src = new.name
                n.output[0] = dst = tr.output[0]
                drop.add(users[0])
                users = consumers.get(dst, [])
            ops = {g.node[u].op_type for u in users}
            if src in inits and not ops <= set(_WEIGHT_OPS):
                unsupported[unit] = f"its weight {role!r} feeds {', '.join(sorted(ops))}, not {'/'.join(_WEIGHT_OPS)}"
            weights.setdefault(unit, src)
        sites.append(Site(module, unit, role, src, dst, i, perm))
    if drop:
        keep = [n for i, n in enumerate(g.node) if i not in drop]
        del g.node[:]
        g.node.extend(keep)
        sites = _reindex(sites, g)
    fg = FloatGraph(model, backend, opset, sites, kinds, {}, weights, unsupported, in_names, out_names, versions)
    fg._body = _unit_bodies(g, sites)
    fg.unit_nodes = {u: [g.node[i].name for i in _main_first(g, sites, u, idx)] for u, idx in fg._body.items()}
    return fg


def _main_first(g: onnx.GraphProto, sites: list[Site], unit: str, body: list[int]) -> list[int]:
    """The unit's body with its main node first: the first node reading its first input mark (the Conv,
    Gemm, Add ... itself, not a Shape a recurrent cell computes from its input); for a layer that pads its
    own input, the node reading that Pad's output."""
    firsts = [s.dst for s in sites if s.unit == unit and s.module == unit and s.role == "input0"]
    main = next((i for i in body if firsts and firsts[0] in g.node[i].input
                 and g.node[i].op_type not in ("Shape", "Size")), None)
    if main is not None and g.node[main].op_type == "Pad":
        padded = g.node[main].output[0]
        main = next((i for i in body if padded in g.node[i].input), main)
    return body if main is None else [main] + [i for i in body if i != main]


def _inline_initializer_identities(g: onnx.GraphProto, inits: dict) -> None:
    """The exporter shares equal initializers through Identity nodes (BN-folded zero biases); point the
    consumers at the initializer itself so each layer's bias and weight can be quantized in place."""
    outputs = {o.name for o in g.output}
    alias = {n.output[0]: n.input[0] for n in g.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return
    keep = [n for n in g.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        n.input[:] = [alias.get(t, t) for t in n.input]
    del g.node[:]
    g.node.extend(keep)


def _reindex(sites: list[Site], g: onnx.GraphProto) -> list[Site]:
    at = {n.output[0]: i for i, n in enumerate(g.node) if n.domain == _MARK_DOMAIN}
    return [Site(s.module, s.unit, s.role, s.src, s.dst, at[s.dst], s.perm) for s in sites]


def _consumers(g: onnx.GraphProto) -> dict[str, list[int]]:
    """Tensor name -> indices of the nodes that read it."""
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(g.node):
        for t in n.input:
            consumers[t].append(i)
    return consumers


def _unit_bodies(g: onnx.GraphProto, sites: list[Site]) -> dict[str, list[int]]:
    """Nodes computing each unit: from its input/weight marks forward to the next mark (at most 4 deep)."""
    consumers = _consumers(g)
    has_output = {s.unit for s in sites if s.role == "output" and s.module == s.unit}
    body: dict[str, list[int]] = defaultdict(list)
    for s in sites:
        if s.module != s.unit or s.role == "output":
            continue
        frontier, depth = [s.dst], 0
        while frontier and depth < 4:
            nxt = []
            for t in frontier:
                for i in consumers.get(t, []):
                    if g.node[i].domain == _MARK_DOMAIN or i in body[s.unit]:
                        continue
                    body[s.unit].append(i)
                    nxt.extend(g.node[i].output)
            # Without an output mark (max pooling) the unit is only its direct consumers.
            frontier = nxt if s.unit in has_output else []
            depth += 1
    return {u: sorted(v) for u, v in body.items()}
