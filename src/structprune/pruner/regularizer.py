"""The regularizer engine: per-parameter coefficient tensors applied with fused foreach calls.

Groups are compiled once (construction, update_regularizer) into terms (parameter, dim, positions,
root index). update_reg scatters per-group values into one coefficient tensor per parameter, shaped to
broadcast along its channel dims; regularize() is then one ``torch._foreach_addcmul_`` over the gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..graph.dependency import is_out_channel_pruning_fn
from ..graph.group import Group

DEFAULT_REG_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass
class _Term:
    group: int  # position in the compiled group list
    param: nn.Parameter
    dim: int
    positions: torch.Tensor  # along dim
    roots: torch.Tensor  # root index of each position
    is_bias: bool


class RegularizerEngine:
    def __init__(self, target_types=DEFAULT_REG_TYPES):
        self.target_types = tuple(target_types)
        self.terms: list[_Term] = []
        self.weights: list[nn.Parameter] = []
        self.weight_coefs: list[torch.Tensor] = []
        self.biases: list[nn.Parameter] = []
        self.bias_coefs: list[torch.Tensor] = []

    def compile(self, groups: list[Group]) -> None:
        self.terms = []
        for index, group in enumerate(groups):
            for item in group:
                self.terms.extend(self._item_terms(index, item))

    def _item_terms(self, index, item):
        node = item.dep.target
        module = node.module
        if isinstance(module, nn.Parameter) or not isinstance(module, self.target_types):
            return []
        pruner = node.pruner
        coupled = pruner.is_coupled(module)
        axes = pruner.out_axes(module) if coupled or is_out_channel_pruning_fn(item.dep.handler) else pruner.in_axes(module)
        idxs = torch.tensor(item.idxs, dtype=torch.long)
        roots = torch.tensor(item.root_idxs, dtype=torch.long)
        terms = []
        for axis in axes:
            leaf = axis.name.rsplit(".", 1)[-1]
            if leaf not in ("weight", "bias"):
                continue
            tensor = axis.tensor(module)
            if not isinstance(tensor, nn.Parameter) or not tensor.requires_grad:
                continue
            unit = axis.unit(tensor)
            local = idxs % unit
            positions = torch.cat([local + block * unit for block in range(axis.blocks)])
            terms.append(_Term(index, tensor, axis.dim, positions, roots.repeat(axis.blocks), leaf == "bias"))
        return terms

    def scatter(self, group_values: list[torch.Tensor]) -> None:
        """Build each parameter's coefficient tensor from one value per root channel per group."""
        vectors: dict = {}
        for term in self.terms:
            key = (term.param, term.dim)
            size = term.param.shape[term.dim]
            if key not in vectors:
                vectors[key] = [torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)]
            total, count = vectors[key]
            gamma = group_values[term.group].to(torch.float64)[term.roots]
            total.index_add_(0, term.positions, gamma)
            count.index_add_(0, term.positions, torch.ones_like(gamma))
        coefs: dict = {}
        order: list = []
        for (param, dim), (total, count) in vectors.items():
            # positions shared by several channels (grouped-conv inputs) take their mean
            vector = torch.where(count > 0, total / count.clamp(min=1), 0.0)
            view = [1] * param.dim()
            view[dim] = -1
            vector = vector.to(param.device, param.dtype).view(view)
            if param not in coefs:
                coefs[param] = vector
                order.append(param)
            else:
                coefs[param] = coefs[param] + vector
        is_bias = {term.param: term.is_bias for term in self.terms}
        self.weights = [p for p in order if not is_bias[p]]
        self.weight_coefs = [coefs[p] for p in self.weights]
        self.biases = [p for p in order if is_bias[p]]
        self.bias_coefs = [coefs[p] for p in self.biases]

    def apply(self, bias: bool = False) -> None:
        """grad += coef * weight for every compiled parameter that has a gradient."""
        _apply(self.weights, self.weight_coefs)
        if bias:
            _apply(self.biases, self.bias_coefs)


def _apply(params, coefs) -> None:
    grads, values, factors = [], [], []
    for param, coef in zip(params, coefs):
        if param.grad is not None:
            grads.append(param.grad)
            values.append(param.detach())
            factors.append(coef)
    if grads:
        torch._foreach_addcmul_(grads, values, factors)
