"""Pruning by hand through a pruner: one layer by ratio or indices, and the pruning history."""
from __future__ import annotations

import torch
from torch import nn

from ..graph.side import side_of_pruning_fn
from ..layers.base import as_index_tensor
from .options import check_ratio


class ManualPruningMixin:
    """Mixin of BasePruner: manual pruning and the graph's history."""

    # -- manual and history --------------------------------------------------------------------------
    def manual_prune(self, layer: nn.Module, pruning_fn, pruning_ratios_or_idxs) -> None:
        """torch_pruning's name for :meth:`manual_prune_width`."""
        self.manual_prune_width(layer, pruning_fn, pruning_ratios_or_idxs)

    def manual_prune_width(self, layer: nn.Module, pruning_fn, ratio_or_idxs) -> None:
        """Prune a layer's group by a ratio (lowest importance first) or by explicit indices."""
        if isinstance(ratio_or_idxs, float):
            check_ratio("ratio", ratio_or_idxs)
            node = self.DG.module2node[layer]
            total = self.DG._channels(node, side_of_pruning_fn(pruning_fn))
            group = self.DG.get_pruning_group(layer, pruning_fn, list(range(total)))
            imp = self.estimate_importance(group)
            idxs = torch.argsort(imp)[: int(total * ratio_or_idxs)].tolist()
        else:
            idxs = as_index_tensor(ratio_or_idxs).tolist()
        self.DG.get_pruning_group(layer, pruning_fn, idxs).prune()

    def pruning_history(self):
        return self.DG.pruning_history()

    def load_pruning_history(self, history) -> None:
        self.DG.load_pruning_history(history)
