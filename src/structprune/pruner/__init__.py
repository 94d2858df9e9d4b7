"""Pruners: BasePruner (MetaPruner), MagnitudePruner and the sparse-training pruners."""
from .. import function  # tp.pruner.function is tp.function, as in torch_pruning
from ..layers.base import BasePruningFunc
from .base import BasePruner, MetaPruner
from .compensation import Compensation
from .growing_reg import GrowingRegPruner
from .delta_reg import delta_reg_for
from .schedulers import linear_scheduler
from .sparse import BNScalePruner, GroupNormPruner

MagnitudePruner = BasePruner
