"""Name the size attributes a pruned model still holds from before pruning.

When a pruned model stops running, the cause is almost always an integer attribute that the forward
reads (``self.num_heads``, ``self.hidden_size``, ``config.intermediate_size``) and that no adapter updated.
The shape error PyTorch raises names neither; this module does, by comparing those attributes with the
layer widths before and after a prune.
"""
from __future__ import annotations

from torch import nn

from ..layers.registry import FORWARD_SIZE_NAMES

# attribute names attention and MLP code reads in forward (transformers, timm, torchvision, custom code)
SIZE_NAMES = FORWARD_SIZE_NAMES


def size_attributes(model: nn.Module) -> dict:
    """``{(path, name): value}`` for every integer size attribute of every module and of its config."""
    found = {}
    for path, module in model.named_modules():
        owners = [(path, module)]
        config = module.__dict__.get("config")
        if config is not None and not isinstance(config, nn.Module):
            owners.append((f"{path}.config" if path else "config", config))
        for prefix, owner in owners:
            values = vars(owner) if hasattr(owner, "__dict__") else {}
            for name in SIZE_NAMES:
                value = values.get(name)
                if isinstance(value, int) and not isinstance(value, bool):
                    found[(prefix, name)] = value
    return found


def stale_attributes(before: dict, after: dict, widths_before: set, widths_after: set) -> list[str]:
    """Attributes unchanged by the prune whose value is a width that pruning made disappear."""
    gone = widths_before - widths_after
    stale = []
    for key, value in after.items():
        if before.get(key) == value and value in gone:
            path, name = key
            stale.append(f"{path}.{name}={value}" if path else f"{name}={value}")
    return stale


def layer_widths(graph) -> set:
    """Every current output and input width of the graph's layers."""
    widths = set()
    for node in graph.module2node.values():
        for side in ("out", "in"):
            width = graph._safe_channels(node, side)
            if isinstance(width, int):
                widths.add(width)
    return widths


def explain(stale: list[str]) -> str:
    if not stale:
        return ""
    return (f"; attributes still holding a pruned width: {', '.join(stale[:8])}"
            f"{' ...' if len(stale) > 8 else ''} (update them, or register an adapter)")
