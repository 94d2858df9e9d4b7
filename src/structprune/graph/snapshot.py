"""Undo support: everything a pruning function may change on a set of modules."""
from __future__ import annotations

from torch import nn

from ..layers.axes import swap_data


class Snapshot:
    """Everything a pruning function may change on the given modules, to restore on failure."""

    def __init__(self, modules):
        self.entries = []
        seen = set()
        for module in modules:
            if id(module) in seen:
                continue
            seen.add(id(module))
            if isinstance(module, nn.Parameter):
                self.entries.append(("param", module, module.data, module.grad))
                continue
            for sub in module.modules():
                for name, param in list(sub._parameters.items()):
                    if param is not None:
                        self.entries.append(("param", param, param.data, param.grad))
                self.entries.append(("buffers", sub, dict(sub._buffers), None))
                self.entries.append(("attrs", sub, {k: v for k, v in sub.__dict__.items()
                                                     if not k.startswith("_")}, None))

    def restore(self):
        for kind, target, data, grad in self.entries:
            if kind == "param":
                swap_data(target, data)
                target.grad = grad
            elif kind == "buffers":
                target._buffers.clear()
                target._buffers.update(data)
            else:
                for key in [k for k in target.__dict__ if not k.startswith("_") and k not in data]:
                    del target.__dict__[key]  # added by the failed pruning function
                target.__dict__.update(data)
