"""Number formats and the backend schemes that realise them.

A *format* says what precision a layer runs in (``int8``, ``fp8_e4m3`` ...). A *backend scheme*
says how an engine realises that format: signedness and zero point of activations, per-channel
weights, and which layer kinds it can run that way. The simulation must use the scheme of the
backend it stands for, because engines differ (ONNX Runtime's fast CPU kernels want uint8
asymmetric activations; TensorRT wants int8 symmetric ones).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from mixq.calib_methods import CALIB_METHODS  # noqa: F401 (kept importable from here)
from mixq.errors import UnknownBackendError, UnknownFormatError, UnsupportedFormatError, did_you_mean

Kind = Literal["float", "int", "fp8"]


@dataclass(frozen=True)
class Format:
    """A named precision for a layer's weights and activations.

    Attributes:
        name: the name users write in plans.
        kind: "float" (plain float cast), "int" (integer fake-quant) or "fp8".
        weight_bits: bits per weight (16/32 for float formats).
        act_bits: bits per activation, or None where activations stay float (weight-only).
        float_dtype: for float formats, the torch dtype name the layer is cast through.
        block_size: block-wise weight scales along the input dimension (int4 weight-only), else None.
    """

    name: str
    kind: Kind
    weight_bits: int
    act_bits: Optional[int]
    float_dtype: Optional[str] = None
    block_size: Optional[int] = None

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def weight_only(self) -> bool:
        return self.act_bits is None and not self.is_float


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("fp32", "float", 32, 32, float_dtype="float32"),
        Format("fp16", "float", 16, 16, float_dtype="float16"),
        Format("bf16", "float", 16, 16, float_dtype="bfloat16"),
        Format("int8", "int", 8, 8),
        Format("fp8_e4m3", "fp8", 8, 8),
        Format("int4_wo", "int", 4, None, block_size=128),
    )
}


def get_format(name: str | Format) -> Format:
    """Return the format called ``name``.

    Raises:
        UnknownFormatError: the name is not one of ``FORMATS``.
    """
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise UnknownFormatError(
            f"unknown format {name!r}; known formats are {', '.join(FORMATS)}.{did_you_mean(str(name), FORMATS)}"
        ) from None


@dataclass(frozen=True)
class TensorScheme:
    """How one tensor (activation or weight) is quantized for an integer or fp8 format.

    Attributes:
        num_bits: integer bits (ignored for fp8).
        unsigned: integer codes are unsigned (uint8 activations with a zero point).
        narrow_range: symmetric codes in [-(2^(b-1)-1), 2^(b-1)-1] instead of down to -2^(b-1).
        axis: per-channel axis, or None for per-tensor.
        asymmetric: a zero point is calibrated (min/max) instead of a symmetric amax.
        fp8: E4M3 with a per-tensor scale.
        block_size: block-wise scales along the last dimension (weight-only int4).
    """

    num_bits: int = 8
    unsigned: bool = False
    narrow_range: bool = True
    axis: Optional[int] = None
    asymmetric: bool = False
    fp8: bool = False
    block_size: Optional[int] = None


# Layer kinds the inventory reports, grouped by what they compute.
WEIGHTED_KINDS = ("conv", "conv_transpose", "linear", "lstm", "lstm_cell")
POOL_KINDS = ("avgpool",)
FUNCTIONAL_KINDS = ("matmul", "add", "cat", "maxpool", "relu")


@dataclass(frozen=True)
class Backend:
    """An engine's way of realising formats.

    Attributes:
        name: "ort-cpu" or "tensorrt".
        formats: format names the backend can run, per layer kind (missing kind: only float).
        activation: scheme for 8-bit integer activations.
        weight: scheme for 8-bit integer weights (axis is set per layer by the quantizer).
        quantize_outputs: whether a quantized op's output tensor is quantized too (ORT's
            QLinear* kernels produce integer outputs; TensorRT only needs Q/DQ on inputs).
    """

    name: str
    formats: dict = field(default_factory=dict)
    activation: TensorScheme = TensorScheme()
    weight: TensorScheme = TensorScheme()
    quantize_outputs: bool = False

    def supported(self, kind: str) -> tuple[str, ...]:
        """Format names this backend can realise for a layer of ``kind`` (fp32 always)."""
        return ("fp32",) + tuple(f for f in self.formats.get(kind, ()) if f != "fp32")

    def check(self, fmt: str | Format, kind: str, layer: str = "") -> Format:
        """Return the format if this backend can realise it for ``kind``.

        Raises:
            UnsupportedFormatError: it cannot; the message lists what it can.
        """
        f = get_format(fmt)
        ok = self.supported(kind)
        if f.name not in ok:
            where = f" for layer {layer!r}" if layer else ""
            raise UnsupportedFormatError(
                f"backend {self.name!r} cannot run format {f.name!r}{where} (a {kind} layer); "
                f"it supports {', '.join(ok)} there. Choose one of those or another backend."
            )
        return f


# What each backend offers per kind is what mixq's export writes and the engine runs; every entry is
# walked through export by tests/test_capabilities.py. Left out on purpose:
# - ort-cpu conv_transpose int8: ONNX Runtime's CPU provider has no integer ConvTranspose kernel; a
#   Q/DQ ConvTranspose runs as DequantizeLinear + float ConvTranspose (rounding cost, no speed-up).
# - lstm (both backends): the exporter's LSTM op reads its weights through Slice/Concat gate
#   reordering, where mixq cannot place weight Q/DQ (or fp16 casts), so a quantized nn.LSTM cannot be
#   exported. nn.LSTMCell is spelled out with Gemm and exports in int8.
# - tensorrt bf16 for conv, conv_transpose, avgpool, maxpool: ONNX Conv / ConvTranspose / AveragePool /
#   MaxPool accept bfloat16 only from opset 22, and mixq exports up to opset 21.
# - tensorrt fp16 / bf16 for lstm_cell: the cell's Casts would cover only its first ops (and its state
#   shapes), so the graph would not compute what the simulation computes.
_TRT_HALF = ("fp16", "bf16")

BACKENDS: dict[str, Backend] = {
    "ort-cpu": Backend(
        name="ort-cpu",
        # ONNX Runtime's CPU provider has fast uint8/int8 kernels and MatMulNBits for 4-bit weights
        # on MatMul/Gemm; it has no fast fp16/bf16/fp8 CPU kernels, so those are not offered.
        formats={
            "conv": ("int8",),
            "linear": ("int8", "int4_wo"),
            "matmul": ("int8",),
            "add": ("int8",),
            "cat": ("int8",),
            "avgpool": ("int8",),
            "maxpool": ("int8",),
            "lstm_cell": ("int8",),
        },
        activation=TensorScheme(num_bits=8, unsigned=True, narrow_range=False, asymmetric=True),
        weight=TensorScheme(num_bits=8, unsigned=False, narrow_range=True, axis=0),
        quantize_outputs=True,
    ),
    "tensorrt": Backend(
        name="tensorrt",
        formats={
            "conv": ("fp16", "int8", "fp8_e4m3"),
            "conv_transpose": ("fp16", "int8", "fp8_e4m3"),
            "linear": _TRT_HALF + ("int8", "fp8_e4m3", "int4_wo"),
            "matmul": _TRT_HALF + ("int8", "fp8_e4m3"),
            "add": _TRT_HALF + ("int8", "fp8_e4m3"),
            "cat": _TRT_HALF + ("int8",),
            "avgpool": ("fp16", "int8"),
            "maxpool": ("fp16", "int8"),
            "lstm_cell": ("int8",),
        },
        # TensorRT saturates activations to [-128, 127]; weights use the symmetric narrow range.
        activation=TensorScheme(num_bits=8, unsigned=False, narrow_range=False),
        weight=TensorScheme(num_bits=8, unsigned=False, narrow_range=True, axis=0),
        quantize_outputs=False,
    ),
}

DEFAULT_BACKEND = "ort-cpu"


def get_backend(name: str | Backend) -> Backend:
    """Return the backend called ``name``.

    Raises:
        UnknownBackendError: the name is not one of ``BACKENDS``.
    """
    if isinstance(name, Backend):
        return name
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise UnknownBackendError(
            f"unknown backend {name!r}; known backends are {', '.join(BACKENDS)}.{did_you_mean(str(name), BACKENDS)}"
        ) from None


def schemes_for(fmt: str | Format, backend: str | Backend) -> tuple[Optional[TensorScheme], Optional[TensorScheme]]:
    """Return (activation scheme, weight scheme) for a format on a backend; None means float.

    Float formats have no scheme (they are simulated by a dtype round trip).
    """
    f, b = get_format(fmt), get_backend(backend)
    if f.is_float:
        return None, None
    if f.kind == "fp8":
        s = TensorScheme(fp8=True)
        # TensorRT FP8 (as ModelOpt exports it) uses per-tensor scales for weights too.
        return s, s
    if f.weight_only:
        return None, TensorScheme(num_bits=f.weight_bits, narrow_range=True, block_size=f.block_size)
    return b.activation, b.weight
