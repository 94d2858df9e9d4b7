"""structprune: structural pruning for PyTorch."""
from . import adapters, adapters_moe, importance, layers, pruner, utils
from .graph import Dependency, DependencyGraph, Group, Node
from .layers import *  # noqa: F401,F403  (prune_* functions and BasePruningFunc)
from .layers import BasePruningFunc
from .serialization import load_pruned, load_state_dict, save_pruned, state_dict

__version__ = "0.1.0"
