"""What a scan measures: its modes, the (layer, format) pairs, and whether a prepared model can serve them.

A scan either calibrates a float model itself or scans a model that mixq already prepared and
calibrated (``mixq.quantize(..., formats=[...])``, or a saved one loaded back); the checks here
make sure such a model fits the scan's options before any work starts.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from mixq.errors import UnsupportedFormatError, did_you_mean
from mixq.formats import get_backend, get_format
from mixq.quant.graph import units
from mixq.sensitivity.errors import ScanError
from mixq.sensitivity.exact import EXACT_MODES


def exact_modes(modes: str | Sequence[str]) -> list[str]:
    if isinstance(modes, str):
        modes = {"both": list(EXACT_MODES), "none": []}.get(modes, [modes])
    bad = [m for m in modes if m not in EXACT_MODES]
    if bad:
        raise ScanError(f"unknown scan mode(s) {bad}; valid modes are {', '.join(EXACT_MODES)}, 'both' and 'none'.")
    return [m for m in EXACT_MODES if m in modes]


def select(kinds: dict[str, str], backend: str, formats: Optional[Sequence[str]],
           layers: Optional[Sequence[str]]) -> dict[str, list[str]]:
    """{layer: [formats]} to scan.

    Default formats are all the backend supports per layer. Explicitly named layers must support
    every explicitly named format; otherwise a format only applies where the backend can realise it.

    Raises:
        ScanError: an unknown layer, or fp32 as a format.
        UnknownFormatError / UnsupportedFormatError: an unknown format, a named layer that cannot
            run a named format, or a format no selected layer can run.
    """
    be = get_backend(backend)
    names = list(kinds)
    if layers is not None:
        layers = list(dict.fromkeys(layers))
        missing = [n for n in layers if n not in kinds]
        if missing:
            hints = "; ".join(f"{n!r}{did_you_mean(n, names) or ' (no similar name)'}" for n in missing[:5])
            raise ScanError(f"unknown layer(s): {hints}. Run `mixq inventory` to list the model's "
                            f"{len(names)} layers.")
        if not layers:
            raise ScanError("no layer selected: pass at least one layer name (or none, to scan them all).")
        names = layers
    if formats is not None:
        fmts = [get_format(f).name for f in dict.fromkeys(formats)]
        if "fp32" in fmts:
            raise ScanError("fp32 is the reference, not a format to scan: pass lower formats "
                            "(for example int8, fp16, int4_wo).")
        if not fmts:
            raise ScanError("no format selected: pass at least one format.")
        if layers is not None:
            for n in names:
                for f in fmts:
                    be.check(f, kinds[n], n)
        todo = {n: [f for f in fmts if f in be.supported(kinds[n])] for n in names}
        for f in fmts:
            if not any(f in fs for fs in todo.values()):
                kinds_ok = sorted(k for k, fs in be.formats.items() if f in fs)
                raise UnsupportedFormatError(
                    f"backend {be.name!r} cannot run format {f!r} on any selected layer; it runs {f} only on "
                    f"{', '.join(kinds_ok) or 'no'} layers. Choose another format or backend.")
    else:
        todo = {n: [f for f in be.supported(kinds[n]) if f != "fp32"] for n in names}
    return {n: fs for n, fs in todo.items() if fs}


def check_prepared(qmodel: nn.Module, backend: Optional[str], calib_method: Optional[str], quant_mode: str,
                    concrete_args: Optional[dict]) -> tuple[str, str, str]:
    """(backend, calibration method, mode) of a prepared model, checked against what the scan was asked for."""
    st = qmodel.mixq
    if not st.calibrated:
        raise ScanError("the model was prepared by mixq but not calibrated: run mixq.calibrate(qmodel, calib_data) "
                        "first, or pass the float model and let the scan calibrate it.")
    wrong = []
    if backend is not None and get_backend(backend).name != st.backend:
        wrong.append(f"backend {backend!r} (the model is quantized for {st.backend!r})")
    if calib_method is not None and calib_method != st.calib_method:
        wrong.append(f"calib_method {calib_method!r} (the model was calibrated with {st.calib_method!r})")
    if quant_mode not in ("auto", st.mode):
        wrong.append(f"quant_mode {quant_mode!r} (the model was prepared in {st.mode!r} mode)")
    if concrete_args is not None:
        wrong.append("concrete_args (the model is already traced)")
    if wrong:
        raise ScanError(f"the prepared model does not fit the scan options: {'; '.join(wrong)}. Leave these options "
                        "out to scan the model as it was calibrated, or pass the float model to calibrate anew.")
    return st.backend, st.calib_method, st.mode


def prepared_formats(qmodel: nn.Module) -> list[str]:
    fmts = [f for f in qmodel.mixq.formats if f != "fp32"]
    if not fmts:
        raise ScanError("the prepared model holds no format to scan besides fp32: quantize it with "
                        "formats=[...] (for example ['int8']), or pass formats=.")
    return fmts


def check_coverage(qmodel: nn.Module, todo: dict[str, list[str]]) -> None:
    """Every (layer, format) to scan needs calibrated quantizers in the prepared model."""
    owners = units(qmodel)
    missing = [(u, f) for u, fs in todo.items() for f in fs
               if not get_format(f).is_float and f not in owners[u].formats]
    if missing:
        fmts = sorted({f for _, f in missing})
        have = ", ".join(f for f in qmodel.mixq.formats if f != "fp32") or "none"
        raise ScanError(f"the prepared model has no calibrated {', '.join(fmts)} quantizers for {len(missing)} "
                        f"layer(s) to scan (e.g. {missing[0][0]!r}); it was prepared for: {have}. Quantize it with "
                        f"formats={fmts} added (mixq.quantize(model, ..., formats=[...])), scan only the prepared "
                        "formats, or pass the float model.")
