"""Every public pruner x every public importance criterion x both step modes x one and three steps.

The interactive path of the sparse-training pruners once crashed (an instance attribute shadowed a method)
while every other combination passed: only the full cross product catches a bug that lives in one cell.
Pruners and criteria are enumerated from the public modules, so a new one joins without editing this file.
"""
import pytest
import torch

import structprune as tp

from catalog import CLASSES, CRITERION_BASES, calibrate, make_criterion, public_criteria, public_pruners, train_step
from nets import CatResidualNet

WIDTH = 8


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


PRUNERS = public_pruners()
CRITERIA = public_criteria()


def test_the_matrix_covers_what_torch_pruning_users_reach_for():
    assert {"BasePruner", "GrowingRegPruner", "GroupNormPruner", "BNScalePruner"} <= set(PRUNERS)
    assert tp.pruner.MetaPruner is tp.pruner.MagnitudePruner is tp.pruner.BasePruner
    assert {"MagnitudeImportance", "GroupMagnitudeImportance", "BNScaleImportance", "LAMPImportance",
            "RandomImportance", "TaylorImportance", "GroupTaylorImportance", "HessianImportance",
            "GroupHessianImportance", "OBDCImportance"} <= set(CRITERIA)
    assert not set(CRITERIA) & set(CRITERION_BASES)


@pytest.mark.parametrize("steps", [1, 3], ids=lambda n: f"steps{n}")
@pytest.mark.parametrize("interactive", [False, True], ids=["step", "interactive"])
@pytest.mark.parametrize("criterion_name", sorted(CRITERIA))
@pytest.mark.parametrize("pruner_name", sorted(PRUNERS))
def test_pruner_with_criterion_prunes_and_the_model_runs_after_every_step(pruner_name, criterion_name,
                                                                          interactive, steps):
    torch.manual_seed(0)
    model = CatResidualNet(CLASSES)
    x = torch.randn(2, 3, 8, 8)
    criterion = make_criterion(CRITERIA[criterion_name])
    pruner = PRUNERS[pruner_name](model, x, criterion, pruning_ratio=0.5, iterative_steps=steps,
                                  ignored_layers=[model.fc])
    before = n_params(model)
    for step in range(1, steps + 1):
        calibrate(criterion, model, x)
        train_step(pruner, model)
        if interactive:
            for group in pruner.step(interactive=True):
                group.prune()
        else:
            pruner.step()
        pruner.update_regularizer()
        out = model(x)
        assert out.shape == (2, CLASSES) and torch.isfinite(out).all()
        after = n_params(model)
        assert after < before, f"step {step} removed no parameter"
        before = after
        # the linear schedule: floor(8 * (1 - 0.5 * step / steps)) channels stay in every group
        width = int(WIDTH * (1 - 0.5 * step / steps))
        for conv in (model.stem, model.down, model.side, model.fuse, model.res):
            assert conv.out_channels == conv.weight.shape[0] == width
        assert model.up.out_channels == model.up.weight.shape[1] == width  # transposed: outputs on dim 1
        assert model.fuse.in_channels == model.fuse.weight.shape[1] == 2 * width  # both halves of the concat
        assert model.fc.in_features == width and model.fc.out_features == CLASSES
