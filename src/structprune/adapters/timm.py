"""timm: the head layouts its attention families keep in attributes, and a few other stored sizes.

Each family keeps its head layout in attributes its forward spells out in a reshape, split or view
(``self.num_heads``, ``self.heads``, ``self.dim_head``, ``self.key_dim``...). The adapters declare them in
``follows`` so the graph lets those sizes change, and rewrite them from the layers' new widths after every
prune; with the removed channels they tell fewer heads from narrower heads exactly (``uses_removed``).
Predicates test where a class is defined, so nothing here imports timm.
"""
from __future__ import annotations

import torch
from torch import nn

from .core import MODULE, adapter
from .layout import (
    class_named,
    from_library,
    grid_layout,
    head_layout,
    in_width,
    kept_grid_layout,
    kept_mask,
    out_width,
    removed_of,
)

#: timm's Attention and the generic reading of a fused qkv (3, num_heads, head_dim) both match timm
#: Attention: the lower order (Attention, which also sizes attn_dim) syncs it
FUSED_QKV = "timm fused qkv attention"


# -- ViT, DeiT... ---------------------------------------------------------------------------------------
@adapter("timm Attention (num_heads, head_dim, attn_dim, scale)",
         lambda module: from_library("timm", module) and isinstance(getattr(module, "qkv", None), nn.Linear)
         and hasattr(module, "num_heads") and hasattr(module, "head_dim") and hasattr(module, "attn_dim"),
         order=MODULE, claim=FUSED_QKV, uses_removed=True, follows=("num_heads", "head_dim", "attn_dim"))
def attention(module: nn.Module, removed=None) -> None:
    """timm ``Attention`` (ViT, DeiT...): fused qkv reshaped to (3, num_heads, head_dim); ``attn_dim``
    sizes the output reshape and ``scale`` the unfused path."""
    heads, dim = head_layout(module.qkv.out_features, module.num_heads, module.head_dim,
                             removed_of(removed, module.qkv), blocks=3, fixed="num_heads")
    module.num_heads, module.head_dim, module.attn_dim = heads, dim, heads * dim
    module.scale = dim ** -0.5


# -- MetaFormer (CAFormer), GCViT, ... ------------------------------------------------------------------
def _qkv_blocks(module: nn.Module, removed) -> int:
    """Blocks of the fused projection: q, k and v, or k and v alone (GCViT's global attention takes its
    queries from the stage's global context), told apart by the width before this prune."""
    per_block = module.num_heads * module.head_dim
    old = module.qkv.out_features + (len(removed) if removed is not None else 0)
    return 2 if per_block and old == 2 * per_block else 3


@adapter("timm fused-qkv attention (MetaFormer...): num_heads, head_dim, scale",
         lambda module: from_library("timm", module) and isinstance(getattr(module, "qkv", None), nn.Linear)
         and isinstance(getattr(module, "num_heads", None), int) and isinstance(getattr(module, "head_dim", None), int),
         order=MODULE + 10, claim=FUSED_QKV, uses_removed=True, follows=("num_heads", "head_dim"))
def fused_qkv_attention(module: nn.Module, removed=None) -> None:
    qkv_removed = removed_of(removed, module.qkv)
    heads, dim = head_layout(module.qkv.out_features, module.num_heads, module.head_dim, qkv_removed,
                             blocks=_qkv_blocks(module, qkv_removed), fixed="num_heads")
    module.num_heads, module.head_dim = heads, dim
    if isinstance(getattr(module, "scale", None), float):
        module.scale = dim ** -0.5


# -- Swin ------------------------------------------------------------------------------------------------
@adapter("timm Swin WindowAttention (num_heads, scale)",
         lambda module: from_library("timm", module) and class_named("WindowAttention")(module)
         and hasattr(module, "relative_position_bias_table"),
         uses_removed=True, follows=("num_heads",))
def window_attention(module: nn.Module, removed=None) -> None:
    """timm Swin ``WindowAttention``: qkv reshaped to (3, num_heads, -1); it stores no head_dim, but its
    ``scale`` is always ``head_dim ** -0.5``, which gives the layout before this prune."""
    old_dim = max(1, round(module.scale ** -2))
    heads, dim = head_layout(module.qkv.out_features, module.num_heads, old_dim,
                             removed_of(removed, module.qkv), blocks=3, fixed="num_heads")
    module.num_heads = heads
    module.scale = dim ** -0.5


# -- LeViT and TinyViT (per-head q, k, v split) -----------------------------------------------------------
@adapter("timm LeViT attention (num_heads, key_dim, val_dim, scale, bias cache)",
         lambda module: from_library("timm.models.levit", module) and hasattr(module, "attention_biases")
         and hasattr(module, "key_dim"),
         follows=("key_dim", "val_dim", "key_attn_dim", "val_attn_dim"))
def levit_attention(module: nn.Module) -> None:
    """timm LeViT ``Attention`` / ``AttentionDownsample``: per-head q/k (``key_dim``) and v (``val_dim``)
    read from the projections; cached attention biases are dropped so they are re-gathered."""
    heads = module.attention_biases.shape[0]
    proj_in = in_width(module.proj.ln)
    module.num_heads = heads
    module.val_dim, module.val_attn_dim = proj_in // heads, proj_in
    if hasattr(module, "qkv"):
        module.key_dim = (out_width(module.qkv) // heads - module.val_dim) // 2
    else:
        module.key_dim = out_width(module.q.ln) // heads
    module.key_attn_dim = module.key_dim * heads
    module.scale = module.key_dim ** -0.5
    module.attention_bias_cache = {}


@adapter("timm TinyViT Attention (num_heads, key_dim, val_dim, out_dim, scale, bias cache)",
         lambda module: from_library("timm.models.tiny_vit", module) and class_named("Attention")(module)
         and hasattr(module, "attention_biases"),
         follows=("key_dim", "val_dim", "out_dim"))
def tiny_vit_attention(module: nn.Module) -> None:
    """timm TinyViT ``Attention``: qkv viewed as (num_heads, -1) and split into key_dim, key_dim, val_dim;
    the output reshaped to ``out_dim``. Heads come from the per-head bias table."""
    heads = module.attention_biases.shape[0]
    module.num_heads = heads
    module.out_dim = module.proj.in_features
    module.val_dim = module.out_dim // heads
    module.key_dim = (module.qkv.out_features // heads - module.val_dim) // 2
    module.scale = module.key_dim ** -0.5
    module.attention_bias_cache = {}


# -- MetaFormer layer scale ------------------------------------------------------------------------------
@adapter("timm MetaFormer Scale.shape",
         lambda module: from_library("timm", module) and class_named("Scale")(module) and hasattr(module, "scale"),
         follows=("shape",))
def metaformer_scale(module: nn.Module) -> None:
    """timm MetaFormer ``Scale`` (PoolFormer layer scale) views its vector with a stored shape."""
    if isinstance(getattr(module, "shape", None), tuple) and module.shape:
        module.shape = (module.scale.shape[0],) + tuple(module.shape[1:])


# -- Hiera -----------------------------------------------------------------------------------------------
@adapter("timm Hiera MaskUnitAttention (heads, head_dim, dim_out, scale)",
         lambda module: from_library("timm.models.hiera", module) and class_named("MaskUnitAttention")(module),
         uses_removed=True, follows=("heads", "head_dim", "dim_out"))
def hiera_attention(module: nn.Module, removed=None) -> None:
    """timm Hiera ``MaskUnitAttention``: qkv reshaped to (3, heads, head_dim), output to ``dim_out``."""
    heads, dim = head_layout(module.qkv.out_features, module.heads, module.head_dim,
                             removed_of(removed, module.qkv), blocks=3, fixed="num_heads")
    module.heads, module.head_dim, module.dim_out = heads, dim, heads * dim
    module.dim = module.qkv.in_features
    module.scale = dim ** -0.5


# -- MaxViT / CoAtNet (maxxvit) ---------------------------------------------------------------------------
@adapter("timm maxxvit Attention2d / AttentionCl (num_heads, dim_head, scale)",
         lambda module: from_library("timm.models.maxxvit", module)
         and class_named("Attention2d", "AttentionCl")(module) and hasattr(module, "dim_head"),
         uses_removed=True, follows=("num_heads", "dim_head"))
def maxxvit_attention(module: nn.Module, removed=None) -> None:
    """timm maxxvit ``Attention2d`` / ``AttentionCl``: qkv viewed as (heads, 3 * dim_head) when
    ``head_first``, else (3, heads, dim_head)."""
    width = out_width(module.qkv)
    heads, dim = module.num_heads, module.dim_head
    if width == 3 * heads * dim:
        return
    shape, head_axis, dim_axis = ((heads, 3, dim), 0, 2) if module.head_first else ((3, heads, dim), 1, 2)
    layout = grid_layout(width, shape, head_axis, dim_axis, removed_of(removed, module.qkv))
    if layout is None and width % (3 * heads) == 0:
        layout = heads, width // (3 * heads)  # unknown removal: the head count stays, as the graph requires
    if layout is not None:
        module.num_heads, module.dim_head = layout
        module.scale = module.dim_head ** -0.5


# -- separate q and kv projections (PVT v2, VOLO / CaiT class attention) ---------------------------------
@adapter("timm q / kv attention (PVT v2, VOLO and CaiT class attention): num_heads, head_dim, scale",
         lambda module: from_library("timm", module) and isinstance(getattr(module, "q", None), nn.Linear)
         and isinstance(getattr(module, "kv", None), nn.Linear)
         and isinstance(getattr(module, "num_heads", None), int) and isinstance(getattr(module, "head_dim", None), int),
         uses_removed=True, follows=("num_heads", "head_dim"))
def q_kv_attention(module: nn.Module, removed=None) -> None:
    """q reshaped to (num_heads, head_dim), kv to (2, num_heads, head_dim): q's removed channels give
    the layout (q and k share head dims through q @ k^T)."""
    heads, dim = head_layout(module.q.out_features, module.num_heads, module.head_dim,
                             removed_of(removed, module.q))
    if module.kv.out_features != 2 * heads * dim:
        heads, dim = head_layout(module.kv.out_features, module.num_heads, module.head_dim,
                                 removed_of(removed, module.kv), blocks=2, fixed="num_heads")
    module.num_heads, module.head_dim = heads, dim
    if isinstance(getattr(module, "scale", None), float):
        module.scale = dim ** -0.5


# -- BoTNet (BottleneckAttn) and HaloNet (HaloAttn) ---------------------------------------------------------
def _set_head_layout(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Heads and head dims from (heads, head dim) kept-masks of q, k and v, when one layout explains them
    (q and k alike, v on the same heads); else the attributes stay and the forward fails loudly."""
    layouts = [kept_grid_layout(part, 0, 1) for part in (q, k, v)]
    if None in layouts or layouts[0] != layouts[1] or layouts[0][0] != layouts[2][0]:
        return
    (heads, qk), (_, v_dim) = layouts[0], layouts[2]
    module.num_heads, module.dim_head_qk, module.dim_head_v = heads, qk, v_dim
    module.dim_out_qk, module.dim_out_v = heads * qk, heads * v_dim
    module.scale = qk ** -0.5
    if hasattr(module.pos_embed, "dim_head"):
        module.pos_embed.dim_head = qk


@adapter("timm BottleneckAttn (num_heads, dim_head_qk, dim_head_v, dim_out_qk, dim_out_v, scale)",
         lambda module: from_library("timm.layers.bottleneck_attn", module) and class_named("BottleneckAttn")(module),
         uses_removed=True, follows=("num_heads", "dim_head_qk", "dim_head_v", "dim_out_qk", "dim_out_v"))
def bottleneck_attention(module: nn.Module, removed=None) -> None:
    """timm ``BottleneckAttn``: a 1x1 qkv conv split into q, k (heads x dim_head_qk each) and v (heads x
    dim_head_v), each reshaped to (batch x heads, head dims)."""
    heads, dqk, dv = module.num_heads, module.dim_head_qk, module.dim_head_v
    kept = kept_mask(module.qkv, removed_of(removed, module.qkv))
    if len(kept) != heads * (2 * dqk + dv):
        return  # the attributes do not describe the layer before this prune: leave them, the forward says so
    q, k, v = kept.split([heads * dqk, heads * dqk, heads * dv])
    _set_head_layout(module, q.view(heads, dqk), k.view(heads, dqk), v.view(heads, dv))


@adapter("timm HaloAttn (num_heads, dim_head_qk, dim_head_v, dim_out_qk, dim_out_v, scale)",
         lambda module: from_library("timm.layers.halo_attn", module) and class_named("HaloAttn")(module),
         uses_removed=True,
         follows=("num_heads", "dim_head_qk", "dim_head_v", "dim_out_qk", "dim_out_v", "pos_embed.dim_head"))
def halo_attention(module: nn.Module, removed=None) -> None:
    """timm ``HaloAttn``: q conv (heads x dim_head_qk) and kv conv (per head: dim_head_qk of k, then
    dim_head_v of v), reshaped to (batch x heads, head dims)."""
    heads, dqk, dv = module.num_heads, module.dim_head_qk, module.dim_head_v
    q_kept = kept_mask(module.q, removed_of(removed, module.q))
    kv_kept = kept_mask(module.kv, removed_of(removed, module.kv))
    if len(q_kept) != heads * dqk or len(kv_kept) != heads * (dqk + dv):
        return
    kv_kept = kv_kept.view(heads, dqk + dv)
    _set_head_layout(module, q_kept.view(heads, dqk), kv_kept[:, :dqk], kv_kept[:, dqk:])


# -- MambaOut (GatedConvBlock) ------------------------------------------------------------------------
@adapter("timm MambaOut GatedConvBlock (split_indices)",
         lambda module: from_library("timm.models.mambaout", module) and class_named("GatedConvBlock")(module)
         and isinstance(getattr(module, "split_indices", None), tuple),
         uses_removed=True, follows=("split_indices",))
def gated_conv_block(module: nn.Module, removed=None) -> None:
    """timm MambaOut ``GatedConvBlock``: fc1's output split by stored sizes into the gate, the identity
    part and the depthwise conv's channels; each piece keeps what the removal left of it."""
    kept = kept_mask(module.fc1, removed_of(removed, module.fc1))
    if len(kept) == sum(module.split_indices):
        module.split_indices = tuple(int(piece.sum()) for piece in kept.split(list(module.split_indices)))
