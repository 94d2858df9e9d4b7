"""The shared pipeline of parameter-based criteria: element scores -> channel scores -> group scores."""
from __future__ import annotations

import contextlib
import contextvars
import copy

import torch
from torch import nn

from ..graph.group import Group, GroupItem, item_axes
from .base import Importance
from .normalizers import apply_normalizer, get_normalizer
from .reductions import get_reduction, scatter_items
from .slices import channels_of_positions, is_bias, parameter_of, position_sums, tensor_name

from ..layers.registry import ROLE_TYPES, LayerRole, resolve_layer_types

DEFAULT_TARGET_TYPES = ROLE_TYPES[LayerRole.SCORED]


class ElementwiseImportance(Importance):
    """Score every parameter element, sum per channel, reduce over the group, normalize.

    For each group item whose layer is one of ``target_types``, the item's axes (out_axes for
    output-side and coupled items, in_axes for input-side ones) select the parameters it removes;
    buffers never count and biases count only with ``bias=True``. The item's score for a channel is
    the sum of :meth:`element_scores` over that channel's slice of every selected parameter, passed
    through :meth:`channel_scores`. Item scores land on the root channels via ``root_idxs``, then
    ``group_reduction`` and ``normalizer`` apply.

    Subclasses give :meth:`element_scores` (and may override :meth:`channel_scores`, :meth:`finalize`).
    """

    def __init__(
        self,
        group_reduction: str | None = "mean",
        normalizer: str | None = "mean",
        bias: bool = False,
        target_types: tuple = DEFAULT_TARGET_TYPES,
    ):
        self.group_reduction = group_reduction
        self.normalizer = normalizer
        self.bias = bias
        self.target_types = tuple(target_types)
        self._reduce = get_reduction(group_reduction)  # fail at construction on a bad name
        self._normalize = get_normalizer(normalizer)

    def rescored(self, group_reduction: str | None, normalizer: str | None) -> "ElementwiseImportance":
        """The same criterion (a shallow copy: calibrated statistics are shared) with another reduction over
        a group's layers and another normalizer."""
        other = copy.copy(self)
        other.group_reduction, other._reduce = group_reduction, get_reduction(group_reduction)
        other.normalizer, other._normalize = normalizer, get_normalizer(normalizer)
        return other

    # -- hooks ----------------------------------------------------------------------------------------
    def element_scores(self, param: nn.Parameter, name: str) -> torch.Tensor:
        """Per-element scores of ``param`` (same shape, float32); ``name`` is for error messages."""
        raise NotImplementedError

    def channel_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Post-process an item's per-channel sums (identity here)."""
        return scores

    def finalize(self, reduced: torch.Tensor) -> torch.Tensor:
        """Post-process the reduced group scores before normalizing (identity here)."""
        return reduced

    # -- pipeline -------------------------------------------------------------------------------------
    def __call__(self, group: Group) -> torch.Tensor | None:
        with torch.no_grad():
            scores, roots = [], []
            positions = _root_positions(group)
            for k, item in enumerate(group):
                score = self.item_scores(item)
                if score is None:
                    continue
                # Root channels outside group[0].idxs (possible only for hand-built groups) are dropped.
                where = positions[_root_tensor(group, k)]
                keep = where >= 0
                scores.append(score[keep.to(score.device)])
                roots.append(where[keep])
            if not scores:
                return None
            stack, mask = scatter_items(scores, roots, len(group[0].idxs))
            reduced = self.finalize(self._reduce(stack, mask))
            return apply_normalizer(self._normalize, reduced).float()

    def item_scores(self, item: GroupItem) -> torch.Tensor | None:
        """One item's score for each of its channels ``item.idxs``; None if it has nothing to score."""
        layer = item.dep.target.module
        if not isinstance(layer, resolve_layer_types(self.target_types, LayerRole.SCORED)):
            return None
        idxs = torch.tensor(item.idxs, dtype=torch.long)
        total = None
        for axis in item_axes(item):
            if is_bias(axis) and not self.bias:
                continue
            param = parameter_of(layer, axis)
            if param is None:
                continue
            per_position = self._position_sums(param, axis, item)
            sums = channels_of_positions(per_position, axis, param, idxs)
            total = sums if total is None else total + sums.to(total.device)
        return None if total is None else self.channel_scores(total)


    def _position_sums(self, param, axis, item) -> torch.Tensor:
        """Element scores summed per position along the axis' dim; within :func:`sharing_position_sums`
        each (parameter, dim) is scored once, not once per group that reads it (a DenseNet conv's inputs
        come from every earlier layer of its block: ten groups, ten passes over the same weight)."""
        shared = _SHARED_SUMS.get()
        key = (id(self), id(param), axis.dim % param.dim())
        if shared is not None and key in shared and shared[key][0] is param:
            return shared[key][1]
        per_position = position_sums(self.element_scores(param, tensor_name(item, axis)), axis)
        if shared is not None:
            shared[key] = (param, per_position)
        return per_position


#: per-position sums by (importance, parameter, dim) while a pruner scores every group of a step
_SHARED_SUMS: contextvars.ContextVar = contextvars.ContextVar("structprune_position_sums", default=None)


@contextlib.contextmanager
def sharing_position_sums():
    """Score each parameter once for all groups scored inside (parameters must not change meanwhile)."""
    token = _SHARED_SUMS.set({})
    try:
        yield
    finally:
        _SHARED_SUMS.reset(token)


def _root_tensor(group, k: int) -> torch.Tensor:
    """Item k's root indices as a tensor: kept from discovery for graph groups, built for hand-made ones."""
    if hasattr(group, "item_tensors"):
        return group.item_tensors(k)[1]
    return torch.tensor(group[k].root_idxs, dtype=torch.long)


def _root_positions(group: Group) -> torch.Tensor:
    """Map a root channel number to its position in ``group[0].idxs`` (identity for full groups)."""
    root = torch.tensor(group[0].root_idxs, dtype=torch.long)
    size = max((max(item.root_idxs, default=-1) for item in group), default=-1) + 1
    lookup = torch.full((max(size, 1),), -1, dtype=torch.long)
    lookup[root] = torch.arange(len(root))
    return lookup
