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
)
from .registry import (
    FORWARD_SIZE_NAMES,
    LAYER_SIZE_NAMES,
    RECORDED_SIZE_NAMES,
    ROLE_TYPES,
    ROOT_TYPES,
    SIZE_ATTRIBUTES,
    LayerRole,
    SizeAttribute,
    default_root_types,
    layer_types,
    resolve_layer_types,
)
from .functions import *  # noqa: F401,F403  (the documented prune_* names)
