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


ADAPTERS: list[Adapter] = [
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

