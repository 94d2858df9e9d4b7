"""Lossless-removal oracle: silence channels in every consumer, prune them, outputs must not move."""
from __future__ import annotations

import torch
from torch import nn

import structprune as tp
from structprune.utils.nested import call_model
from structprune.graph.dependency import is_in_channel_pruning_fn


def run(model, example_inputs):
    return call_model(model, example_inputs)


def leaves(output):
    from structprune.graph.trace import _flatten

    return [t for _, t in _flatten(output, []) if isinstance(t, torch.Tensor)]


def silence_consumers(group, producers: bool = False) -> None:
    """Zero the input weights of every consumer at the group's indices, so the channels carry nothing.

    With ``producers`` the producing layers' output rows are zeroed too: needed where channels meet
    through a product (attention's q . k) rather than through a consumer's weights.
    """
    with torch.no_grad():
        for item in group:
            node = item.dep.target
            if isinstance(node.module, nn.Parameter) or node.pruner.is_coupled(node.module):
                continue
            if is_in_channel_pruning_fn(item.dep.handler):
                axes = node.pruner.in_axes(node.module)
            elif producers:
                axes = node.pruner.out_axes(node.module)
            else:
                continue
            idxs = torch.tensor(item.idxs, dtype=torch.long)
            for axis in axes:
                tensor = axis.tensor(node.module)
                if tensor is not None:
                    tensor.index_fill_(axis.dim, axis.positions(idxs, tensor), 0.0)


def assert_lossless(model, example_inputs, module, idxs, pruning_fn=None, rtol=1e-5, atol=1e-5, producers=False):
    """Build the graph, silence ``idxs`` of ``module``'s output group, prune them, compare outputs."""
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs)
    pruner = graph.get_pruner_of_module(module)
    pruning_fn = pruning_fn or pruner.prune_out_channels
    group = graph.get_pruning_group(module, pruning_fn, idxs)
    assert not group.blocked, group.blocked
    silence_consumers(group, producers)
    with torch.no_grad():
        before = [t.clone() for t in leaves(run(model, example_inputs))]
    group.prune()
    with torch.no_grad():
        after = leaves(run(model, example_inputs))
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert b.shape == a.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    return group
