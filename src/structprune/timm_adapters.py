"""Adapters for more timm attention families (see adapters.py for what an adapter is).

Each family keeps its head layout in attributes its forward spells out in a reshape, split or view
(``self.heads``, ``self.dim_head``, ``self.key_dim``...). The adapters declare them in ``follows`` so the
graph lets those sizes change, and rewrite them from the layers' new widths after every prune; with the
removed channels they tell fewer heads from narrower heads exactly (``uses_removed``).
"""
from __future__ import annotations

import torch
from torch import nn

from .adapters import Adapter, _class_named, _from, _removed_of, head_layout


def _width(layer) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def grid_layout(width: int, shape: tuple, head_axis: int, dim_axis: int, removed) -> tuple[int, int] | None:
    """(heads, head size) of a projection laid out as ``shape`` (heads and dims on the given axes, fused
    q/k/v blocks on the others) once ``removed`` went, or None when that does not explain ``width``."""
    if removed is None or not len(removed):
        return None
    total = 1
    for size in shape:
        total *= size
    idxs = torch.as_tensor(removed, dtype=torch.long)
    if int(idxs.min()) < 0 or int(idxs.max()) >= total:
        return None
    kept = torch.ones(total, dtype=torch.bool)
    kept[idxs] = False
    grid = kept.view(shape)
    heads = int(grid.any(dim=tuple(a for a in range(len(shape)) if a != head_axis)).sum())
    dims = int(grid.any(dim=tuple(a for a in range(len(shape)) if a != dim_axis)).sum())
    blocks = total // (shape[head_axis] * shape[dim_axis])
    return (heads, dims) if width == blocks * heads * dims else None


# -- Hiera -----------------------------------------------------------------------------------------------
def _hiera_attention(module, removed=None) -> None:
    """timm Hiera ``MaskUnitAttention``: qkv reshaped to (3, heads, head_dim), output to ``dim_out``."""
    heads, dim = head_layout(module.qkv.out_features, module.heads, module.head_dim,
                             _removed_of(removed, module.qkv), blocks=3, fixed="num_heads")
    module.heads, module.head_dim, module.dim_out = heads, dim, heads * dim
    module.dim = module.qkv.in_features
    module.scale = dim ** -0.5


# -- MaxViT / CoAtNet (maxxvit) ---------------------------------------------------------------------------
def _maxxvit_attention(module, removed=None) -> None:
    """timm maxxvit ``Attention2d`` / ``AttentionCl``: qkv viewed as (heads, 3 * dim_head) when
    ``head_first``, else (3, heads, dim_head)."""
    width = _width(module.qkv)
    heads, dim = module.num_heads, module.dim_head
    if width == 3 * heads * dim:
        return
    shape, head_axis, dim_axis = ((heads, 3, dim), 0, 2) if module.head_first else ((3, heads, dim), 1, 2)
    layout = grid_layout(width, shape, head_axis, dim_axis, _removed_of(removed, module.qkv))
    if layout is None and width % (3 * heads) == 0:
        layout = heads, width // (3 * heads)  # unknown removal: the head count stays, as the graph requires
    if layout is not None:
        module.num_heads, module.dim_head = layout
        module.scale = module.dim_head ** -0.5


# -- MetaFormer (CAFormer), ... ------------------------------------------------------------------------
def _is_fused_qkv_attention(module) -> bool:
    """timm attention with a fused qkv Linear reshaped to (3, num_heads, head_dim) that records no
    ``attn_dim`` (timm ``Attention`` itself has one and its own adapter)."""
    return (_from("timm", module) and isinstance(getattr(module, "qkv", None), nn.Linear)
            and isinstance(getattr(module, "num_heads", None), int) and isinstance(getattr(module, "head_dim", None), int)
            and not hasattr(module, "attn_dim"))


def _fused_qkv_attention(module, removed=None) -> None:
    qkv_removed = _removed_of(removed, module.qkv)
    heads, dim = head_layout(module.qkv.out_features, module.num_heads, module.head_dim, qkv_removed,
                             blocks=_qkv_blocks(module, qkv_removed), fixed="num_heads")
    module.num_heads, module.head_dim = heads, dim
    if isinstance(getattr(module, "scale", None), float):
        module.scale = dim ** -0.5


def _qkv_blocks(module, removed) -> int:
    """Blocks of the fused projection: q, k and v, or k and v alone (GCViT's global attention takes its
    queries from the stage's global context), told apart by the width before this prune."""
    per_block = module.num_heads * module.head_dim
    old = module.qkv.out_features + (len(removed) if removed is not None else 0)
    return 2 if per_block and old == 2 * per_block else 3


# -- separate q and kv projections (PVT v2, VOLO / CaiT class attention) ---------------------------------
def _is_q_kv_attention(module) -> bool:
    return (_from("timm", module) and isinstance(getattr(module, "q", None), nn.Linear)
            and isinstance(getattr(module, "kv", None), nn.Linear)
            and isinstance(getattr(module, "num_heads", None), int) and isinstance(getattr(module, "head_dim", None), int))


def _q_kv_attention(module, removed=None) -> None:
    """q reshaped to (num_heads, head_dim), kv to (2, num_heads, head_dim): q's removed channels give
    the layout (q and k share head dims through q @ k^T)."""
    heads, dim = head_layout(module.q.out_features, module.num_heads, module.head_dim,
                             _removed_of(removed, module.q))
    if module.kv.out_features != 2 * heads * dim:
        heads, dim = head_layout(module.kv.out_features, module.num_heads, module.head_dim,
                                 _removed_of(removed, module.kv), blocks=2, fixed="num_heads")
    module.num_heads, module.head_dim = heads, dim
    if isinstance(getattr(module, "scale", None), float):
        module.scale = dim ** -0.5


# -- TinyViT (LeViT-style split of per-head q, k, v) ------------------------------------------------------
def _tiny_vit_attention(module) -> None:
    """timm TinyViT ``Attention``: qkv viewed as (num_heads, -1) and split into key_dim, key_dim, val_dim;
    the output reshaped to ``out_dim``. Heads come from the per-head bias table."""
    heads = module.attention_biases.shape[0]
    module.num_heads = heads
    module.out_dim = module.proj.in_features
    module.val_dim = module.out_dim // heads
    module.key_dim = (module.qkv.out_features // heads - module.val_dim) // 2
    module.scale = module.key_dim ** -0.5
    module.attention_bias_cache = {}


# -- BoTNet (BottleneckAttn) ---------------------------------------------------------------------------
def _bottleneck_attention(module, removed=None) -> None:
    """timm ``BottleneckAttn``: a 1x1 qkv conv split into q, k (heads x dim_head_qk each) and v (heads x
    dim_head_v), each reshaped to (batch x heads, head dims)."""
    heads, dqk, dv = module.num_heads, module.dim_head_qk, module.dim_head_v
    kept = _kept_mask(module.qkv, _removed_of(removed, module.qkv))
    if len(kept) != heads * (2 * dqk + dv):
        return  # the attributes do not describe the layer before this prune: leave them, the forward says so
    q, k, v = kept.split([heads * dqk, heads * dqk, heads * dv])
    _set_head_layout(module, q.view(heads, dqk), k.view(heads, dqk), v.view(heads, dv))


def _halo_attention(module, removed=None) -> None:
    """timm ``HaloAttn``: q conv (heads x dim_head_qk) and kv conv (per head: dim_head_qk of k, then
    dim_head_v of v), reshaped to (batch x heads, head dims)."""
    heads, dqk, dv = module.num_heads, module.dim_head_qk, module.dim_head_v
    q_kept = _kept_mask(module.q, _removed_of(removed, module.q))
    kv_kept = _kept_mask(module.kv, _removed_of(removed, module.kv))
    if len(q_kept) != heads * dqk or len(kv_kept) != heads * (dqk + dv):
        return
    kv_kept = kv_kept.view(heads, dqk + dv)
    _set_head_layout(module, q_kept.view(heads, dqk), kv_kept[:, :dqk], kv_kept[:, dqk:])


def _set_head_layout(module, q, k, v) -> None:
    """Heads and head dims from (heads, head dim) kept-masks of q, k and v, when one layout explains them
    (q and k alike, v on the same heads); else the attributes stay and the forward fails loudly."""
    layouts = [_per_head(part) for part in (q, k, v)]
    if None in layouts or layouts[0] != layouts[1] or layouts[0][0] != layouts[2][0]:
        return
    (heads, qk), (_, v_dim) = layouts[0], layouts[2]
    module.num_heads, module.dim_head_qk, module.dim_head_v = heads, qk, v_dim
    module.dim_out_qk, module.dim_out_v = heads * qk, heads * v_dim
    module.scale = qk ** -0.5
    if hasattr(module.pos_embed, "dim_head"):
        module.pos_embed.dim_head = qk


# -- MambaOut (GatedConvBlock) ------------------------------------------------------------------------
def _gated_conv_block(module, removed=None) -> None:
    """timm MambaOut ``GatedConvBlock``: fc1's output split by stored sizes into the gate, the identity
    part and the depthwise conv's channels; each piece keeps what the removal left of it."""
    kept = _kept_mask(module.fc1, _removed_of(removed, module.fc1))
    if len(kept) == sum(module.split_indices):
        module.split_indices = tuple(int(piece.sum()) for piece in kept.split(list(module.split_indices)))


def _kept_mask(layer, removed) -> torch.Tensor:
    """Which of a layer's output channels before this prune are kept (all, when it lost none now)."""
    count = len(removed) if removed is not None else 0
    kept = torch.ones(_width(layer) + count, dtype=torch.bool)
    if count:
        kept[torch.as_tensor(removed, dtype=torch.long)] = False
    return kept


def _per_head(grid: torch.Tensor) -> tuple[int, int] | None:
    """(heads left, channels each keeps) of a (heads, head dim) kept-mask, None when heads differ."""
    counts = grid.sum(dim=1)
    left = counts[counts > 0]
    if len(left) == 0 or not bool((left == left[0]).all()):
        return None
    return len(left), int(left[0])


TIMM_ADAPTERS = [
    Adapter("timm MambaOut GatedConvBlock (split_indices)",
            lambda module: _from("timm.models.mambaout", module) and _class_named("GatedConvBlock")(module)
            and isinstance(getattr(module, "split_indices", None), tuple),
            _gated_conv_block, uses_removed=True, follows=("split_indices",)),
    Adapter("timm HaloAttn (num_heads, dim_head_qk, dim_head_v, dim_out_qk, dim_out_v, scale)",
            lambda module: _from("timm.layers.halo_attn", module) and _class_named("HaloAttn")(module),
            _halo_attention, uses_removed=True,
            follows=("num_heads", "dim_head_qk", "dim_head_v", "dim_out_qk", "dim_out_v", "pos_embed.dim_head")),
    Adapter("timm BottleneckAttn (num_heads, dim_head_qk, dim_head_v, dim_out_qk, dim_out_v, scale)",
            lambda module: _from("timm.layers.bottleneck_attn", module) and _class_named("BottleneckAttn")(module),
            _bottleneck_attention, uses_removed=True,
            follows=("num_heads", "dim_head_qk", "dim_head_v", "dim_out_qk", "dim_out_v")),
    Adapter("timm Hiera MaskUnitAttention (heads, head_dim, dim_out, scale)",
            lambda module: _from("timm.models.hiera", module) and _class_named("MaskUnitAttention")(module),
            _hiera_attention, uses_removed=True, follows=("heads", "head_dim", "dim_out")),
    Adapter("timm maxxvit Attention2d / AttentionCl (num_heads, dim_head, scale)",
            lambda module: _from("timm.models.maxxvit", module)
            and _class_named("Attention2d", "AttentionCl")(module) and hasattr(module, "dim_head"),
            _maxxvit_attention, uses_removed=True, follows=("num_heads", "dim_head")),
    Adapter("timm fused-qkv attention without attn_dim (MetaFormer...): num_heads, head_dim, scale",
            _is_fused_qkv_attention, _fused_qkv_attention, uses_removed=True, follows=("num_heads", "head_dim")),
    Adapter("timm q / kv attention (PVT v2, VOLO and CaiT class attention): num_heads, head_dim, scale",
            _is_q_kv_attention, _q_kv_attention, uses_removed=True, follows=("num_heads", "head_dim")),
    Adapter("timm TinyViT Attention (num_heads, key_dim, val_dim, out_dim, scale, bias cache)",
            lambda module: _from("timm.models.tiny_vit", module) and _class_named("Attention")(module)
            and hasattr(module, "attention_biases"),
            _tiny_vit_attention, follows=("key_dim", "val_dim", "out_dim")),
]
