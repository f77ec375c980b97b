"""Graph capture with ``torch.export`` for models ``torch.fx`` cannot trace (Hugging Face encoders as they come).

``torch.fx.symbolic_trace`` runs the forward on proxies, so Python that looks at values or shapes stops
it (in transformers 5.25 BERT: ``modeling_bert.py:85``, ``self.position_ids[:, cache_length : seq_length +
cache_length]``, a slice by a traced length; a bare ``BertModel`` first fails on ``merge_with_config_defaults``
writing into ``**kwargs``).
``torch.export`` runs the forward on fake tensors with concrete shapes instead, and keeps the
batch axis symbolic. ``capture`` turns the exported graph into the kind of ``fx.GraphModule``
mixq's graph mode works on:

- every call of a module mixq quantizes (``nn.Linear``, ``nn.Conv2d`` ... found from each node's
  ``nn_module_stack``), and of BatchNorm / MaxPool / ReLU modules, becomes one ``call_module`` node on
  that module, as ``torch.fx`` would leave it (BatchNorm then folds, ReLU fuses on ort-cpu);
- ``aten.add`` / ``aten.matmul`` / ``aten.bmm`` / ``aten.cat`` / ``aten.max_pool*`` / ``aten.relu`` become the torch functions
  ``mixq.quant.graph`` recognises as functional units;
- ``aten.scaled_dot_product_attention`` is written out as ``matmul -> scale -> mask -> softmax -> matmul``,
  so the two attention matmuls are units whether a model runs "sdpa" or "eager" attention;
- inference dropouts, shape guards and dead code (a pooler nobody reads) are removed;
- ``node.meta["scope"]`` is the path of the module whose forward made the node, so functional
  units get the names FX graph mode gives them (``bert.encoder.layer.0.attention.output.add``).

Only tensor outputs are supported (a Tensor or a tuple/list of Tensors): a model returning a
``ModelOutput`` or dict is wrapped by the user in a small module that picks (and pools) what it needs,
as ``experiments/minilm_hf.py`` does.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import math
import operator
import os
import traceback
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from mixq.errors import ModelError
from mixq.quant.custom import CustomModules, quant_class_for
from mixq.quant.modules import QuantMixin

CAPTURED = "mixq_captured"  # key in GraphModule.meta: how the graph was captured

_aten = torch.ops.aten
_FUNCS = {_aten.matmul.default: torch.matmul, _aten.bmm.default: torch.bmm, _aten.cat.default: torch.cat,
          _aten.concat.default: torch.cat, _aten.max_pool1d.default: F.max_pool1d,
          _aten.max_pool2d.default: F.max_pool2d, _aten.max_pool3d.default: F.max_pool3d,
          _aten.relu.default: torch.relu, _aten.relu_.default: torch.relu_}
# Modules kept whole besides the quantizable ones: BatchNorm (folded into the conv before it) and
# max pooling (a unit), as torch.fx leaves them.
_KEPT_MODULES = (nn.modules.batchnorm._BatchNorm, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.ReLU)
_DROPPED = {_aten._assert_tensor_metadata.default, _aten._assert_scalar.default}
_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export")
_TORCH_DIR = os.path.dirname(torch.__file__)
_MIXQ_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CaptureError(ModelError):
    """A model neither ``torch.fx`` nor ``torch.export`` can turn into a graph; the message names the construct."""


def construct_of(exc: BaseException) -> str:
    """Where ``exc`` was raised in the model's own code: ``file:line in function: `source```.

    The innermost frame outside torch and mixq is the construct that stopped the trace (a branch on a
    tensor, a slice by a traced size, a write into ``**kwargs``); a model defined inside torch gives
    the innermost frame of all.

    Args:
        exc: the exception torch.fx or torch.export raised.

    Returns:
        A one-line description, or "" when the traceback is empty.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if not os.path.abspath(f.filename).startswith((_TORCH_DIR, _MIXQ_DIR))]
    if not mine:
        mine = [f for f in frames if not os.path.abspath(f.filename).startswith(_MIXQ_DIR)] or frames
    if not mine:
        return ""
    f = mine[-1]
    return f"{_short_path(f.filename)}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


def _short_path(path: str) -> str:
    """A path from its package root (``transformers/utils/generic.py``) rather than the site-packages prefix."""
    parts = os.path.abspath(path).split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) + 1:])
    return path


def describe_failure(exc: BaseException) -> str:
    """``TypeError: <first line> at <construct>``: a failure's type, message and where it comes from."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    where = construct_of(exc)
    return f"{type(exc).__name__}: {first}" + (f" (at {where})" if where else "")


def _inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise CaptureError(f"graph capture needs one example batch as a Tensor or a tuple of Tensors (the model's "
                       f"positional inputs), but got {type(example_inputs).__name__}.")


def _check_outputs(out: Any, model: nn.Module) -> None:
    ok = isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and out
                                           and all(isinstance(t, torch.Tensor) for t in out))
    if not ok:
        raise CaptureError(
            f"{type(model).__name__} returns a {type(out).__name__}; mixq's graph mode needs a Tensor or a tuple of "
            "Tensors. Wrap the model in a module whose forward returns the tensor(s) you evaluate, e.g. "
            "`model(input_ids, attention_mask).last_hidden_state` pooled (see experiments/minilm_hf.py).")


def _widened(args: tuple, batch_axis: Optional[int]) -> tuple:
    """The example with at least 2 samples: export would specialise a batch of 1 to that size."""
    if batch_axis is None or any(t.dim() == 0 for t in args) or args[0].shape[batch_axis] > 1:
        return args
    return tuple(torch.cat([t, t], dim=batch_axis) for t in args)


def export_program(model: nn.Module, args: tuple, batch_axis: Optional[int]) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict) with ``batch_axis`` of every input dynamic.

    Raises:
        CaptureError: export failed; the message names the construct that stopped it.
    """
    dyn = None
    if batch_axis is not None:
        dyn = tuple({batch_axis % t.dim(): torch.export.Dim.AUTO} if t.dim() else None for t in args)
    try:
        with _quiet_torch_logs():
            return torch.export.export(model, args, dynamic_shapes=dyn, strict=False)
    except Exception as e:  # export raises many types (UserError, GuardOnDataDependentSymNode, TypeError ...)
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {describe_failure(e)}") from e


@contextlib.contextmanager
def _quiet_torch_logs():
    """A failed export logs warnings and prints its partial graph to stderr; the CaptureError says what matters."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _stack(node: fx.Node) -> list[tuple[str, str, str]]:
    """(call key, module path, type name) from the outermost module call to the innermost."""
    return [(k, v[0], v[1]) for k, v in (node.meta.get("nn_module_stack") or {}).items()]


def _unit_calls(gm: fx.GraphModule, model: nn.Module, custom: dict) -> dict[str, tuple[str, list[fx.Node]]]:
    """{call key: (module path, nodes of that call)} for every call of a module mixq quantizes (outermost only)."""
    calls: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for key, path, _ in _stack(node):
            try:
                m = model.get_submodule(path)
            except AttributeError:
                continue
            if (isinstance(m, (QuantMixin, *_KEPT_MODULES)) or type(m) in custom
                    or quant_class_for(type(m), custom) is not None):
                calls.setdefault(key, (path, []))[1].append(node)
                break
    return calls


def _collapse_call(gm: fx.GraphModule, path: str, module: nn.Module, nodes: list[fx.Node]) -> bool:
    """Replace the nodes of one module call by ``call_module(path, x)``; False when the call is not one-in one-out."""
    inside = set(nodes)
    ins = [a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"]
    ins = list(dict.fromkeys(ins))
    outs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(ins) != 1 or len(outs) != 1:
        return False
    try:
        gm.get_submodule(path)
    except AttributeError:  # the exported module holds only modules with tensors; a pooling layer has none
        parent, _, leaf = path.rpartition(".")
        owner = gm
        for part in parent.split(".") if parent else ():
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.add_module(leaf, module)
    with gm.graph.inserting_after(outs[0]):
        new = gm.graph.call_module(path, args=(ins[0],))
    new.meta.update({k: v for k, v in outs[0].meta.items() if k != "nn_module_stack"})
    new.meta["nn_module_stack"] = {k: v for k, v in (outs[0].meta.get("nn_module_stack") or {}).items()
                                   if v[0] != path and not v[0].startswith(path + ".")}
    outs[0].replace_all_uses_with(new)
    for n in reversed(nodes):
        if not n.users:
            gm.graph.erase_node(n)
    return True


def _sdpa(graph: fx.Graph, node: fx.Node) -> Optional[fx.Node]:
    """Write ``scaled_dot_product_attention`` out with explicit matmuls (None: a variant kept as it is)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, node.args), **node.kwargs)
    if a.get("dropout_p", 0.0) or a.get("is_causal", False) or a.get("enable_gqa", False):
        return None
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    scale = a.get("scale")
    qval = q.meta.get("val") if isinstance(q, fx.Node) else None
    if scale is None:
        if qval is None or not isinstance(qval.shape[-1], int):
            return None
        scale = 1.0 / math.sqrt(qval.shape[-1])
    mval = mask.meta.get("val") if isinstance(mask, fx.Node) else None
    if mask is not None and (mval is None or qval is None):
        return None
    with graph.inserting_before(node):
        kt = graph.call_method("transpose", (k, -2, -1))
        scores = graph.call_function(operator.mul, (graph.call_function(torch.matmul, (q, kt)), scale))
        if mask is not None and mval.dtype == torch.bool:
            # True = attend (SDPA's convention); the most negative finite value keeps fully masked rows finite.
            scores = graph.call_method("masked_fill", (scores, graph.call_method("logical_not", (mask,)),
                                                       torch.finfo(qval.dtype).min))
        elif mask is not None:
            scores = graph.call_function(operator.add, (scores, mask))
        probs = graph.call_function(torch.softmax, (scores,), {"dim": -1})
        out = graph.call_function(torch.matmul, (probs, v))
    new = list(graph.nodes)
    for n in new[new.index(kt):new.index(out) + 1]:
        n.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
    return out


def _rewrite_ops(gm: fx.GraphModule) -> None:
    """aten ops -> the torch functions graph mode knows; dropouts, guards and assertions out."""
    graph = gm.graph
    for node in list(graph.nodes):
        tgt = node.target
        if node.op == "call_module" and str(tgt).startswith("_guards_fn"):
            graph.erase_node(node)
        elif node.op != "call_function":
            continue
        elif tgt in _DROPPED:
            graph.erase_node(node)
        elif tgt in (_aten.dropout.default, _aten.feature_dropout.default, _aten.alpha_dropout.default) \
                and not (node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif tgt is _aten.add.Tensor and len(node.args) == 2 and not node.kwargs:
            node.target = operator.add
        elif tgt in _FUNCS:
            node.target = _FUNCS[tgt]
        elif isinstance(tgt, torch._ops.OpOverload) and _takes_traced_size(node):
            _to_python_api(node)
        elif tgt is _aten.sym_size.int:
            # A traced size: ``x.size(d)`` stays dynamic in the TorchScript ONNX export as well.
            node.op, node.target = "call_method", "size"
        elif tgt is _aten.scaled_dot_product_attention.default:
            out = _sdpa(graph, node)
            if out is not None:
                node.replace_all_uses_with(out)
                graph.erase_node(node)


def _takes_traced_size(node: fx.Node) -> bool:
    """Does ``node`` take a size that follows the dynamic batch (a SymInt)?"""
    return any(isinstance(a.meta.get("val"), torch.SymInt) for a in node.all_input_nodes)


def _to_python_api(node: fx.Node) -> None:
    """Call ``torch.<op>`` or ``Tensor.<op>`` instead of the aten overload: the TorchScript ONNX exporter then
    records the traced size as dynamic (``aten.arange.default`` refuses the traced size outright)."""
    name = node.target._schema.name.split("::")[-1]
    if hasattr(torch, name):
        node.target = getattr(torch, name)
    elif hasattr(torch.Tensor, name):
        node.op, node.target = "call_method", name


def _set_scopes(gm: fx.GraphModule) -> None:
    """``node.meta["scope"]``: the innermost module path of each node, as mixq's FX tracer records it."""
    for node in gm.graph.nodes:
        stack = _stack(node)
        node.meta["scope"] = stack[-1][1] if stack else ""


def _name_placeholders(gm: fx.GraphModule, model: nn.Module) -> None:
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip(holders, params):
        node.target = name


def _plain_graph(gm: fx.GraphModule, model: nn.Module, out_is_tensor: bool) -> fx.GraphModule:
    """The exported graph with plain positional inputs and outputs (no pytree codegen)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            flat = node.args[0]
            res = tuple(env[o] if isinstance(o, fx.Node) else o for o in flat)
            graph.output(res[0] if out_is_tensor else res)
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    # Modules mixq quantizes come from the model itself (their class matters); parameters, buffers and
    # constants from the exported module, which holds them under the same paths.
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            root[node.target] = model.get_submodule(node.target)
        elif node.op == "get_attr":
            root[node.target] = _attr(gm, node.target)
    out = fx.GraphModule(root, graph, type(model).__name__)
    _name_placeholders(out, model)
    out.recompile()
    return out


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def capture(model: nn.Module, example_inputs: Any, batch_axis: Optional[int] = 0,
            custom_modules: CustomModules = None, rtol: float = 1e-4) -> fx.GraphModule:
    """Capture ``model`` with ``torch.export`` into a GraphModule that mixq's FX graph mode quantizes.

    Args:
        model: float model (a deep copy is captured; the model is not modified).
        example_inputs: one batch: a Tensor or a tuple of the forward's positional Tensors.
        batch_axis: the axis of every input that indexes samples, kept dynamic (None: static shapes).
        custom_modules: a user's ``{float class: quant class or None}`` map (its classes stay one module).
        rtol: the captured graph must reproduce the model's output on the example within this
            relative tolerance (of the output's largest magnitude).

    Returns:
        A ``fx.GraphModule`` called like ``model``; ``gm.meta[CAPTURED] == "torch.export"``.

    Raises:
        CaptureError: bad example inputs, outputs that are not tensors, an export failure (naming the
            construct that stopped it), or a captured graph that computes something else on the example.
    """
    args = _inputs(example_inputs)
    model = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(*args)
    _check_outputs(ref, model)
    ep = export_program(model, _widened(args, batch_axis), batch_axis)
    gm = ep.module()
    custom = dict(custom_modules or {})
    for path, nodes in _unit_calls(gm, model, custom).values():
        _collapse_call(gm, path, model.get_submodule(path), nodes)
    _rewrite_ops(gm)
    gm.graph.eliminate_dead_code()
    out = _plain_graph(gm, model, isinstance(ref, torch.Tensor))
    _set_scopes(out)
    out.meta[CAPTURED] = "torch.export"
    out.train(model.training)
    _check_same(out, model, args, ref, rtol)
    return out


def _check_same(gm: fx.GraphModule, model: nn.Module, args: tuple, ref: Any, rtol: float) -> None:
    with torch.no_grad():
        got = gm(*args)
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    gots = [got] if isinstance(got, torch.Tensor) else list(got)
    for i, (r, g) in enumerate(zip(refs, gots)):
        tol = rtol * float(r.abs().max()) + 1e-6 if r.is_floating_point() and r.numel() else 0.0
        if r.shape != g.shape or (r.numel() and float((r.double() - g.double()).abs().max()) > tol):
            raise CaptureError(f"the graph torch.export captured from {type(model).__name__} does not compute its "
                               f"output {i} on the example batch (shape {tuple(g.shape)} vs {tuple(r.shape)}); "
                               "the forward depends on something the trace fixed (a value read with .item() or a "
                               "Python branch on data). Use mode='module'.")
