"""structprune: structural pruning for PyTorch."""
from . import adapters, function, importance, integrations, layers, pruner, utils
from .graph import Dependency, DependencyGraph, Group, Node
from .layers import *  # noqa: F401,F403  (prune_* functions and BasePruningFunc)
from .layers import BasePruningFunc
# torch_pruning exports its pruners at the top too (tp.MetaPruner); they win over the same-named layer
# pruning classes, which stay under tp.function (= tp.pruner.function) and tp.layers
from .pruner import BasePruner, BNScalePruner, GroupNormPruner, GrowingRegPruner, MagnitudePruner, MetaPruner
from .serialization import load_pruned, load_state_dict, save_pruned, state_dict

__version__ = "0.1.0"
