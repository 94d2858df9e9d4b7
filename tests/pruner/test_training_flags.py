"""Every submodule's training flag survives the library's calls (frozen-BatchNorm fine-tuning)."""
import pytest
import torch
from torch import nn
from torchvision.models import resnet18

import structprune as tp


def frozen_bn_resnet():
    model = resnet18()
    model.train()
    model.bn1.eval()
    for module in model.layer1.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return model


def flags(model):
    return {name: module.training for name, module in model.named_modules()}


def test_graph_pruner_update_reg_step_and_update_regularizer_keep_every_flag():
    model = frozen_bn_resnet()
    before = flags(model)
    assert before["bn1"] is False and before["layer1.0.bn2"] is False and before["layer2.0.bn1"] is True
    x = torch.randn(1, 3, 64, 64)
    tp.DependencyGraph().build_dependency(model, x)
    assert flags(model) == before
    pruner = tp.pruner.GrowingRegPruner(model, x, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                                        iterative_steps=2, ignored_layers=[model.fc])
    assert flags(model) == before
    pruner.update_reg()
    assert flags(model) == before
    pruner.step()
    assert flags(model) == before
    pruner.update_regularizer()
    assert flags(model) == before
    for group in pruner.step(interactive=True):
        group.prune()
    assert flags(model) == before
    tp.utils.count_ops_and_params(model, x)
    assert flags(model) == before


def test_flags_survive_a_step_that_falls_back_group_by_group():
    class Pinned(nn.Module):
        """A width read from an attribute no adapter follows, handed to a function whose size arguments
        the graph does not read (layer_norm's normalized_shape): the one-shot step breaks it."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.width = 8
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            y = self.bn(self.conv(x)).mean((2, 3))
            return self.head(nn.functional.layer_norm(y, (self.width,)))

    model = Pinned()
    model.train()
    model.bn.eval()
    before = flags(model)
    pruner = tp.pruner.MetaPruner(model, torch.randn(2, 3, 8, 8), tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[model.head])
    with pytest.warns(UserWarning, match="left unpruned"):
        pruner.step()
    assert model.conv.out_channels == 8
    assert [root for record in pruner.fallback_history for root, _ in record.skipped] == ["conv"]
    assert flags(model) == before
