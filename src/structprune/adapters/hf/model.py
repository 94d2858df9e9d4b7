"""Hugging Face models beyond attention: the config, MLP and Mamba sizes, and copies of a head count.

The config adapter (order ``MODEL``: after every module adapter, once per step) rewrites every config field
from the layers (``structprune.hf.config``) and puts the save_pretrained check in front of
``save_pretrained``.
"""
from __future__ import annotations

from torch import nn

from ...hf.attention import is_generic_attention, is_specific_attention
from ...hf.config import MLP_PAIRS, _attention_roles, _resolve, is_config, sync_config
from ...hf.rebuild import install_save_check
from ..core import MODEL, MODULE, adapter
from ..layout import from_library, out_width
from .attention import ATTENTION


def is_pretrained_model(module: nn.Module) -> bool:
    return (from_library("transformers", module) and is_config(module.__dict__.get("config"))
            and callable(getattr(type(module), "save_pretrained", None)))


@adapter("Hugging Face model config (every layer; save_pretrained checks it)", is_pretrained_model, order=MODEL)
def pretrained_config(module: nn.Module) -> None:
    """Config fields follow every layer (structprune.hf.config); save_pretrained checks them first."""
    for layer in module.modules():
        # an embedding the forward never calls but whose weight it shares (T5's ``shared``) is in no group
        if isinstance(layer, nn.Embedding) and layer.weight.dim() == 2:
            layer.num_embeddings, layer.embedding_dim = layer.weight.shape
    sync_config(module)
    install_save_check(module)


def _is_mlp_with_sizes(module: nn.Module) -> bool:
    # fused MoE experts hold gate_up_proj / down_proj as bare tensors: adapters/moe.py sizes them
    return from_library("transformers", module) and isinstance(module.__dict__.get("intermediate_size"), int) and any(
        isinstance(_resolve(module, inner), nn.Module) and isinstance(_resolve(module, back), nn.Module)
        for inner, back, _ in MLP_PAIRS)


@adapter("Hugging Face MLP sizes (intermediate_size, hidden_size)", _is_mlp_with_sizes, order=MODULE)
def mlp_sizes(module: nn.Module) -> None:
    """MLP modules that record ``intermediate_size`` / ``hidden_size`` (LlamaMLP)."""
    for inner, back, per_unit in MLP_PAIRS:
        inner_layer, back_layer = _resolve(module, inner), _resolve(module, back)
        if isinstance(inner_layer, nn.Module) and isinstance(back_layer, nn.Module):
            module.intermediate_size = out_width(inner_layer) // per_unit
            if isinstance(module.__dict__.get("hidden_size"), int):
                module.hidden_size = out_width(back_layer)
            return


@adapter("Hugging Face Mamba mixer (intermediate_size)",
         lambda module: from_library("transformers", module) and hasattr(module, "conv1d")
         and hasattr(module, "in_proj") and isinstance(module.__dict__.get("intermediate_size"), int),
         order=MODULE)
def mamba_mixer(module: nn.Module) -> None:
    """Mamba mixer: ``intermediate_size`` (the conv / SSM channels) sizes its cache and scan state."""
    module.intermediate_size = module.conv1d.out_channels


def _inner_attention(module: nn.Module) -> nn.Module | None:
    return next((child for child in module.modules() if child is not module and (
        is_generic_attention(child) or is_specific_attention(child))), None)


def _is_outer_head_count(module: nn.Module) -> bool:
    """A decoder layer or model that keeps its own copy of the head count (Falcon's ``num_heads``); an
    attention module itself is claimed by its attention adapter first."""
    return (from_library("transformers", module) and isinstance(module.__dict__.get("num_heads"), int)
            and not isinstance(module, nn.MultiheadAttention) and _inner_attention(module) is not None)


# after the attention adapters: it copies their head count
@adapter("Hugging Face layer/model copies of the head count (num_heads)", _is_outer_head_count,
         order=MODEL + 10, claim=ATTENTION)
def outer_head_count(module: nn.Module) -> None:
    roles = _attention_roles(_inner_attention(module))
    if roles and "heads" in roles:
        module.num_heads = roles["heads"]
