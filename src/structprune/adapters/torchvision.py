"""torchvision: attributes of its vision transformers that must follow pruned widths.

ViT reshapes with ``hidden_dim``, MaxViT's relative attention with ``head_dim``, MViT's multiscale
attention with ``num_heads`` / ``head_dim`` / ``output_dim``. Predicates test class names, so nothing here
imports torchvision.
"""
from __future__ import annotations

from torch import nn

from .core import adapter
from .layout import class_named, from_library, head_layout, removed_of


@adapter("torchvision VisionTransformer.hidden_dim",
         lambda module: class_named("VisionTransformer")(module) and hasattr(module, "conv_proj"),
         follows=("hidden_dim",))
def vit(module: nn.Module) -> None:
    module.hidden_dim = module.conv_proj.out_channels


@adapter("torchvision RelativePositionalMultiHeadAttention.head_dim",
         lambda module: class_named("RelativePositionalMultiHeadAttention")(module) and hasattr(module, "merge"),
         follows=("head_dim",))
def maxvit_attention(module: nn.Module) -> None:
    # q/k/v are reshaped with (n_heads, head_dim); head-dim pruning shrinks every head alike
    module.head_dim = module.merge.in_features // module.n_heads


@adapter("torchvision MViT MultiscaleAttention (num_heads, head_dim, output_dim, scaler)",
         lambda module: from_library("torchvision", module) and class_named("MultiscaleAttention")(module)
         and isinstance(getattr(module, "qkv", None), nn.Linear),
         uses_removed=True, follows=("num_heads", "head_dim", "output_dim"))
def mvit_attention(module: nn.Module, removed=None) -> None:
    """torchvision MViT ``MultiscaleAttention``: qkv reshaped to (3, num_heads, head_dim), the output to
    ``output_dim``; ``scaler`` is ``head_dim ** -0.5``."""
    heads, dim = head_layout(module.qkv.out_features, module.num_heads, module.head_dim,
                             removed_of(removed, module.qkv), blocks=3, fixed="num_heads")
    module.num_heads, module.head_dim, module.output_dim = heads, dim, heads * dim
    module.scaler = dim ** -0.5
