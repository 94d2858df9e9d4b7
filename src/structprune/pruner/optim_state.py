"""Slice optimizer state (SGD momentum, Adam moments) along the same axes a group prunes."""
from __future__ import annotations

import torch
from torch import nn

from ..graph.group import Group, item_axes


def plan_optimizer_state(optimizer: torch.optim.Optimizer, group: Group) -> list:
    """What to slice, computed before pruning while shapes still match the indices."""
    plan = []
    for item in group:
        node = item.dep.target
        module = node.module
        idxs = torch.tensor(item.idxs, dtype=torch.long)
        if isinstance(module, nn.Parameter):
            axes = [(module, node.pruning_dim, idxs)]
        else:
            axes = []
            for axis in item_axes(item):
                tensor = axis.tensor(module)
                if isinstance(tensor, nn.Parameter):
                    axes.append((tensor, axis.dim, axis.positions(idxs, tensor)))
        for param, dim, positions in axes:
            state = optimizer.state.get(param)
            if not state:
                continue
            keep = torch.ones(param.shape[dim], dtype=torch.bool)
            keep[positions] = False
            keep = torch.nonzero(keep).reshape(-1)
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() == param.dim():
                    # the width is checked when applied: an earlier group of the same step may prune this
                    # very axis (GQA: whole q heads, then the q heads of removed kv heads), and plans apply
                    # in order, so by then the state has the width the parameter has now
                    plan.append((state, name, dim, keep, param.shape[dim]))
    return plan


def apply_optimizer_plan(plan: list) -> None:
    for state, name, dim, keep, width in plan:
        value = state[name]
        if value.shape[dim] == width:
            state[name] = value.index_select(dim, keep.to(value.device)).contiguous()


def prune_optimizer_state(optimizer, group: Group) -> None:
    apply_optimizer_plan(plan_optimizer_state(optimizer, group))
