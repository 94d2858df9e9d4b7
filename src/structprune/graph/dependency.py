"""DependencyGraph: trace once, then find the coupled channels of any layer by walking channel states.

The class is assembled from one mixin per job: ``build.py`` (tracing and building), ``queries.py`` (groups,
checks, layer widths), ``apply.py`` (applying, rollback, history), ``renumber.py`` (original and current
channel numbering) and ``discovery.py`` (walking channel states from a root).
"""
from __future__ import annotations

from types import MappingProxyType

from ..layers.base import BasePruningFunc
from ..layers.declarations import DEFAULT_PRUNERS
from .apply import GraphApplier
from .build import GraphBuilder
from .discovery import GroupFinder
# torch_pruning's dependency module holds these too
from .group import Group, Node, is_in_channel_pruning_fn, is_out_channel_pruning_fn  # noqa: F401
from .queries import GraphQueries
from .renumber import GraphRenumbering


class DependencyGraph(GraphBuilder, GraphQueries, GraphApplier, GraphRenumbering, GroupFinder):
    """Coupled-channel analysis of a model, built from one traced forward pass."""

    def __init__(self):
        self.REGISTERED_PRUNERS: dict = dict(DEFAULT_PRUNERS)
        self.module2node: dict = {}
        self.module2name: dict = {}
        self._history: list = []
        self.IGNORED_LAYERS: list = []
        self.ignored_params: list = []
        self._all_groups_cache: dict = {}

    # -- registration --------------------------------------------------------------------------------
    def register_customized_layer(self, layer_type_or_instance, layer_pruner: BasePruningFunc):
        """Teach the graph a layer: a type (all its instances) or one module instance."""
        self.REGISTERED_PRUNERS[layer_type_or_instance] = layer_pruner

    @property
    def CUSTOMIZED_PRUNERS(self) -> MappingProxyType:
        """The pruners registered beyond the defaults (torch_pruning's name), read-only: register with
        ``register_customized_layer``."""
        return MappingProxyType({key: pruner for key, pruner in self.REGISTERED_PRUNERS.items()
                                 if DEFAULT_PRUNERS.get(key) is not pruner})

    is_out_channel_pruning_fn = staticmethod(is_out_channel_pruning_fn)
    is_in_channel_pruning_fn = staticmethod(is_in_channel_pruning_fn)
