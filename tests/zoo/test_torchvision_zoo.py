"""Every torchvision classification model: graph, 50% local and global magnitude pruning, forward."""
import copy

import pytest
import torch

import structprune as tp
from torchvision_zoo import build, classification_models

MODELS = classification_models()


def classifier(model):
    """The last Linear/Conv producing the logits: kept whole, as users do."""
    last = None
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            last = module
    return last


@pytest.mark.parametrize("name", MODELS)
def test_prune_half_local_and_global(name):
    model, x = build(name)
    with torch.no_grad():
        expected_shape = model(x).shape
    baseline_params = tp.utils.count_params(model)
    for global_pruning in (False, True):
        pruned = copy.deepcopy(model)
        pruner = tp.pruner.BasePruner(
            pruned, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
            global_pruning=global_pruning, ignored_layers=[classifier(pruned)],
        )
        groups = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers))
        assert groups, f"{name}: no prunable group found"
        pruner.step()
        with torch.no_grad():
            out = pruned(x)
        assert out.shape == expected_shape
        params = tp.utils.count_params(pruned)
        assert params < baseline_params * (0.8 if not global_pruning else 0.9), (name, global_pruning, params)


def test_every_torchvision_classification_model_is_covered():
    # the parametrised test above runs once per model; this pins that the list is the full one
    assert len(MODELS) >= 80 and {"vit_b_16", "swin_v2_t", "maxvit_t", "shufflenet_v2_x1_0"} <= set(MODELS)
