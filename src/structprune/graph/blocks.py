"""Movement ops that move channels and tokens independently, planned on the channels alone.

A window partition, a roll, a head split or a permute of a (tokens x channels) map sends element
(token, channel) to (token', channel') with token' depending only on the token and channel' only on the
channel. Its correspondence (one source index per target element) is then a sum of independent parts:
``T[a, b] = F(a) + G(b) - base`` over groups of target dims, each part moving its own source dims.
What the op does to channels on some dims depends only on the parts that touch those dims, so the
channel plans can be worked out on a correspondence the size of those parts (a few hundred channels)
instead of on every element of the feature map (millions for a video model). This module finds the
parts once per correspondence and builds the reduced problem; channels.py solves it with its usual
plans and renames the dims back. Anything not separable this way (patch merging mixes spatial parity
into channels; a padding reads nothing at some positions) is left to the full-size plans.
"""
from __future__ import annotations

import math

import torch

#: correspondences smaller than this are planned at full size: splitting them would cost more than it saves
_WORTH = 4096


class Parts:
    """Independent parts of one correspondence: ``(target dims, source dims, values over the target dims)``."""

    __slots__ = ("base", "parts", "target_shape", "source_shape", "reduced")

    def __init__(self, base, parts, target_shape, source_shape):
        self.base, self.parts = base, parts
        self.target_shape, self.source_shape = target_shape, source_shape
        self.reduced: dict = {}


def parts_of(correspondence: torch.Tensor, source_shape, any_size: bool = False) -> Parts | None:
    """The independent parts of a correspondence, found once (cached on the tensor), or None. Small
    correspondences get None unless ``any_size``: their full-size plans are cheap."""
    if correspondence.numel() < _WORTH and not any_size:
        return None
    plans = correspondence.__dict__.setdefault("_structprune_plans", {})
    key = ("parts", tuple(source_shape))
    if key not in plans:
        plans[key] = _find_parts(correspondence, tuple(source_shape))
    return plans[key]


def _find_parts(correspondence, source_shape):
    target_shape = tuple(correspondence.shape)
    if correspondence.numel() == 0 or math.prod(source_shape) == 0:
        return None
    base = int(correspondence.reshape(-1)[0])
    if base < 0:
        return None  # a position that reads nothing (padding, another input): the full plans say what it means
    base_digits = unravel(torch.tensor([base]), source_shape)[0]
    parts = []  # [target dims, source dims]
    for dim, size in enumerate(target_shape):
        if size > 1:
            parts.append([{dim}, set()])
    while True:
        for part in parts:
            values = _values(correspondence, part[0])
            if bool((values < 0).any()):
                return None
            part[1] |= _moved(values.reshape(-1), source_shape, base_digits)
        merged = _merge(parts)
        if len(merged) == len(parts):
            break
        parts = merged
    if len(parts) < 2:
        return None
    values = [(tuple(sorted(dims)), tuple(sorted(sources)), _values(correspondence, dims)) for dims, sources in parts]
    if correspondence.__dict__.get("_structprune_view_of_labels"):
        return Parts(base, values, target_shape, source_shape)  # affine in the target coordinates: parts add up
    expected = _sum_of_parts(base, values, tuple(range(len(target_shape))), target_shape)
    if tuple(expected.shape) != target_shape or not bool(torch.equal(expected, correspondence)):
        return None
    return Parts(base, values, target_shape, source_shape)


def mark_views(outputs, labels: torch.Tensor, op_name: str) -> None:
    """Flag the outputs of a replay that are views of its label tensor (permute, unbind, split...): element
    i of such a view reads ``storage_offset + sum(i * stride)``, an affine map whose parts add up without
    a check over every element. Ops that write into their input (``x[i] = y``, ``add_``) change the labels."""
    if writes_in_place(op_name):
        return
    for tensor in outputs:
        if tensor.numel() and tensor.untyped_storage().data_ptr() == labels.untyped_storage().data_ptr():
            tensor.__dict__["_structprune_view_of_labels"] = True


#: operator methods that write into their first operand (``x += y``, ``x[i] = y``); the trace's
#: write of a view back into its base (trace.WRITE_VIEW) writes into a fresh copy, but is one of them too
_WRITING_DUNDERS = frozenset({
    "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__imatmul__",
    "__ilshift__", "__irshift__", "__iand__", "__ior__", "__ixor__", "__setitem__", "__write_view__",
})


def writes_in_place(op_name: str) -> bool:
    """Whether an op of this name writes into an input (``add_``, ``x += y``, ``x[i] = y``); other operator
    methods (``__getitem__``, ``__add__``) end in an underscore too, and write nothing."""
    if op_name.startswith("__") and op_name.endswith("__"):
        return op_name in _WRITING_DUNDERS
    return op_name.endswith("_")


def _values(correspondence, dims):
    """The correspondence along ``dims`` with every other target dim at 0 (a view over ``dims``, in order)."""
    index = tuple(slice(None) if d in dims else 0 for d in range(correspondence.dim()))
    return correspondence[index]


def unravel(flat: torch.Tensor, sizes) -> torch.Tensor:
    """Row-major coordinates (one column per size) of flat positions."""
    coords = []
    for size in reversed(sizes):
        coords.append(flat % size)
        flat = flat // size
    return torch.stack(list(reversed(coords)), dim=1) if coords else flat.view(-1, 0)


def ravel(coords: torch.Tensor, sizes) -> torch.Tensor:
    """Flat row-major positions of coordinates (the inverse of :func:`unravel`)."""
    flat = torch.zeros(coords.shape[0], dtype=torch.long)
    for column, size in enumerate(sizes):
        flat = flat * size + coords[:, column]
    return flat


def _moved(flat, source_shape, base_digits) -> set[int]:
    """Source dims whose digit differs from the base's somewhere in ``flat``."""
    digits = unravel(flat, source_shape)
    return {d for d in range(len(source_shape)) if bool((digits[:, d] != base_digits[d]).any())}


def _merge(parts):
    """Parts that move a common source dim are one part."""
    merged: list = []
    for dims, sources in parts:
        dims, sources = set(dims), set(sources)
        keep = []
        for other in merged:
            if other[1] & sources:
                dims |= other[0]
                sources |= other[1]
            else:
                keep.append(other)
        merged = keep + [[dims, sources]]
    return merged


def reduced(parts: Parts, target_dims=None, source_dims=None):
    """The problem restricted to the parts touching a state: (correspondence, source shape, target dims,
    source dims), dims ascending; the reduced correspondence's dims are the listed target dims, its source's
    the listed source dims. None when the state touches every part or a source dim no part moves."""
    fixed = ()
    if target_dims is not None:
        chosen = [i for i, (dims, _, _) in enumerate(parts.parts) if set(dims) & set(target_dims)]
    else:
        chosen = [i for i, (_, sources, _) in enumerate(parts.parts) if set(sources) & set(source_dims)]
        # a state dim no part moves (the dim an unbind takes apart) is read at one position: it stays
        moved = {d for _, sources, _ in parts.parts for d in sources}
        fixed = tuple(d for d in source_dims if d not in moved)
        if not set(source_dims) <= {d for i in chosen for d in parts.parts[i][1]} | set(fixed):
            return None
    if len(chosen) == len(parts.parts):
        return None
    key = (tuple(chosen), fixed)
    if key not in parts.reduced:
        parts.reduced[key] = _build_reduced(parts, chosen, fixed)
    return parts.reduced[key]


def reduced_with_siblings(parts: Parts, siblings: list, target_dims):
    """:func:`reduced` for one output of an op with several (an unbind, a chunk), and its siblings reduced
    alike. Exact when every sibling moves tokens the same way (same parts, same grids outside the state's):
    along token dims an element is then read by this output exactly where it is read by a sibling. The
    source dims no part moves (the unbound dim) stay: they tell this output's elements from a sibling's."""
    chosen = [i for i, (dims, _, _) in enumerate(parts.parts) if set(dims) & set(target_dims)]
    if len(chosen) == len(parts.parts) or any(other is None for other in siblings):
        return None
    key = ("siblings", tuple(chosen), tuple(id(other) for other in siblings))
    if key not in parts.reduced:
        parts.reduced[key] = _reduce_with_siblings(parts, siblings, chosen)
    return parts.reduced[key]


def _reduce_with_siblings(parts: Parts, siblings: list, chosen: list):
    layout = [(dims, sources) for dims, sources, _ in parts.parts]
    moved = {d for _, sources in layout for d in sources}
    fixed = [d for d in range(len(parts.source_shape)) if d not in moved]
    base = unravel(torch.tensor([parts.base]), parts.source_shape)[0]
    for other in siblings:
        if other.source_shape != parts.source_shape or [(d, s) for d, s, _ in other.parts] != layout:
            return None
        other_base = unravel(torch.tensor([other.base]), parts.source_shape)[0]
        for i, (dims, sources, grid) in enumerate(parts.parts):
            if i in chosen:
                continue
            if not torch.equal(other.parts[i][2] - other.base, grid - parts.base) or \
                    not torch.equal(other_base[list(sources)], base[list(sources)]):
                return None
    own = _build_reduced(parts, chosen, fixed)
    others = [_build_reduced(other, chosen, fixed) for other in siblings]
    return None if own is None else (own, [other[0] for other in others])


def _sum_of_parts(base: int, parts, dims, target_shape) -> torch.Tensor:
    """``base + sum(grid - base)`` over ``parts`` ((target dims, sources, grid) each), broadcast over the
    target dims ``dims`` (ascending): the correspondence those parts alone describe."""
    total = torch.full((), base, dtype=torch.long)
    for own, _, grid in parts:
        total = total + (grid - base).view([target_shape[d] if d in own else 1 for d in dims])
    return total


def _build_reduced(parts: Parts, chosen, fixed=()):
    dims = tuple(sorted(d for i in chosen for d in parts.parts[i][0]))
    moved = [d for i in chosen for d in parts.parts[i][1]]
    if not moved:
        return None
    sources = tuple(sorted(set(moved) | set(fixed)))
    shape = [parts.target_shape[d] for d in dims]
    values = _sum_of_parts(parts.base, [parts.parts[i] for i in chosen], dims, parts.target_shape)
    values = torch.broadcast_to(values, shape).reshape(-1)
    sizes = [parts.source_shape[d] for d in sources]
    small = ravel(unravel(values, parts.source_shape)[:, list(sources)], sizes).view(shape)
    # the reduced problem is planned at full size: looking for parts in it again finds none worth having
    small.__dict__["_structprune_plans"] = {("parts", tuple(sizes)): None}
    return small, tuple(sizes), dims, sources


def passes_through(correspondence: torch.Tensor, source_shape, dim: int) -> bool:
    """Whether the op hands every position of source ``dim`` to one target dim, unchanged and in order,
    and moves nothing else with it: then cutting that dim shorter cannot change which piece gets what."""
    parts = parts_of(correspondence, source_shape, any_size=True)
    if parts is None:
        return False
    stride = math.prod(parts.source_shape[dim + 1:])
    for dims, sources, grid in parts.parts:
        if dim in sources:
            return (sources == (dim,) and len(dims) == 1 and len(grid) == parts.source_shape[dim]
                    and bool(torch.equal(grid - parts.base, torch.arange(len(grid)) * stride)))
    return False
