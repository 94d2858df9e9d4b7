"""Original and current channel numbering: the trace describes the model as built."""
from __future__ import annotations

import torch

from .group import Group


class GraphRenumbering:
    """Mixin of DependencyGraph: which original channels are alive, and where they sit now."""

    # The trace describes the model as built; after pruning, its index maps still hold for the channels
    # that remain. Groups are found in original numbering and shown in current numbering.
    def update_index_mapping(self) -> None:
        """torch_pruning's call to refresh concat/split index maps after pruning. Here every group is found
        in the original numbering and translated to the current one when returned, so the maps are never
        stale; the call is accepted so that code written for torch_pruning runs unchanged."""

    def _init_alive(self):
        # original indices still alive, and original -> current position maps, only for pruned sides
        self._position_maps = {}
        self._original_counts = {}
        self._alive = {}
        for module, node in self.module2node.items():
            for side in node.sides:
                total = self._safe_channels(node, side)
                if total is not None:
                    self._alive[(module, side)] = torch.arange(total)
                    self._original_counts[(module, side)] = total

    def _to_current(self, original: Group) -> Group:
        group = Group(self)
        group.blocked = original.blocked
        group.explicit = original.explicit
        group.size_ties = original.size_ties
        group.block_hint = original.block_hint
        root_map = self._position_maps.get((original[0].dep.target.module, original[0].side))
        for k, item in enumerate(original):
            position_map = self._position_maps.get((item.dep.target.module, item.side))
            idxs, roots = original.item_tensors(k)
            keep = None
            if position_map is not None:
                idxs = position_map[idxs]
                keep = idxs >= 0
            if root_map is not None:
                roots = root_map[roots]
                keep = roots >= 0 if keep is None else keep & (roots >= 0)
            if keep is not None and not bool(keep.all()):
                idxs, roots = idxs[keep], roots[keep]
            if len(idxs) or k == 0:
                group.add_dep(item.dep, idxs, roots)
        return group
