"""Which weighted modules of a model mixq leaves float, and why.

A module with parameters of its own is either the float side of a quantizable unit, or left float:
by design (normalization layers, BatchNorm folded into its convolution) or because mixq cannot
quantize it (a subclass of a supported layer, a layer type without a quant module, a user module
that uses its parameters in its own forward). Every parameter is counted once, so
``quantized_params + sum(left.params) == model_params``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from mixq.quant.custom import WRAPPABLE_KINDS, CustomModules, supported_base
from mixq.quant.graph import units
from mixq.quant.modules import QUANT_MAP, _QuantFunctional

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
              *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
CUSTOM_HINT = ("mixq wraps subclasses of conv, linear and pooling layers from user code only "
               "(pass custom_modules={{{cls}: QuantClass}} to quantize it)")


@dataclass(frozen=True)
class LeftFloat:
    """A module whose own parameters no quantizable unit covers.

    Attributes:
        name: its path in the float model ("" is the model itself).
        type: its class name ("nn.Embedding" for torch.nn classes).
        params: its parameters not already counted in a unit or an earlier entry.
        reason: why it stays float.
        by_design: True for normalization layers and folded BatchNorm (not compute-heavy);
            False where a quantizable computation is left float.
    """

    name: str
    type: str
    params: int
    reason: str
    by_design: bool = False


@dataclass(frozen=True)
class ParamCoverage:
    """Parameter totals of a model: quantized units + left float = model."""

    model: int
    quantized: int
    left_float: int


def type_label(cls: type) -> str:
    """``nn.Conv2d`` for torch.nn classes, the bare class name otherwise."""
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def _unit_modules(model: nn.Module, qmodel: nn.Module) -> dict[str, nn.Module]:
    """Float modules of ``model`` that became (module) units of ``qmodel``, by name."""
    found = {}
    for name, m in units(qmodel).items():
        if isinstance(m, _QuantFunctional):
            continue
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            continue
    return found


def _own_forward(cls: type, base: type) -> bool:
    for c in cls.__mro__:
        if c is base:
            return False
        if "forward" in vars(c):
            return True
    return False


def _opaque_parent(name: str, qmodel: nn.Module) -> Optional[str]:
    """The nearest ancestor that FX kept whole (a leaf module: GraphModule rebuilds others as plain nn.Module)."""
    kept = dict(qmodel.named_modules())
    if name not in kept:
        return None
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i])
        if parent in kept and type(kept[parent]) is not nn.Module:
            return parent
    return None


def _reason(name: str, m: nn.Module, qmodel: nn.Module, folded: Optional[dict[str, str]], mode: str,
            custom: dict) -> tuple[str, bool]:
    cls = type(m)
    label = type_label(cls)
    if cls in custom and custom[cls] is None:
        return "kept float as asked (custom_modules maps it to None)", True
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and folded and name in folded:
        return (f"BatchNorm folded into {folded[name]!r} (its scale and shift are that unit's weights and bias; "
                "excluded by design)"), True
    if isinstance(m, NORM_TYPES):
        why = ""
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if mode != "fx":
                why = " (not folded: module mode folds no BatchNorm)"
            elif folded is None:
                why = " (not folded: BatchNorm folding is off, as for a model in training mode)"
            else:
                why = " (not folded: its input is not the single-use output of an nn.Conv1d/2d/3d or nn.Linear)"
        return f"normalization layer ({label}) kept float by design: not compute-heavy{why}", True
    base = supported_base(cls) if cls not in QUANT_MAP else None
    if base is not None:
        own = " with its own forward" if _own_forward(cls, base) else ""
        where = "defined inside torch" if cls.__module__.startswith("torch.") else (
            "" if QUANT_MAP[base].kind in WRAPPABLE_KINDS else f"of a {QUANT_MAP[base].kind} layer")
        where = f" ({where})" if where else ""
        return f"subclass of {type_label(base)}{own}{where}: {CUSTOM_HINT.format(cls=cls.__name__)}", False
    if cls in QUANT_MAP:
        if mode == "fx":
            parent = _opaque_parent(name, qmodel)
            if parent is not None:
                ptype = type_label(type(qmodel.get_submodule(parent)))
                return f"inside {ptype} {parent!r}, which the FX trace keeps as one module mixq does not quantize", False
            return ("not called as a module in the traced forward (FX graph mode quantizes the module calls it "
                    "sees; a parent's forward may use its weight directly)"), False
        return "not swapped (it is not reachable as a submodule by name)", False
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return f"no quant module for {label} (a table lookup: no multiply-accumulates; its table stays float)", False
    if cls.__module__.startswith("torch.nn"):
        return f"no quant module for {label}", False
    return (f"parameters of a module mixq does not know ({label} uses them in its own forward; pass "
            f"custom_modules={{{cls.__name__}: QuantClass}} to quantize it)"), False


def left_float(model: nn.Module, qmodel: nn.Module, custom_modules: CustomModules = None) -> list[LeftFloat]:
    """Every module of ``model`` with parameters of its own that no unit of ``qmodel`` quantizes.

    Args:
        model: the float model.
        qmodel: the model ``mixq.prepare`` made from it.
        custom_modules: the map ``prepare`` was given.

    Returns:
        One ``LeftFloat`` per such module, in ``model.named_modules()`` order.
    """
    covered = _unit_modules(model, qmodel)
    seen = {id(p) for m in covered.values() for p in m.parameters(recurse=False)}
    folded = getattr(qmodel, "mixq_folded_bn", None)  # None: folding was off
    mode = getattr(getattr(qmodel, "mixq", None), "mode", "fx" if hasattr(qmodel, "graph") else "module")
    custom = dict(custom_modules or {})
    kept = {n: m for n, m in model.named_modules() if n and type(m) in custom and custom[type(m)] is None}
    out = []
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False)]
        if not own or name in covered:
            continue
        fresh = [p for p in own if id(p) not in seen]
        seen.update(id(p) for p in own)
        inside = next((k for k in kept if name.startswith(f"{k}.")), None)
        if inside is not None:
            reason, by_design = (f"inside {type_label(type(kept[inside]))} {inside!r}, kept float as asked "
                                 "(custom_modules maps it to None)"), True
        else:
            reason, by_design = _reason(name, m, qmodel, folded, mode, custom)
        out.append(LeftFloat(name=name, type=type_label(type(m)), params=sum(p.numel() for p in fresh),
                             reason=reason, by_design=by_design))
    return out


def param_coverage(model: nn.Module, qmodel: nn.Module, left: list[LeftFloat]) -> ParamCoverage:
    """Parameter totals of ``model`` (each tensor counted once): in quantized units, left float, all."""
    quantized = {id(p): p.numel() for m in _unit_modules(model, qmodel).values() for p in m.parameters(recurse=False)}
    return ParamCoverage(model=sum(p.numel() for p in model.parameters()), quantized=sum(quantized.values()),
                         left_float=sum(l.params for l in left))


def left_float_summary(left: list[LeftFloat], coverage: Optional[ParamCoverage] = None,
                       only_attention: bool = False) -> str:
    """Plain-text section: ``left float: N modules, P params`` then one line per module with its reason."""
    rows = [l for l in left if not (only_attention and l.by_design)]
    head = f"left float: {len(rows)} modules, {sum(l.params for l in rows):,} params"
    if coverage is not None:
        head += f" (model {coverage.model:,} params: {coverage.quantized:,} in quantized units)"
    lines = [head]
    for l in rows:
        lines.append(f"  {l.name or '<model>'} ({l.type}, {l.params:,} params): {l.reason}")
    return "\n".join(lines)
