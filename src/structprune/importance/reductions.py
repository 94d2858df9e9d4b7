"""Group reductions: combine the per-item score rows of a group into one score per root channel.

Every function takes ``stack`` of shape ``[items, n]`` (each group item's scores scattered onto the
root channels) and an optional boolean ``mask`` of the same shape telling which entries an item
actually covers (an item behind a split or concat covers only some root channels). Entries outside
the mask are ignored; a root channel covered by no item scores 0.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Reduction = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _mask_of(stack: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(stack, dtype=torch.bool) if mask is None else mask


def _zero_uncovered(reduced: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.any(0), reduced, torch.zeros_like(reduced))


def reduce_sum(stack: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the items covering each channel."""
    mask = _mask_of(stack, mask)
    return (stack * mask).sum(0)


def reduce_mean(stack: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the items covering each channel (not over all items: see module docstring)."""
    mask = _mask_of(stack, mask)
    return reduce_sum(stack, mask) / mask.sum(0).clamp(min=1)


def reduce_max(stack: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Largest score among the items covering each channel."""
    mask = _mask_of(stack, mask)
    reduced = stack.masked_fill(~mask, float("-inf")).max(0).values
    return _zero_uncovered(reduced, mask)


def reduce_prod(stack: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Product of the scores of the items covering each channel."""
    mask = _mask_of(stack, mask)
    return _zero_uncovered(stack.masked_fill(~mask, 1.0).prod(0), mask)


def reduce_first(stack: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The first scored item's row (the group's root, unless the root was not scorable)."""
    mask = _mask_of(stack, mask)
    return stack[0] * mask[0]


def reduce_gate(stack: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The last scored item's row (torch_pruning's name for it)."""
    mask = _mask_of(stack, mask)
    return stack[-1] * mask[-1]


def reduce_none(stack: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """No reduction: the ``[items, n]`` stack itself, uncovered entries zeroed."""
    return stack * _mask_of(stack, mask)


REDUCTIONS: dict = {
    "sum": reduce_sum,
    "mean": reduce_mean,
    "max": reduce_max,
    "prod": reduce_prod,
    "first": reduce_first,
    "gate": reduce_gate,
    None: reduce_none,
}


def get_reduction(name: str | Reduction | None) -> Reduction:
    """The reduction function for a name (or a callable taking ``(stack, mask)``, returned as is)."""
    if callable(name):
        return name
    if name not in REDUCTIONS:
        raise ValueError(f"unknown group_reduction {name!r}; choose one of {list(REDUCTIONS)} or pass a callable")
    return REDUCTIONS[name]


def scatter_items(
    scores: Sequence[torch.Tensor], roots: Sequence[torch.Tensor], n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-item scores onto ``n`` root channels: ``(stack [items, n], mask [items, n])``.

    ``roots[i][k]`` is the root position of ``scores[i][k]``. An item reaching the same root channel
    several times (a tensor concatenated with itself, a flatten) adds those scores up: together they
    are what that layer loses with the channel.
    """
    device = scores[0].device
    stack = torch.zeros(len(scores), n, dtype=torch.float32, device=device)
    mask = torch.zeros(len(scores), n, dtype=torch.bool, device=device)
    for row, (score, root) in enumerate(zip(scores, roots)):
        root = root.to(device)
        stack[row].index_add_(0, root, score.to(device, torch.float32))
        mask[row, root] = True
    return stack, mask
