"""TensorRT engine layers -> precisions and mixq units (pure JSON / names; no TensorRT needed).

``layer_precision`` reads the precision of an engine-inspector layer entry; ``onnx_names_in`` splits
a fused layer name (``a + b``, ``PWN(...)``, reformats, Myelin ``{ForeignNode[...]}``) into the ONNX
node names it is made of; ``unit_of_path`` / ``node_units`` / ``layer_units`` map those to mixq units;
``precision_report`` compares the layers' precisions with what a plan asked for.
"""
from __future__ import annotations

import ast
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

LOW_PRECISIONS = ("int8", "fp8", "int4", "fp4")


# ------------------------------------------------------------------------------------- precisions
_DTYPE_WORDS = (("FP8", "fp8"), ("Int8", "int8"), ("Int4", "int4"), ("FP4", "fp4"), ("Half", "fp16"), ("FP16", "fp16"),
                ("BFloat16", "bf16"), ("BF16", "bf16"), ("Float", "fp32"), ("FP32", "fp32"), ("Int32", "int32"),
                ("Int64", "int64"), ("Bool", "bool"))
_TACTIC_HINTS = (("i8i8", "int8"), ("int8", "int8"), ("e4m3", "fp8"), ("fp8", "fp8"), ("f16f16", "fp16"),
                 ("h884", "fp16"), ("h1688", "fp16"), ("hmma", "fp16"), ("fp16", "fp16"), ("bf16", "bf16"))


def dtype_of(fmt: str) -> str:
    """Normalised data type of an inspector ``Format/Datatype`` string ("Int8", "Row major linear FP16 format")."""
    for word, name in _DTYPE_WORDS:
        if re.search(rf"\b{word}\b", fmt):
            return name
    return "unknown"


def layer_precision(layer: Mapping) -> str:
    """The precision an engine layer computes in, from its detailed inspector entry.

    Weights decide for weighted layers (``Weights.Type``); otherwise the lowest-precision input
    tensor; otherwise hints in the tactic (kernel) name. Returns "unknown" for names-only entries.
    """
    w = layer.get("Weights")
    if isinstance(w, dict) and w.get("Type"):
        d = dtype_of(str(w["Type"]))
        if d != "unknown":
            return d
    order = ["fp4", "int4", "fp8", "int8", "fp16", "bf16", "fp32"]
    dts = [dtype_of(str(t.get("Format/Datatype", ""))) for t in layer.get("Inputs", []) if isinstance(t, dict)]
    dts = [d for d in dts if d in order]
    if dts:
        return min(dts, key=order.index)
    tactic = str(layer.get("TacticName", "")).lower()
    for hint, name in _TACTIC_HINTS:
        if hint in tactic:
            return name
    return "unknown"


# ------------------------------------------------------------------------------ names -> units
_ONNX_OP = re.compile(r"^([A-Z][A-Za-z0-9]*)(_\d+)?$")
# ONNX op type -> the op name mixq's FX mode gives a functional unit (``layer1.0.add``).
_FUNCTIONAL_OPS = {"Add": "add", "MatMul": "matmul", "Concat": "cat", "MaxPool": "max_pool"}


def onnx_names_in(layer_name: str) -> list[str]:
    """The ONNX node (or tensor) names a TensorRT engine layer name is made of.

    Handles fusion (`` + ``), pointwise groups (``PWN(a, PWN(b))``), reformats (``Reformatting
    CopyNode for Input Tensor 0 to X``) and Myelin regions (``{ForeignNode[first...last]}``).
    """
    s = re.sub(r"^Reformatting CopyNode for (Input|Output) Tensor \d+ to ", "", layer_name)
    s = s.replace("...", " + ")
    parts = re.split(r" \+ |, |\bPWN\(|\bForeignNode\[|[{}\[\]]|\)(?=\s|$|\)|,|\])", s)
    out = []
    for p in parts:
        p = p.strip().strip("()[]{}").strip()
        if p and p not in out:
            out.append(p)
    return out


def unit_of_path(name: str, units: Iterable[str]) -> Optional[str]:
    """Map one ONNX node name in TorchScript-exporter style to a unit, or None.

    ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``; ``/layer1/layer1.0/Add_1`` ->
    ``layer1.0.add_1``; ``/fc/input_quantizer/QuantizeLinear`` -> ``fc`` (nodes inside a unit).
    """
    unit_set = set(units)
    comps = [c for c in name.strip("/").split("/") if c]
    if not comps:
        return None
    op = comps[-1] if len(comps) > 1 or _ONNX_OP.match(comps[-1]) else ""
    path, prev = "", ""
    for c in comps[:-1] if op else comps:
        # The exporter writes a container's child as "<container attr>.<index>" ("downsample.0").
        path = f"{path}{c[len(prev):]}" if prev and c.startswith(prev + ".") else f"{path}.{c}" if path else c
        prev = c
    m = _ONNX_OP.match(op) if op else None
    if m and m.group(1) in _FUNCTIONAL_OPS:
        fname = _FUNCTIONAL_OPS[m.group(1)] + (m.group(2) or "")
        cand = f"{path}.{fname}" if path else fname
        if cand in unit_set:
            return cand
    while path:
        if path in unit_set:
            return path
        path = path.rpartition(".")[0]
    return None


def node_units(onnx_model: Any, units: Iterable[str]) -> dict[str, str]:
    """Map the node names of an ONNX model to units, using the exporter's metadata where present.

    Looks, per node, at ``mixq.unit`` metadata, then the dynamo exporter's
    ``pkg.torch.onnx.name_scopes`` (deepest scope that is or lies inside a unit), then the node
    name in TorchScript style. Output tensor names map to the node's unit too (TensorRT names
    some layers after tensors).

    Args:
        onnx_model: an ``onnx.ModelProto`` or a path to one.
        units: the model's unit names.
    """
    import onnx

    m = onnx.load(str(onnx_model), load_external_data=False) if isinstance(onnx_model, (str, os.PathLike)) else onnx_model
    unit_list = list(units)
    unit_set = set(unit_list)
    out: dict[str, str] = {}
    for n in m.graph.node:
        meta = {p.key: p.value for p in n.metadata_props}
        u = meta.get("mixq.unit") if meta.get("mixq.unit") in unit_set else None
        if u is None and "pkg.torch.onnx.name_scopes" in meta:
            try:
                scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            except (ValueError, SyntaxError):
                scopes = []
            for sc in reversed([s for s in scopes if isinstance(s, str) and s]):
                u = unit_of_path("/" + sc.replace(".", "/") + "/X", unit_set) if sc not in unit_set else sc
                if u is not None:
                    break
        if u is None and n.name:
            u = unit_of_path(n.name, unit_set)
        if u is not None:
            if n.name:
                out[n.name] = u
            for t in n.output:
                out.setdefault(t, u)
    return out


def layer_units(layer_name: str, units: Iterable[str], node_map: Optional[Mapping[str, str]] = None) -> list[str]:
    """Units an engine layer computes (several when TensorRT fused them), in name order."""
    found = []
    unit_set = set(units)
    for n in onnx_names_in(layer_name):
        u = node_map.get(n) if node_map else None
        if u is None:
            u = unit_of_path(n, unit_set)
        if u is not None and u not in found:
            found.append(u)
    return found


def precision_report(layers: Sequence[Mapping], assignment: Mapping[str, str]) -> dict:
    """Compare engine layers (``Engine.layers`` output) with the plan's formats per unit."""
    seen: dict[str, list[str]] = {u: [] for u in assignment}
    unmatched = []
    for layer in layers:
        if str(layer["name"]).startswith("Reformatting CopyNode") or layer.get("type") == "Reformat":
            continue
        if not layer["units"]:
            unmatched.append(layer["name"])
        for u in layer["units"]:
            if layer["precision"] not in seen[u]:
                seen[u].append(layer["precision"])
    mism = []
    for u, f in assignment.items():
        obs = [p for p in seen[u] if p != "unknown"]
        planned_low = f in ("int8", "fp8_e4m3", "int4_wo")
        if not obs:
            continue
        runs_low = any(p in LOW_PRECISIONS for p in obs)
        if planned_low != runs_low:
            mism.append(u)
    return {"units": {u: {"planned": assignment[u], "observed": seen[u]} for u in assignment},
            "mismatches": mism, "unmatched_layers": unmatched}
