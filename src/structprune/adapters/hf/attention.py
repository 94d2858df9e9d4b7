"""Hugging Face attention: the head attributes a forward reads, rewritten from the layers after a prune.

One rule serves most families: read the new head layout from the layer widths (``hf.attention.read_layout``),
then rewrite each head attribute the module has, by what it held before (a width that was heads x head
size stays that). The head counts and widths a family spells out in a reshape are ``follows`` attributes:
the graph lets those reshape dims shrink because these adapters rewrite them. BERT-, ViT-, BLOOM- and
GPT-2-style attention lay their heads out their own way and come first in the ``ATTENTION`` claim; the
fused-qkv and the generic reading follow, then DeepSeek's latent attention (``mla.py``) and, for modules
no attention adapter claimed, the copies of a head count outside the attention (``model.py``).
"""
from __future__ import annotations

import math

from torch import nn

from ...hf.attention import (
    HEAD_COUNT_NAMES,
    HEAD_SIZE_NAMES,
    HEAD_WIDTH_NAMES,
    KEY_NAMES,
    KV_HEAD_NAMES,
    QUERY_NAMES,
    SCALE_NAMES,
    HeadLayout,
    _child,
    _int_attr,
    is_bert_attention,
    is_bloom_attention,
    is_generic_attention,
    is_gpt2_attention,
    is_vit_attention,
    read_layout,
)
from ..core import MODULE, adapter
from ..layout import grid_layout, head_layout, out_width, removed_of

#: every Hugging Face adapter that syncs a module's head attributes: the lowest-ordered that applies wins
ATTENTION = "Hugging Face attention heads"


@adapter("Hugging Face BERT attention (num_attention_heads, attention_head_size, all_head_size, scaling)",
         is_bert_attention, order=MODULE, claim=ATTENTION, uses_removed=True,
         follows=("num_attention_heads", "attention_head_size"))
def bert_attention(module: nn.Module, removed=None) -> None:
    """BERT-style self/cross attention (query/key/value Linears, output projection in a sibling module):
    views with ``attention_head_size`` (DeBERTa: query_proj/key_proj/value_proj, viewed as (heads, -1))."""
    query, key, value = _child(module, QUERY_NAMES), _child(module, KEY_NAMES), _child(module, ("value", "value_proj"))
    heads, dim = head_layout(query.out_features, module.num_attention_heads, module.attention_head_size,
                             removed_of(removed, query, key, value))
    module.num_attention_heads, module.attention_head_size, module.all_head_size = heads, dim, heads * dim
    if hasattr(module, "scaling"):
        module.scaling = dim ** -0.5


@adapter("Hugging Face ViT attention (num_attention_heads, head_dim, scaling)", is_vit_attention,
         order=MODULE + 1, claim=ATTENTION, uses_removed=True, follows=("head_dim",))
def vit_attention(module: nn.Module, removed=None) -> None:
    """ViT-style attention viewed as (-1, head_dim): narrower heads rewrite head_dim, which ViTConfig carries
    too (ViTAttention reads ``config.head_dim`` when it is set), so torch_pruning's ViT recipe (head dims
    narrowed with prune_head_dims) prunes and the checkpoint reloads."""
    heads, dim = head_layout(module.q_proj.out_features, module.num_attention_heads, module.head_dim,
                             removed_of(removed, module.q_proj, module.k_proj, module.v_proj))
    module.num_attention_heads, module.head_dim = heads, dim
    if hasattr(module, "scaling"):
        module.scaling = dim ** -0.5


@adapter("Hugging Face BLOOM attention (num_heads, head_dim, hidden_size, split_size, inv_norm_factor)",
         is_bloom_attention, order=MODULE + 2, claim=ATTENTION, uses_removed=True, follows=("num_heads", "head_dim"))
def bloom_attention(module: nn.Module, removed=None) -> None:
    """BLOOM: fused ``query_key_value`` laid out per head as [heads, 3 (q, k, v), head_dim], viewed with
    both ``num_heads`` and ``head_dim``. ALiBi slopes are a function of the head count, so heads keep
    their number and narrow instead; the removed channels say which of the two changed."""
    fused = module.query_key_value
    heads, dim, width = module.num_heads, module.head_dim, out_width(fused)
    if width != 3 * heads * dim:
        layout = grid_layout(width, (heads, 3, dim), 0, 2, removed_of(removed, fused))
        if layout is not None:
            heads, dim = layout
    old_width = module.num_heads * module.head_dim
    for name in ("hidden_size", "split_size"):
        if module.__dict__.get(name) == old_width:
            setattr(module, name, heads * dim)
    module.num_heads, module.head_dim = heads, dim
    module.inv_norm_factor = 1.0 / math.sqrt(dim)


@adapter("Hugging Face GPT-2 attention (num_heads, head_dim, split_size, embed_dim, scaling)",
         is_gpt2_attention, order=MODULE + 3, claim=ATTENTION, uses_removed=True, follows=("split_size",))
def gpt2_attention(module: nn.Module, removed=None) -> None:
    """GPT-2 attention: fused ``c_attn`` (q, k, v) split by ``split_size`` and viewed with ``head_dim``;
    ``scaling`` recomputed as GPT2Attention.__init__ does."""
    blocks = 2 if getattr(module, "is_cross_attention", False) else 3
    heads, dim = head_layout(out_width(module.c_attn), module.num_heads, module.head_dim,
                             removed_of(removed, module.c_attn), blocks=blocks)
    module.num_heads, module.head_dim = heads, dim
    module.split_size = module.embed_dim = heads * dim
    if hasattr(module, "scaling"):
        scaling = dim ** -0.5 if getattr(module, "scale_attn_weights", True) else 1.0
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            scaling /= float(module.layer_idx + 1)
        module.scaling = scaling


def write_layout(module: nn.Module, layout: HeadLayout) -> None:
    """Rewrite every head attribute ``module`` has from ``layout``, each by what it held before."""
    _, old_dim = _int_attr(module, HEAD_SIZE_NAMES)
    _, old_heads = _int_attr(module, HEAD_COUNT_NAMES)
    _, old_kv = _int_attr(module, KV_HEAD_NAMES)
    old_width = old_heads * old_dim if old_heads is not None else None
    state = module.__dict__
    for name in HEAD_COUNT_NAMES:
        if name in state and isinstance(state[name], int):
            state[name] = layout.heads
    if layout.kv_heads is not None:
        for name in KV_HEAD_NAMES:
            if name in state and isinstance(state[name], int):
                state[name] = layout.kv_heads
    for name in HEAD_SIZE_NAMES:
        if name in state and isinstance(state[name], int):
            state[name] = layout.head_dim
    for name in HEAD_WIDTH_NAMES:
        if name in state and isinstance(state[name], int) and old_width is not None and state[name] == old_width:
            state[name] = layout.heads * layout.head_dim
    kv_heads = layout.kv_heads if layout.kv_heads is not None else old_kv
    if isinstance(state.get("num_key_value_groups"), int) and kv_heads:
        state["num_key_value_groups"] = max(1, layout.heads // kv_heads)
    if layout.head_dim != old_dim:
        for name in SCALE_NAMES:
            value = state.get(name)
            if isinstance(value, float):
                if math.isclose(value, old_dim ** -0.5):
                    state[name] = layout.head_dim ** -0.5
                elif math.isclose(value, old_dim ** 0.5):
                    state[name] = layout.head_dim ** 0.5


def generic_attention(module: nn.Module, removed=None) -> None:
    layout = read_layout(module, removed)
    if layout is not None:
        write_layout(module, layout)


def _is_fused_generic(module: nn.Module) -> bool:
    return (is_generic_attention(module) and not hasattr(module, "q_proj") and hasattr(module, "o_proj")
            and hasattr(module, "qkv_proj"))


# Phi-3 slices its fused qkv with config.num_attention_heads, which the config adapter rewrites
adapter("Hugging Face fused qkv_proj attention (heads, key/value heads; config.num_attention_heads)",
        _is_fused_generic, order=MODULE + 10, claim=ATTENTION, uses_removed=True,
        follows=HEAD_COUNT_NAMES + KV_HEAD_NAMES + ("config.num_attention_heads",))(generic_attention)
adapter("Hugging Face attention (num_heads / n_heads / num_key_value_heads, head size, widths, scaling)",
        is_generic_attention, order=MODULE + 20, claim=ATTENTION, uses_removed=True,
        follows=HEAD_COUNT_NAMES + KV_HEAD_NAMES + ("num_key_value_groups", "all_head_size", "inner_dim", "split_size"))(generic_attention)
