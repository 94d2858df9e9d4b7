"""Whether the sizes a forward spells out still fit the tensors after a removal (see sizes.py).

A reshape asks for the sizes its arguments evaluate to; after a removal its input has fewer elements
along some dims. The removal is fine exactly when every size the reshape asks for equals the size the
pruned tensor needs along that dim (``-1`` and adapter-rewritten attributes adjust themselves). This
replaces a rule of thumb (the dim written as -1, or else the innermost one, may shrink) that let
``reshape(B, N, self.head_dim)`` and ``reshape(B, N, 384)`` through and broke the model at run time.
"""
from __future__ import annotations

import torch

from ..layers.registry import INPUT_SIZE_NAMES
from .refusal import Refusal, RefusalKind
from .side import Side
from .signatures import shape_argument
from .sizes import FREE, evaluate, shape_reads

#: ops whose arguments are the sizes of their output
RESHAPES = {"view", "reshape"}


class RemovalSizes:
    """The sizes of traced values and layers once one discovered removal is applied."""

    def __init__(self, graph, states: dict, deps: dict):
        self.graph = graph
        self.by_value: dict = {}
        for (key, dims), state in states.items():
            self.by_value.setdefault(key, []).append((dims, state))
        self.removed_channels = {}
        for (node, side), state in deps.items():
            self.removed_channels[(node.module, side)] = len(torch.unique(state.idxs))
        self._shrunk: dict = {}

    def removed_along(self, key, dim: int) -> int:
        """How many positions along ``dim`` of value ``key`` the removal takes away entirely."""
        if (key, dim) in self._shrunk:
            return self._shrunk[(key, dim)]
        shape = self.graph.values[key].shape
        removed = 0
        for dims, state in self.by_value.get(key, ()):
            if dim in dims:
                removed = max(removed, _removed_along(shape, dims, state, dim))
        self._shrunk[(key, dim)] = removed
        return removed

    def new_shape(self, key) -> tuple:
        shape = self.graph.values[key].shape
        if key not in self.by_value:
            return tuple(shape)
        return tuple(size - self.removed_along(key, dim) for dim, size in enumerate(shape))

    def shape_size(self, read):
        if read.key is None or read.key not in self.by_value:
            return None
        return read.value - self.removed_along(read.key, read.dim)

    def layer_size(self, module, name, old):
        node = self.graph.module2node.get(module)
        if node is None:
            return None
        side = Side.IN if name in INPUT_SIZE_NAMES and not node.pruner.is_coupled(module) else Side.OUT
        removed = self.removed_channels.get((module, side))
        if removed is None:
            return None
        if self.graph._original_counts.get((module, side)) != old:
            return FREE  # an attribute that is not the width itself (the layer's pruning function updates it)
        return old - removed

    def evaluate(self, value):
        return evaluate(value, self.shape_size, self.layer_size)


def _removed_along(shape, dims, state, dim: int) -> int:
    sizes = [shape[d] for d in dims]
    if len(dims) == 1:
        return len(state.idxs)
    kept = torch.ones(sizes, dtype=torch.bool).reshape(-1)
    kept[state.idxs] = False
    kept = kept.view(sizes)
    axis = dims.index(dim)
    others = tuple(d for d in range(len(sizes)) if d != axis)
    return int((~kept.any(dim=others)).sum())


def requested_shape(call) -> list | None:
    """The sizes a view/reshape asks for, as written (ints, TracedSizes, -1), or None when not sizes."""
    requested = shape_argument(call)
    return requested if all(isinstance(a, int) for a in requested) else None


def reshape_check(call, sizes: RemovalSizes) -> tuple[Refusal | None, list]:
    """(why the reshape ``call`` would not fit its pruned input or None, its size ties).

    A size computed from another tensor's shape (``reshape(B, N, C)`` or ``C // self.num_heads`` with
    ``B, N, C = x.shape``: timm BEiT, VOLO, EdgeNeXt, PVT attention) ties the reshaped width to that
    tensor's width. A removal that changes only one side of a tie is not refused: another group (the one
    that prunes ``x``) can change the other side to match, and the pruner checks that every tie it
    touched holds over the whole step. Each tie is ``((output, dim), size, dim size, removed from the
    dim, ((read, removed from the read width), ...))``; removals that change both sides and still do
    not fit are refused here.
    """
    if call.name not in RESHAPES or not call.outputs or call.outputs[0] not in sizes.graph.values:
        return None, []
    requested = requested_shape(call)
    output = call.outputs[0]
    shape = sizes.graph.values[output].shape
    if requested is None or len(requested) != len(shape):
        return None, []
    needed = sizes.new_shape(output)
    ties = []
    for dim, size in enumerate(requested):
        if size == -1 and not hasattr(size, "expr"):
            continue
        new = sizes.evaluate(size)
        if new is FREE:
            continue
        reads = _computed_reads(size, output, sizes.graph)
        if reads:
            removed = tuple((read, sizes.removed_along(read.key, read.dim) if read.key in sizes.by_value else 0)
                            for read in reads)
            reads_change = any(amount for _, amount in removed)
            if new == needed[dim] or reads_change != (needed[dim] != shape[dim]):
                ties.append(((output, dim), size, shape[dim], shape[dim] - needed[dim], removed))
                continue
        elif new == needed[dim]:
            continue
        if hasattr(size, "expr"):
            origin = f"computed from sizes read while tracing, {new} after this removal"
        else:
            origin = "a number, or an attribute no adapter rewrites"
        return Refusal(
            RefusalKind.SPELLED_OUT_SIZE, call.name,
            f"'{call.name}' to {list(shape)} spells out the size of dim {dim} ({int(size)}: {origin}), but after "
            f"this removal that dim holds {needed[dim]}; only a size written as -1, read from the data (x.shape) "
            f"or rewritten by an adapter may change"
        ), []
    return None, ties


def _computed_reads(size, output, graph) -> list:
    """The shapes a size reads from tensors the model computes (not inputs or constants, which keep
    their width), other than the reshape's own output."""
    reads = []
    for read in shape_reads(size):
        if isinstance(read, tuple) or read.key is None or read.key == output or read.key not in graph.values:
            continue
        if graph.values[read.key].producer is not None and all(read is not other for other in reads):
            reads.append(read)
    return reads


def size_dependents(graph) -> dict:
    """{value key or layer module: reshapes whose sizes read it}, found once per graph."""
    found: dict = {}
    for call in graph.calls:
        if call.kind != "function" or call.name not in RESHAPES:
            continue
        for read in shape_reads((call.args, call.kwargs)):
            owner = read[1] if isinstance(read, tuple) else read.key
            if owner is not None:
                found.setdefault(owner, []).append(call)
    return found


def size_refusals(graph, states: dict, deps: dict) -> tuple[RemovalSizes, list[Refusal], list]:
    """Every reshape the removal reaches, or whose sizes it changes, that would not fit afterwards, and
    the size ties it leaves for other groups to balance (see reshape_check)."""
    sizes = RemovalSizes(graph, states, deps)
    dependents = getattr(graph, "_size_dependents", None)
    if dependents is None:
        dependents = graph._size_dependents = size_dependents(graph)
    calls = {}
    for key in sizes.by_value:
        producer = graph.values[key].producer
        if producer is not None and producer[0].name in RESHAPES:
            calls[id(producer[0])] = producer[0]
        for call in dependents.get(key, ()):
            calls[id(call)] = call
    for module, _ in sizes.removed_channels:
        for call in dependents.get(module, ()):
            calls[id(call)] = call
    refusals, ties = [], []
    for call in sorted(calls.values(), key=lambda call: call.order):
        reason, call_ties = reshape_check(call, sizes)
        if reason is not None:
            refusals.append(reason)
        ties.extend(call_ties)
    return sizes, refusals, ties
