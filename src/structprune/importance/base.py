"""The importance protocol: a group in, one score per root channel out."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ..graph.group import Group


class Importance(ABC):
    """Scores the channels of a pruning group; higher means more worth keeping.

    ``__call__(group)`` returns a 1-D float32 tensor with one score per root channel
    (``len(group[0].idxs)``), in the order of ``group[0].idxs``, or ``None`` when no layer of the
    group is something this criterion can score (the pruner then skips the group).
    """

    @abstractmethod
    def __call__(self, group: Group) -> torch.Tensor | None:
        """Scores of the group's root channels."""


def group_device(group: Group) -> torch.device:
    """Device of the first parameter found in the group (the root's, usually); CPU if none."""
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.Parameter):
            return module.device
        for param in module.parameters():
            return param.device
    return torch.device("cpu")
