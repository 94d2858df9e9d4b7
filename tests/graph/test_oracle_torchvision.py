"""The lossless-removal oracle on real torchvision architectures: every group of each, random channels."""
import pytest
import torch
import torchvision

import structprune as tp
from oracle import run, silence_consumers


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "googlenet", "efficientnet_b0"])
def test_silenced_channels_prune_without_changing_outputs(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    graph = tp.DependencyGraph().build_dependency(model, x)
    generator = torch.Generator().manual_seed(1)
    chosen = []
    for group in graph.get_all_groups():
        total = len(group[0].idxs)
        idxs = torch.randperm(total, generator=generator)[: max(1, total // 4)].sort().values.tolist()
        root = group[0].dep
        candidate = graph.get_pruning_group(root.target.module, root.handler, idxs)
        if graph.check_pruning_group(candidate):
            chosen.append(candidate)
    assert len(chosen) >= 10
    for group in chosen:
        silence_consumers(group)
    with torch.no_grad():
        before = run(model, x).clone()
    params_before = tp.utils.count_params(model)
    for group in chosen:
        root = group[0].dep
        # groups were planned on the unpruned model; re-resolve each through the graph's bookkeeping
        graph.get_pruning_group(root.target.module, root.handler, group[0].idxs).prune()
    with torch.no_grad():
        after = run(model, x)
    assert tp.utils.count_params(model) < params_before
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
