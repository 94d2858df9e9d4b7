"""structprune: structural pruning for PyTorch."""
from . import adapters, layers, pruner, utils
from .graph import Dependency, DependencyGraph, Group, Node
from .layers import *  # noqa: F401,F403  (prune_* functions and BasePruningFunc)
from .layers import BasePruningFunc

__version__ = "0.1.0"
