"""The quantizer core: fake-quant functions, quantizers, calibrators and quant modules.

Importing this package registers every quant module (LSTMs included) in ``modules.QUANT_MAP``.
"""
from mixq.quant.descriptor import QuantDescriptor
from mixq.quant.tensor_quant import fake_affine_quant, fake_fp8_e4m3_quant, fake_tensor_quant
from mixq.quant.quantizer import TensorQuantizer
from mixq.quant.modules import (
    QUANT_MAP,
    QuantAdaptiveAvgPool1d,
    QuantAdaptiveAvgPool2d,
    QuantAdaptiveAvgPool3d,
    QuantAdd,
    QuantAvgPool1d,
    QuantAvgPool2d,
    QuantAvgPool3d,
    QuantCat,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantLinear,
    QuantMatMul,
    QuantMaxPool,
    QuantMixin,
)
from mixq.quant import rnn as _rnn  # registers LSTM quant modules
from mixq.quant.rnn import QuantLSTM, QuantLSTMCell
from mixq.quant import quant_modules

__all__ = [
    "QUANT_MAP",
    "QuantAdaptiveAvgPool1d",
    "QuantAdaptiveAvgPool2d",
    "QuantAdaptiveAvgPool3d",
    "QuantAdd",
    "QuantAvgPool1d",
    "QuantAvgPool2d",
    "QuantAvgPool3d",
    "QuantCat",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantDescriptor",
    "QuantLSTM",
    "QuantLSTMCell",
    "QuantLinear",
    "QuantMatMul",
    "QuantMaxPool",
    "QuantMixin",
    "TensorQuantizer",
    "fake_affine_quant",
    "fake_fp8_e4m3_quant",
    "fake_tensor_quant",
    "quant_modules",
]
