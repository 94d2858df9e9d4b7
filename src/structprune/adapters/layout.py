"""What adapters read off a module: library and class tests, layer widths, kept channels, head layouts.

One reading of head layouts serves every family: the kept (head, dim) grid of a projection once a step's
channels went (:func:`kept_grid_layout`). Each kept head must keep as many channels as every other (a
per-head reshape needs one size); the heads, and the channels each keeps, are the layout. Fewer heads
and narrower heads remove the same number of channels, so only the removed indices tell them apart;
without them (a sync by hand, a reload) :func:`head_layout` keeps the size the family's forward spells out.

Nothing here imports a model library or a family module: the hf config code reads layouts from here too.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def from_library(library: str, module: nn.Module) -> bool:
    """Whether ``module``'s class is defined in ``library`` (a dotted prefix: ``"timm.models.levit"``)."""
    return type(module).__module__.startswith(library)


def class_named(*names: str) -> Callable[[nn.Module], bool]:
    """A test for modules whose class has one of ``names`` (a class the library may not be installed for)."""
    return lambda module: type(module).__name__ in names


def out_width(layer: nn.Module) -> int:
    """Output width of a Linear, a Conv, a transformers Conv1D (``nf``) or a timm LeViT LinearNorm."""
    layer = getattr(layer, "linear", layer)
    for name in ("out_features", "out_channels"):
        if hasattr(layer, name):
            return getattr(layer, name)
    # transformers Conv1D keeps its weight as [in, out]
    return layer.weight.shape[1] if hasattr(layer, "nf") else layer.weight.shape[0]


def in_width(layer: nn.Module) -> int:
    """Input width of a Linear, a transformers Conv1D (``nx``) or a timm LeViT LinearNorm."""
    layer = getattr(layer, "linear", layer)
    if hasattr(layer, "in_features"):
        return layer.in_features
    return layer.weight.shape[0] if hasattr(layer, "nx") else layer.weight.shape[1]


def removed_of(removed: dict | None, *layers: nn.Module | None) -> torch.Tensor | None:
    """Removed output channels of the first of ``layers`` pruned in this step (None when unknown).

    ``removed`` is what the graph hands a hook after a group: {layer: removed output channels}. A wrapper
    that holds its layer as ``.linear`` (LeViT's LinearNorm) answers for it.
    """
    if not removed:
        return None
    for layer in layers:
        if layer is not None and layer in removed:
            return removed[layer]
        inner = getattr(layer, "linear", None)
        if inner is not None and inner in removed:
            return removed[inner]
    return None


def kept_channels(total: int, removed) -> torch.Tensor | None:
    """Boolean mask of which of ``total`` channels are kept once ``removed`` went (None when an index is
    outside them: the layer was not what the caller thought)."""
    kept = torch.ones(total, dtype=torch.bool)
    if removed is None or not len(removed):
        return kept
    idxs = torch.as_tensor(removed, dtype=torch.long)
    if int(idxs.min()) < 0 or int(idxs.max()) >= total:
        return None
    kept[idxs] = False
    return kept


def kept_mask(layer: nn.Module, removed) -> torch.Tensor:
    """Which of a layer's output channels before this prune are kept (all, when it lost none now)."""
    count = len(removed) if removed is not None else 0
    return kept_channels(out_width(layer) + count, removed)


def kept_grid_layout(kept: torch.Tensor, head_axis: int, dim_axis: int) -> tuple[int, int] | None:
    """(heads, channels per head) of a kept-channel grid with heads on ``head_axis`` and head channels on
    ``dim_axis`` (other axes: fused q/k/v blocks), or None when no layout explains it.

    A head is kept when it keeps any channel; every kept head must keep the same number of channels in
    every block, and a removed head must be gone from every block.
    """
    kept = kept.movedim((head_axis, dim_axis), (-2, -1))
    counts = kept.sum(dim=-1).reshape(-1, kept.shape[-2])  # (blocks, heads)
    alive = counts > 0
    if not bool(alive.any()) or not bool((alive == alive[0]).all()):
        return None
    left = counts[:, alive[0]]
    if not bool((left == left.flatten()[0]).all()):
        return None
    return int(alive[0].sum()), int(left.flatten()[0])


def grid_layout(width: int, shape: tuple, head_axis: int, dim_axis: int, removed) -> tuple[int, int] | None:
    """(heads, head size) of a projection laid out as ``shape`` (heads and dims on the given axes, fused
    q/k/v blocks on the others) once ``removed`` went, or None when that does not explain ``width``."""
    if removed is None or not len(removed):
        return None
    total = 1
    for size in shape:
        total *= size
    kept = kept_channels(total, removed)
    if kept is None:
        return None
    layout = kept_grid_layout(kept.view(shape), head_axis, dim_axis)
    blocks = total // (shape[head_axis] * shape[dim_axis])
    return layout if layout is not None and width == blocks * layout[0] * layout[1] else None


def head_layout(width: int, num_heads: int, head_dim: int, removed=None, blocks: int = 1,
                fixed: str = "head_dim") -> tuple[int, int]:
    """(num_heads, head_dim) of a projection holding ``blocks`` x heads x head_dim channels, now ``width`` wide.

    ``removed`` (indices into the old ``blocks * num_heads * head_dim`` channels) tells fewer heads from
    narrower heads exactly. Without it the size the family's forward spells out stays (``fixed``: the
    graph lets only the reshape dim written as -1, or the innermost one, shrink): ``view(..., -1,
    head_dim)`` keeps ``"head_dim"``, ``reshape(..., num_heads, head_dim)`` and ``reshape(..., num_heads,
    -1)`` keep ``"num_heads"``. A width no layout explains leaves both unchanged, so the forward fails
    loudly instead of regrouping channels silently.
    """
    if width == blocks * num_heads * head_dim:
        return num_heads, head_dim
    layout = grid_layout(width, (blocks, num_heads, head_dim), 1, 2, removed)
    if layout is not None:
        return layout
    per_block, rest = divmod(width, blocks)
    if rest == 0 and fixed == "head_dim" and per_block % head_dim == 0:
        return per_block // head_dim, head_dim
    if rest == 0 and fixed == "num_heads" and per_block % num_heads == 0:
        return num_heads, per_block // num_heads
    return num_heads, head_dim
