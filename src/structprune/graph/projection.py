"""A group for some of a root's channels, read off the walk that found the group of all of them.

A planner asks for the group of the channels it chose from every group it scored, and it already holds
the group of all the root's channels: walking again from the chosen ones is the larger part of a step
on attention models (every window partition, head split and roll visited a second time). When the walk
of all channels went channel by channel (graph/pointwise.py), each element it reached came from exactly
one root channel and is reached from any set of root channels holding that one; the chosen channels
reach exactly the elements whose root they hold. Only the checks that depend on how many channels go
(reshape sizes, regrouping, pieces of a split) are run again, as a discovery would run them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .channels import ChannelState


@dataclass
class Walk:
    """What a discovery walked: states by (value, dims), layer states by (node, side), layers in order."""

    states: dict
    deps: dict
    order: list


def restricted_walk(walk: Walk, roots: torch.Tensor) -> Walk | None:
    """The walk that ``roots`` (original root channels) alone would make; None when they hold none of the
    root layer's channels."""
    # every root a walk records is one of its root layer's channels
    bound = int(walk.deps[walk.order[0]].roots.max()) + 1
    chosen = torch.zeros(max(bound, int(roots.max()) + 1 if len(roots) else 0), dtype=torch.bool)
    chosen[roots] = True
    states = {slot: kept for slot, kept in ((slot, _kept(state, chosen)) for slot, state in walk.states.items())
              if kept is not None}
    deps, order = {}, []
    for key in walk.order:
        kept = _kept(walk.deps[key], chosen)
        if kept is not None:
            deps[key] = kept
            order.append(key)
    if not order or order[0] != walk.order[0]:
        return None  # the root itself lost every channel: nothing was chosen
    return Walk(states, deps, order)


def _kept(state: ChannelState, chosen: torch.Tensor) -> ChannelState | None:
    keep = chosen[state.roots]
    if bool(keep.all()):
        return state
    if not bool(keep.any()):
        return None
    kept = object.__new__(ChannelState)  # a subset of sorted positions stays sorted
    kept.dims, kept.idxs, kept.roots = state.dims, state.idxs[keep], state.roots[keep]
    return kept
