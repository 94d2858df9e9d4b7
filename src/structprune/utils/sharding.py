"""Telling sharded (FSDP2 / DTensor) parameters apart without importing torch.distributed eagerly."""
from __future__ import annotations


def dtensor_type():
    """DTensor's class, or None where torch.distributed is unavailable."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


def is_sharded(tensor) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def refuse_sharded(model, action: str) -> None:
    """Raise if ``model`` holds sharded parameters: ``action`` needs whole layers (their channels)."""
    for name, param in model.named_parameters():
        if is_sharded(param):
            raise RuntimeError(
                f"{action}: {name} is a sharded DTensor (the model went through FSDP2's fully_shard), and this "
                f"needs whole layers. Build the pruner on the unsharded model before fully_shard and train a sharded "
                f"copy: regularize(sharded) follows its parameters by name; before update_reg() and step(), gather "
                f"the full state into the unsharded model (docs/distributed.md, FSDP2)"
            )
