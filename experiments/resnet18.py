"""ResNet-18 (ImageNet shape) with random weights, for latency benchmarks only.

The architecture and parameter names follow torchvision's ``resnet18`` (conv1, bn1,
relu, maxpool, layer1..layer4 of two BasicBlocks each, ``downsample`` as
``nn.Sequential(conv1x1, bn)``, avgpool, fc; 1000 classes, 3x224x224 input), so a
torchvision state_dict would load into it. One deliberate difference: ReLU is not
in-place, so a hook that keeps an activation sees the values it was handed. The
weights are a seeded random init (torchvision's scheme), not trained: accuracy
numbers from this model mean nothing, which is why it has no ``eval_data`` or
``metric``. Its use is measuring how a quantization plan changes latency on a
realistic convolutional network.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0


class BasicBlock(nn.Module):
    """torchvision's BasicBlock; the residual add is out-of-place so graph tools see a plain add."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu(out)


class ResNet18(nn.Module):
    """ResNet-18 in torchvision's layout.

    Args:
        num_classes: Width of the final ``fc`` layer.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(64, 64, stride=1)
        self.layer2 = self._stage(64, 128, stride=2)
        self.layer3 = self._stage(128, 256, stride=2)
        self.layer4 = self._stage(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(inplanes: int, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        return nn.Sequential(BasicBlock(inplanes, planes, stride, downsample), BasicBlock(planes, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def model() -> nn.Module:
    """Return a seeded random-init ResNet-18 in eval mode (for latency work only).

    Returns:
        A fresh ``ResNet18``; the same weights on every call, without touching the global RNG.
    """
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        net = ResNet18()
    return net.eval()


def example_inputs(batch: int = 1) -> torch.Tensor:
    """Return one seeded input batch of the model's shape.

    Args:
        batch: Batch size.

    Returns:
        A ``(batch, 3, 224, 224)`` float tensor drawn from a standard normal.
    """
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(batch, 3, 224, 224, generator=gen)


def calib_data(num_batches: int = 4) -> list[torch.Tensor]:
    """Return seeded random calibration batches (there is no training split: the weights are random).

    Args:
        num_batches: Number of batches of size 1.

    Returns:
        A list of ``(1, 3, 224, 224)`` standard-normal tensors.
    """
    gen = torch.Generator().manual_seed(SEED + 1)
    return [torch.randn(1, 3, 224, 224, generator=gen) for _ in range(num_batches)]
