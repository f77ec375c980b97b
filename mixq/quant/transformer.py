"""PyTorch's transformer modules rebuilt so that every Linear in them is a unit mixq quantizes.

- ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` take a native fast path in eval mode
  (``torch._transformer_encoder_layer_fwd``, nested tensors) that reads every weight itself, so a
  quant module swapped in for ``linear1`` is never called; their forward does not FX-trace
  (``F._none_or_dtype`` of a Proxy).
- ``nn.TransformerDecoder`` / ``nn.Transformer`` do not FX-trace (shape tests on Proxies), and FX
  keeps a ``torch.nn`` module it cannot look into as one opaque leaf.
- ``nn.MultiheadAttention`` hides its projections (``mixq.quant.attention``).

``decompose_attention(model)`` returns a copy in which each of them (and subclasses that keep
their class's forward) is replaced by an equivalent module whose forward is the slow path written
with plain pieces, under the same submodule names (``layers.0.linear1``, ``layers.0.self_attn.q_proj``,
``decoder.layers.0.multihead_attn.k_proj``). In FP32 the copy computes what the original computes on
its slow path; padded positions of the encoder's nested-tensor fast path hold the slow path's
values, not zeros. Shape checks of the originals are not repeated; forward hooks on the replaced
modules are not carried over.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from mixq.quant.attention import DecomposedMultiheadAttention

__all__ = ["DecomposedEncoderLayer", "DecomposedEncoder", "DecomposedDecoderLayer", "DecomposedDecoder",
           "DecomposedTransformer", "decompose_attention", "decomposed_names"]

Mask = Optional[torch.Tensor]


def _take(dst: nn.Module, src: nn.Module, *names: str) -> None:
    for n in names:
        setattr(dst, n, getattr(src, n))


class DecomposedEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` whose forward is always the slow path (its submodules, same names)."""

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        _take(self, layer, "self_attn", "linear1", "dropout", "linear2", "norm_first", "norm1", "norm2", "dropout1",
              "dropout2", "activation")  # activation: a function (F.relu, F.gelu ...) or a module

    def forward(self, src: torch.Tensor, src_mask: Mask = None, src_key_padding_mask: Mask = None,
                is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x: torch.Tensor, attn_mask: Mask, key_padding_mask: Mask, is_causal: bool) -> torch.Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class DecomposedEncoder(nn.Module):
    """``nn.TransformerEncoder`` without its nested-tensor fast path (layers and final norm, same names)."""

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        _take(self, encoder, "layers", "num_layers", "norm")

    def forward(self, src: torch.Tensor, mask: Mask = None, src_key_padding_mask: Mask = None,
                is_causal: Optional[bool] = None) -> torch.Tensor:
        out = src
        is_causal = False if is_causal is None else is_causal  # a hint: the mask itself is applied
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        return self.norm(out) if self.norm is not None else out


class DecomposedDecoderLayer(nn.Module):
    """``nn.TransformerDecoderLayer`` (no fast path of its own; rebuilt so that FX looks inside)."""

    def __init__(self, layer: nn.TransformerDecoderLayer) -> None:
        super().__init__()
        _take(self, layer, "self_attn", "multihead_attn", "linear1", "dropout", "linear2", "norm_first", "norm1",
              "norm2", "norm3", "dropout1", "dropout2", "dropout3", "activation")

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: Mask = None, memory_mask: Mask = None,
                tgt_key_padding_mask: Mask = None, memory_key_padding_mask: Mask = None,
                tgt_is_causal: bool = False, memory_is_causal: bool = False) -> torch.Tensor:
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _sa_block(self, x: torch.Tensor, attn_mask: Mask, key_padding_mask: Mask, is_causal: bool) -> torch.Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                           need_weights=False)[0]
        return self.dropout1(x)

    def _mha_block(self, x: torch.Tensor, mem: torch.Tensor, attn_mask: Mask, key_padding_mask: Mask,
                   is_causal: bool) -> torch.Tensor:
        x = self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                is_causal=is_causal, need_weights=False)[0]
        return self.dropout2(x)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class DecomposedDecoder(nn.Module):
    """``nn.TransformerDecoder`` (layers and final norm, same names) with a forward FX traces."""

    def __init__(self, decoder: nn.TransformerDecoder) -> None:
        super().__init__()
        _take(self, decoder, "layers", "num_layers", "norm")

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: Mask = None, memory_mask: Mask = None,
                tgt_key_padding_mask: Mask = None, memory_key_padding_mask: Mask = None,
                tgt_is_causal: Optional[bool] = None, memory_is_causal: bool = False) -> torch.Tensor:
        out = tgt
        tgt_is_causal = False if tgt_is_causal is None else tgt_is_causal  # a hint: the mask itself is applied
        for layer in self.layers:
            out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                        tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
        return self.norm(out) if self.norm is not None else out


class DecomposedTransformer(nn.Module):
    """``nn.Transformer``: its encoder, then its decoder on the encoder's output (same names)."""

    def __init__(self, transformer: nn.Transformer) -> None:
        super().__init__()
        _take(self, transformer, "encoder", "decoder", "d_model", "nhead", "batch_first")

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: Mask = None, tgt_mask: Mask = None,
                memory_mask: Mask = None, src_key_padding_mask: Mask = None, tgt_key_padding_mask: Mask = None,
                memory_key_padding_mask: Mask = None, src_is_causal: Optional[bool] = None,
                tgt_is_causal: Optional[bool] = None, memory_is_causal: bool = False) -> torch.Tensor:
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)


# class -> (its rebuild, the methods a subclass must inherit unchanged for the rebuild to compute the same)
_REBUILT: dict[type, tuple[type, tuple[str, ...]]] = {
    nn.MultiheadAttention: (DecomposedMultiheadAttention, ("forward",)),
    nn.TransformerEncoderLayer: (DecomposedEncoderLayer, ("forward", "_sa_block", "_ff_block")),
    nn.TransformerEncoder: (DecomposedEncoder, ("forward",)),
    nn.TransformerDecoderLayer: (DecomposedDecoderLayer, ("forward", "_sa_block", "_mha_block", "_ff_block")),
    nn.TransformerDecoder: (DecomposedDecoder, ("forward",)),
    nn.Transformer: (DecomposedTransformer, ("forward",)),
}
_HOLDERS = tuple(c for c in _REBUILT if c is not nn.MultiheadAttention)


def _replaceable(m: nn.Module, skip: set) -> Optional[type]:
    """The torch class ``m`` is rebuilt as (itself or a subclass that only changes ``__init__``), or None."""
    if type(m) in skip:
        return None
    for base, (_, methods) in _REBUILT.items():
        if isinstance(m, base) and all(getattr(type(m), f) is getattr(base, f) for f in methods):
            return base
    return None


def _opaque(m: nn.Module, base: Optional[type]) -> bool:
    """A transformer subclass with a forward of its own may read its attention's in_proj_weight: its
    attention stays as it is (and a fast path there is caught by quantize's checks)."""
    return base is None and isinstance(m, _HOLDERS)


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
    elif base is not None:
        out = _REBUILT[base][0](m)
    if out is not m:
        out.train(m.training)
    memo[id(m)] = out
    return out


def decompose_attention(model: nn.Module, keep: tuple[type, ...] = ()) -> nn.Module:
    """A copy of ``model`` with PyTorch's attention and transformer modules rebuilt (``model`` if it has none).

    Args:
        model: the float model (not modified).
        keep: classes to leave as they are (those a user's ``custom_modules`` maps).

    Returns:
        A deep copy in which each ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
        ``nn.TransformerEncoder``, ``nn.TransformerDecoderLayer``, ``nn.TransformerDecoder`` and
        ``nn.Transformer`` (subclasses too when they keep the forward of their class) is replaced
        (see the module docstring), or ``model`` itself when it has none.

    Raises:
        ModelError: an ``nn.MultiheadAttention`` with ``add_bias_kv`` or ``add_zero_attn`` (named).
    """
    skip = set(keep)
    if not _has_targets(model, skip):
        return model
    return _rebuild(copy.deepcopy(model), "", skip, {})


def decomposed_names(model: nn.Module) -> list[str]:
    """Paths of the modules ``decompose_attention`` made in ``model`` (for reports)."""
    kinds = tuple(rebuilt for rebuilt, _ in _REBUILT.values())
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]
