"""One registry of size attributes and layer roles, read by every part of the library."""
from torch import nn

import structprune as tp
from structprune.importance.elementwise import DEFAULT_TARGET_TYPES
from structprune.layers.registry import (
    FORWARD_SIZE_NAMES, LAYER_SIZE_NAMES, RECORDED_SIZE_NAMES, SIZE_ATTRIBUTES, LayerRole, layer_types,
    resolve_layer_types,
)
from structprune.pruner.regularizer import DEFAULT_REG_TYPES, RegularizerEngine


def test_every_reader_takes_its_attribute_list_from_the_registry():
    from structprune.graph.build import LAYER_SIZE_NAMES as traced
    from structprune.pruner.diagnose import SIZE_NAMES
    from structprune.serialization import RECORDED_ATTRIBUTES

    assert traced is LAYER_SIZE_NAMES and RECORDED_ATTRIBUTES is RECORDED_SIZE_NAMES and SIZE_NAMES is FORWARD_SIZE_NAMES
    names = [a.name for a in SIZE_ATTRIBUTES]
    assert len(names) == len(set(names))
    # what a layer's pruning function rewrites is saved with the pruned model
    assert set(LAYER_SIZE_NAMES) <= set(RECORDED_SIZE_NAMES)
    assert {"out_channels", "in_features", "num_features", "normalized_shape", "groups"} <= set(RECORDED_SIZE_NAMES)
    assert {"num_heads", "head_dim", "intermediate_size"} <= set(FORWARD_SIZE_NAMES)


def test_roles_add_imported_linear_like_layers_only_to_their_defaults():
    from transformers.pytorch_utils import Conv1D

    for role in (LayerRole.ROOT, LayerRole.SCORED, LayerRole.REGULARIZED):
        assert Conv1D in layer_types(role)
    assert layer_types(LayerRole.SCALED_NORM) == (nn.modules.batchnorm._BatchNorm,)
    assert Conv1D in resolve_layer_types(DEFAULT_TARGET_TYPES, LayerRole.SCORED)
    assert resolve_layer_types((nn.Linear,), LayerRole.SCORED) == (nn.Linear,)
    assert Conv1D in RegularizerEngine(DEFAULT_REG_TYPES).target_types
    assert RegularizerEngine((nn.Linear,)).target_types == (nn.Linear,)
    assert Conv1D in tp.layers.default_root_types()
    from structprune.layers.registry import ROOT_TYPES, default_root_types

    assert default_root_types() == layer_types(LayerRole.ROOT) and ROOT_TYPES == (nn.modules.conv._ConvNd, nn.Linear, nn.LSTM, tp.layers.ExpertWidth)
