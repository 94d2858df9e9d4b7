"""Which channels of a layer a group item removes: its outputs or its inputs."""
from __future__ import annotations

from enum import Enum


class Side(str, Enum):
    """The side of a layer whose channels a group item removes.

    Set once where an item is made (group discovery); nothing reads it back from a function name. A str
    enum, so ``Side.OUT == "out"`` keeps code that spelled sides as strings working.
    """

    OUT = "out"
    IN = "in"

    @property
    def word(self) -> str:
        """``"output"`` / ``"input"``, as layer checks and error messages spell the side."""
        return "output" if self is Side.OUT else "input"

    def __str__(self) -> str:
        return self.value


def is_out_channel_pruning_fn(fn) -> bool:
    """``prune_out_channels`` and the documented ``prune_*_out_channels`` names (torch_pruning's helper)."""
    return "out_channels" in getattr(fn, "__name__", "")


def is_in_channel_pruning_fn(fn) -> bool:
    """``prune_in_channels`` and the documented ``prune_*_in_channels`` names (torch_pruning's helper)."""
    return "in_channels" in getattr(fn, "__name__", "")


def side_of_pruning_fn(fn) -> Side:
    """The side a pruning function a user hands us removes; the one place a side comes from a name."""
    return Side.OUT if is_out_channel_pruning_fn(fn) else Side.IN
