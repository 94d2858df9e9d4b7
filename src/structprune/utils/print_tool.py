"""Show how pruning changed a model, module by module.

Typical use::

    before_pruning(model)        # remember every parameter shape
    pruner.step()                # ... prune ...
    report = after_pruning(model)  # prints and returns the changed modules

Each changed module yields one line, the ``weight`` change first and
without a name, other parameters named::

    conv1: (16, 3, 3, 3) -> (8, 3, 3, 3), bias: (16,) -> (8,)

A shape of ``-`` marks a module or parameter that exists on one side only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ShapeSnapshot", "take_snapshot", "before_pruning", "after_pruning", "diff_snapshots"]

Shape = tuple[int, ...]

# Where before_pruning leaves its snapshot. A plain (non-tensor) attribute is
# invisible to state_dict(), parameters() and the module repr.
_SNAPSHOT_ATTR = "_structprune_shape_snapshot"


@dataclass(frozen=True)
class ShapeSnapshot:
    """Parameter shapes of a model: ``{module path: {param name: shape}}``."""

    shapes: dict[str, dict[str, Shape]]
    num_params: int


def take_snapshot(model: nn.Module) -> ShapeSnapshot:
    """Record the shape of every parameter, grouped by the module that owns it."""
    shapes: dict[str, dict[str, Shape]] = {}
    for path, module in model.named_modules():
        # recurse=False: each parameter is listed once, under its owner.
        own = {name: tuple(p.shape) for name, p in module.named_parameters(recurse=False)}
        if own:
            shapes[path] = own
    num_params = sum(p.numel() for p in model.parameters())
    return ShapeSnapshot(shapes=shapes, num_params=num_params)


def before_pruning(model: nn.Module) -> ShapeSnapshot:
    """Snapshot the parameter shapes, store it on ``model`` and return it."""
    snapshot = take_snapshot(model)
    setattr(model, _SNAPSHOT_ATTR, snapshot)
    return snapshot


def _format_shape(shape: Shape | None) -> str:
    return "-" if shape is None else str(shape)


def _param_order(names: set[str]) -> list[str]:
    # "weight" first: it carries the interesting information (channel counts).
    return sorted(names, key=lambda name: (name != "weight", name))


def _module_line(path: str, old: dict[str, Shape], new: dict[str, Shape]) -> str | None:
    """One report line for a module, or None if none of its parameters changed."""
    items = []
    for name in _param_order(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        change = f"{_format_shape(before)} -> {_format_shape(after)}"
        items.append(change if name == "weight" else f"{name}: {change}")
    if not items:
        return None
    return f"{path or '<root>'}: " + ", ".join(items)


def diff_snapshots(old: ShapeSnapshot, new: ShapeSnapshot) -> list[str]:
    """Lines describing every module whose parameter shapes differ, in model order."""
    # Modules of the new model keep their order; removed ones follow.
    paths = list(new.shapes) + [path for path in old.shapes if path not in new.shapes]
    lines = (_module_line(p, old.shapes.get(p, {}), new.shapes.get(p, {})) for p in paths)
    return [line for line in lines if line is not None]


def _summary(old: ShapeSnapshot, new: ShapeSnapshot) -> str:
    change = (new.num_params - old.num_params) / old.num_params * 100 if old.num_params else 0.0
    return f"Params: {old.num_params:,} -> {new.num_params:,} ({change:+.2f}%)"


def after_pruning(model: nn.Module, do_print: bool = True, snapshot: ShapeSnapshot | None = None) -> str:
    """Return (and print, if ``do_print``) the per-module shape changes since the snapshot.

    torch_pruning's signature: ``after_pruning(model, do_print=True)``. ``snapshot`` defaults to the one
    stored on ``model`` by :func:`before_pruning`. The report lists only modules with a changed
    parameter shape, followed by a line with the total parameter count before and after.
    """
    if snapshot is None:
        snapshot = getattr(model, _SNAPSHOT_ATTR, None)
        if snapshot is None:
            raise RuntimeError("no snapshot: call before_pruning(model) before after_pruning(model)")
    current = take_snapshot(model)
    lines = diff_snapshots(snapshot, current) or ["No parameter shape changed."]
    report = "\n".join([*lines, _summary(snapshot, current)])
    if do_print:
        print(report)
    return report
