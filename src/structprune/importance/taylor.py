"""First-order Taylor criterion: the loss change estimated from weights times gradients."""
from __future__ import annotations

import torch
from torch import nn

from .elementwise import DEFAULT_TARGET_TYPES, ElementwiseImportance


class TaylorImportance(ElementwiseImportance):
    """Per item and channel: ``sum |w * grad|`` over the channel's slice (Molchanov et al. 2019).

    With ``multivariable=True`` the products are summed over the item's whole slice (all its
    tensors and fused blocks) before the absolute value: ``|sum(w * grad)|``, the first-order
    loss change of removing the slice at once. Needs ``.grad`` on every scored parameter: run a
    backward pass first.
    """

    def __init__(
        self,
        group_reduction: str | None = "mean",
        normalizer: str | None = "mean",
        multivariable: bool = False,
        bias: bool = False,
        target_types: tuple = DEFAULT_TARGET_TYPES,
    ):
        super().__init__(group_reduction, normalizer, bias, target_types)
        self.multivariable = multivariable

    def element_scores(self, param: nn.Parameter, name: str) -> torch.Tensor:
        if param.grad is None:
            raise RuntimeError(
                f"{type(self).__name__}: {name} has no .grad; run loss.backward() on the model before "
                f"estimating importance (and do not zero the gradients in between)"
            )
        products = param.detach().float() * param.grad.detach().float()
        return products if self.multivariable else products.abs()

    def channel_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.abs() if self.multivariable else scores


class GroupTaylorImportance(TaylorImportance):
    """torch_pruning's name for the group-reduced Taylor criterion; same as :class:`TaylorImportance`."""
