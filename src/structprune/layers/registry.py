"""What the library knows about layers beyond their channel axes: size attributes and layer roles.

One table of the integer size attributes modules hold (who rewrites each, which are saved with a pruned
model, which family code reads in forward) and one table of the layer types each part of the library
works on by default. Every reader (tracing, serialization, the pruner's diagnosis, group roots,
importance, regularization) takes its list from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import nn

from .declarations import SCORED_TYPES, optional_linear_types
from .moe import ExpertWidth


@dataclass(frozen=True)
class SizeAttribute:
    name: str
    #: a declared layer's pruning function rewrites it (``conv.in_channels``): code that spells it out in a
    #: reshape or split follows the pruning, so the trace marks it as followed
    layer: bool = False
    #: saved in a pruned model's plan and set back when a fresh model loads it
    recorded: bool = False
    #: read in forward by attention and MLP code (transformers, timm, torchvision, custom): named when a
    #: pruned model stops running and it still holds a pruned width
    read_in_forward: bool = False
    #: counts a layer's input channels (the other layer attributes count its output channels): the graph
    #: evaluates a traced ``conv.in_channels`` against the removal on the layer's input side
    counts_inputs: bool = False


def _attributes(*rows: tuple) -> tuple[SizeAttribute, ...]:
    return tuple(SizeAttribute(name, "L" in flags, "R" in flags, "F" in flags, "I" in flags) for name, flags in rows)


#: Every size attribute the library reads or writes. L: rewritten by layer pruning functions;
#: R: recorded in saved plans; F: read in forward by family code; I: counts a layer's input channels.
#: Order is the order of diagnoses.
SIZE_ATTRIBUTES: tuple[SizeAttribute, ...] = _attributes(
    ("num_heads", "RF"), ("num_attention_heads", "F"), ("num_key_value_heads", "F"), ("n_head", "F"),
    ("n_heads", "F"), ("head_dim", "RF"), ("attention_head_size", "F"), ("all_head_size", "F"),
    ("hidden_size", "LRF"), ("hidden_dim", "F"), ("embed_dim", "LRF"), ("n_embd", "F"), ("dim", "F"),
    ("inner_dim", "F"), ("intermediate_size", "F"), ("split_size", "F"), ("kdim", "RF"), ("vdim", "RF"),
    ("width", "F"), ("channels", "F"), ("num_channels", "LRF"), ("in_dim", "F"), ("out_dim", "F"),
    ("features", "F"), ("num_features", "LRF"),
    ("in_channels", "LRI"), ("out_channels", "LR"), ("in_features", "LRI"), ("out_features", "LR"),
    ("embedding_dim", "LR"), ("input_size", "LRI"), ("groups", "R"), ("normalized_shape", "R"),
    ("num_parameters", "R"),
)

#: size attributes the pruning functions of declared layers rewrite
LAYER_SIZE_NAMES: tuple[str, ...] = tuple(a.name for a in SIZE_ATTRIBUTES if a.layer)
#: layer size attributes that count a layer's input channels (the rest count its output channels)
INPUT_SIZE_NAMES: frozenset[str] = frozenset(a.name for a in SIZE_ATTRIBUTES if a.layer and a.counts_inputs)
#: size attributes recorded for every module that has them in a saved plan (and restored on load); only
#: plain instance attributes holding an int or a sequence of ints are recorded
RECORDED_SIZE_NAMES: tuple[str, ...] = tuple(a.name for a in SIZE_ATTRIBUTES if a.recorded)
#: size attributes family code reads in forward
FORWARD_SIZE_NAMES: tuple[str, ...] = tuple(a.name for a in SIZE_ATTRIBUTES if a.read_in_forward)


class LayerRole(Enum):
    """What part of the library works on a layer type by default."""

    #: roots channel groups: the layers whose output channels a pruner counts
    ROOT = "roots channel groups"
    #: scored by the parameter-based importance criteria
    SCORED = "scored by importance"
    #: penalized by the regularizing pruners (growing regularization, group lasso)
    REGULARIZED = "regularized"
    #: the scaling factors network slimming penalizes and scores
    SCALED_NORM = "scaled norm"


#: The torch layer types of each role; Linear-like types of optional libraries (transformers Conv1D, fused
#: MoE experts) join every role holding nn.Linear once their library is imported, and the inner layers of
#: MoE experts are scored and regularized like Linear (see :func:`layer_types`).
ROLE_TYPES: dict[LayerRole, tuple[type, ...]] = {
    LayerRole.ROOT: (nn.modules.conv._ConvNd, nn.Linear, nn.LSTM, ExpertWidth),
    LayerRole.SCORED: (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm),
    LayerRole.REGULARIZED: (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm),
    LayerRole.SCALED_NORM: (nn.modules.batchnorm._BatchNorm,),
}


def layer_types(role: LayerRole) -> tuple[type, ...]:
    """The layer types of ``role`` now: its torch types plus the imported Linear-like optional types."""
    base = ROLE_TYPES[role]
    if nn.Linear not in base:
        return base
    inner = SCORED_TYPES if role in (LayerRole.SCORED, LayerRole.REGULARIZED) else ()  # MoE experts' widths
    return base + optional_linear_types() + tuple(t for t in inner if t not in base)


def resolve_layer_types(types, role: LayerRole) -> tuple[type, ...]:
    """``types`` a user passed for ``role``: the role's default tuple means the role (optional types
    included), anything else is taken as given."""
    types = tuple(types)
    return layer_types(role) if types == ROLE_TYPES[role] else types


#: Layer types that root channel groups by default (kept under its older name)
ROOT_TYPES: tuple[type, ...] = ROLE_TYPES[LayerRole.ROOT]


def default_root_types() -> tuple[type, ...]:
    """``ROOT_TYPES`` plus the imported Linear-like optional types: the default group roots."""
    return layer_types(LayerRole.ROOT)
