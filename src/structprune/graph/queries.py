"""Asking a DependencyGraph: the group of any channels, every group of a model, layer widths."""
from __future__ import annotations

from typing import Iterable

from torch import nn

from ..layers.base import BasePruningFunc, as_index_tensor, validate_idxs
from ..layers.declarations import ParameterPruner, find_pruner
from ..layers.registry import LayerRole, layer_types
from .discovery import IN, OUT
from .group import Group, Node, item_axes
from .projection import restricted_walk
from .side import Side, side_of_pruning_fn


class GraphQueries:
    """Mixin of DependencyGraph: groups, checks and layer widths, read from the built graph."""

    # -- groups ----------------------------------------------------------------------------------------
    def get_pruning_group(self, module, pruning_fn, idxs) -> Group:
        """Every (layer, side, indices) that must go with removing ``idxs`` via ``pruning_fn`` on ``module``."""
        # an explicit request: a group whose only refusal is a model output is still complete, and prune()
        # honours it with a warning; the pruners' own planning goes through get_group_by_side
        return self.get_group_by_side(module, side_of_pruning_fn(pruning_fn), idxs, trigger=pruning_fn,
                                      explicit=True)

    def get_group_by_side(self, module, side: Side, idxs, trigger=None, explicit: bool = False) -> Group:
        """Every (layer, side, indices) that must go with removing ``idxs`` from ``side`` of ``module``.

        ``explicit``: the user asked for exactly this removal. Channels that reach a model output still
        refuse the group (``blocked``, and ``check_pruning_group`` says False), but discovery follows them
        past the output, and ``prune()`` removes them with a warning that the output shape changes."""
        node = self.module2node.get(module)
        if node is None:
            if module not in self.module2name and module not in self._param_names:
                raise KeyError(
                    f"{type(module).__name__} does not belong to the traced model: it comes from a different model; "
                    f"build a DependencyGraph for that model, or pass this model's own layer"
                )
            raise KeyError(
                f"{self._name(module)} is not in the dependency graph: it is not a declared layer type or it "
                f"does not take part in the traced forward; register a customized pruner for its type"
            )
        idxs = as_index_tensor(idxs)
        side = node.side_for(Side(side))
        total = self._channels(node, side)
        if total is not None:
            # a group over every channel is fine to inspect and score; pruning it is refused later
            validate_idxs(module, idxs, total, side.word, name=node.name, allow_all=True)
        alive = self._alive.get((module, side))
        original = alive[idxs] if alive is not None and (module, side) in self._position_maps else idxs
        trigger = self._handler(node, side) if trigger is None else trigger
        return self._to_current(self._discover(node, side, original, trigger, explicit=explicit))

    def _chosen_group(self, module, side: Side, idxs) -> Group:
        """``get_group_by_side`` for channels a pruner chose from a layer whose group of all output channels
        is known: when that group's walk went channel by channel, the walk restricted to ``idxs``
        (graph/projection.py) instead of a new one."""
        node = self.module2node.get(module)
        cached = self._all_groups_cache.get(module) if node is not None else None
        walk = getattr(cached, "walk", None)
        if walk is None or Side(side) is not OUT or node.side_for(OUT) is not OUT:
            return self.get_group_by_side(module, side, idxs)
        idxs = as_index_tensor(idxs)
        total = self._channels(node, OUT)
        if total is None or len(idxs) == 0:
            return self.get_group_by_side(module, side, idxs)
        validate_idxs(module, idxs, total, OUT.word, name=node.name, allow_all=True)
        alive = self._alive.get((module, OUT))
        original = alive[idxs] if alive is not None and (module, OUT) in self._position_maps else idxs
        restricted = restricted_walk(walk, original)
        if restricted is None:
            return self.get_group_by_side(module, side, idxs)
        group = self._finish(node, self._handler(node, OUT), restricted.states, restricted.deps, restricted.order, [])
        return self._to_current(group)

    def get_all_groups(self, ignored_layers=None, root_module_types=None, include_blocked: bool = False) -> Iterable[Group]:
        """One group per independent set of coupled channels, rooted at the first layer that owns it.

        Groups whose full channel set cannot be removed (``group.blocked``) are skipped unless
        ``include_blocked``: some of their subsets may still be removable (whole attention heads when
        rotary embeddings pin the head dims).
        """
        ignored = list(ignored_layers or []) + list(self.IGNORED_LAYERS)
        types = tuple(root_module_types) if root_module_types else layer_types(LayerRole.ROOT)
        covered = set()
        for module, node in self.module2node.items():
            if isinstance(module, nn.Parameter) or not isinstance(module, types):
                continue
            if _is_ignored(module, ignored) or (module, OUT) in covered:
                continue
            total = node.pruner.get_out_channels(module)
            if not total:
                continue
            group = self._cached_group(node)
            if len(group[0].idxs) == 0:
                continue
            for item in group:
                # only a one-to-one image of the root is covered: channels reached as whole heads (many
                # channels per root channel) still deserve a group of their own for finer pruning
                if item.side is OUT and len(set(item.root_idxs)) == len(item.root_idxs):
                    covered.add((item.dep.target.module, OUT))
            if group.blocked and not include_blocked:
                continue
            if any(_is_ignored(item.dep.target.module, ignored) and item.side is OUT for item in group):
                continue
            if any(self._owns_ignored_param(item) for item in group):
                continue
            yield group

    def _owns_ignored_param(self, item) -> bool:
        """A group that would slice an ignored parameter (e.g. ``bn.weight``) is left alone."""
        if not self.ignored_params:
            return False
        module = item.dep.target.module
        if isinstance(module, nn.Parameter):
            return any(module is p for p in self.ignored_params)
        return any(any(axis.tensor(module) is p for p in self.ignored_params) for axis in item_axes(item))

    def _cached_group(self, node):
        module = node.module
        if module not in self._all_groups_cache:
            full = self._alive[(module, OUT)]
            self._all_groups_cache[module] = self._discover(node, OUT, full, node.pruner.prune_out_channels)
        return self._to_current(self._all_groups_cache[module])

    def check_pruning_group(self, group: Group) -> bool:
        """True when pruning the group leaves every layer with at least one channel and breaks nothing."""
        if group.blocked:
            return False
        for item in group:
            module = item.dep.target.module
            pruner = item.dep.target.pruner
            total = self._channels(item.dep.target, item.side)
            if total is not None and len(set(item.idxs)) >= total:
                return False
            if IN in item.dep.target.sides:  # a layer with inputs of its own: grouped convs check evenness
                try:
                    pruner.check_structure(module, item.idxs, item.side.word)
                except ValueError:
                    return False
        return True

    def get_pruner_of_module(self, module) -> BasePruningFunc | None:
        if isinstance(module, nn.Parameter):
            node = self.module2node.get(module)
            return node.pruner if node is not None else ParameterPruner()
        return find_pruner(module, self.REGISTERED_PRUNERS)

    def get_out_channels(self, module_or_node):
        module = module_or_node.module if isinstance(module_or_node, Node) else module_or_node
        pruner = self.get_pruner_of_module(module)
        return None if pruner is None else pruner.get_out_channels(module)

    def get_in_channels(self, module_or_node):
        module = module_or_node.module if isinstance(module_or_node, Node) else module_or_node
        pruner = self.get_pruner_of_module(module)
        return None if pruner is None else pruner.get_in_channels(module)

    def _channels(self, node, side):
        pruner = node.pruner
        module = node.module
        return pruner.get_out_channels(module) if side == OUT else pruner.get_in_channels(module)

    def _safe_channels(self, node, side):
        try:
            return self._channels(node, side)
        except (NotImplementedError, AttributeError):
            return None

    def _name(self, module) -> str:
        if isinstance(module, nn.Parameter):
            return self._param_names.get(module, "parameter")
        return self.module2name.get(module, type(module).__name__)


def _is_ignored(module, ignored) -> bool:
    for item in ignored:
        if isinstance(item, type) and not isinstance(module, nn.Parameter) and isinstance(module, item):
            return True
        if item is module:
            return True
    return False
