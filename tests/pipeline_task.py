"""A task on which a search has something to find, quickly: an MLP whose INT8 Linear layers run faster than FP32
on ONNX Runtime (batch 1, wide layers: memory-bound), in module:function form for `mixq run --model ...`."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

WIDTH = 1024


def model():
    torch.manual_seed(0)
    layers = [nn.Linear(64, WIDTH), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10)).eval()


def _inputs(seed: int, n: int, batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 64, generator=g) for _ in range(n)]


def calib_data():
    return _inputs(0, 4, 32)


def eval_data():
    """512 inputs labelled with the float model's own predictions, far from a tie between the top two logits
    (a near-tie flips on one rounding step, which would make engine-vs-simulation checks flaky)."""
    m = model()
    x = torch.cat(_inputs(1, 16, 128))
    with torch.no_grad():
        top2 = m(x).topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    keep = x[gap > gap.median()][:512]
    with torch.no_grad():
        return [(b, m(b).argmax(1)) for b in keep.split(64)]


def train_data():
    return _inputs(2, 4, 32)  # inputs alone: QAT distils the FP32 model


def metric(outputs, targets):
    return np.concatenate([100.0 * (o.argmax(1) == t).numpy() for o, t in zip(outputs, targets)])
