"""Tiny models with hand-set weights shared by the importance tests."""
import torch
from torch import nn

import structprune as tp


def set_(param, values):
    with torch.no_grad():
        param.copy_(torch.as_tensor(values, dtype=param.dtype).reshape(param.shape))


def only_group(model, example, root=None):
    """The group rooted at ``root`` (default: the first one) of a freshly built graph."""
    graph = tp.DependencyGraph().build_dependency(model, example)
    for group in graph.get_all_groups():
        if root is None or group[0].dep.target.module is root:
            return group
    raise AssertionError("no such group")


class ConvBNLinear(nn.Module):
    """conv scores [4, 9] (p=2), bn gamma [0.5, -4], fc input columns [1,3,5] and [2,4,6] -> [35, 56]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 3)
        set_(self.conv.weight, [2.0, 3.0])
        set_(self.conv.bias, [10.0, 20.0])
        set_(self.bn.weight, [0.5, -4.0])
        set_(self.bn.bias, [1.0, 2.0])
        set_(self.fc.weight, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        set_(self.fc.bias, [100.0, 100.0, 100.0])

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def conv_bn_linear_group():
    model = ConvBNLinear()
    return model, only_group(model, torch.randn(1, 1, 2, 2))


class LinearLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 2)
        self.fc2 = nn.Linear(2, 1)
        set_(self.fc1.weight, [[1.0, -2.0], [3.0, 4.0]])
        set_(self.fc1.bias, [1.0, 1.0])
        set_(self.fc2.weight, [[2.0, -1.0]])

    def forward(self, x):
        return self.fc2(self.fc1(x))


def linear_linear_group():
    model = LinearLinear()
    return model, only_group(model, torch.randn(1, 2), root=model.fc1)
