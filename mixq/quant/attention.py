"""nn.MultiheadAttention and nn.TransformerEncoder(Layer) rebuilt from pieces mixq quantizes.

PyTorch's own attention modules hide their arithmetic from a quantizer:

- ``nn.MultiheadAttention`` multiplies by ``in_proj_weight`` inside ``F.multi_head_attention_forward``
  (no Linear module is ever called for the q/k/v projections), and its ``out_proj`` is a Linear
  subclass whose weight that function also reads directly;
- ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` take a native fast path in eval mode
  (``torch._transformer_encoder_layer_fwd``, nested tensors) that reads every weight itself, so a
  quant module swapped in for ``linear1`` is never called; and their forward does not FX-trace
  (``F._none_or_dtype`` of a Proxy).

``decompose_attention(model)`` returns a copy in which each of them (and subclasses that keep its
forward) is replaced by
an equivalent module whose forward is the slow path written with plain pieces: q/k/v input
projections and ``out_proj`` as ``nn.Linear`` (``self_attn.q_proj`` ...), the two attention products
as ``torch.matmul`` and the softmax as ``torch.softmax`` (units in FX graph mode, as in a BERT written
by hand), and the masks as one additive bias that stays float. In FP32 the copy computes what the
original computes on its slow path (padded positions of a nested-tensor fast path hold the slow
path's values, not zeros). Forward hooks on the replaced modules are not carried over.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from mixq.errors import ModelError

__all__ = ["DecomposedMultiheadAttention", "DecomposedEncoderLayer", "DecomposedEncoder", "attention_bias",
           "decompose_attention"]


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


class DecomposedEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` whose forward is always the slow path (its submodules, same names)."""

    def __init__(self, layer: nn.TransformerEncoderLayer, self_attn: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.linear1, self.dropout, self.linear2 = layer.linear1, layer.dropout, layer.linear2
        self.norm_first = layer.norm_first
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout1, self.dropout2 = layer.dropout1, layer.dropout2
        self.activation = layer.activation  # a function (F.relu, F.gelu ...) or a module

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor],
                  key_padding_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class DecomposedEncoder(nn.Module):
    """``nn.TransformerEncoder`` without its nested-tensor fast path (layers and final norm, same names)."""

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = encoder.layers
        self.num_layers = encoder.num_layers
        self.norm = encoder.norm

    def forward(self, src: torch.Tensor, mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: Optional[bool] = None) -> torch.Tensor:
        out = src
        is_causal = False if is_causal is None else is_causal
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        return self.norm(out) if self.norm is not None else out


# class -> the methods a subclass must inherit unchanged for the rebuild to compute what it computes
_REPLACED: dict[type, tuple[str, ...]] = {nn.MultiheadAttention: ("forward",),
                                         nn.TransformerEncoderLayer: ("forward", "_sa_block", "_ff_block"),
                                         nn.TransformerEncoder: ("forward",)}


def _replaceable(m: nn.Module, skip: set) -> Optional[type]:
    """The torch class ``m`` is rebuilt as (itself or a subclass that only changes ``__init__``), or None."""
    if type(m) in skip:
        return None
    for base, methods in _REPLACED.items():
        if isinstance(m, base) and all(getattr(type(m), f) is getattr(base, f) for f in methods):
            return base
    return None


def _opaque(m: nn.Module, base: Optional[type]) -> bool:
    """An encoder (layer) subclass with a forward of its own may read its attention's in_proj_weight:
    its attention stays as it is (and a fast path there is caught by quantize's checks)."""
    return base is None and isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder))


def _has_targets(m: nn.Module, skip: set) -> bool:
    """Would ``_rebuild`` replace anything in ``m``?"""
    base = _replaceable(m, skip)
    if base is not None:
        return True
    return any(_has_targets(c, skip) for c in m.children()
               if not (_opaque(m, base) and isinstance(c, nn.MultiheadAttention)))


def _rebuild(m: nn.Module, name: str, skip: set, memo: dict) -> nn.Module:
    """``m`` with its children rebuilt first, then itself replaced when it is a module we rebuild."""
    if id(m) in memo:  # a module used in several places stays shared
        return memo[id(m)]
    base = _replaceable(m, skip)
    opaque = _opaque(m, base)
    for child_name, child in list(m._modules.items()):
        if child is None or (opaque and isinstance(child, nn.MultiheadAttention)):
            continue
        new = _rebuild(child, f"{name}.{child_name}" if name else child_name, skip, memo)
        if new is not child:
            m._modules[child_name] = new
    out = m
    if base is nn.MultiheadAttention:
        out = DecomposedMultiheadAttention(m, name)
    elif base is nn.TransformerEncoderLayer:
        out = DecomposedEncoderLayer(m, m.self_attn)
    elif base is nn.TransformerEncoder:
        out = DecomposedEncoder(m)
    if out is not m:
        out.train(m.training)
    memo[id(m)] = out
    return out


def decompose_attention(model: nn.Module, keep: tuple[type, ...] = ()) -> nn.Module:
    """A copy of ``model`` with MHA / encoder layers / encoders rebuilt from plain pieces (``model`` if none).

    Args:
        model: the float model (not modified).
        keep: classes to leave as they are (those a user's ``custom_modules`` maps).

    Returns:
        A deep copy with each ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and
        ``nn.TransformerEncoder`` replaced (see the module docstring; subclasses too when they keep the
        forward of their class), or ``model`` itself when it has none.

    Raises:
        ModelError: an ``nn.MultiheadAttention`` with ``add_bias_kv`` or ``add_zero_attn`` (named).
    """
    skip = set(keep)
    if not _has_targets(model, skip):
        return model
    return _rebuild(copy.deepcopy(model), "", skip, {})


def decomposed_names(model: nn.Module) -> list[str]:
    """Paths of the modules ``decompose_attention`` made in ``model`` (for reports)."""
    kinds = (DecomposedMultiheadAttention, DecomposedEncoderLayer, DecomposedEncoder)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]
