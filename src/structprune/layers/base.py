"""The pruning-function protocol and its declaration-driven implementation."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import torch
from torch import nn

from .axes import Axis, set_tensor, swap_data
from .slicing_log import record_slice

# (tensor id, dim) already sliced while one group is applied: tied weights (an embedding shared with the
# output head) are reached through two layers but must be cut once
_ALREADY_PRUNED: contextvars.ContextVar[set | None] = contextvars.ContextVar("already_pruned", default=None)


@contextlib.contextmanager
def pruning_once():
    token = _ALREADY_PRUNED.set(set())
    try:
        yield
    finally:
        _ALREADY_PRUNED.reset(token)


def as_index_tensor(idxs: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(idxs, torch.Tensor):
        if idxs.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError(f"channel indices must be integers, got a {idxs.dtype} tensor")
        return idxs.detach().to("cpu", torch.long).reshape(-1)
    values = list(idxs)
    if set(map(type, values)) <= {int}:  # the common case, checked at C speed without the loop below
        return torch.tensor(values, dtype=torch.long)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) and not (
            hasattr(value, "__index__") and not isinstance(value, float)
        ):
            raise TypeError(f"channel indices must be integers, got {value!r} ({type(value).__name__})")
    return torch.tensor([int(v) for v in values], dtype=torch.long)


class BasePruningFunc:
    """How to remove channels from one layer type.

    Subclass this for a layer the library does not know and register it with
    ``DependencyGraph.register_customized_layer`` (or pass ``customized_pruners``). A subclass must give
    ``prune_out_channels``, ``prune_in_channels``, ``get_out_channels`` and ``get_in_channels``;
    declaring ``out_axes``/``in_axes`` instead gives all four, plus importance and regularization.
    """

    #: activation dimension carrying the layer's output / input channels (None: detect from sizes)
    out_tensor_dim: int | None = None
    in_tensor_dim: int | None = None
    #: True when input and output channels are the same channels (norms, depthwise convs)
    coupled: bool = False
    #: positional inputs whose channels the layer reads (None: every tensor argument)
    channel_inputs: tuple[int, ...] | None = None

    def __init__(self, pruning_dim: int = 1):
        self.pruning_dim = pruning_dim

    # -- protocol -----------------------------------------------------------------------------------
    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return self._prune(layer, self.out_axes(layer), idxs, self.get_out_channels(layer), "output")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if self.is_coupled(layer):
            return self.prune_out_channels(layer, idxs)
        return self._prune(layer, self.in_axes(layer), idxs, self.get_in_channels(layer), "input")

    def get_out_channels(self, layer: nn.Module) -> int | None:
        raise NotImplementedError

    def get_in_channels(self, layer: nn.Module) -> int | None:
        raise NotImplementedError

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return 1

    def get_in_channel_groups(self, layer: nn.Module) -> int:
        return 1

    # -- declarations -------------------------------------------------------------------------------
    def out_axes(self, layer: nn.Module) -> list[Axis]:
        return []

    def in_axes(self, layer: nn.Module) -> list[Axis]:
        return self.out_axes(layer) if self.is_coupled(layer) else []

    def is_coupled(self, layer: nn.Module) -> bool:
        # a custom pruner written torch_pruning's way says "inputs are the outputs" by aliasing the two
        # methods (prune_in_channels = prune_out_channels), as for a norm or a per-channel scale
        return self.coupled or type(self).prune_in_channels is type(self).prune_out_channels

    def update_attrs(self, layer: nn.Module) -> None:
        """Make attributes such as ``out_channels`` agree with the new parameter shapes."""

    def inner_layers(self, layer: nn.Module, parent: nn.Module | None) -> list[nn.Module]:
        """Widths the layer holds that its inputs and outputs do not show (an MoE experts module's
        intermediate width and expert count), as proxy modules with declarations of their own; the graph
        adds them as layers with no calls. ``parent`` (the module holding ``layer``) lets a declaration
        reach a sibling (the router that scores the experts)."""
        return []

    def shrink_attrs(self, layer: nn.Module, removed: int) -> None:
        """Narrow width attributes by ``removed`` for a layer that holds no channel tensors."""

    def check_structure(self, layer: nn.Module, idxs, side: str) -> None:
        """Raise ValueError when removing ``idxs`` on ``side`` ("output"/"input") would break the layer's
        structure (grouped convs losing channels unevenly). Called before anything changes."""

    # -- torch_pruning-compatible helpers ----------------------------------------------------------
    def __call__(self, layer: nn.Module, idxs: Sequence[int], to_output: bool = True, inplace: bool = True,
                 dry_run: bool = False):
        if dry_run:
            self.check(layer, idxs, to_output)
            return layer
        if not inplace:
            import copy

            layer = copy.deepcopy(layer)
        if to_output:
            return self.prune_out_channels(layer, idxs)
        return self.prune_in_channels(layer, idxs)

    def _prune_parameter_and_grad(self, weight: nn.Parameter, keep_idxs, pruning_dim: int) -> nn.Parameter:
        """Keep ``keep_idxs`` of ``weight`` (and its gradient) along ``pruning_dim``, for custom pruners.

        Returns the same Parameter object, sliced in place, so optimizers keep holding it; assigning the
        result back (``layer.scale = self._prune_parameter_and_grad(...)``) is harmless.
        """
        keep = as_index_tensor(keep_idxs).to(weight.device)
        grad = weight.grad
        record_slice(weight, pruning_dim, keep, weight.shape)
        swap_data(weight, torch.index_select(weight.data, pruning_dim, keep).contiguous())
        if grad is not None:
            weight.grad = torch.index_select(grad, pruning_dim, keep).contiguous()
        return weight

    def check(self, layer: nn.Module, idxs: Sequence[int], to_output: bool) -> None:
        idxs = as_index_tensor(idxs)
        total = self.get_out_channels(layer) if to_output else self.get_in_channels(layer)
        validate_idxs(layer, idxs, total, "output" if to_output else "input")

    # -- implementation -----------------------------------------------------------------------------
    def _prune(self, layer: nn.Module, axes: list[Axis], idxs, total: int | None, side: str) -> nn.Module:
        idxs = as_index_tensor(idxs)
        done = _ALREADY_PRUNED.get()
        if total is not None and done is None:  # a group validates all its layers before it starts
            validate_idxs(layer, idxs, total, side)
        if len(idxs) == 0:
            return layer
        if all(axis.tensor(layer) is None for axis in axes):
            # nothing to slice (non-affine norms): the width lives only in an attribute
            self.shrink_attrs(layer, len(idxs))
            return layer
        for axis in axes:
            tensor = axis.tensor(layer)
            if tensor is None:
                continue
            if done is not None:
                if (id(tensor), axis.dim) in done:
                    continue
                done.add((id(tensor), axis.dim))
            positions = axis.positions(idxs, tensor)
            keep = _complement(positions, tensor.shape[axis.dim], tensor.device)
            grad = tensor.grad if isinstance(tensor, nn.Parameter) else None
            if isinstance(tensor, nn.Parameter):
                record_slice(tensor, axis.dim, keep, tensor.shape)
            set_tensor(layer, axis.name, _like_layout(torch.index_select(tensor.data, axis.dim, keep), tensor))
            if grad is not None:
                axis.tensor(layer).grad = _like_layout(torch.index_select(grad, axis.dim, keep), grad)
        self.update_attrs(layer)
        return layer


def _like_layout(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Keep channels_last weights channels_last (index_select returns the default layout)."""
    for layout, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if old.dim() == ndim and not old.is_contiguous() and old.is_contiguous(memory_format=layout):
            return new.contiguous(memory_format=layout)
    return new.contiguous()


def _complement(positions: torch.Tensor, size: int, device) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[positions] = False
    return torch.nonzero(mask).reshape(-1).to(device)


def validate_idxs(layer: nn.Module, idxs: torch.Tensor, total: int, side: str, name: str | None = None,
                  allow_all: bool = False) -> None:
    where = name or type(layer).__name__
    if len(idxs) == 0:
        return
    if int(idxs.min()) < 0 or int(idxs.max()) >= total:
        raise IndexError(
            f"{where}: {side} channel index out of range: got {idxs.tolist()[:8]}... for {total} channels; "
            f"indices must lie in [0, {total})"
        )
    if len(torch.unique(idxs)) != len(idxs):
        raise ValueError(f"{where}: duplicated {side} channel indices {idxs.tolist()[:8]}...; pass each index once")
    if len(idxs) >= total and not allow_all:
        raise ValueError(
            f"{where}: pruning all {total} {side} channels would leave an empty layer; keep at least one"
        )
