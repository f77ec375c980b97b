"""Opsets: which ones each flavour (and each format of a plan) can be exported at."""
from __future__ import annotations

import onnx

from mixq.export.errors import OpsetError

MIN_OPSET = 13  # per-channel Q/DQ (axis)
MAX_OPSET = 21  # the TorchScript exporter stops at 20; 21 is reached by the ONNX version converter
DEFAULT_OPSET = {"ort-cpu": 17, "tensorrt": 21}
_TORCHSCRIPT_MAX_OPSET = 20
_FORMAT_MIN_OPSET = {("tensorrt", "fp8_e4m3"): 19, ("tensorrt", "int4_wo"): 21}


def check_opset(backend: str, opset: int) -> None:
    """Raise OpsetError unless the flavour can be exported at ``opset``."""
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise OpsetError(f"opset {opset!r} cannot be exported for {backend!r}: per-channel Q/DQ needs opset >= "
                         f"{MIN_OPSET} and mixq exports up to {MAX_OPSET}; use {DEFAULT_OPSET[backend]} "
                         f"(the default for {backend}).")


def _upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Raise the default-domain opset. From 20 to 21 only GroupNormalization changed meaning (the
    other changes add types), so the import is bumped unless the converter has work to do."""
    if any(n.op_type == "GroupNormalization" for n in model.graph.node):
        from onnx import version_converter

        return version_converter.convert_version(model, opset)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    model.ir_version = max(model.ir_version, 10)
    return model
