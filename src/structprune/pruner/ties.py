"""Size ties between groups: widths a reshape computes from another tensor's shape (graph/size_checks.py).

``x.transpose(1, 2).reshape(B, N, C)`` with ``C`` read from the attention's input ties the attention's
output width to its input width; VOLO's ``C // self.num_heads`` ties its head size to it. Each group that
changes either side records how much it removes from the reshaped dim and from the widths the size
reads; a step keeps the model running exactly when every tie evaluates, with the removals of all the
groups it prunes added up, to the width the reshaped tensor ends up with.
"""
from __future__ import annotations

from collections import defaultdict

from ..graph.sizes import FREE, evaluate


def unbalanced_ties(groups) -> set:
    """Tie keys ((output, dim)) that do not hold once all the given (pruned) groups are applied."""
    removed_from_dim: dict = defaultdict(int)
    removed_from_read: dict = defaultdict(int)
    sizes: dict = {}
    for group in groups:
        reads = {}
        for key, size, dim_size, removed, read_removals in getattr(group, "size_ties", ()):
            removed_from_dim[key] += removed
            sizes[key] = (size, dim_size)
            for read, amount in read_removals:
                reads[id(read)] = amount  # one amount per read and group, however many ties share it
        for read_id, amount in reads.items():
            removed_from_read[read_id] += amount
    unbalanced = set()
    for key, (size, dim_size) in sizes.items():
        new = evaluate(size, lambda read: read.value - removed_from_read.get(id(read), 0), lambda *layer: None)
        if new is not FREE and new != dim_size - removed_from_dim[key]:
            unbalanced.add(key)
    return unbalanced


def touches(group, keys: set) -> bool:
    return any(entry[0] in keys for entry in getattr(group, "size_ties", ()))
