"""Save a prepared, multi-format, calibrated model and load it back, refusing a stale file.

A saved model is a folder::

    PATH/quantizers.pt   every quantizer's range (amax / scale / zero point), plain tensors
    PATH/mixq.json       what it was made from: hashes of the float weights and of the calibration
                         data, calibration method, backend, mode, prepared formats, plan, versions,
                         and the SHA-256 of quantizers.pt

Loading re-prepares the float model the way ``quantize`` did (``prepare`` + ``add_formats``),
then fills in the saved ranges: no calibration data is needed, and the result is bit-identical
to the model that was saved under every plan. The float model is not stored: the caller passes
it, and a model whose weights differ from the saved hash is refused, as is a file written by
another mixq or torch version. Tensors are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from mixq.artifacts import write_atomic
from mixq.errors import CheckpointError, StaleCheckpointError
from mixq.fingerprint import data_digest, parameters_digest, weights_digest
from mixq.noop import NotRun
from mixq.plan import QuantPlan
from mixq.quant.custom import CustomModules
from mixq.quant.modules import QuantMixin
from mixq.quant.quantizer import _LEARNED
from mixq.quantize import _state, add_formats, first_batch, prepare, set_plan

FILE_FORMAT = "mixq-quantized"
FILE_VERSION = 1
TENSORS, META = "quantizers.pt", "mixq.json"
_RANGES = ("_amax", "_scale", "_zero_point")
_SEP = "|"


def _versions() -> dict[str, str]:
    import mixq

    return {"mixq": mixq.__version__, "torch": torch.__version__}


def _quantizer_tensors(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """``module|format|role|buffer`` -> tensor, for every range a quantizer holds."""
    out = {}
    for name, m in qmodel.named_modules():
        if not isinstance(m, QuantMixin):
            continue
        for fmt, qs in m.quantizers.items():
            for role, q in qs.items():
                for buf in _RANGES:
                    t = q._buffers.get(buf)
                    if t is not None:
                        out[_SEP.join((name, fmt, role, buf))] = t.detach().cpu().clone()
                for par in _LEARNED:
                    t = q._parameters.get(par)
                    if t is not None:
                        out[_SEP.join((name, fmt, role, par))] = t.detach().cpu().clone()
    return out


def save_quantized(qmodel: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``qmodel`` (from ``quantize``, or ``prepare`` + ``add_formats`` + ``calibrate``) to the folder ``path``.

    Each file is written atomically; the metadata last, holding the hash of the tensor file, so a
    crash between the two leaves a folder that loads the previous pair or is refused.

    Returns:
        The folder.

    Raises:
        MixqError: the model was not prepared by mixq; CheckpointError: it is not calibrated, or its
            weights changed since it was prepared.
    """
    st = _state(qmodel)
    if not st.calibrated:
        raise CheckpointError("the model is not calibrated: calibrate it (mixq.calibrate or quantize(..., "
                              "calib_data=...)) before saving it.")
    if st.prepared_digest and parameters_digest(qmodel) != st.prepared_digest:
        raise CheckpointError("the model's weights changed after it was prepared (fine-tuning?): a saved file rebuilds "
                              "the model from the float weights, so it would not reproduce them. Save the "
                              "fine-tuned float model's weights instead and quantize it again.")
    folder = Path(path)
    buf = io.BytesIO()
    torch.save(_quantizer_tensors(qmodel), buf)
    blob = buf.getvalue()
    meta = {
        "format": FILE_FORMAT, "version": FILE_VERSION, "versions": _versions(),
        "weights_digest": st.weights_digest, "calib_digest": st.calib_digest, "calib_batches": st.calib_batches,
        "calib_method": st.calib_method, "backend": st.backend, "mode": st.mode,
        "prepare_options": st.prepare_options, "formats": list(st.formats), "kinds": st.kinds,
        "plan": st.plan.to_dict() if st.plan is not None else None, "fallback_reason": st.fallback_reason,
        "not_run": [dataclasses.asdict(n) for n in st.not_run],
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    write_atomic(folder / TENSORS, blob)
    write_atomic(folder / META, json.dumps(meta, indent=1))
    return folder


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata of a saved quantized model.

    Raises:
        CheckpointError: no mixq metadata there, or not readable.
    """
    p = Path(path) / META
    if not p.is_file():
        raise CheckpointError(f"{str(path)!r} holds no saved quantized model ({META} is missing); "
                              "write one with mixq.save_quantized(qmodel, path).")
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(p)!r} is not readable JSON ({e}); save the model again.") from None
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
        raise CheckpointError(f"{str(p)!r} is not a mixq quantized-model file.")
    if meta.get("version") != FILE_VERSION:
        raise StaleCheckpointError(f"{str(p)!r} has file version {meta.get('version')!r}; this mixq reads version "
                                   f"{FILE_VERSION}: quantize and save again.")
    return meta


def _short(h: str) -> str:
    return (h or "none")[:12]


def _check_current(meta: dict, model: nn.Module, calib_digest: Optional[str]) -> None:
    problems = []
    now = _versions()
    for lib in ("mixq", "torch"):
        if meta["versions"].get(lib) != now[lib]:
            problems.append(f"{lib} version: saved with {meta['versions'].get(lib)}, running {now[lib]}")
    w = weights_digest(model)
    if w != meta["weights_digest"]:
        problems.append(f"model weights: sha256 {_short(w)} now, {_short(meta['weights_digest'])} when saved "
                        "(a weight or buffer changed)")
    if calib_digest is not None and calib_digest != meta["calib_digest"]:
        problems.append(f"calibration data: sha256 {_short(calib_digest)} given, {_short(meta['calib_digest'])} "
                        f"when saved ({meta['calib_batches']} batches)")
    if problems:
        raise StaleCheckpointError("the saved quantized model is stale: " + "; ".join(problems) +
                                   ". Quantize and calibrate again, then save_quantized.")


def load_quantized(model: nn.Module, path: str | os.PathLike, *, calib_data: Optional[Iterable] = None,
                   calib_digest: Optional[str] = None, concrete_args: Optional[dict] = None,
                   custom_modules: CustomModules = None) -> nn.Module:
    """Rebuild the quantized model saved at ``path`` from its float ``model``, without calibrating.

    Args:
        model: the float model the file was made from (same weights; it is not modified).
        path: a folder written by ``save_quantized``.
        calib_data / calib_digest: when given, the calibration data (or its hash,
            ``mixq.fingerprint.data_digest``) must be the one the file was calibrated on.
        concrete_args: FX concrete args, when the saved model was traced with some.
        custom_modules: the ``custom_modules`` map the saved model was prepared with, if any.

    Returns:
        The quantized model, in the plan it was saved in.

    Raises:
        CheckpointError: no saved model there, a corrupt tensor file, or a model whose units differ.
        StaleCheckpointError: other weights, calibration data, or mixq / torch versions than saved.
    """
    meta = read_meta(path)
    if calib_data is not None and calib_digest is None:
        calib_digest = data_digest(calib_data)
    _check_current(meta, model, calib_digest)
    opts = meta["prepare_options"]
    if opts.get("concrete_args") and not concrete_args:
        raise CheckpointError(f"the saved model was traced with concrete_args {opts['concrete_args']}; pass the "
                              "same concrete_args= to load_quantized.")
    given = sorted(f"{c.__module__}.{c.__qualname__}" for c in (custom_modules or {}))
    if given != sorted(opts.get("custom_modules") or []):
        raise CheckpointError(f"the saved model was prepared with custom_modules for {opts.get('custom_modules') or 'no class'}"
                              f", but load_quantized got them for {given or 'no class'}; pass the same map.")
    blob = _read_tensors(Path(path), meta)
    qmodel = prepare(model, meta["backend"], meta["mode"], concrete_args, opts.get("preserved_attributes", ()),
                     opts.get("fold_bn"), custom_modules, example_inputs=first_batch(calib_data))
    st = _state(qmodel)
    if st.kinds != meta["kinds"]:
        raise CheckpointError("the model's units differ from the saved ones (same weights, other structure?): "
                              f"{len(st.kinds)} units now, {len(meta['kinds'])} saved.")
    st.calib_method = meta["calib_method"]
    add_formats(qmodel, meta["formats"], meta["calib_method"])
    _fill(qmodel, blob)
    st.prepare_options = opts
    st.calibrated, st.calib_digest, st.calib_batches = True, meta["calib_digest"], meta["calib_batches"]
    st.not_run = [NotRun(**n) for n in meta.get("not_run", [])]  # units that never ran count as fp32 again
    if meta["plan"] is not None:
        set_plan(qmodel, QuantPlan.from_dict(meta["plan"]))
    return qmodel


def _read_tensors(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    p = folder / TENSORS
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {str(p)!r} ({e}); save the model again.") from None
    if hashlib.sha256(raw).hexdigest() != meta["tensors_sha256"]:
        raise CheckpointError(f"{str(p)!r} does not match {META} (its SHA-256 differs): the folder holds parts of "
                              "two saves, or a damaged file; save the model again.")
    try:
        tensors = torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as e:  # weights_only refuses any pickle that is not plain tensors (UnpicklingError ...)
        raise CheckpointError(f"{str(p)!r} is not a plain tensor file ({type(e).__name__}); it is not loaded. "
                              "Save the model again.") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{str(p)!r} does not hold a name -> tensor map; save the model again.")
    return tensors


def _fill(qmodel: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for key, t in tensors.items():
        try:
            name, fmt, role, buf = key.split(_SEP)
            q = qmodel.get_submodule(name).quantizers[fmt][role]
        except (ValueError, AttributeError, KeyError):
            raise CheckpointError(f"saved quantizer {key!r} has no place in the rebuilt model; save it again.") \
                from None
        if buf in _LEARNED:
            setattr(q, buf, nn.Parameter(t.clone()))
        else:
            q._buffers[buf] = t.clone()
