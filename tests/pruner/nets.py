"""Small models shared by the pruner tests."""
import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def magnitude(group):
    """Deterministic L1 score of the root layer's output channels (test-only criterion)."""
    module = group[0].dep.target.module
    weight = module.weight.detach()
    idxs = torch.tensor(group[0].idxs)
    return weight.abs().flatten(1).sum(1)[idxs] if weight.dim() > 1 else weight.abs()[idxs]


def example():
    torch.manual_seed(0)
    return SmallCNN(), torch.randn(2, 3, 8, 8)
