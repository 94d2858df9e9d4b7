"""``tp.function`` (also ``tp.pruner.function``): the low-level pruning layer under torch_pruning's names.

Every name is the object structprune already has: the per-type pruning classes of ``layers/declarations.py``,
the table the dependency graph reads, and the ``prune_*`` functions of ``layers/functions.py``. Nothing here
is a copy, so subclassing ``tp.function.LinearPruner`` for a custom layer and passing an instance in
``customized_pruners`` works as it does with torch_pruning. What differs is listed in docs/compatibility.md.
"""
from .layers.base import BasePruningFunc
from .layers.declarations import (
    DEFAULT_PRUNERS,
    ActivationPruner,
    BatchnormPruner,
    Conv1DPruner,
    ConvPruner,
    ConvTransposePruner,
    DepthwiseConvPruner,
    EmbeddingPruner,
    GroupNormPruner,
    InstanceNormPruner,
    LayernormPruner,
    LinearPruner,
    LSTMPruner,
    MultiheadAttentionPruner,
    ParameterPruner,
    PReLUPruner,
)
from .layers.functions import *  # noqa: F401,F403  (the prune_*_out_channels / prune_*_in_channels functions)
from .layers.functions import __all__ as _FUNCTIONS

#: layer type -> the pruning-function instance the graph uses for it (torch_pruning keys its PrunerBox by
#: ``ops.OPTYPE`` members instead; structprune has no op-type enum, a layer's class is its key)
PrunerBox = DEFAULT_PRUNERS

__all__ = [
    "BasePruningFunc", "PrunerBox",
    "ConvPruner", "DepthwiseConvPruner", "ConvTransposePruner", "LinearPruner", "BatchnormPruner",
    "InstanceNormPruner", "GroupNormPruner", "LayernormPruner", "PReLUPruner", "EmbeddingPruner",
    "MultiheadAttentionPruner", "LSTMPruner", "ParameterPruner", "Conv1DPruner", "ActivationPruner",
    *_FUNCTIONS,
]
