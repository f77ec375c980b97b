"""FX graph mode: trace a model, fold BatchNorm, and put quant modules where the backend wants them.

Every quantizable unit becomes a quant module in the traced ``GraphModule``: float layers
(Conv, Linear ...) are swapped in place, and functional calls (``+`` on residuals, ``torch.cat``,
``torch.matmul``, ``F.max_pool2d``) are replaced by ``QuantAdd`` / ``QuantCat`` / ``QuantMatMul``
/ ``QuantMaxPool`` submodules named after the module that called them (``layer1.0.add``).

Backend placement rules applied here:
- ort-cpu: a quantized op's output is requantized (QLinear* kernels produce integers); when the
  output feeds a ReLU, the output quantizer moves behind the ReLU so Conv+ReLU fuse.
- tensorrt: residual Add quantizes only the input that is not a convolution output, so
  TensorRT can fuse the Add into that convolution.
"""
from __future__ import annotations

import copy
import inspect
import operator
from collections import defaultdict
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_eval, fuse_linear_bn_weights

from mixq.formats import DEFAULT_BACKEND, get_backend
from mixq.quant.capture import CAPTURED, CaptureError, capture, describe_failure
from mixq.quant.custom import CustomModules, quant_class_for, wrappable
from mixq.quant.modules import (QUANT_MAP, QuantAdd, QuantCat, QuantMatMul, QuantMaxPool, QuantMixin, _QuantFunctional,
                                from_float)

ADD_FUNCS = {operator.add, torch.add, operator.iadd}
MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.bmm}
CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
MAXPOOL_FUNCS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
                 torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3}
MAXPOOL_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
RELU_FUNCS = {F.relu, torch.relu, torch.relu_}
_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_CONV_BN = {(nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d),
            (nn.Linear, nn.BatchNorm1d)}


class QuantFollower(_QuantFunctional):
    """The output quantizer of another unit, moved behind an activation it fuses with.

    It is not a unit of its own: ``owner`` names the unit whose format it follows.
    """

    kind = "follower"

    def __init__(self, owner: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.owner = owner
        self.quantize_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_input(x)


class ScopeTracer(fx.Tracer):
    """A tracer that records, for every node, the path of the module whose forward created it."""

    def __init__(self, custom_modules: CustomModules = None) -> None:
        super().__init__()
        self._scope: list[str] = []
        self.custom_modules = dict(custom_modules or {})

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self._scope.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._scope.pop()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Quant modules built by quant_modules.initialize() are units already: keep them whole, and so
        # are modules that become units (subclasses of supported layers, a user's custom modules).
        return (isinstance(m, QuantMixin) or type(m) in self.custom_modules
                or quant_class_for(type(m), self.custom_modules) is not None
                or super().is_leaf_module(m, module_qualified_name))

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["scope"] = self._scope[-1] if self._scope else ""
        return node


def trace(model: nn.Module, concrete_args: Optional[dict] = None,
          preserved_attributes: Sequence[str] = (), custom_modules: CustomModules = None) -> fx.GraphModule:
    """Symbolically trace ``model`` (raises whatever torch.fx raises when it cannot).

    A graph ``mixq.quant.capture.capture`` made is used as it is: re-tracing it would lose the module
    scopes its nodes carry (and so the names of its functional units).
    """
    if isinstance(model, fx.GraphModule) and getattr(model, "meta", {}).get(CAPTURED):
        return model
    tracer = ScopeTracer(custom_modules)
    graph = tracer.trace(model, concrete_args=concrete_args)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _restore_argument_names(gm, model)
    for attr in preserved_attributes:
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return gm


def _restore_argument_names(gm: fx.GraphModule, model: nn.Module) -> None:
    """FX renames placeholders of concrete args (``double`` -> ``double_1``); give callers their names back."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(holders) == len(params):
        for node, p in zip(holders, params):
            node.target = p.name
        gm.recompile()


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold eval-mode BatchNorm into the Conv/Linear that feeds it; return how many were folded.

    Only folds when the conv output goes nowhere else, so the graph computes the same function.
    ``gm.mixq_folded_bn`` records {BatchNorm path: Conv/Linear path} for the fold.
    """
    folded = 0
    record = gm.__dict__.setdefault("mixq_folded_bn", {})
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if bn is None or not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or len(src.users) != 1:
            continue
        conv = _module(gm, src)
        if conv is None or conv.training or not _foldable(conv, bn):
            continue
        fused = (fuse_linear_bn_eval if isinstance(conv, nn.Linear) else fuse_conv_bn_eval)(conv, bn)
        if type(conv) not in QUANT_MAP and not _fold_agrees(conv, bn, fused):
            continue
        _set_module(gm, src.target, fused)
        record[str(node.target)] = str(src.target)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    return folded


def fold_batchnorm_prepared(gm: fx.GraphModule, backend: str) -> list[str]:
    """Fold BatchNorm into the quant Conv/Linear units that feed it, in a prepared graph; return the folded BNs.

    The unit's weight and bias become the folded ones (in place, with the arithmetic of
    ``torch.nn.utils.fusion``), the BatchNorm leaves the graph, and the backend's placement is applied
    again (an output quantizer moves behind a ReLU the unit now feeds), so the graph is the one
    ``prepare`` builds from the model in eval mode. Ranges calibrated before are stale afterwards.
    """
    folded = []
    record = gm.__dict__.setdefault("mixq_folded_bn", {})
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if bn is None or not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            continue
        src = node.args[0]
        conv = _module(gm, src) if isinstance(src, fx.Node) else None
        if not isinstance(conv, QuantMixin) or len(src.users) != 1:
            continue
        if isinstance(conv, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            w, b = fuse_linear_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                          bn.weight, bn.bias)
        elif any(isinstance(conv, c) and type(bn) is b for c, b in _CONV_BN if c is not nn.Linear):
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
        else:
            continue
        conv.weight, conv.bias = w, b
        record[str(node.target)] = str(src.target)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded.append(str(node.target))
    if folded:
        gm.delete_all_unused_submodules()
        _apply_placement(gm, backend, dict(backend=get_backend(backend).name, formats=()))
        gm.graph.lint()
        gm.recompile()
    return folded


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if (type(conv), type(bn)) in _CONV_BN:
        return True
    # A user's subclass (same-padding conv ...) is folded only when a probe shows its forward applies
    # weight and bias as the base layer does (a weight-standardizing conv would not).
    return wrappable(type(conv)) and any(isinstance(conv, c) and type(bn) is b for c, b in _CONV_BN)


def _fold_agrees(conv: nn.Module, bn: nn.Module, fused: nn.Module) -> bool:
    """Does ``fused`` compute ``bn(conv(x))`` on a random probe input?"""
    if isinstance(conv, nn.Linear):
        shape = (2, conv.in_features)
    else:
        span = max(8, max(k * d for k, d in zip(conv.kernel_size, conv.dilation)) + 2)
        shape = (2, conv.in_channels) + (span,) * len(conv.kernel_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=conv.weight.dtype)
    try:
        with torch.no_grad():
            ref, got = bn(conv(x)), fused(x)
    except Exception:  # a forward that needs other input shapes: do not fold
        return False
    return ref.shape == got.shape and torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-7)


def _set_module(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in RELU_FUNCS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU)


def _is_conv_output(gm: fx.GraphModule, node: Any) -> bool:
    m = _module(gm, node) if isinstance(node, fx.Node) else None
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


class _Namer:
    """Names functional units after the module that called them: ``layer1.0.add``, ``layer1.0.add_1``."""

    def __init__(self, gm: nn.Module) -> None:
        self.used = {n for n, _ in gm.named_modules()}
        self.count: dict[str, int] = defaultdict(int)

    def __call__(self, scope: str, op: str) -> str:
        while True:
            base = f"{scope}.{op}" if scope else op
            k = self.count[base]
            self.count[base] += 1
            name = base if k == 0 else f"{base}_{k}"
            if name not in self.used:
                self.used.add(name)
                return name


def insert_quant_modules(gm: fx.GraphModule, backend: str = DEFAULT_BACKEND, fold_bn: bool = True,
                         custom_modules: CustomModules = None) -> fx.GraphModule:
    """Rewrite ``gm`` in place so every quantizable unit is a quant module with no formats yet.

    Args:
        gm: a traced model (a copy: it is modified).
        backend: whose placement rules to follow.
        fold_bn: fold eval-mode BatchNorm into convolutions first (PTQ).
        custom_modules: a user's {float class: quant class or None} map (see ``mixq.quant.custom``).

    Returns:
        ``gm``, recompiled.
    """
    be = get_backend(backend)
    if fold_bn and fold_batchnorm(gm):
        gm.delete_all_unused_submodules()
    namer = _Namer(gm)
    kw = dict(backend=be.name, formats=())
    swapped: set[str] = set()
    # Nodes computed from the output of a weighted layer. Functional ops are units only when every
    # tensor input is such an activation: an attention-mask add (scores + -1e4 * mask) or an embedding
    # sum would otherwise get an int8 range dominated by constants, and engines keep those in float.
    activations: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if any(a in activations for a in node.all_input_nodes):
            activations.add(node)
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            qcls = None if isinstance(m, QuantMixin) else quant_class_for(type(m), custom_modules)
            if qcls is not None or isinstance(m, QuantMixin):
                activations.add(node)
            if isinstance(m, QuantMixin) and node.target not in swapped:
                reset_quant_module(m, be.name)
                swapped.add(node.target)
            elif qcls is not None and node.target not in swapped:
                _set_module(gm, node.target, from_float(m, quant_cls=qcls, **kw))
                swapped.add(node.target)
            elif type(m) in MAXPOOL_MODULES and not m.return_indices:
                pool_kwargs = {a: getattr(m, a) for a in _POOL_ARGS[:-1]}
                _set_module(gm, node.target, QuantMaxPool(nd=MAXPOOL_MODULES[type(m)], pool_kwargs=pool_kwargs, **kw))
            continue
        new = _functional_unit(node, kw)
        if new is None or not all(a in activations for a in new[2]):
            continue
        op, qmod, args = new
        name = namer(node.meta.get("scope", ""), op)
        gm.add_submodule(name, qmod)
        with gm.graph.inserting_after(node):
            repl = gm.graph.call_module(name, args=args)
        repl.meta.update(node.meta)
        activations.add(repl)
        node.replace_all_uses_with(repl)
        gm.graph.erase_node(node)
    _apply_placement(gm, be.name, kw)
    gm.graph.lint()
    gm.recompile()
    return gm


def reset_quant_module(m: QuantMixin, backend: str) -> None:
    """Re-initialise a quant module built elsewhere (quant_modules.initialize) for ``backend``, no formats."""
    d_in, d_w = m._desc_overrides
    m.init_quantizer(backend=backend, formats=(), quant_desc_input=d_in, quant_desc_weight=d_w)


def _functional_unit(node: fx.Node, kw: dict):
    """Return (op name, quant module, call args) if ``node`` is a quantizable functional call."""
    tgt = node.target
    if node.op == "call_function" and tgt in ADD_FUNCS or node.op == "call_method" and tgt == "add":
        a, b = node.args[:2] if len(node.args) >= 2 else (None, None)
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and not node.kwargs:
            return "add", QuantAdd(**kw), (a, b)
    elif node.op == "call_function" and tgt in MATMUL_FUNCS or node.op == "call_method" and tgt == "matmul":
        a, b = node.args[:2]
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return "matmul", QuantMatMul(**kw), (a, b)
    elif node.op == "call_function" and tgt in CAT_FUNCS:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if isinstance(tensors, (list, tuple)) and all(isinstance(t, fx.Node) for t in tensors) and isinstance(dim, int):
            return "cat", QuantCat(dim=dim, num_inputs=len(tensors), **kw), tuple(tensors)
    elif node.op == "call_function" and tgt in MAXPOOL_FUNCS:
        pool_kwargs = dict(zip(_POOL_ARGS, node.args[1:]), **node.kwargs)
        if not pool_kwargs.pop("return_indices", False) and isinstance(node.args[0], fx.Node):
            return ("max_pool", QuantMaxPool(nd=MAXPOOL_FUNCS[tgt], pool_kwargs=pool_kwargs, **kw),
                    (node.args[0],))
    return None


def _apply_placement(gm: fx.GraphModule, backend: str, kw: dict) -> None:
    be = get_backend(backend)
    namer = _Namer(gm)
    calls = defaultdict(int)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] += 1
    for node in list(gm.graph.nodes):
        m = _module(gm, node)
        if not isinstance(m, QuantMixin):
            continue
        if be.name == "tensorrt" and isinstance(m, QuantAdd):
            convs = [_is_conv_output(gm, a) for a in node.args[:2]]
            if any(convs):
                # The first conv-produced input fuses with the Add; Q/DQ goes on the other (residual) one.
                first = convs.index(True)
                m.input_mask = [i != first for i in range(2)]
        # A module called more than once keeps its output quantizer: one follower cannot serve every call.
        if be.quantize_outputs and m.quantize_output and len(node.users) == 1 and calls[node.target] == 1:
            user = next(iter(node.users))
            if _is_relu(gm, user):
                name = namer(node.meta.get("scope", "") if node.op != "call_module" else node.target, "output_quant")
                follower = QuantFollower(owner=node.target, **kw)
                gm.add_submodule(name, follower)
                with gm.graph.inserting_after(user):
                    fnode = gm.graph.call_module(name, args=(user,))
                user.replace_all_uses_with(fnode, delete_user_cb=lambda u: u is not fnode)
                m.quantize_output = False


def units(gm: nn.Module) -> dict[str, QuantMixin]:
    """Quantizable units of a prepared model by name (followers excluded)."""
    return {n: m for n, m in gm.named_modules() if isinstance(m, QuantMixin) and not isinstance(m, QuantFollower)}


def followers(gm: nn.Module) -> list[QuantFollower]:
    return [m for m in gm.modules() if isinstance(m, QuantFollower)]


def prepare_fx(model: nn.Module, backend: str = DEFAULT_BACKEND, concrete_args: Optional[dict] = None,
               preserved_attributes: Sequence[str] = (), fold_bn: Optional[bool] = None,
               custom_modules: CustomModules = None) -> fx.GraphModule:
    """Trace a deep copy of ``model`` and insert quant modules (no formats prepared yet).

    Args:
        fold_bn: fold BatchNorm; default: when the model is in eval mode (PTQ), not in training (QAT).
    """
    gm = trace(copy.deepcopy(model), concrete_args, preserved_attributes, custom_modules)
    if fold_bn is None:
        fold_bn = not model.training
    return insert_quant_modules(gm, backend, fold_bn, custom_modules)


class GraphModeError(CaptureError):
    """Neither torch.fx nor torch.export gave a graph; ``reasons`` holds each one's failure, construct named."""

    def __init__(self, message: str, reasons: dict[str, str]) -> None:
        super().__init__(message)
        self.reasons = reasons


def prepare_graph(model: nn.Module, backend: str = DEFAULT_BACKEND, concrete_args: Optional[dict] = None,
                  preserved_attributes: Sequence[str] = (), fold_bn: Optional[bool] = None,
                  custom_modules: CustomModules = None, example_inputs: Any = None) -> tuple[fx.GraphModule, str]:
    """Graph-mode preparation: ``torch.fx`` first, then ``torch.export`` capture when an example batch is given.

    Args:
        model, backend, concrete_args, preserved_attributes, fold_bn, custom_modules: as for ``prepare_fx``.
        example_inputs: one batch (Tensor or tuple of positional Tensors); without it only torch.fx is tried.

    Returns:
        (the prepared GraphModule, how it was captured: "torch.fx" or "torch.export").

    Raises:
        GraphModeError: both failed (or fx failed and there is no example batch); the message names the
            construct that stopped each one (file, line, function and source line).
    """
    how = (getattr(model, "meta", {}).get(CAPTURED) if isinstance(model, fx.GraphModule) else None) or "torch.fx"
    try:
        return prepare_fx(model, backend, concrete_args, preserved_attributes, fold_bn, custom_modules), how
    except Exception as e:  # torch.fx raises many types (TraceError, TypeError, NotImplementedError ...)
        reasons = {"torch.fx": describe_failure(e)}
        first = e
    if example_inputs is None:
        raise GraphModeError(f"torch.fx cannot trace {type(model).__name__}: {reasons['torch.fx']}; no example batch "
                             "was given to try torch.export", reasons) from first
    try:
        gm = capture(model, example_inputs, custom_modules=custom_modules)
        return prepare_fx(gm, backend, concrete_args, preserved_attributes,
                          (not model.training) if fold_bn is None else fold_bn, custom_modules), "torch.export"
    except CaptureError as e:
        reasons["torch.export"] = str(e)
    except Exception as e:  # an exported graph mixq's conversion or graph mode does not handle
        reasons["torch.export"] = (f"torch.export captured {type(model).__name__} but mixq could not turn the graph "
                                   f"into quant modules: {describe_failure(e)}")
    raise GraphModeError(f"torch.fx cannot trace {type(model).__name__}: {reasons['torch.fx']}; and "
                         f"{reasons['torch.export']}", reasons)
