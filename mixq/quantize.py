"""quantize(): a float model + a plan -> a calibrated fake-quant model that can switch plans.

Two ways to find the quantizable units: FX graph mode (default when the model traces: functional
calls are quantized too and BatchNorm is folded) and module mode (swap float modules by name;
the fallback when tracing fails).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from mixq.errors import CalibrationError, ConfigError, MixqError, ModelError, PlanError, QuantNotAppliedError
from mixq.formats import get_backend, get_format
from mixq.fingerprint import Hasher, parameters_digest, weights_digest
from mixq.leftfloat import LeftFloat, ParamCoverage, left_float, param_coverage
from mixq.noop import NotRun, describe, judge_not_run, not_run_text, outputs_identical, record_calls, units_not_run
from mixq.plan import QuantPlan, Realisation
from mixq.progress import batches as progress_batches
from mixq.quant.transformer import decompose_attention, decomposed_names
from mixq.quant.descriptor import check_calib_method
from mixq.quant.graph import GraphModeError, followers, prepare_graph, reset_quant_module, units
from mixq.quant.custom import CustomModules, check_custom_modules, quant_class_for
from mixq.quant.modules import QUANT_MAP, QuantMixin, from_float

MODES = ("auto", "fx", "module")
ON_NOOP = ("error", "warn")


class FallbackWarning(UserWarning):
    """FX tracing failed and mixq fell back to module mode."""


class LeftFloatWarning(UserWarning):
    """Weighted modules that mixq cannot quantize stay float (``qmodel.mixq.left_float`` lists them)."""


class QuantNotAppliedWarning(UserWarning):
    """Units never ran during calibration (``qmodel.mixq.not_run``), or a check of ``on_noop="warn"`` failed."""


@dataclass
class QuantState:
    """What mixq knows about a quantized model (kept on it as ``model.mixq``)."""

    backend: str
    mode: str
    kinds: dict[str, str]
    formats: tuple[str, ...] = ()
    plan: Optional[QuantPlan] = None
    calibrated: bool = False
    calib_method: str = "max"
    fallback_reason: str = ""
    extra: dict = field(default_factory=dict)
    calib_digest: str = ""
    calib_batches: int = 0
    left_float: list[LeftFloat] = field(default_factory=list)
    coverage: Optional[ParamCoverage] = None
    weights_digest: str = ""
    prepare_options: dict = field(default_factory=dict)
    prepared_digest: str = ""
    not_run: list[NotRun] = field(default_factory=list)

    @property
    def realisation(self) -> Optional[Realisation]:
        """What the active plan realises on this model (formats per unit, fallbacks and why).

        Units that never ran during calibration count as fp32 (``Realisation.not_run``).
        """
        if self.plan is None:
            return None
        return self.plan.realisation(self.kinds, {n.unit: n.reason for n in self.not_run})


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: a Tensor, a tuple/list of positional inputs, or a dict of kwargs."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def first_batch(data: Optional[Iterable]) -> Any:
    """The first batch of ``data`` when it can be read without consuming it (a list, a DataLoader), else None."""
    if data is None:
        return None
    try:
        it = iter(data)
        return None if it is data else next(it, None)
    except TypeError:
        return None


def prepare(model: nn.Module, backend: str = "ort-cpu", mode: str = "auto", concrete_args: Optional[dict] = None,
            preserved_attributes: Sequence[str] = (), fold_bn: Optional[bool] = None,
            custom_modules: CustomModules = None, example_inputs: Any = None) -> nn.Module:
    """Return a copy of ``model`` whose quantizable units are quant modules (no formats yet).

    Args:
        model: float model (left untouched).
        backend: whose placement rules and schemes to use.
        mode: "fx", "module", or "auto" (FX, falling back to module mode with a warning).
        concrete_args / preserved_attributes: passed to the FX tracer.
        fold_bn: fold BatchNorm into convolutions (FX mode; default when the model is in eval mode).
        custom_modules: ``{float class: quant class or None}`` for a user's own layers (None keeps a
            class float). Subclasses of conv / linear / pooling layers from user code need no entry:
            they are quantized around their own forward.
        example_inputs: one batch; when torch.fx cannot trace the model (a Hugging Face model as it comes),
            graph mode captures it with ``torch.export`` on this batch (``mixq.quant.capture``).

    PyTorch's ``nn.MultiheadAttention`` and transformer modules (encoder / decoder layers and stacks,
    ``nn.Transformer``) are first rebuilt from plain pieces (``mixq.quant.transformer``: q/k/v/out
    projections as Linear units such as ``layers.0.self_attn.q_proj``, no native fast path, a forward
    FX traces), unless ``custom_modules`` names their class.

    Raises:
        MixqError: bad mode; ModelError: no quantizable unit, a bad custom_modules entry, an
            nn.MultiheadAttention mixq cannot rebuild (add_bias_kv / add_zero_attn), or (mode "fx") no
            graph from torch.fx nor torch.export, naming the construct that stopped each.
    """
    be = get_backend(backend)
    custom = check_custom_modules(custom_modules)
    if mode not in MODES:
        raise MixqError(f"unknown mode {mode!r}; valid modes are {', '.join(MODES)}.")
    source = model
    model = decompose_attention(source, tuple(custom))
    reason, captured_by = "", ""
    qmodel = None
    if mode in ("auto", "fx"):
        try:
            qmodel, captured_by = prepare_graph(model, be.name, concrete_args, preserved_attributes, fold_bn, custom,
                                                example_inputs)
            used = "fx"
        except GraphModeError as e:
            if mode == "fx":
                raise ModelError(f"FX tracing failed and no other capture worked: {e}. Use mode='module' or make "
                                 "the forward traceable (concrete_args for data-dependent branches).") from e
            reason = "; ".join(f"{k}: {v}" for k, v in e.reasons.items())
            warnings.warn(f"graph capture failed ({reason}); falling back to module mode: functional ops "
                          "(add, matmul, cat, max_pool) stay float.", FallbackWarning, stacklevel=3)
    if qmodel is None:
        qmodel = _prepare_modules(model, be.name, custom)
        used = "module"
    kinds = {n: m.kind for n, m in units(qmodel).items()}
    if not kinds:
        raise ModelError(
            f"the model ({type(model).__name__}) has no quantizable layer: mixq quantizes "
            f"{', '.join(sorted(c.__name__ for c in QUANT_MAP))} modules and functional add/matmul/cat/max_pool."
        )
    left = left_float(model, qmodel, custom)
    qmodel.mixq = QuantState(backend=be.name, mode=used, kinds=kinds, fallback_reason=reason, left_float=left,
                             coverage=param_coverage(model, qmodel, left), weights_digest=weights_digest(source),
                             prepare_options={"mode": mode, "fold_bn": fold_bn, "capture": captured_by,
                                              "preserved_attributes": list(preserved_attributes),
                                              "concrete_args": sorted(concrete_args) if concrete_args else None,
                                              "custom_modules": sorted(f"{c.__module__}.{c.__qualname__}"
                                                                       for c in custom)})
    qmodel.mixq.prepared_digest = parameters_digest(qmodel)
    if model is not source:
        qmodel.mixq.extra["decomposed"] = decomposed_names(model)
    _preserve_on_deepcopy(qmodel, "mixq", "mixq_folded_bn")
    return qmodel


def _preserve_on_deepcopy(qmodel: nn.Module, *attrs: str) -> None:
    """GraphModule.__deepcopy__ drops plain attributes except those named in its meta; name ours there."""
    key = getattr(torch.fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", None)
    meta = getattr(qmodel, "meta", None)
    if isinstance(qmodel, torch.fx.GraphModule) and key and isinstance(meta, dict):
        keep = meta.setdefault(key, {})
        keep.update({a: getattr(qmodel, a) for a in attrs if hasattr(qmodel, a)})


def warn_left_float(st: QuantState, stacklevel: int = 3) -> None:
    """Warn (``LeftFloatWarning``) about weighted modules left float that are not float by design."""
    todo = [l for l in st.left_float if not l.by_design]
    if not todo:
        return
    shown = "; ".join(f"{l.name or '<model>'} ({l.type}, {l.params:,} params): {l.reason}" for l in todo[:8])
    more = f"; and {len(todo) - 8} more" if len(todo) > 8 else ""
    total = st.coverage.model if st.coverage is not None else 0
    warnings.warn(f"{len(todo)} weighted module(s) stay float ({sum(l.params for l in todo):,} of {total:,} params): "
                  f"{shown}{more}. `mixq inventory` lists every module left float.", LeftFloatWarning,
                  stacklevel=stacklevel)


def _prepare_modules(model: nn.Module, backend: str, custom: dict) -> nn.Module:
    qmodel = copy.deepcopy(model)
    for m in qmodel.modules():
        if isinstance(m, QuantMixin):
            reset_quant_module(m, backend)
    swap, owned = [], []  # a custom-mapped module is one unit (or float) as a whole, as in FX mode
    for n, m in qmodel.named_modules():
        if isinstance(m, QuantMixin) or any(n.startswith(p) for p in owned):
            continue
        if type(m) in custom:
            owned.append(f"{n}." if n else "")
        if (q := quant_class_for(type(m), custom)) is not None:
            swap.append((n, m, q))
    if swap and swap[0][0] == "":
        return from_float(qmodel, quant_cls=swap[0][2], backend=backend, formats=())
    for name, m, qcls in swap:
        parent, _, leaf = name.rpartition(".")
        setattr(qmodel.get_submodule(parent) if parent else qmodel, leaf,
                from_float(m, quant_cls=qcls, backend=backend, formats=()))
    return qmodel


def _state(qmodel: nn.Module) -> QuantState:
    st = getattr(qmodel, "mixq", None)
    if not isinstance(st, QuantState):
        raise MixqError("this model was not prepared by mixq: call mixq.quantize(model, plan, ...) first.")
    return st


def add_formats(qmodel: nn.Module, formats: Iterable[str], calib_method: str = "max") -> None:
    """Prepare quantizers for ``formats`` on every unit that the backend can run them on."""
    st = _state(qmodel)
    be = get_backend(st.backend)
    owners = units(qmodel)
    for name, m in owners.items():
        for f in formats:
            if get_format(f).name in be.supported(m.kind):
                m.add_format(f, calib_method)
    for fol in followers(qmodel):
        for f in owners[fol.owner].formats:
            fol.add_format(f, calib_method)
    st.formats = tuple(sorted({*st.formats, *(get_format(f).name for f in formats)}))


def calibrate(qmodel: nn.Module, calib_data: Iterable, method: Optional[str] = None,
              progress: Optional[str] = None) -> int:
    """Collect activation statistics for every prepared format in one pass; return batches seen.

    The model runs in float during calibration (statistics of the float network), so each
    format's ranges are independent of which plan is active later. Every activation quantizer of
    every prepared format (followers included) calibrates with ``method``, except FP8 and
    per-channel ones, which use max by design. Statistics of an earlier calibration are dropped.
    The pass runs in eval mode (BatchNorm running statistics untouched, no dropout); each module's
    mode is restored afterwards.
    The method and a hash of the batches are recorded in ``qmodel.mixq`` (``calib_method``,
    ``calib_digest``); plans switched to later must name the same method.

    Args:
        qmodel: a model from ``prepare`` / ``quantize``.
        calib_data: iterable of input batches (Tensor, tuple of positional inputs, or dict of kwargs).
        method: "max", "entropy", "percentile" or "mse"; None keeps the model's (``qmodel.mixq.calib_method``).
        progress: label of a progress bar over the batches (shown on a terminal), or None.

    Units that never run during the pass are recorded in ``qmodel.mixq.not_run`` (they count as fp32
    in ``realisation``) and named in a ``QuantNotAppliedWarning``; ``check_applied`` decides whether
    that is an error for a plan.

    Returns:
        The number of batches run.

    Raises:
        ConfigError: an unknown method (checked before any work).
        CalibrationError: the loader yields nothing, or yields NaN/Inf.
    """
    n, _ = _calibrate(qmodel, calib_data, method, progress)
    missed = _state(qmodel).not_run
    if missed:
        warnings.warn(f"{len(missed)} unit(s) never ran during calibration and stay uncalibrated: "
                      f"{not_run_text(missed)}", QuantNotAppliedWarning, stacklevel=2)
    return n


def _calibrate(qmodel: nn.Module, calib_data: Iterable, method: Optional[str],
               progress: Optional[str]) -> tuple[int, Any]:
    """``calibrate`` without its warning; returns (batches run, the first batch)."""
    st = _state(qmodel)
    method = check_calib_method(method or st.calib_method)
    mods = [m for m in qmodel.modules() if isinstance(m, QuantMixin)]
    for m in mods:
        m.begin_calibration(method)
    digest = Hasher()
    first = None
    # Eval mode whatever mode the model is in: statistics of the network as it will run (BatchNorm with
    # its running statistics, which must not move; no dropout).
    modes = [(m, m.training) for m in qmodel.modules()]
    qmodel.eval()
    try:
        with torch.no_grad(), record_calls() as called:
            for batch in progress_batches(calib_data, progress):
                call_model(qmodel, batch)
                digest.update(batch)
                first = batch if first is None else first
    finally:
        for m in mods:
            m.calibrating = False
        for m, t in modes:
            m.training = t
    if digest.batches == 0:
        raise CalibrationError("the calibration loader yielded no batch: pass an iterable of input batches "
                               "(a Tensor, or a tuple of Tensors per batch).")
    for m in mods:
        m.end_calibration()
    st.calib_method, st.calib_digest, st.calib_batches = method, digest.hexdigest(), digest.batches
    st.not_run = units_not_run(qmodel, called)
    st.calibrated = True
    if st.plan is not None and st.plan.calib_method != method:
        st.plan = dataclasses.replace(st.plan, calib_method=method)
    return digest.batches, first


def fold_bn(qmodel: nn.Module) -> list[str]:
    """Fold the BatchNorm layers of a prepared model into the quantized convolutions that feed them.

    For a model prepared (or trained, e.g. QAT with frozen BatchNorm) with its BatchNorm unfolded:
    afterwards it computes the same function in float, its graph is the one ``prepare`` builds from
    the model in eval mode, and it exports as folded convolutions. Its activation ranges are stale
    (the convolutions' outputs changed), so the model must be calibrated again (``calibrate``).

    Returns:
        The BatchNorm layers folded.

    Raises:
        ModelError: the model was not prepared in graph mode (module mode cannot see what a BatchNorm follows).
    """
    from mixq.quant.graph import fold_batchnorm_prepared

    st = _state(qmodel)
    if not isinstance(qmodel, torch.fx.GraphModule):
        raise ModelError("fold_bn needs a model prepared in graph mode (FX); this one was prepared in module mode. "
                         "Prepare the float model in eval mode instead: BatchNorm is folded then.")
    folded = fold_batchnorm_prepared(qmodel, st.backend)
    if folded:
        for fol in followers(qmodel):
            owner = units(qmodel)[fol.owner]
            for f in owner.formats:
                fol.add_format(f, st.calib_method)
            fol.set_format(owner.active_format)
        for m in qmodel.modules():
            if isinstance(m, QuantMixin):
                for _, q in m.iter_activation_quantizers():
                    q.reset_calibration()  # stale: the convolutions' outputs changed
                m.calibrate_weights()
        st.calibrated = False
        st.prepare_options = {**st.prepare_options, "fold_bn": True}
        st.prepared_digest = parameters_digest(qmodel)
    return folded


def check_applied(qmodel: nn.Module, batch: Any = None, on_noop: str = "error") -> None:
    """Check that the active plan's quantization happens: its units ran, and change the output.

    A unit the plan quantizes that never ran during calibration computes nothing quantized: when a
    module around it ran without calling it ("bypassed", e.g. a native fast path computing with the
    float weights) or when none of the plan's quantized units ran, that is a failure; units that
    were merely never reached (an unused branch) get a ``QuantNotAppliedWarning``. Then, on
    ``batch``, the model's output under the plan must differ from its output with every unit fp32
    (both in eval mode): a bit-identical output means the quantization never reaches the output.
    A plan that quantizes nothing, or an output with no floating-point tensor, passes.

    Args:
        qmodel: a calibrated model from ``quantize`` (its active plan is checked and kept).
        batch: an input batch (the first calibration batch in ``quantize``); None skips the output check.
        on_noop: "error" (raise) or "warn" (``QuantNotAppliedWarning``) on a failure.

    Raises:
        ConfigError: an unknown ``on_noop``.
        QuantNotAppliedError: a failure, when ``on_noop="error"``.
    """
    if on_noop not in ON_NOOP:
        raise ConfigError(f"unknown on_noop {on_noop!r}; valid values are {', '.join(ON_NOOP)}.")
    st = _state(qmodel)
    if st.plan is None:
        return
    quantized = [u for u, f in st.plan.resolve(st.kinds).items() if f != "fp32"]
    failure, note, ran = judge_not_run(quantized, st.not_run)
    if failure is None and batch is not None and ran and _output_unchanged(qmodel, batch):
        failure = (f"the model's output under the plan is bit-identical to its output with every unit fp32 on the "
                   f"first calibration batch, although {len(ran)} quantized unit(s) ran ({describe(ran)}): the "
                   f"quantization does not reach the output (a forward that discards their outputs, or computes "
                   f"with the float weights elsewhere).")
    if note:
        warnings.warn(note, QuantNotAppliedWarning, stacklevel=3)
    if failure and on_noop == "error":
        raise QuantNotAppliedError(f"{failure} Pass on_noop='warn' to go on anyway.")
    if failure:
        warnings.warn(failure, QuantNotAppliedWarning, stacklevel=3)


def _output_unchanged(qmodel: nn.Module, batch: Any) -> Optional[bool]:
    """Is the output under the active plan bit-identical to the all-fp32 output (eval mode, modes restored)?"""
    modes = [(m, m.training) for m in qmodel.modules()]
    qmodel.eval()
    try:
        with torch.no_grad():
            out = call_model(qmodel, batch)
            with applied(qmodel, "fp32"):
                ref = call_model(qmodel, batch)
    finally:
        for m, t in modes:
            m.training = t
    return outputs_identical(out, ref)


def set_plan(qmodel: nn.Module, plan: QuantPlan | str | dict) -> dict[str, str]:
    """Switch a prepared, calibrated model to ``plan`` in place; return the resolved {layer: format}.

    Cheap: only attribute changes, no recalibration. A format name (or a plan dict without
    ``backend`` / ``calib_method``) takes the model's backend and calibration method.

    Raises:
        PlanError: the plan is for another backend or another calibration method than the model's,
            names a layer the model lacks, or a format that was not prepared.
        UnsupportedFormatError: a format the backend cannot run where the plan puts it.
    """
    st = _state(qmodel)
    plan = _as_plan(plan, st.backend, st.calib_method)
    if plan.backend != st.backend:
        raise PlanError(f"the plan is for backend {plan.backend!r} but the model was quantized for {st.backend!r}; "
                        f"quantize again with backend={plan.backend!r}.")
    if plan.calib_method != st.calib_method:
        raise PlanError(
            f"the plan asks for {plan.calib_method!r} calibration but the model was calibrated with "
            f"{st.calib_method!r}; recalibrate with mixq.calibrate(qmodel, calib_data, method={plan.calib_method!r}) "
            f"(or quantize(..., calib_method={plan.calib_method!r})), or use a plan with "
            f"calib_method={st.calib_method!r}.")
    resolved = plan.resolve(st.kinds)
    owners = units(qmodel)
    for name, fmt in resolved.items():
        owners[name].set_format(fmt)
    for fol in followers(qmodel):
        fol.set_format(owners[fol.owner].active_format)
    st.plan = plan
    return resolved


def _active_formats(qmodel: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, m.active_format) for m in qmodel.modules() if isinstance(m, QuantMixin)]


@contextlib.contextmanager
def applied(qmodel: nn.Module, plan: QuantPlan | str | dict):
    """Run ``qmodel`` under ``plan`` inside the block; the previous formats (followers included) come back after.

    Yields:
        The resolved {layer: format} of ``plan``.

    Raises:
        the errors of ``set_plan``; nothing is switched when the plan does not fit.
    """
    st = _state(qmodel)
    before, previous = _active_formats(qmodel), st.plan
    try:
        yield set_plan(qmodel, plan)
    finally:
        for m, f in before:
            m.active_format = f
        st.plan = previous


@contextlib.contextmanager
def switched(qmodel: nn.Module, formats: dict[str, str]):
    """Run the named units (and the output quantizers that follow them) in the given formats inside the block.

    Unlike ``applied`` this changes only the named units; the rest keep their formats.

    Raises:
        PlanError: a unit the model does not have, or a format not prepared for it.
    """
    _state(qmodel)
    owners = units(qmodel)
    missing = [u for u in formats if u not in owners]
    if missing:
        raise PlanError(f"unknown unit(s) {missing[:5]}; the model has {len(owners)} units (see `mixq inventory`).")
    before = _active_formats(qmodel)
    try:
        for u, f in formats.items():
            owners[u].set_format(f)
        for fol in followers(qmodel):
            if fol.owner in formats:
                fol.set_format(owners[fol.owner].active_format)
        yield
    finally:
        for m, f in before:
            m.active_format = f


def _as_plan(plan: QuantPlan | str | dict, backend: str, calib_method: str = "max") -> QuantPlan:
    if isinstance(plan, QuantPlan):
        return plan
    if isinstance(plan, dict):
        return QuantPlan.from_dict({"backend": backend, "calib_method": calib_method, **plan})
    return QuantPlan.uniform(plan, backend, calib_method)


def quantize(model: nn.Module, plan_or_format: QuantPlan | str | dict = "int8", backend: Optional[str] = None,
             calib_data: Optional[Iterable] = None, calib_method: Optional[str] = None,
             formats: Sequence[str] = (), mode: str = "auto", concrete_args: Optional[dict] = None,
             preserved_attributes: Sequence[str] = (), fold_bn: Optional[bool] = None,
             custom_modules: CustomModules = None, progress: Optional[str] = None,
             on_noop: str = "error") -> nn.Module:
    """Return a calibrated fake-quant copy of ``model`` running ``plan_or_format``.

    Args:
        model: the float model; it is not modified.
        plan_or_format: a QuantPlan, its dict form, or a format name applied to every layer.
        backend: backend name; defaults to the plan's backend (or "ort-cpu" for a format name).
        calib_data: iterable of input batches; required unless every quantized format is weight-only.
        calib_method: "max", "entropy", "percentile" or "mse" (default: the plan's).
        formats: extra formats to prepare so that ``set_plan`` can switch to them later.
        mode: "auto" (FX, falling back to module mode), "fx" or "module".
        concrete_args / preserved_attributes / fold_bn: FX options.
        custom_modules: ``{float class: quant class or None}`` for a user's own layers (see ``prepare``).
        progress: label of a progress bar over the calibration batches (shown on a terminal), or None.
        on_noop: "error" or "warn" when the quantization does not happen (``check_applied``: units the
            plan quantizes never ran during calibration, or the output equals the float output).

    Returns:
        The quantized model; ``model.mixq`` holds its QuantState.

    Raises:
        MixqError subclasses for a bad plan, backend, calibration data or model;
        QuantNotAppliedError: the quantization does not happen (``on_noop="error"``).
    """
    if on_noop not in ON_NOOP:
        raise ConfigError(f"unknown on_noop {on_noop!r}; valid values are {', '.join(ON_NOOP)}.")
    if isinstance(plan_or_format, str):
        plan = QuantPlan.uniform(plan_or_format, backend or "ort-cpu", check_calib_method(calib_method or "max"))
    else:
        plan = _as_plan(plan_or_format, backend or "ort-cpu")
        if backend is not None and get_backend(backend).name != plan.backend:
            plan = dataclasses.replace(plan, backend=backend)
    method = check_calib_method(calib_method or plan.calib_method)
    if plan.calib_method != method:
        plan = dataclasses.replace(plan, calib_method=method)  # the plan on the model names the method used
    qmodel = prepare(model, plan.backend, mode, concrete_args, preserved_attributes, fold_bn, custom_modules,
                     example_inputs=first_batch(calib_data))
    st = _state(qmodel)
    warn_left_float(st)
    st.calib_method = method
    plan.validate(st.kinds)
    add_formats(qmodel, [*plan.formats(), *formats], method)
    needs_data = any(not get_format(f).is_float and not get_format(f).weight_only for f in st.formats)
    if needs_data and calib_data is None:
        raise CalibrationError(f"calib_data is required to calibrate activations for {', '.join(st.formats)}: "
                               "pass an iterable of input batches.")
    first = None
    if calib_data is not None:
        _, first = _calibrate(qmodel, calib_data, method, progress)
    else:
        for m in qmodel.modules():
            if isinstance(m, QuantMixin):
                m.calibrate_weights()
        st.calibrated = True
    set_plan(qmodel, plan)
    check_applied(qmodel, first, on_noop)
    return qmodel
