"""Channel axes: where a layer's channels live inside its parameters and buffers."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Axis:
    """A parameter (or buffer) dimension that carries channels.

    ``blocks`` repeats the channel layout along the dimension (LSTM gates: 4, fused q/k/v rows: 3).
    When the dimension holds fewer positions per block than the layer has channels (grouped conv
    inputs, bidirectional LSTM outputs), channel ``c`` lives at position ``c % unit`` so pruning must be
    symmetric across those repeats; ``channel_repeats`` reports how many there are.
    """

    name: str
    dim: int
    blocks: int = 1

    def tensor(self, layer: nn.Module) -> torch.Tensor | None:
        owner, attr = _resolve(layer, self.name)
        return getattr(owner, attr, None)

    def unit(self, tensor: torch.Tensor) -> int:
        return tensor.shape[self.dim] // self.blocks

    def positions(self, idxs: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """Positions along ``dim`` touched by channel ``idxs`` (sorted, unique)."""
        unit = self.unit(tensor)
        local = torch.unique(idxs % unit)
        if self.blocks == 1:
            return local
        offsets = torch.arange(self.blocks, device=local.device) * unit
        return (local[None, :] + offsets[:, None]).reshape(-1)

    def channel_of_position(self, tensor: torch.Tensor) -> torch.Tensor:
        """For each position along ``dim``, the local channel index it belongs to."""
        unit = self.unit(tensor)
        return torch.arange(tensor.shape[self.dim]) % unit


def _resolve(layer: nn.Module, name: str) -> tuple[nn.Module, str]:
    """'out_proj.weight' -> (layer.out_proj, 'weight'): a declaration may reach into a child module."""
    *path, attr = name.split(".")
    owner = layer
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def set_tensor(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a parameter's or buffer's data, keeping the Parameter object so optimizers still hold it."""
    owner, attr = _resolve(layer, name)
    current = getattr(owner, attr)
    if isinstance(current, nn.Parameter):
        swap_data(current, value)
    else:
        setattr(owner, attr, value)


def swap_data(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.data = value`` for a new shape, keeping the Parameter object (optimizers hold it).

    A graph kept alive after ``backward()`` (a ``loss`` still in scope) holds the parameter's gradient
    accumulator, which remembers the old shape; autograd reuses it on the next forward and rejects the
    new-shaped gradient. Assigning data of another dtype makes PyTorch drop that cached accumulator
    (``set_data`` resets it on a type change, not on a shape change), so a fresh one is made.
    """
    if tuple(param.shape) != tuple(value.shape):
        other = torch.float64 if value.dtype != torch.float64 else torch.float32
        param.data = torch.empty(0, dtype=other, device=value.device)
    param.data = value
