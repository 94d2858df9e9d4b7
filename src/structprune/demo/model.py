"""The demo's CNN: three conv+BN+ReLU blocks (32/64/128 channels) and two Linear layers."""
from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digit images.

    8x8 -> block1 (32) -> block2 (64) -> 2x2 max-pool -> block3 (128) -> 2x2 max-pool -> flatten (128*2*2)
    -> fc1 (hidden) -> ReLU -> fc2 (10 classes). The flatten couples each conv3 channel to four fc1 inputs,
    which the dependency graph has to follow.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), hidden: int = 128,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        first, second, third = widths
        self.block1 = _conv_block(1, first)
        self.block2 = _conv_block(first, second)
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = _conv_block(second, third)
        self.pool3 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(third * 2 * 2, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.block2(self.block1(x)))
        x = self.pool3(self.block3(x))
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def build_model(seed: int = 0) -> DigitsCNN:
    """A freshly initialised :class:`DigitsCNN`; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return DigitsCNN()


def example_inputs(batch_size: int = 1) -> torch.Tensor:
    """Inputs with the digits' shape, for tracing, MAC counting and latency."""
    return torch.zeros(batch_size, 1, 8, 8)


def ignored_layers(model: DigitsCNN) -> list[nn.Module]:
    """Layers whose outputs must keep their size: the classifier's 10 logits."""
    return [model.fc2]
