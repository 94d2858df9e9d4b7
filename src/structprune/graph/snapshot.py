"""Undo support: everything pruning (or loading a pruned plan) may change on a set of modules.

One snapshot serves a group's rollback, the pruner's checkpoint of a step and the all-or-nothing load of
a saved plan.
"""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from ..layers.axes import swap_data


class Snapshot:
    """Parameter data and gradients, buffers and public attributes of the given modules and of every
    module inside them, each recorded once; :meth:`restore` puts them back.

    Tensors are kept by reference, not copied: pruning and loading swap ``param.data`` and buffers for
    new tensors, they do not write into the old ones.
    """

    def __init__(self, modules: Iterable):
        self.entries: list[tuple] = []
        seen: set[int] = set()
        for module in modules:
            if isinstance(module, nn.Parameter):
                self._add_param(module, seen)
                continue
            for sub in module.modules():
                if id(sub) in seen:
                    continue  # reached again inside another module of the list (a pruner's whole model)
                seen.add(id(sub))
                for param in sub._parameters.values():
                    if param is not None:
                        self._add_param(param, seen)
                # a pruning step may add a parameter (compensation's bias on a bias-free layer)
                self.entries.append(("params", sub, dict(sub._parameters), None))
                self.entries.append(("buffers", sub, dict(sub._buffers), None))
                self.entries.append(("attrs", sub, {k: v for k, v in sub.__dict__.items()
                                                     if not k.startswith("_")}, None))

    def _add_param(self, param: nn.Parameter, seen: set) -> None:
        if id(param) not in seen:  # tied weights are one tensor
            seen.add(id(param))
            self.entries.append(("param", param, param.data, param.grad))

    def restore(self) -> None:
        for kind, target, data, grad in self.entries:
            if kind == "param":
                swap_data(target, data)
                target.grad = grad
            elif kind == "params":
                target._parameters.clear()
                target._parameters.update(data)
            elif kind == "buffers":
                target._buffers.clear()
                target._buffers.update(data)
            else:
                for key in [k for k in target.__dict__ if not k.startswith("_") and k not in data]:
                    del target.__dict__[key]  # added by the failed pruning function
                target.__dict__.update(data)


class Checkpoint:
    """A snapshot of the whole model plus the graph's channel bookkeeping at the same moment, to undo
    every group pruned since (``DependencyGraph.checkpoint``)."""

    def __init__(self, snapshot: Snapshot, restore_graph: Callable[[], None]):
        self.snapshot = snapshot
        self._restore_graph = restore_graph

    def restore(self) -> None:
        self.snapshot.restore()
        self._restore_graph()
