"""Quantization that does not happen: units that never ran, and outputs bit-identical to float.

A quant module only quantizes when the model calls it. PyTorch's native fast paths
(``nn.TransformerEncoderLayer`` in eval mode, which mixq now rebuilds) and user forwards that read a
layer's weight directly (``F.linear(x, self.fc.weight)``) compute with the float weights while the
quant module sits unused; a model whose every quantized unit is skipped so is a float model labelled
"int8". Two checks catch it:

- ``record_calls`` / ``units_not_run``: which units never ran during calibration, and whether a module
  that ran was supposed to call them ("bypassed": its nearest enclosing module ran without calling it,
  the signature of a fast path) or nothing around them ran ("not reached": an unused or conditional
  branch). Calls are recorded by a global forward pre-hook: a hook on the modules themselves would
  turn off the very fast path it is meant to catch (``nn.TransformerEncoderLayer`` skips it when any
  of its modules has hooks).
- ``outputs_identical``: the model's output under the plan, compared bit for bit with its output
  with every unit in fp32, on one calibration batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from mixq.leftfloat import type_label
from mixq.quant.graph import units


@dataclass(frozen=True)
class NotRun:
    """A unit that never ran during calibration.

    Attributes:
        unit: its name.
        caller: the nearest enclosing module (FX containers skipped; "" is the model).
        caller_type: that module's type label.
        bypassed: True when ``caller`` (not the model itself) ran without calling the unit.
    """

    unit: str
    caller: str
    caller_type: str
    bypassed: bool

    @property
    def reason(self) -> str:
        if self.bypassed:
            return (f"bypassed: {self.caller_type} {self.caller!r} ran without calling it (a native fast path such as "
                    "nn.TransformerEncoderLayer's in eval mode, or a forward that reads the weight directly)")
        where = "the model" if not self.caller else f"{self.caller_type} {self.caller!r}"
        return f"never called in forward on the calibration data (around it, {where} " + (
            "ran: an unused or conditional module, or a forward that reads the weight directly)"
            if not self.caller else "never ran either: an unused or conditional branch)")


@contextlib.contextmanager
def record_calls() -> Iterator[set[int]]:
    """Inside the block, collect the ``id`` of every ``nn.Module`` called (a global forward pre-hook)."""
    called: set[int] = set()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, args: called.add(id(m)))
    try:
        yield called
    finally:
        handle.remove()


def _caller(name: str, mods: dict[str, nn.Module]) -> str:
    """The nearest enclosing module that can be called (not a GraphModule's plain containers, not a ModuleList)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i])
        m = mods.get(parent)
        if m is not None and type(m) not in (nn.Module, nn.ModuleList, nn.ModuleDict):
            return parent
    return ""


def units_not_run(qmodel: nn.Module, called: set[int]) -> list[NotRun]:
    """Units of ``qmodel`` whose module is not in ``called``, with where they sit.

    Args:
        qmodel: a prepared model.
        called: ids recorded by ``record_calls`` while the model ran.

    Returns:
        One ``NotRun`` per such unit, in ``units(qmodel)`` order.
    """
    mods = dict(qmodel.named_modules())
    out = []
    for name, m in units(qmodel).items():
        if id(m) in called:
            continue
        caller = _caller(name, mods)
        out.append(NotRun(unit=name, caller=caller, caller_type=type_label(type(mods[caller])),
                          bypassed=bool(caller) and id(mods[caller]) in called))
    return out


def float_tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensors, tuples, lists, dicts, dataclasses), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in float_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in float_tensors(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in float_tensors(getattr(out, f.name))]
    return []


def outputs_identical(a: Any, b: Any) -> Optional[bool]:
    """Are two model outputs bit-identical in every floating-point tensor? None when they hold none."""
    ta, tb = float_tensors(a), float_tensors(b)
    if not ta or len(ta) != len(tb):
        return None if not ta else False
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def describe(units_: list[str], limit: int = 6) -> str:
    """``'a', 'b' and 3 more``."""
    shown = ", ".join(repr(u) for u in units_[:limit])
    return shown + (f" and {len(units_) - limit} more" if len(units_) > limit else "")


def not_run_text(missed: Sequence[NotRun]) -> str:
    """The units grouped by cause: ``'a', 'b' (bypassed: nn.X 'p', 'q' ran without calling them: ...); ...``."""
    groups: dict[tuple, tuple[list[str], list[str]]] = {}
    for n in missed:
        us, callers = groups.setdefault((n.bypassed, n.caller_type if n.caller else ""), ([], []))
        us.append(n.unit)
        if n.caller not in callers:
            callers.append(n.caller)
    parts = []
    for (bypassed, ctype), (us, callers) in groups.items():
        if bypassed:
            why = (f"bypassed: {ctype} {describe(callers, 3)} ran without calling them, a native fast path (as "
                   "nn.TransformerEncoderLayer's in eval mode) or a forward that reads their weights directly")
        elif ctype:
            why = f"never called: {ctype} {describe(callers, 3)} around them never ran either (an unused branch)"
        else:
            why = "never called in the model's forward on the calibration data (unused, or its weight read directly)"
        parts.append(f"{describe(us)} ({why})")
    return "; ".join(parts)


def judge_not_run(quantized: Sequence[str], not_run: Sequence[NotRun]) -> tuple[Optional[str], Optional[str], list[str]]:
    """Is it a failure that some of the units a plan quantizes never ran?

    A failure when none of them ran (the "quantized" model computes in float) or when one was
    bypassed (a module around it computed without it: a fast path using the float weights); a note
    when the rest were merely never reached (an unused branch: nothing of theirs is computed).

    Args:
        quantized: the units the plan runs in a format other than fp32.
        not_run: the model's units that never ran during calibration.

    Returns:
        (failure text or None, note text or None, the quantized units that ran).
    """
    missed = [n for n in not_run if n.unit in set(quantized)]
    gone = {n.unit for n in missed}
    ran = [u for u in quantized if u not in gone]
    hint = (" Keep them fp32 in the plan (layers={name: 'fp32'}), or make the forward call them (mixq rebuilds "
            "nn.MultiheadAttention and nn.TransformerEncoder(Layer) itself).")
    if missed and not ran:
        return (f"none of the {len(quantized)} unit(s) the plan quantizes ran during calibration, so the "
                f"'quantized' model computes in float: {not_run_text(missed)}.{hint}"), None, ran
    text = (f"{len(missed)} of the {len(quantized)} unit(s) the plan quantizes never ran during calibration "
            f"(they count as fp32): {not_run_text(missed)}.")
    if any(n.bypassed for n in missed):
        return text + hint, None, ran
    return None, (text if missed else None), ran
