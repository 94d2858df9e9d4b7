"""Per-family attribute adapters: model attributes that must follow pruned shapes.

Some models keep sizes in plain attributes that their forward reads (torchvision's ViT reshapes with
``self.hidden_dim``; Hugging Face attention reshapes with ``self.head_dim``). After every pruning step
each adapter whose ``applies`` matches a module recomputes those attributes from the layers' shapes.
Add a family with ``register_adapter``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Adapter:
    name: str
    applies: Callable[[nn.Module], bool]
    sync: Callable[[nn.Module], None]


def _class_named(*names: str) -> Callable[[nn.Module], bool]:
    return lambda module: type(module).__name__ in names


def _torchvision_vit(module) -> None:
    module.hidden_dim = module.conv_proj.out_channels


def _torchvision_maxvit_attention(module) -> None:
    # q/k/v are reshaped with (n_heads, head_dim); head-dim pruning shrinks every head alike
    module.head_dim = module.merge.in_features // module.n_heads


def _is_hf_decoder(module) -> bool:
    config = getattr(module, "config", None)
    return (config is not None and hasattr(config, "num_attention_heads") and hasattr(config, "hidden_size")
            and hasattr(module, "get_input_embeddings") and type(module).__module__.startswith("transformers"))


def _hf_config(module) -> None:
    """Config fields follow the first decoder layer, so save_pretrained / from_pretrained round-trip.

    Layers pruned unevenly cannot be described by one config; the fields then describe layer 0.
    """
    config = module.config
    embeddings = module.get_input_embeddings()
    if embeddings is not None and hasattr(embeddings, "embedding_dim"):
        config.hidden_size = embeddings.embedding_dim
    attention = next((m for m in module.modules() if hasattr(m, "q_proj") and hasattr(m, "head_dim")), None)
    if attention is not None:
        head_dim = attention.head_dim
        config.num_attention_heads = attention.q_proj.out_features // head_dim
        if hasattr(attention, "k_proj") and hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = attention.k_proj.out_features // head_dim
        if hasattr(config, "head_dim"):
            config.head_dim = head_dim
    mlp = next((m for m in module.modules() if hasattr(m, "up_proj") and hasattr(m, "down_proj")), None)
    if mlp is not None and hasattr(config, "intermediate_size"):
        config.intermediate_size = mlp.up_proj.out_features
        if hasattr(mlp, "intermediate_size"):
            for layer in module.modules():
                if hasattr(layer, "up_proj") and hasattr(layer, "intermediate_size"):
                    layer.intermediate_size = layer.up_proj.out_features
    for layer in module.modules():
        if hasattr(layer, "q_proj") and hasattr(layer, "num_key_value_groups") and hasattr(layer, "k_proj"):
            layer.num_key_value_groups = layer.q_proj.out_features // layer.k_proj.out_features
        if hasattr(layer, "hidden_size") and hasattr(layer, "o_proj"):
            layer.hidden_size = layer.o_proj.out_features


ADAPTERS: list[Adapter] = [
    Adapter("Hugging Face decoder config (hidden_size, heads, intermediate_size)", _is_hf_decoder, _hf_config),
    Adapter(
        "torchvision RelativePositionalMultiHeadAttention.head_dim",
        lambda module: _class_named("RelativePositionalMultiHeadAttention")(module) and hasattr(module, "merge"),
        _torchvision_maxvit_attention,
    ),
    Adapter(
        "torchvision VisionTransformer.hidden_dim",
        lambda module: _class_named("VisionTransformer")(module) and hasattr(module, "conv_proj"),
        _torchvision_vit,
    ),
]


def register_adapter(adapter: Adapter) -> None:
    ADAPTERS.append(adapter)


def matching_modules(model: nn.Module) -> list[tuple[nn.Module, Adapter]]:
    """(module, adapter) pairs for a model; module types do not change, so this is found once."""
    return [(module, adapter) for module in model.modules() for adapter in ADAPTERS if adapter.applies(module)]


def sync_attributes(model: nn.Module, matches: list | None = None) -> list[str]:
    """Run every matching adapter; returns what was synced (for logs and tests)."""
    done = []
    for module, adapter in matches if matches is not None else matching_modules(model):
        adapter.sync(module)
        done.append(adapter.name)
    return done

