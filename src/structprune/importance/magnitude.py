"""Magnitude criteria: the p-th power of parameter magnitudes summed over each channel's slice."""
from __future__ import annotations

import torch
from torch import nn

from ..layers.registry import LayerRole, layer_types
from .elementwise import DEFAULT_TARGET_TYPES, ElementwiseImportance


class MagnitudeImportance(ElementwiseImportance):
    """Per item and channel: ``sum(|w| ** p)`` over the channel's slice of every removed weight.

    No 1/p root is taken per item (torch_pruning's local score), so with p=2 this is the squared
    L2 norm of the slice. Fused blocks (LSTM gates, q/k/v) add up. ``bias=True`` adds the bias
    elements' ``|b| ** p``. Non-``target_types`` layers of the group are ignored.
    """

    def __init__(
        self,
        p: float = 2,
        group_reduction: str | None = "mean",
        normalizer: str | None = "mean",
        bias: bool = False,
        target_types: tuple = DEFAULT_TARGET_TYPES,
    ):
        super().__init__(group_reduction, normalizer, bias, target_types)
        self.p = p

    def element_scores(self, param: nn.Parameter, name: str) -> torch.Tensor:
        weight = param.detach().float()
        if self.p == 2:
            return weight.square()  # the same values as abs().pow(2), in one pass over the weight instead of two
        if self.p == 1:
            return weight.abs()
        return weight.abs().pow(self.p)


class GroupMagnitudeImportance(MagnitudeImportance):
    """Group norm: ``(sum over all coupled slices of |w| ** p) ** (1/p)``, then divided by the group max.

    With the defaults (p=2, sum, max) this is the L2 norm of everything the channel removes,
    torch_pruning's group-norm criterion.
    """

    def __init__(
        self,
        p: float = 2,
        group_reduction: str | None = "sum",
        normalizer: str | None = "max",
        bias: bool = False,
        target_types: tuple = DEFAULT_TARGET_TYPES,
    ):
        super().__init__(p, group_reduction, normalizer, bias, target_types)

    def finalize(self, reduced: torch.Tensor) -> torch.Tensor:
        return reduced.pow(1.0 / self.p)


GroupNormImportance = GroupMagnitudeImportance


class BNScaleImportance(MagnitudeImportance):
    """|gamma| of the group's BatchNorm layers (network slimming); other layers are ignored."""

    def __init__(self, group_reduction: str | None = "mean", normalizer: str | None = "mean"):
        super().__init__(p=1, group_reduction=group_reduction, normalizer=normalizer, bias=False,
                         target_types=layer_types(LayerRole.SCALED_NORM))


class LAMPImportance(MagnitudeImportance):
    """Magnitude scores rescaled by LAMP: each over the sum of the scores not smaller than it."""

    def __init__(
        self,
        p: float = 2,
        group_reduction: str | None = "mean",
        normalizer: str | None = "lamp",
        bias: bool = False,
        target_types: tuple = DEFAULT_TARGET_TYPES,
    ):
        super().__init__(p, group_reduction, normalizer, bias, target_types)
