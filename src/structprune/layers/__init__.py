"""Layer declarations and the pruning functions built from them."""
from .axes import Axis
from .base import BasePruningFunc
from .declarations import (
    DEFAULT_PRUNERS,
    ActivationPruner,
    BatchnormPruner,
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
    find_pruner,
)
from .functions import *  # noqa: F401,F403  (the documented prune_* names)
