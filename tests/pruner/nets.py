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


class CatResidualNet(nn.Module):
    """A transposed conv, a concat of two branches and a residual add, every group with a BatchNorm (so
    BN-only criteria score it too), 8 channels wide: the couplings every pruner must keep consistent."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem, self.bn_stem = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.down, self.bn_down = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.up, self.bn_up = nn.ConvTranspose2d(8, 8, 2, stride=2), nn.BatchNorm2d(8)
        self.side, self.bn_side = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.fuse, self.bn_fuse = nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)
        self.res, self.bn_res = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.bn_stem(self.stem(x)))
        y = torch.relu(self.bn_up(self.up(torch.relu(self.bn_down(self.down(x))))))
        z = torch.cat([y, torch.relu(self.bn_side(self.side(x)))], dim=1)
        z = torch.relu(self.bn_fuse(self.fuse(z)))
        z = z + self.bn_res(self.res(z))
        return self.fc(z.mean((2, 3)))
