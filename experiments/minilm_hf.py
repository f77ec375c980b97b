"""all-MiniLM-L6-v2 as Hugging Face ships it (``transformers.AutoModel``), on the ``minilm`` example's task.

The same checkpoint, tokenizer, data and metric as ``experiments.minilm`` (imported from there), but the
encoder is ``transformers.AutoModel.from_pretrained`` on the packaged folder, unmodified: its default
"sdpa" attention, its mask helpers (``transformers.masking_utils``), its pooler. ``torch.fx`` cannot trace
it (``transformers.utils.generic``'s ``merge_with_config_defaults`` writes into ``**kwargs``), so mixq's
graph mode captures it with ``torch.export`` (``mixq.quant.capture``) on the first calibration batch.

A Hugging Face model returns a ``ModelOutput``; mixq needs tensors, so ``MeanPooled`` wraps it with the
sentence-transformers pooling (mean over real tokens, L2 norm; ``experiments.minilm.mean_pool``) and
returns the ``(B, 384)`` embedding. Unit names are the encoder's own under the wrapper's ``bert.``
prefix (``bert.encoder.layer.0.attention.self.query``); the rewrite's names are the same without it.
The pooler (the checkpoint's 37th Linear) feeds ``pooler_output``, which mean pooling never reads: the
captured graph drops it as dead code and it stays float.
"""
from __future__ import annotations

import torch
from torch import nn

from experiments.minilm import (SEQ_LEN, calib_data, eval_data, evaluate, mean_pool, metric,  # noqa: F401
                                model_path, tokenize)

PREFIX = "bert."  # where the Hugging Face model sits in MeanPooled


class MeanPooled(nn.Module):
    """A Hugging Face encoder followed by attention-masked mean pooling and L2 normalisation.

    Args:
        encoder: a ``transformers`` model whose output has ``last_hidden_state`` (``AutoModel``).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.bert = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


def hf_model() -> nn.Module:
    """Return ``transformers.AutoModel`` on the packaged all-MiniLM-L6-v2, as it comes, in eval mode."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_path()).eval()


def model() -> nn.Module:
    """Return the Hugging Face all-MiniLM-L6-v2 wrapped in ``MeanPooled``, in eval mode.

    Returns:
        A module called as ``model(input_ids, attention_mask)`` returning ``(B, 384)`` embeddings.
    """
    return MeanPooled(hf_model()).eval()


def rewrite_name(hf_name: str) -> str:
    """The name of the same unit in ``experiments.minilm``'s rewrite (drops the wrapper's ``bert.``)."""
    return hf_name[len(PREFIX):] if hf_name.startswith(PREFIX) else hf_name
