"""A user task in module:function form, as `mixq --model cli_task:model ...` would load it."""
from __future__ import annotations

import numpy as np
import torch

from zoo import build


def model():
    return build("residual")[0]


def calib_data():
    return build("residual")[1]


def eval_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, 16, 16, generator=g)
    return [(x, model()(x).argmax(1))]  # labels = the float model's own predictions


def metric(outputs, targets):
    return np.concatenate([100.0 * (o.argmax(1) == t).numpy() for o, t in zip(outputs, targets)])


def nan_metric(outputs, targets):
    return np.full(sum(len(t) for t in targets), np.nan)


def exploding_metric(outputs, targets):
    raise AssertionError("the metric ran: an evaluation happened before the bad input was refused")


def train_data():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 1, 16, 16, generator=g) for _ in range(4)]  # inputs alone: distillation from FP32
