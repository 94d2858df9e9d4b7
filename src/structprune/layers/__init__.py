"""Layer declarations and the pruning functions built from them."""
from .axes import Axis
from .base import BasePruningFunc
from .declarations import (
    DEFAULT_PRUNERS,
    OPTIONAL_LINEAR_LIKE,
    OPTIONAL_PRUNERS,
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
    TorchvisionMaxVitAttentionPruner,
    TorchvisionSwinAttentionPruner,
    find_pruner,
    optional_linear_types,
    register_optional_layers,
    scored_types,
)
from .registry import ROOT_TYPES, default_root_types  # size attributes and layer roles: layers/registry.py
from .moe import ExpertCount, ExpertsPruner, ExpertWidth, RouterPruner
from .functions import *  # noqa: F401,F403  (the documented prune_* names)
