"""Quant LSTM modules: ``QuantLSTM`` (whole sequence) and ``QuantLSTMCell`` (one step).

The weights of every layer and direction get a per-row (axis 0) weight quantizer and the input
sequence gets an input quantizer. ``QuantLSTM`` runs the same ``_VF.lstm`` kernel as
``nn.LSTM`` on the fake-quantized tensors, so ``"fp32"`` reproduces the float module exactly.
``QuantLSTMCell`` spells the gates out with ``F.linear`` (the MatMul/Gemm an exporter can put
Q/DQ around), in the order ATen's CPU cell uses, so its ``"fp32"`` output is exact on CPU too.
Outputs are not requantized for integer formats: the recurrent state stays float inside the cell.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from mixq.errors import ModelError
from mixq.quant.modules import KIND_OF, QUANT_MAP, QuantMixin, _quant_kwargs

HiddenState = tuple[torch.Tensor, torch.Tensor]


class QuantLSTM(QuantMixin, nn.LSTM):
    """``nn.LSTM`` with quantized input sequence and weights (padded, non-packed input only).

    Takes the float constructor's arguments plus ``backend``, ``formats``, ``calib_method``,
    ``quant_desc_input`` and ``quant_desc_weight``.

    Raises:
        ModelError: ``proj_size > 0`` (projections are not supported) or a PackedSequence input.
    """

    kind = "lstm"
    num_inputs = 1
    weight_axis = 0

    def __init__(self, *args, **kwargs) -> None:
        q = _quant_kwargs(kwargs)
        super().__init__(*args, **kwargs)
        self.init_quantizer(**q)

    def init_quantizer(self, *args, **kwargs) -> None:
        if self.proj_size > 0:
            raise ModelError(
                f"QuantLSTM does not support projections, but got proj_size={self.proj_size}; "
                "use proj_size=0 or keep this LSTM in fp32."
            )
        # Depends on num_layers / bidirectional, so it is per instance; QuantMixin reads it.
        self.weight_names = tuple(n for n in self._flat_weights_names if n.startswith("weight_"))
        # A private list: from_float copies __dict__, and RNNBase.__setattr__ edits this list in place.
        self._flat_weights = list(self._flat_weights)
        super().init_quantizer(*args, **kwargs)
        self.quantize_output = False

    def forward(self, input: torch.Tensor, hx: Optional[HiddenState] = None) -> tuple[torch.Tensor, HiddenState]:
        if isinstance(input, PackedSequence):
            raise ModelError(
                "QuantLSTM does not accept a PackedSequence; pad the batch (torch.nn.utils.rnn.pad_packed_sequence) "
                "and pass the padded tensor, or keep this LSTM in fp32."
            )
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        x = self.quant_input(input)
        is_batched = x.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            x = x.unsqueeze(batch_dim)
        if hx is None:
            n = self.num_layers * (2 if self.bidirectional else 1)
            zeros = torch.zeros(n, x.size(batch_dim), self.hidden_size, dtype=x.dtype, device=x.device)
            hx = (zeros, zeros)
        elif is_batched:
            if hx[0].dim() != 3 or hx[1].dim() != 3:
                raise RuntimeError(f"For batched 3-D input, hx and cx should also be 3-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        else:
            if hx[0].dim() != 2 or hx[1].dim() != 2:
                raise RuntimeError(f"For unbatched 2-D input, hx and cx should also be 2-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        self.check_forward_args(x, hx, None)
        weights = [self.quant_weight(getattr(self, n), n) if n in self.weight_names else getattr(self, n)
                   for n in self._flat_weights_names]
        result = _VF.lstm(x, hx, weights, self.bias, self.num_layers, self.dropout, self.training,
                          self.bidirectional, self.batch_first)
        output, h, c = result[0], result[1], result[2]
        if not is_batched:
            output, h, c = output.squeeze(batch_dim), h.squeeze(1), c.squeeze(1)
        # quantize_output is False: this only rounds through fp16/bf16 for float formats.
        return self.quant_output(output), (self.quant_output(h), self.quant_output(c))


class QuantLSTMCell(QuantMixin, nn.LSTMCell):
    """``nn.LSTMCell`` with quantized input, hidden state and weights.

    ``input0`` quantizes the input and ``input1`` the hidden state ``h`` (the cell state ``c``
    stays float). Takes the float constructor's arguments plus the quantization keywords.
    """

    kind = "lstm_cell"
    num_inputs = 2
    weight_names = ("weight_ih", "weight_hh")
    weight_axis = 0

    def __init__(self, *args, **kwargs) -> None:
        q = _quant_kwargs(kwargs)
        super().__init__(*args, **kwargs)
        self.init_quantizer(**q)

    def init_quantizer(self, *args, **kwargs) -> None:
        super().init_quantizer(*args, **kwargs)
        self.quantize_output = False

    def forward(self, input: torch.Tensor, hx: Optional[HiddenState] = None) -> HiddenState:
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        is_batched = input.dim() == 2
        x = self.quant_input(input if is_batched else input.unsqueeze(0), 0)
        if hx is None:
            # A zero state is exact in every format; it is not fed to the hidden-state calibrator.
            h = c = torch.zeros(x.size(0), self.hidden_size, dtype=x.dtype, device=x.device)
        else:
            h, c = hx if is_batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
            h = self.quant_input(h, 1)
        w_ih = self.quant_weight(self.weight_ih, "weight_ih")
        w_hh = self.quant_weight(self.weight_hh, "weight_hh")
        # Same operations, in the same order, as ATen's CPU LSTMCell.
        gates = F.linear(h, w_hh, self.bias_hh) + F.linear(x, w_ih, self.bias_ih)
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if not is_batched:
            h_new, c_new = h_new.squeeze(0), c_new.squeeze(0)
        return self.quant_output(h_new), self.quant_output(c_new)


QUANT_MAP.update({nn.LSTM: QuantLSTM, nn.LSTMCell: QuantLSTMCell})
KIND_OF.update({nn.LSTM: QuantLSTM.kind, nn.LSTMCell: QuantLSTMCell.kind})
