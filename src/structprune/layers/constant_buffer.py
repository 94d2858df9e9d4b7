"""Constant buffers the forward combines with pruned channels (timm BEiT/SwinV2/EVA: ``k_bias``).

timm keeps the key bias of BEiT-style attention as a non-persistent all-zero buffer and builds the qkv
bias as ``cat(q_bias, k_bias, v_bias)``; the buffer's positions are the key channels, so a group that
narrows the keys must narrow it too, or no head can lose a channel. Every element of a constant buffer
holds the same value, so any subset of its positions is exactly the buffer the narrower model needs: the
graph adds such buffers as layers of their own (a proxy holding the owner, as MoE widths are) whose only
tensor is the buffer, sliced along its one dim. Buffers with varying values (rotary tables, relative
position indices) carry information per position and still refuse a removal.
"""
from __future__ import annotations

import torch
from torch import nn

from .axes import Axis
from .base import BasePruningFunc


class ConstantBuffer(nn.Module):
    """One constant 1-D buffer of ``owner`` (a proxy the graph builds; not part of the model)."""

    def __init__(self, owner: nn.Module, buffer_name: str):
        super().__init__()
        self.owner = owner  # a child, so that a group's undo snapshot covers the owner's buffers
        self.buffer_name = buffer_name

    def extra_repr(self) -> str:
        return f"{self.buffer_name}: {tuple(getattr(self.owner, self.buffer_name).shape)}"


class ConstantBufferPruner(BasePruningFunc):
    """Channel ``j`` is position ``j`` of the buffer; nothing else changes."""

    coupled = True
    out_tensor_dim = None
    in_tensor_dim = None

    def out_axes(self, layer):
        return [Axis(f"owner.{layer.buffer_name}", 0)]

    def in_axes(self, layer):
        return self.out_axes(layer)

    def get_out_channels(self, layer):
        return getattr(layer.owner, layer.buffer_name).shape[0]

    get_in_channels = get_out_channels


def is_constant_buffer(owner: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """A non-persistent 1-D floating buffer whose elements are all equal (it is not saved, so its shape
    follows the pruned model on reload from the plan alone)."""
    return (name in owner._non_persistent_buffers_set and tensor.dim() == 1 and tensor.numel() > 1
            and tensor.is_floating_point() and not tensor.is_meta
            and bool((tensor == tensor[0]).all()))
