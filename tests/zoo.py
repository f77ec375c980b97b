"""Small models of the shapes mixq must handle, built quickly with fixed seeds."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalNet(nn.Module):
    """Functional relu / max_pool2d between convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class ConcatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


class TinyAttention(nn.Module):
    """Single-head self-attention: torch.matmul for scores and context, an additive mask, a residual."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp, self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(5))
        self.scale = d ** -0.5

    def forward(self, x):
        h = self.inp(x)
        mask = (x[..., :1].transpose(-1, -2) > 2.0).float() * -10000.0  # masks a few keys
        scores = torch.matmul(self.q(h), self.k(h).transpose(-1, -2)) * self.scale + mask
        ctx = torch.matmul(scores.softmax(-1), self.v(h))
        return self.o(ctx) + h


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16 * 4 * 4)
        self.up1 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1)

    def forward(self, z):
        x = self.fc(z).view(-1, 16, 4, 4)
        return torch.sigmoid(self.up2(F.relu(self.up1(x))))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 12, num_layers=2, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


class ReusedNet(nn.Module):
    """One Linear applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(self.shared(torch.relu(self.shared(x)))))


class ControlFlowNet(nn.Module):
    """Data-dependent branch: FX cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = torch.relu(h)
        return self.b(h)


class Conv1dNet(nn.Module):
    """Conv1d -> ReLU -> AvgPool1d -> Conv1d -> global average -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.pool = nn.AvgPool1d(2)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        return self.fc(self.conv2(x).mean(-1))


class Conv3dNet(nn.Module):
    """Conv3d -> ReLU -> MaxPool3d -> Conv3d -> flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1)
        self.pool = nn.MaxPool3d(2)
        self.conv2 = nn.Conv3d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2 * 2, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        return self.fc(torch.flatten(self.conv2(x), 1))


class TimeMajorLSTM(nn.Module):
    """``nn.LSTM(batch_first=False)``: inputs are (time, batch, features), dim 0 is not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[-1])


class TimeMajorCellLoop(nn.Module):
    """A recurrent loop over a time-major sequence (time, batch, features): dim 0 is time, not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(6, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h, c = self.cell(x[0])
        for t in range(1, 5):
            h, c = self.cell(x[t], (h, c))
        return self.fc(h)


class LSTMCellNet(nn.Module):
    """An ``nn.LSTMCell`` stepped over 5 time steps (batch-first input)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(6, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h, c = self.cell(x[:, 0])
        for t in range(1, 5):
            h, c = self.cell(x[:, t], (h, c))
        return self.fc(h)


class ModuleModeNet(nn.Module):
    """FX cannot trace it (a data-dependent branch), so mixq prepares it in module mode; it has a
    ConvTranspose2d, a Conv2d, an AvgPool2d and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if h.mean() > -1e9:  # always taken; FX cannot know that
            h = self.up(h)
        return self.fc(torch.flatten(self.pool(h), 1))


def _rand(*shape):
    return torch.randn(*shape)


ZOO = {
    "functional": (FunctionalNet, lambda: _rand(4, 1, 16, 16)),
    "residual": (ResidualNet, lambda: _rand(4, 1, 16, 16)),
    "concat": (ConcatNet, lambda: _rand(4, 3, 8, 8)),
    "attention": (TinyAttention, lambda: _rand(4, 6, 16)),
    "decoder": (Decoder, lambda: _rand(4, 8)),
    "lstm": (LSTMNet, lambda: _rand(4, 7, 6)),
    "reused": (ReusedNet, lambda: _rand(4, 8)),
    "control_flow": (ControlFlowNet, lambda: _rand(4, 8)),
    "conv1d": (Conv1dNet, lambda: _rand(4, 3, 16)),
    "conv3d": (Conv3dNet, lambda: _rand(4, 2, 4, 4, 4)),
    "lstm_time_major": (TimeMajorLSTM, lambda: _rand(7, 4, 6)),
    "lstm_cell": (LSTMCellNet, lambda: _rand(4, 5, 6)),
    "cell_time_major": (TimeMajorCellLoop, lambda: _rand(5, 4, 6)),
    "module_mode": (ModuleModeNet, lambda: _rand(4, 2, 8, 8)),
}


def build(name: str, seed: int = 0):
    """Return (eval-mode model with randomized BN statistics, calibration batches, test batch)."""
    torch.manual_seed(seed)
    cls, inputs = ZOO[name]
    model = cls()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval(), [inputs() for _ in range(4)], inputs()
