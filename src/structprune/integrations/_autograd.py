"""Pruning in the middle of a training loop: autograd's per-parameter gradient accumulators.

Autograd keeps one gradient accumulator per parameter for as long as any graph that reaches the parameter
is alive, and that accumulator remembers the parameter's shape. Training loops keep the last step's loss
(and so its graph) alive in local variables we cannot reach (Ultralytics' ``loss`` in ``_do_train``), so
the first backward after pruning would be checked against the unpruned shapes and fail. Assigning
``param.data`` a tensor of another dtype drops the accumulator (a shape change does not), so a round trip
through another dtype gives the next graph fresh accumulators with the pruned shapes; parameter identity,
values and optimizer state are untouched.
"""
from __future__ import annotations

import torch
from torch import nn


def reset_grad_accumulators(model: nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.is_floating_point():
                continue
            dtype = parameter.dtype
            detour = torch.float64 if dtype != torch.float64 else torch.float32
            values = parameter.data
            parameter.data = values.to(detour)
            parameter.data = values
