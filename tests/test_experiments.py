"""Tests of the example models and data in ``experiments/``.

The MNIST tests train the model on first use (2-3 minutes, one thread, in a child
process) and then reads the cache; the MiniLM tests load the real pretrained weights. Both are marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments import minilm, mnist_resnet, resnet18
from experiments._repro import deterministic, state_sha256, train_in_child


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


# ---------------------------------------------------------------- mnist_resnet


def test_mnist_split_is_disjoint_and_shuffled() -> None:
    x_train, y_train, x_test, y_test = mnist_resnet._split()
    assert (len(x_train), len(x_test)) == (4000, 1000)
    assert not _rows(x_train) & _rows(x_test)
    # The raw file is sorted by label; a missing shuffle would leave only 8s and 9s in the test split.
    assert set(y_test.tolist()) == set(range(10))
    assert set(y_train.tolist()) == set(range(10))


def test_mnist_calib_comes_from_train_split() -> None:
    batches = mnist_resnet.calib_data(num_batches=3, batch_size=16)
    assert [tuple(b.shape) for b in batches] == [(16, 1, 28, 28)] * 3
    train = _rows(mnist_resnet._split()[0])
    assert all(r in train for b in batches for r in _rows(b))
    with pytest.raises(ValueError, match="4000"):
        mnist_resnet.calib_data(num_batches=1000)


def test_mnist_eval_data_shapes() -> None:
    batches = mnist_resnet.eval_data()
    assert len(batches) == 4
    assert all(x.shape == (250, 1, 28, 28) and y.shape == (250,) for x, y in batches)


def test_mnist_metric_is_per_sample_percent() -> None:
    logits = [torch.eye(10)[[1, 2, 3]], torch.eye(10)[[0]]]
    labels = [torch.tensor([1, 2, 0]), torch.tensor([5])]
    scores = mnist_resnet.metric(logits, labels)
    assert scores.dtype == np.float64
    np.testing.assert_array_equal(scores, [100.0, 100.0, 0.0, 0.0])


@pytest.mark.slow
def test_mnist_accuracy_at_least_97() -> None:
    net = mnist_resnet.model()
    assert not net.training
    assert mnist_resnet.evaluate(net) >= 97.0


def test_mnist_fx_trace_matches() -> None:
    torch.manual_seed(0)
    net = mnist_resnet.MnistResNet().eval()
    x = torch.randn(2, 1, 28, 28)
    traced = torch.fx.symbolic_trace(net)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x), rtol=0, atol=0)
    adds = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 3  # one residual add per BasicBlock


# ---------------------------------------------------------------- minilm


@pytest.fixture(scope="module")
def minilm_model() -> torch.nn.Module:
    return minilm.model()


def test_minilm_data_is_disjoint() -> None:
    pairs = minilm._pairs()
    evaluated = {t for pair in pairs[: minilm.NUM_EVAL_PAIRS] for t in pair}
    assert len(evaluated) == 2 * minilm.NUM_EVAL_PAIRS  # no duplicate query or document
    calib = minilm._calib_texts()
    assert len(calib) >= 8 * 32
    assert not evaluated & set(calib)


# pydoc_data.topics ships with the interpreter, so the pairs are pinned for the version that made the figures.
MINILM_DATA_SHA256 = {"3.11.7": "0520ce9c19b1c73e3abe21589682c5025cdf6f5b67a662b990be65517466ac46"}


def test_minilm_data_are_pinned() -> None:
    import hashlib
    import json
    import platform

    version = platform.python_version()
    if version not in MINILM_DATA_SHA256:
        pytest.skip(f"MiniLM pairs are pinned for Python {', '.join(MINILM_DATA_SHA256)}, not {version}")
    pairs, calib = minilm._pairs(), minilm._calib_texts()
    assert len(pairs) == 473
    assert hashlib.sha256(json.dumps([pairs, calib]).encode()).hexdigest() == MINILM_DATA_SHA256[version]


def test_minilm_calib_and_eval_shapes() -> None:
    batches = minilm.calib_data()
    assert len(batches) == 8
    for ids, mask in batches:
        assert ids.shape == mask.shape == (32, minilm.SEQ_LEN)
        assert ids.dtype == mask.dtype == torch.long
    evals = minilm.eval_data()
    assert [kind for _, (kind, _) in evals] == ["query"] * 4 + ["doc"] * 4
    assert all(inputs[0].shape == (64, minilm.SEQ_LEN) for inputs, _ in evals)
    with pytest.raises(ValueError, match="calibration texts"):
        minilm.calib_data(num_batches=1000)


def test_minilm_metric_counts_top1_hits() -> None:
    emb = torch.eye(4)
    outputs = [emb[:2], emb[2:], emb[[0, 1, 3, 2]]]
    targets = [("query", torch.tensor([0, 1])), ("query", torch.tensor([2, 3])), ("doc", torch.tensor([0, 1, 2, 3]))]
    # Query 2 looks like document 3's embedding and vice versa: two misses.
    np.testing.assert_array_equal(minilm.metric(outputs, targets), [100.0, 100.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="kind"):
        minilm.metric([emb], [("passage", torch.arange(4))])


def test_minilm_has_36_linear_layers_with_hf_names(minilm_model: torch.nn.Module) -> None:
    names = [n for n, m in minilm_model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(names) == 36
    for expected in (
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.5.intermediate.dense",
        "encoder.layer.5.output.dense",
    ):
        assert expected in names


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm_model: torch.nn.Module) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(minilm.model_path(), device="cpu")
    reference.max_seq_length = minilm.SEQ_LEN  # same truncation as ours
    texts = [t for pair in minilm._pairs()[:24] for t in pair] + ["Hello world.", "A"]
    expected = reference.encode(texts, convert_to_tensor=True)
    with torch.no_grad():
        ours = minilm_model(*minilm.tokenize(texts))
    cosine = torch.nn.functional.cosine_similarity(ours, expected.cpu(), dim=1)
    assert cosine.min().item() > 0.9999


@pytest.mark.slow
def test_minilm_retrieval_scores_per_query(minilm_model: torch.nn.Module) -> None:
    batches = minilm.eval_data()
    with torch.no_grad():
        outputs = [minilm_model(*inputs) for inputs, _ in batches]
    scores = minilm.metric(outputs, [t for _, t in batches])
    assert scores.shape == (minilm.NUM_EVAL_PAIRS,)
    assert scores.dtype == np.float64
    assert set(np.unique(scores)) <= {0.0, 100.0}
    # Far above chance (0.4%), far from saturated: quantization damage must be visible.
    assert 20.0 < scores.mean() < 80.0


def test_minilm_fx_trace_matches(minilm_model: torch.nn.Module) -> None:
    ids, mask = minilm.tokenize(["Short.", "A somewhat longer sentence about Python objects."])
    traced = torch.fx.symbolic_trace(minilm_model)
    with torch.no_grad():
        torch.testing.assert_close(traced(ids, mask), minilm_model(ids, mask), rtol=0, atol=0)
    matmuls = [n for n in traced.graph.nodes if n.target is torch.matmul]
    assert len(matmuls) == 12  # scores and context in each of 6 layers


@pytest.mark.slow
def test_minilm_exports_to_onnx(minilm_model: torch.nn.Module, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ids, mask = minilm.calib_data(num_batches=1, batch_size=4)[0]
    path = tmp_path / "minilm.onnx"
    torch.onnx.export(minilm_model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, minilm_model(ids, mask).numpy(), atol=1e-5)


# ---------------------------------------------------------------- resnet18


def test_resnet18_forward_shape_and_determinism() -> None:
    net = resnet18.model()
    x = resnet18.example_inputs(batch=2)
    assert x.shape == (2, 3, 224, 224)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (2, 1000)
        torch.testing.assert_close(resnet18.model()(x), out, rtol=0, atol=0)
    calib = resnet18.calib_data()
    assert [tuple(b.shape) for b in calib] == [(1, 3, 224, 224)] * 4


def test_resnet18_has_torchvision_names() -> None:
    state = resnet18.model().state_dict()
    assert len(state) == 122  # torchvision resnet18().state_dict() has 122 entries
    for key in ("conv1.weight", "bn1.running_mean", "layer2.0.downsample.0.weight",
                "layer4.1.bn2.num_batches_tracked", "fc.bias"):
        assert key in state
    convs = [m for m in resnet18.model().modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20


def test_resnet18_fx_trace_matches() -> None:
    net = resnet18.model()
    x = resnet18.example_inputs()
    traced = torch.fx.symbolic_trace(net)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x), rtol=0, atol=0)


# ---------------------------------------------------------------- deterministic training (_repro)

# The pinned kernels make training repeatable on one machine, not bit-identical across machines: CI machines
# of this workplace with the same pins gave three different weight hashes (81d31bf1..., a2d19bd3..., and another
# here). So a test pins what holds everywhere: the same recipe twice on this machine gives the same bytes, and
# the accuracy lands in a narrow band around what every machine has measured (98.2% on the recorded ones).
MNIST_FP32_CORRECT_BAND = (976, 988)  # of 1,000 held-out digits


@pytest.mark.slow
def test_mnist_training_is_repeatable_here_and_accurate(tmp_path) -> None:
    net = mnist_resnet.model()  # the cached weights (trained on first use)
    with torch.no_grad():
        scores = mnist_resnet.metric(
            [net(x) for x, _ in mnist_resnet.eval_data()], [y for _, y in mnist_resnet.eval_data()]
        )
    correct = int(round(scores.sum() / 100.0))
    assert MNIST_FP32_CORRECT_BAND[0] <= correct <= MNIST_FP32_CORRECT_BAND[1], correct
    again = tmp_path / "again.pt"
    train_in_child("experiments.mnist_resnet", again)  # the recipe once more, in a fresh pinned child
    assert state_sha256(torch.load(again, map_location="cpu", weights_only=True)) == state_sha256(net.state_dict())


def test_deterministic_sets_and_restores_settings() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's count, which training must hand back
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with deterministic(seed=7, threads=1):
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.mkldnn.enabled
        inside = torch.rand(3)
    with deterministic(seed=7, threads=1, onednn=True):
        assert torch.backends.mkldnn.enabled
        assert torch.equal(torch.rand(3), inside)  # seeded: the same draw each time
    assert torch.get_num_threads() == 2
    torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.mkldnn.enabled
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched


def test_state_sha256_is_canonical_and_sensitive() -> None:
    state = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int64)}
    digest = state_sha256(state)
    assert len(digest) == 64
    assert state_sha256(dict(reversed(list(state.items())))) == digest  # insertion order does not matter
    changed = {"b": state["b"].clone(), "a": state["a"]}
    changed["b"][1, 2] = torch.nextafter(changed["b"][1, 2], torch.tensor(100.0))  # one ulp
    variants = [
        changed,
        {"b": state["b"].reshape(3, 2), "a": state["a"]},
        {"b": state["b"].double(), "a": state["a"]},
        {"c": state["b"], "a": state["a"]},
        {"b": state["b"].t().contiguous().t(), "a": state["a"]},  # same values, other strides: equal
    ]
    got = [state_sha256(v) for v in variants]
    assert digest not in got[:4] and len(set(got[:4])) == 4
    assert got[4] == digest


def test_train_in_child_reports_a_failing_child(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="No module named"):
        train_in_child("experiments.no_such_example", tmp_path / "w.pt")


def test_minilm_train_data_is_disjoint_from_the_evaluation_set() -> None:
    evaluated = [t for pair in minilm._pairs()[: minilm.NUM_EVAL_PAIRS] for t in pair]
    batches = minilm.train_data()
    for (ids, mask), target in batches:
        assert target is None and ids.shape[1] == mask.shape[1] == minilm.SEQ_LEN
    train_rows = {tuple(row.tolist()) for (ids, _), _ in batches for row in ids}
    eval_rows = {tuple(row.tolist()) for row in minilm.tokenize(evaluated)[0]}
    assert len(train_rows) > 400 and not train_rows & eval_rows  # what train_data returns, as the model sees it
    assert minilm.TRAIN_RECIPE["lr"] > 0 and minilm.TRAIN_RECIPE["epochs"] >= 1
