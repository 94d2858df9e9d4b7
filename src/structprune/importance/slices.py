"""Per-channel views of a layer's parameters, read only through the layer declarations' axes."""
from __future__ import annotations

import torch
from torch import nn

from ..graph.group import GroupItem
from ..layers.axes import Axis


def is_bias(axis: Axis) -> bool:
    """Whether an axis names a bias-like tensor (bias, bias_ih_l0, in_proj_bias, bias_k, out_proj.bias)."""
    return "bias" in axis.name.rsplit(".", 1)[-1]


def parameter_of(layer, axis: Axis) -> nn.Parameter | None:
    """The trainable parameter behind an axis; None for buffers (running statistics) and absent tensors."""
    if isinstance(layer, nn.Parameter):
        return layer  # an unwrapped parameter node is its own only tensor (axis "data")
    tensor = axis.tensor(layer)
    return tensor if isinstance(tensor, nn.Parameter) else None


def tensor_name(item: GroupItem, axis: Axis) -> str:
    """'fc.weight'-style name for error messages."""
    node = item.dep.target
    if isinstance(node.module, nn.Parameter):
        return node.name
    return f"{node.name}.{axis.name} ({type(node.module).__name__})"


def channel_sums(values: torch.Tensor, axis: Axis, idxs: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` (shaped like the axis' tensor) over each channel's slice, for channels ``idxs``.

    A channel's slice is every position of ``axis.dim`` that belongs to it, in every fused block
    (LSTM gates, q/k/v rows), times everything along the other dims. Channels that share positions
    (grouped-conv inputs, the repeats of a bidirectional LSTM's input columns) get the same sum.
    """
    return channels_of_positions(position_sums(values, axis), axis, values, idxs)


def position_sums(values: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Sum of ``values`` over every dim but the axis' one: one number per position along it."""
    dim = axis.dim % values.dim()
    others = [d for d in range(values.dim()) if d != dim]
    return values.sum(dim=others) if others else values


def channels_of_positions(per_position: torch.Tensor, axis: Axis, values: torch.Tensor,
                          idxs: torch.Tensor) -> torch.Tensor:
    """:func:`channel_sums` from the per-position sums (``values``: the tensor they came from, for its shape)."""
    device = per_position.device
    owners = axis.channel_of_position(values).to(device)
    per_channel = torch.zeros(axis.unit(values), dtype=per_position.dtype, device=device)
    per_channel.index_add_(0, owners, per_position)
    return per_channel[idxs.to(device) % axis.unit(values)]
