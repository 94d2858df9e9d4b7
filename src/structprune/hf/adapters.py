"""The Hugging Face entries of the adapter table (structprune.adapters.ADAPTERS)."""
from __future__ import annotations

from torch import nn

from ..adapters import Adapter, _from, _linear_out
from .attention import (
    ATTENTION_ADAPTERS,
    HEAD_COUNT_NAMES,
    KV_HEAD_NAMES,
    _specific,
    generic_attention,
    is_generic_attention,
)
from .config import MLP_PAIRS, _attention_roles, _resolve, is_config, sync_config
from .mla import MLA_ADAPTERS, is_mla_attention
from .rebuild import install_save_check


def is_pretrained_model(module) -> bool:
    return (_from("transformers", module) and is_config(module.__dict__.get("config"))
            and callable(getattr(type(module), "save_pretrained", None)))


def pretrained_config(module) -> None:
    """Config fields follow every layer (structprune.hf.config); save_pretrained checks them first."""
    for layer in module.modules():
        # an embedding the forward never calls but whose weight it shares (T5's ``shared``) is in no group
        if isinstance(layer, nn.Embedding) and layer.weight.dim() == 2:
            layer.num_embeddings, layer.embedding_dim = layer.weight.shape
    sync_config(module)
    install_save_check(module)


def _is_mlp_with_sizes(module) -> bool:
    # fused MoE experts hold gate_up_proj / down_proj as bare tensors: adapters_moe sizes them
    return _from("transformers", module) and isinstance(module.__dict__.get("intermediate_size"), int) and any(
        isinstance(_resolve(module, inner), nn.Module) and isinstance(_resolve(module, back), nn.Module)
        for inner, back, _ in MLP_PAIRS)


def mlp_sizes(module) -> None:
    """MLP modules that record ``intermediate_size`` / ``hidden_size`` (LlamaMLP)."""
    for inner, back, per_unit in MLP_PAIRS:
        inner_layer, back_layer = _resolve(module, inner), _resolve(module, back)
        if isinstance(inner_layer, nn.Module) and isinstance(back_layer, nn.Module):
            module.intermediate_size = _linear_out(inner_layer) // per_unit
            if isinstance(module.__dict__.get("hidden_size"), int):
                module.hidden_size = _linear_out(back_layer)
            return


def _is_mamba_mixer(module) -> bool:
    return (_from("transformers", module) and hasattr(module, "conv1d") and hasattr(module, "in_proj")
            and isinstance(module.__dict__.get("intermediate_size"), int))


def mamba_mixer(module) -> None:
    """Mamba mixer: ``intermediate_size`` (the conv / SSM channels) sizes its cache and scan state."""
    module.intermediate_size = module.conv1d.out_channels


def _is_outer_head_count(module) -> bool:
    """A decoder layer or model that keeps its own copy of the head count (Falcon's ``num_heads``)."""
    return (_from("transformers", module) and isinstance(module.__dict__.get("num_heads"), int)
            and not is_generic_attention(module) and not _specific(module) and not is_mla_attention(module)
            and not isinstance(module, nn.MultiheadAttention) and _inner_attention(module) is not None)


def _inner_attention(module):
    return next((child for child in module.modules() if child is not module and (
        is_generic_attention(child) or _specific(child))), None)


def outer_head_count(module) -> None:
    roles = _attention_roles(_inner_attention(module))
    if roles and "heads" in roles:
        module.num_heads = roles["heads"]


def _is_fused_generic(module) -> bool:
    return is_generic_attention(module) and not _specific(module) and not hasattr(module, "q_proj") \
        and hasattr(module, "o_proj") and hasattr(module, "qkv_proj")


HF_ADAPTERS = [
    Adapter("Hugging Face model config (every layer; save_pretrained checks it)", is_pretrained_model,
            pretrained_config, late=True),
    *ATTENTION_ADAPTERS,
    # Phi-3 slices its fused qkv with config.num_attention_heads, which the config adapter rewrites
    Adapter("Hugging Face fused qkv_proj attention (heads, key/value heads; config.num_attention_heads)",
            _is_fused_generic, generic_attention, uses_removed=True,
            follows=HEAD_COUNT_NAMES + KV_HEAD_NAMES + ("config.num_attention_heads",)),
    Adapter("Hugging Face attention (num_heads / n_heads / num_key_value_heads, head size, widths, scaling)",
            lambda module: is_generic_attention(module) and not _specific(module) and not _is_fused_generic(module),
            generic_attention, uses_removed=True,
            follows=HEAD_COUNT_NAMES + KV_HEAD_NAMES + ("all_head_size", "inner_dim", "split_size")),
    *MLA_ADAPTERS,
    Adapter("Hugging Face MLP sizes (intermediate_size, hidden_size)", _is_mlp_with_sizes, mlp_sizes),
    # after the attention adapters: it copies their head count
    Adapter("Hugging Face layer/model copies of the head count (num_heads)", _is_outer_head_count,
            outer_head_count, late=True),
    Adapter("Hugging Face Mamba mixer (intermediate_size)", _is_mamba_mixer, mamba_mixer),
]
