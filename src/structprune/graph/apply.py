"""Applying a group: validate every layer, prune them all, undo all on failure; history and checkpoints."""
from __future__ import annotations

import torch

from ..layers.base import pruning_once, validate_idxs
from .discovery import IN, OUT
from .group import Group, Node
from .hooks import removed_outputs
from .side import Side
from .snapshot import Checkpoint, Snapshot


class GraphApplier:
    """Mixin of DependencyGraph: apply groups, record them, undo them."""

    # -- applying --------------------------------------------------------------------------------------
    def _apply_group(self, group: Group):
        for k, item in enumerate(group):
            module = item.dep.target.module
            pruner = item.dep.target.pruner
            total = self._channels(item.dep.target, item.side)
            if total is not None:
                validate_idxs(module, group.item_tensors(k)[0], total, item.side.word, name=item.dep.target.name)
            if IN in item.dep.target.sides:  # a layer with inputs of its own: grouped convs check evenness
                try:
                    pruner.check_structure(module, item.idxs, item.side.word)
                except ValueError as error:
                    raise ValueError(f"{item.dep.target.name}: {error}") from None
        snapshot = Snapshot([item.dep.target.module for item in group])
        try:
            with pruning_once():
                for item in group:
                    item.dep(item.idxs)
        except BaseException:
            snapshot.restore()
            raise
        removed = removed_outputs(group)
        for hook in self._hooks:
            hook.after_apply(removed)
        for k, item in enumerate(group):
            key = (item.dep.target.module, item.side)
            if key in self._alive:
                keep = torch.ones(len(self._alive[key]), dtype=torch.bool)
                keep[group.item_tensors(k)[0]] = False
                alive = self._alive[key][keep]
                self._alive[key] = alive
                original_count = self._original_counts[key]
                position_map = torch.full((original_count,), -1, dtype=torch.long)
                position_map[alive] = torch.arange(len(alive))
                self._position_maps[key] = position_map

    def checkpoint(self) -> Checkpoint:
        """The model's state and the graph's channel bookkeeping now; ``restore()`` undoes every group
        pruned since."""
        alive, position_maps, history = dict(self._alive), dict(self._position_maps), len(self._history)

        def restore_graph():
            self._alive = dict(alive)
            self._position_maps = dict(position_maps)
            del self._history[history:]

        return Checkpoint(Snapshot([self.model]), restore_graph)

    def _record(self, node: Node, side: Side, idxs):
        self._history.append((node.name, side is OUT, [int(i) for i in idxs]))

    def pruning_history(self) -> list:
        return list(self._history)

    def load_pruning_history(self, history):
        named = dict(self.model.named_modules())
        params = dict(self.model.named_parameters())
        inner = {node.name: module for module, node in self.module2node.items() if node.name not in named}
        for name, is_out, idxs in history:
            module = named.get(name, params.get(name, inner.get(name)))
            if module is None:
                raise KeyError(f"pruning history names '{name}', which the model does not have")
            self.get_group_by_side(module, OUT if is_out else IN, idxs).prune(record_history=True)
