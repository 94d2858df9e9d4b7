"""What the graph tells the outside after applying a group, so model families never live in the graph.

Code that keeps model attributes in step with pruning (``structprune.adapters`` for transformers, timm
and torchvision families) registers a factory with :func:`register_graph_hook`. Each graph build asks
every factory about its model once; the :class:`ModelHook` it returns names the size attributes it
rewrites (the trace marks them as followed, or as formulas of layer widths) and is called after every
applied group with the output channels each layer just lost.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .side import Side


@dataclass
class ModelHook:
    """One registered hook, attached to one model."""

    #: called after each applied group with ``{layer: removed output channels}`` (see :func:`removed_outputs`)
    after_apply: Callable[[dict], None]
    #: ``(module, attribute names)``: int attributes the hook rewrites that a forward may spell out in a
    #: reshape; during the trace they are marked as following the pruning
    follows: list = field(default_factory=list)
    #: ``(module, ((name, formula), ...))``: int attributes that are a formula of layer widths (ultralytics
    #: C2PSA's ``c = cv1.conv.out_channels // 2``); the trace swaps in the formula evaluated on the layers'
    #: traced sizes, so the graph evaluates the attribute exactly for any removal
    derives: list = field(default_factory=list)


HookFactory = Callable[[nn.Module], "ModelHook | None"]
_FACTORIES: list[HookFactory] = []


def register_graph_hook(factory: HookFactory) -> None:
    """Ask ``factory(model)`` for a :class:`ModelHook` (or None) whenever a graph is built for a model."""
    if factory not in _FACTORIES:
        _FACTORIES.append(factory)


def unregister_graph_hook(factory: HookFactory) -> None:
    """Stop asking ``factory``; graphs built before keep the hooks they attached."""
    if factory in _FACTORIES:
        _FACTORIES.remove(factory)


def hooks_for(model: nn.Module) -> list[ModelHook]:
    """The hooks every registered factory attaches to ``model``, in registration order."""
    return [hook for hook in (factory(model) for factory in _FACTORIES) if hook is not None]


def removed_outputs(group) -> dict:
    """{layer: removed output channel indices} of a group about to be (or just) pruned, in the numbering
    the group uses (current channels before the prune); what ``after_apply`` hooks receive."""
    removed = {}
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.Module) and item.side is Side.OUT:
            removed[module] = torch.as_tensor(item.idxs, dtype=torch.long)
    return removed
