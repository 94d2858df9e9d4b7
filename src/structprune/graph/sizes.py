"""Sizes the forward computes, and what they become once channels are removed.

During the trace every size the forward reads from a tensor (``x.shape``, ``x.size(d)``, ``x.numel()``),
every size attribute of a declared layer (``conv.out_channels``) and every attribute an adapter rewrites
(timm's ``num_heads``) is handed out as a :class:`TracedSize`: an int that remembers where it came from,
and keeps remembering through ``+ - * // %``. A reshape, split or slice the trace records then holds
expressions instead of bare numbers, and the graph can work out, for any removal, the exact sizes the
code will ask for afterwards: ``C // self.num_heads`` with ``C`` read from the data follows the data,
``reshape(B, N, 384)`` and ``self.head_dim`` (no adapter) stay what they are. Comparing those with the
sizes the pruned tensors will have is what tells a removal the code cannot follow from one it can,
without running the model.

Sizes lose their origin where the code leaves integer arithmetic (``int(x)``, ``math.prod``, floats);
they then count as fixed numbers, which may refuse a removal the code would have followed but never
accepts one it cannot.
"""
from __future__ import annotations

import operator

#: what an attribute an adapter rewrites evaluates to: whatever the pruned data needs
FREE = object()

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod}


class ShapeRead:
    """``tensor.shape[dim]`` of one traced value; ``key`` is renumbered when the graph compacts its values."""

    __slots__ = ("key", "dim", "value")

    def __init__(self, key, dim: int, value: int):
        self.key, self.dim, self.value = key, dim, value

    def __repr__(self):
        return f"shape[{self.dim}]={self.value}"


class TracedSize(int):
    """An int that knows how it was computed (see the module docstring). ``expr`` is ``("const", v)``,
    ``("shape", ShapeRead)``, ``("layer", module, name, v)``, ``("followed", v)`` or ``(op, a, b)``."""

    def __new__(cls, value: int, expr: tuple):
        obj = int.__new__(cls, value)
        obj.expr = expr
        return obj

    def __reduce__(self):  # pickles, copies and deep copies see a plain int
        return int, (int(self),)

    def _apply(self, symbol: str, other, reflected: bool = False):
        if not isinstance(other, int):
            method = getattr(int, f"__{'r' if reflected else ''}{_NAMES[symbol]}__")
            return method(int(self), other)
        a, b = (other, self) if reflected else (self, other)
        result = _OPS[symbol](int(a), int(b))
        return TracedSize(result, (symbol, expression(a), expression(b)))

    def __add__(self, other):
        return self._apply("+", other)

    def __radd__(self, other):
        return self._apply("+", other, True)

    def __sub__(self, other):
        return self._apply("-", other)

    def __rsub__(self, other):
        return self._apply("-", other, True)

    def __mul__(self, other):
        return self._apply("*", other)

    def __rmul__(self, other):
        return self._apply("*", other, True)

    def __floordiv__(self, other):
        return self._apply("//", other)

    def __rfloordiv__(self, other):
        return self._apply("//", other, True)

    def __mod__(self, other):
        return self._apply("%", other)

    def __rmod__(self, other):
        return self._apply("%", other, True)

    def __neg__(self):
        return TracedSize(-int(self), ("-", ("const", 0), self.expr))


_NAMES = {"+": "add", "-": "sub", "*": "mul", "//": "floordiv", "%": "mod"}


def expression(value) -> tuple:
    return value.expr if isinstance(value, TracedSize) else ("const", int(value))


def shape_reads(value, found: list | None = None) -> list:
    """Every ShapeRead and layer attribute (as ``("layer", module, name, v)``) inside an argument."""
    found = [] if found is None else found
    if isinstance(value, TracedSize):
        _leaves(value.expr, found)
    elif isinstance(value, slice):
        for bound in (value.start, value.stop, value.step):
            shape_reads(bound, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            shape_reads(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            shape_reads(item, found)
    return found


def _leaves(expr, found):
    kind = expr[0]
    if kind == "shape":
        found.append(expr[1])
    elif kind == "layer":
        found.append(expr)
    elif kind in _OPS:
        _leaves(expr[1], found)
        _leaves(expr[2], found)


def is_traced(value) -> bool:
    """Whether an argument holds any size that may change with a removal (shape read, layer, adapter)."""
    return any(True for _ in _traced_items(value))


def has_followed(value) -> bool:
    """Whether an argument holds an attribute an adapter rewrites (its new value is unknown here)."""
    return any(_mentions_followed(item.expr) for item in _traced_items(value))


def _traced_items(value):
    if isinstance(value, TracedSize):
        yield value
    elif isinstance(value, slice):
        for bound in (value.start, value.stop, value.step):
            yield from _traced_items(bound)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _traced_items(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _traced_items(item)


def follows_pruning(value) -> bool:
    """Whether a size is kept in step with the layer widths: an adapter-rewritten attribute or a layer's
    own size attribute, alone or in arithmetic (a tensor made with it is made at the new width)."""
    return isinstance(value, TracedSize) and _mentions(value.expr, ("followed", "layer"))


def _mentions(expr, kinds) -> bool:
    if expr[0] in kinds:
        return True
    return expr[0] in _OPS and (_mentions(expr[1], kinds) or _mentions(expr[2], kinds))


def _mentions_followed(expr) -> bool:
    if expr[0] == "followed":
        return True
    return expr[0] in _OPS and (_mentions_followed(expr[1]) or _mentions_followed(expr[2]))


def evaluate(value, shape_size, layer_size):
    """The value an argument takes after a removal; FREE where an adapter decides it.

    ``shape_size(read)`` and ``layer_size(module, name, old)`` give the new sizes (``None``: unchanged).
    Containers are rebuilt with their ints evaluated, so a replay can run on them.
    """
    if isinstance(value, TracedSize):
        return _evaluate(value.expr, shape_size, layer_size)
    if isinstance(value, slice):
        bounds = [evaluate(bound, shape_size, layer_size) for bound in (value.start, value.stop, value.step)]
        return FREE if any(bound is FREE for bound in bounds) else slice(*bounds)
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        items = [evaluate(item, shape_size, layer_size) for item in value]
        return FREE if any(item is FREE for item in items) else type(value)(items)
    if isinstance(value, dict):
        items = {key: evaluate(item, shape_size, layer_size) for key, item in value.items()}
        return FREE if any(item is FREE for item in items.values()) else items
    return value


def _evaluate(expr, shape_size, layer_size):
    kind = expr[0]
    if kind == "const":
        return expr[1]
    if kind == "followed":
        return FREE
    if kind == "shape":
        new = shape_size(expr[1])
        return expr[1].value if new is None else new
    if kind == "layer":
        new = layer_size(expr[1], expr[2], expr[3])
        return expr[3] if new is None else new
    a = _evaluate(expr[1], shape_size, layer_size)
    b = _evaluate(expr[2], shape_size, layer_size)
    if a is FREE or b is FREE:
        return FREE
    if kind in ("//", "%") and b == 0:
        return FREE if a == 0 else 0  # a size that became zero: the removal is refused elsewhere
    return _OPS[kind](a, b)


def wrap_shape(result, key, make_read):
    """``x.shape`` / ``x.size()`` as TracedSizes reading value ``key`` (``make_read(key, dim, v)``)."""
    import torch

    return torch.Size([TracedSize(size, ("shape", make_read(key, dim, size))) for dim, size in enumerate(result)])


def wrap_numel(result: int, shape, key, make_read):
    expr = ("const", 1)
    for dim, size in enumerate(shape):
        expr = ("*", expr, ("shape", make_read(key, dim, size)))
    return TracedSize(result, expr)
