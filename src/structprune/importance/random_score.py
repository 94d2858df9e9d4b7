"""Random scores: the baseline every criterion should beat."""
from __future__ import annotations

import torch

from ..graph.group import Group
from .base import Importance, group_device


class RandomImportance(Importance):
    """Uniform random scores in [0, 1), one per root channel (uses torch's global RNG)."""

    def __call__(self, group: Group) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), device=group_device(group))
