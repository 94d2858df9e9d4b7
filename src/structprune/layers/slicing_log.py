"""How each pruned parameter was sliced, so optimizer state made before pruning can follow it.

Parameters keep their identity when pruned, so an optimizer built before ``step()`` still holds them;
its momentum and Adam moments keep the old shape unless ``step(optimizer=...)`` sliced them. A global
optimizer step pre-hook replays the recorded slices on such state right before the optimizer uses it,
so an optimizer created once before an iterative pruning loop keeps training the right channels.
"""
from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

# id(param) -> [(shape before, dim, kept positions)], oldest first, dropped when the parameter dies (a
# WeakKeyDictionary would compare tensors with ==). Rollbacks are not erased: replay walks back from the
# current shape, so a slice that was undone and replaced is never followed.
_SLICES: dict[int, list] = {}
_HOOK = None


def record_slice(param: torch.Tensor, dim: int, keep: torch.Tensor, old_shape) -> None:
    """Remember that ``param`` (of ``old_shape``) kept ``keep`` along ``dim``."""
    global _HOOK
    if param.is_meta:
        return  # no values, so no optimizer state to follow
    if id(param) not in _SLICES:
        _SLICES[id(param)] = []
        weakref.finalize(param, _SLICES.pop, id(param), None)
    _SLICES[id(param)].append((tuple(old_shape), dim, keep.detach().to("cpu", torch.long)))
    if _HOOK is None:
        _HOOK = register_optimizer_step_pre_hook(_follow_pruned_shapes)


def replay(value: torch.Tensor, param: torch.Tensor, name: str = "state") -> torch.Tensor:
    """``value`` (shaped like ``param`` once was) sliced the way ``param`` was since then."""
    chain = _chain(_SLICES.get(id(param), []), tuple(value.shape), tuple(param.shape))
    if chain is None:
        raise RuntimeError(
            f"optimizer {name} has shape {tuple(value.shape)} but its parameter is now {tuple(param.shape)}, "
            f"and no recorded pruning leads from one to the other; pass optimizer=... to pruner.step() or "
            f"create the optimizer after pruning"
        )
    for _, dim, keep in chain:
        value = value.index_select(dim, keep.to(value.device)).contiguous()
    return value


def _chain(records: list, start: tuple, end: tuple) -> list | None:
    steps, shape = [], end
    for old_shape, dim, keep in reversed(records):
        if shape == start:
            break
        after = list(old_shape)
        after[dim] = len(keep)
        if tuple(after) != shape:
            continue  # undone by a rollback, or another branch of history
        steps.append((old_shape, dim, keep))
        shape = old_shape
    return list(reversed(steps)) if shape == start else None


def _follow_pruned_shapes(optimizer, args, kwargs) -> None:
    if not _SLICES:
        return
    for param_group in optimizer.param_groups:
        for param in param_group["params"]:
            if id(param) not in _SLICES:
                continue
            state = optimizer.state.get(param)
            for name, value in (state or {}).items():
                if (isinstance(value, torch.Tensor) and value.dim() == param.dim() and value.dim() > 0
                        and value.shape != param.shape):
                    state[name] = replay(value, param, name)
