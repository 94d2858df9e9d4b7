"""Low-level pruning functions under the names torch_pruning users know."""
from __future__ import annotations

from .base import BasePruningFunc  # noqa: F401  (tp.pruner.function.BasePruningFunc: custom layers subclass it)
from .declarations import (  # noqa: F401  (the pruner classes under their torch_pruning names)
    _BN, _CONV, _CONV1D, _CONV_T, _EMBED, _GN, _LINEAR, _LN, _LSTM, _MHA, _PRELU, ActivationPruner, BatchnormPruner,
    Conv1DPruner, ConvPruner, ConvTransposePruner, DepthwiseConvPruner, EmbeddingPruner, GroupNormPruner,
    InstanceNormPruner, LayernormPruner, LinearPruner, LSTMPruner, MultiheadAttentionPruner, ParameterPruner,
    PReLUPruner,
)

__all__ = [
    "prune_conv_out_channels", "prune_conv_in_channels",
    "prune_depthwise_conv_out_channels", "prune_depthwise_conv_in_channels",
    "prune_transposed_conv_out_channels", "prune_transposed_conv_in_channels",
    "prune_linear_out_channels", "prune_linear_in_channels",
    "prune_batchnorm_out_channels", "prune_batchnorm_in_channels",
    "prune_instancenorm_out_channels", "prune_instancenorm_in_channels",
    "prune_groupnorm_out_channels", "prune_groupnorm_in_channels",
    "prune_layernorm_out_channels", "prune_layernorm_in_channels",
    "prune_rmsnorm_out_channels", "prune_rmsnorm_in_channels",
    "prune_prelu_out_channels", "prune_prelu_in_channels",
    "prune_embedding_out_channels", "prune_embedding_in_channels",
    "prune_multihead_attention_out_channels", "prune_multihead_attention_in_channels",
    "prune_lstm_out_channels", "prune_lstm_in_channels",
    "prune_conv1d_out_channels", "prune_conv1d_in_channels",
    "prune_parameter_out_channels", "prune_parameter_in_channels",
    "prune_elementwise_out_channels", "prune_elementwise_in_channels",
]

prune_conv_out_channels = _CONV.prune_out_channels
prune_conv_in_channels = _CONV.prune_in_channels
prune_depthwise_conv_out_channels = _CONV.prune_out_channels
prune_depthwise_conv_in_channels = _CONV.prune_in_channels
prune_transposed_conv_out_channels = _CONV_T.prune_out_channels
prune_transposed_conv_in_channels = _CONV_T.prune_in_channels
prune_linear_out_channels = _LINEAR.prune_out_channels
prune_linear_in_channels = _LINEAR.prune_in_channels
prune_batchnorm_out_channels = _BN.prune_out_channels
prune_batchnorm_in_channels = _BN.prune_in_channels
prune_instancenorm_out_channels = _BN.prune_out_channels
prune_instancenorm_in_channels = _BN.prune_in_channels
prune_groupnorm_out_channels = _GN.prune_out_channels
prune_groupnorm_in_channels = _GN.prune_in_channels
prune_layernorm_out_channels = _LN.prune_out_channels
prune_layernorm_in_channels = _LN.prune_in_channels
prune_rmsnorm_out_channels = _LN.prune_out_channels
prune_rmsnorm_in_channels = _LN.prune_in_channels
prune_prelu_out_channels = _PRELU.prune_out_channels
prune_prelu_in_channels = _PRELU.prune_in_channels
prune_embedding_out_channels = _EMBED.prune_out_channels
prune_embedding_in_channels = _EMBED.prune_out_channels
prune_multihead_attention_out_channels = _MHA.prune_out_channels
prune_multihead_attention_in_channels = _MHA.prune_in_channels
prune_lstm_out_channels = _LSTM.prune_out_channels
prune_lstm_in_channels = _LSTM.prune_in_channels
# transformers.pytorch_utils.Conv1D (GPT-2): the layer object needs no transformers import
prune_conv1d_out_channels = _CONV1D.prune_out_channels
prune_conv1d_in_channels = _CONV1D.prune_in_channels

_PARAMETER = ParameterPruner()
prune_parameter_out_channels = _PARAMETER.prune_out_channels
prune_parameter_in_channels = _PARAMETER.prune_in_channels

_ACTIVATION = ActivationPruner()
prune_elementwise_out_channels = _ACTIVATION.prune_out_channels
prune_elementwise_in_channels = _ACTIVATION.prune_in_channels
