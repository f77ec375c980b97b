"""nn.MultiheadAttention rebuilt from pieces mixq quantizes.

``nn.MultiheadAttention`` multiplies by ``in_proj_weight`` inside ``F.multi_head_attention_forward``
(no Linear module is ever called for the q/k/v projections), and its ``out_proj`` is a Linear
subclass whose weight that function also reads directly; in eval mode it may take a native fast
path (``torch._native_multi_head_attention``). ``DecomposedMultiheadAttention`` computes the same
thing from plain pieces: q/k/v input projections and ``out_proj`` as ``nn.Linear``
(``self_attn.q_proj`` ...), the two attention products as ``torch.matmul`` and the softmax as
``torch.softmax`` (units in FX graph mode, as in a BERT written by hand), and the masks as one
additive bias that stays float. ``mixq.quant.transformer`` puts it in place of each
``nn.MultiheadAttention`` of a model, and rebuilds the encoder / decoder layers around it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import fx, nn

from mixq.errors import ModelError

__all__ = ["DecomposedMultiheadAttention", "attention_bias"]


def _additive(mask: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise ModelError(f"{what} must be a bool or floating-point tensor, but got dtype {mask.dtype}.")
    return mask.to(dtype)


def attention_bias(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], num_heads: int,
                   dtype: torch.dtype, is_causal: bool = False) -> torch.Tensor:
    """The additive bias of the attention scores (batch, heads, target, source) for the given masks.

    As ``nn.MultiheadAttention``: a bool mask is True where attention is not allowed (-inf), a float
    mask is added; ``attn_mask`` is (target, source) or (batch * heads, target, source);
    ``key_padding_mask`` is (batch, source). Wrapped for FX (one graph node) so its branches on the
    masks' dtype and rank run at call time; it takes no activation, so the add it feeds stays float.

    Args:
        attn_mask / key_padding_mask: the masks, or None.
        num_heads: the heads, to split a 3-D ``attn_mask``'s first axis.
        dtype: the scores' dtype.
        is_causal: PyTorch's hint that ``attn_mask`` is causal (the mask is applied as given).

    Returns:
        A tensor that broadcasts against the scores (a zero scalar when both masks are None).

    Raises:
        ModelError: a mask that is neither bool nor floating point, or ``is_causal`` without ``attn_mask``.
    """
    if is_causal and attn_mask is None:
        raise ModelError("is_causal=True needs attn_mask (the causal mask), as in nn.MultiheadAttention.")
    bias = torch.zeros((), dtype=dtype)
    if attn_mask is not None:
        m = _additive(attn_mask, dtype, "attn_mask")
        bias = bias + (m.unflatten(0, (-1, num_heads)) if m.dim() == 3 else m)
    if key_padding_mask is not None:
        p = _additive(key_padding_mask, dtype, "key_padding_mask")
        bias = bias + p[:, None, None, :]
    return bias


fx.wrap("attention_bias")


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        lin.bias.requires_grad_(bias.requires_grad)
    return lin


class DecomposedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` as q/k/v/out ``nn.Linear`` + matmul / softmax / matmul (same forward signature).

    Attributes:
        q_proj / k_proj / v_proj: the input projections (rows of ``in_proj_weight`` / ``in_proj_bias``,
            or ``q/k/v_proj_weight`` when key and value have their own sizes).
        out_proj: a plain ``nn.Linear`` sharing the original ``out_proj``'s parameters.
        attn_dropout: dropout on the attention probabilities (``nn.Dropout``: follows train/eval).
    """

    def __init__(self, mha: nn.MultiheadAttention, name: str = "") -> None:
        super().__init__()
        where = f"nn.MultiheadAttention {name!r}" if name else "nn.MultiheadAttention"
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise ModelError(
                f"{where} uses add_bias_kv={mha.bias_k is not None} / add_zero_attn={mha.add_zero_attn}; mixq "
                "rebuilds only attention without them (add_bias_kv=False, add_zero_attn=False). Keep it float with "
                "custom_modules={nn.MultiheadAttention: None}.")
        e = mha.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.kdim, self.vdim, self.batch_first = mha.kdim, mha.vdim, mha.batch_first
        b = mha.in_proj_bias
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight
            ws = (w[:e], w[e:2 * e], w[2 * e:])
        else:
            ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        bs = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        self.q_proj, self.k_proj, self.v_proj = (_linear(w, bb) for w, bb in zip(ws, bs))
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None, device=mha.out_proj.weight.device,
                                  dtype=mha.out_proj.weight.dtype)
        self.out_proj.weight = mha.out_proj.weight
        if mha.out_proj.bias is not None:
            self.out_proj.bias = mha.out_proj.bias
        self.attn_dropout = nn.Dropout(mha.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, embed) or (length, batch, embed) -> (batch, heads, length, head_dim)."""
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        return x.transpose(1, 2) if self.batch_first else x.permute(1, 2, 0, 3)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, heads, length, head_dim) -> the input layout with embed last."""
        return (x.transpose(1, 2) if self.batch_first else x.permute(2, 0, 1, 3)).flatten(2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """As ``nn.MultiheadAttention.forward``; ``is_causal`` is a hint only (``attn_mask`` is applied).

        Raises:
            ModelError: ``is_causal`` without ``attn_mask`` (as PyTorch), or a mask of another dtype.
        """
        # Unbatched (length, embed) inputs: a batch of one. Under FX the inputs are Proxies, taken as batched.
        unbatched = isinstance(query, torch.Tensor) and query.dim() == 2
        if unbatched:
            axis = 0 if self.batch_first else 1
            query, key, value = query.unsqueeze(axis), key.unsqueeze(axis), value.unsqueeze(axis)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        # Python tests on the masks only ask "is None" / "is False": under FX a Proxy passes them (the
        # bias node is traced, and is a zero scalar at run time when the masks turn out None).
        if attn_mask is not None or key_padding_mask is not None or is_causal is not False:
            # The dtype is read from a parameter (a constant when traced): reading it from the scores
            # would make the bias an activation and the mask add a quantized unit.
            scores = scores + attention_bias(attn_mask, key_padding_mask, self.num_heads, self.out_proj.weight.dtype,
                                             is_causal)
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))
        out = self.out_proj(self._merge(torch.matmul(probs, v)))
        weights = (probs.mean(dim=1) if average_attn_weights else probs) if need_weights else None
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights
