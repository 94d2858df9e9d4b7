"""Hugging Face attention modules: the head attributes their forward reads, kept in step with the layers.

Every family stores a head count, a head size and a few products of them as plain ints (``num_heads``,
``n_heads``, ``num_key_value_heads``, ``head_dim``, ``attention_head_size``, ``all_head_size``,
``inner_dim``...). One rule serves them all: read the new head layout from the layer widths, then rewrite
each attribute the family has, by what it held before (a width that was heads x head size stays that).

The layout comes from the query projection (or, for fused q/k/v projections, the output projection's
input width), fewer heads told from narrower heads by the removed channels when the pruner passes them.
Key/value heads come from the key projection or, fused, from what is left of the fused width. The head
counts and widths a family spells out in a reshape are ``follows`` attributes: the graph lets those
reshape dims shrink because this adapter rewrites them.

BERT-style, ViT-style and GPT-2 attention keep their own adapters (``bert_attention``...), written first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import Adapter, _from, _linear_in, _linear_out, _removed_of, head_layout

#: attributes holding the number of query heads
HEAD_COUNT_NAMES = ("num_heads", "num_attention_heads", "n_heads", "n_head")
#: attributes holding the number of key/value heads (grouped-query attention)
KV_HEAD_NAMES = ("num_key_value_heads", "num_kv_heads")
#: attributes holding the size of one head
HEAD_SIZE_NAMES = ("head_dim", "head_size", "attention_head_size", "key_value_proj_dim")
#: attributes that held heads x head size (the attention width) and keep meaning that
HEAD_WIDTH_NAMES = ("all_head_size", "inner_dim", "split_size", "embed_dim", "hidden_size")
#: attributes computed from the head size as head_dim ** -0.5 or head_dim ** 0.5
SCALE_NAMES = ("scaling", "scale", "inv_norm_factor", "norm_factor", "scale_attn", "beta")

QUERY_NAMES = ("q_proj", "q", "q_lin", "query", "query_proj")
KEY_NAMES = ("k_proj", "k", "k_lin", "key", "key_proj")
FUSED_NAMES = ("qkv_proj", "query_key_value", "Wqkv")
OUTPUT_NAMES = ("o_proj", "o", "out_proj", "out_lin", "dense")


def _child(module, names):
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module) and hasattr(child, "weight"):
            return child
    return None


def _int_attr(module, names):
    for name in names:
        value = module.__dict__.get(name)
        if type(value) is int or (isinstance(value, int) and not isinstance(value, bool)):
            return name, int(value)
    return None, None


@dataclass(frozen=True)
class HeadLayout:
    heads: int
    head_dim: int
    kv_heads: int | None


def is_generic_attention(module) -> bool:
    """A transformers attention module with a head size attribute and q/k/v (or fused) projections
    next to an output projection (BERT keeps its output projection in a sibling module)."""
    if not _from("transformers", module) or _int_attr(module, HEAD_SIZE_NAMES)[0] is None:
        return False
    if _child(module, OUTPUT_NAMES) is None:
        return False
    return _child(module, QUERY_NAMES) is not None or _child(module, FUSED_NAMES) is not None


def read_layout(module, removed=None) -> HeadLayout | None:
    """The head layout the layers of ``module`` hold now (None when no whole layout explains them)."""
    _, head_dim = _int_attr(module, HEAD_SIZE_NAMES)
    _, old_heads = _int_attr(module, HEAD_COUNT_NAMES)
    query, fused = _child(module, QUERY_NAMES), _child(module, FUSED_NAMES)
    if query is not None:
        width, lost = _linear_out(query), _removed_of(removed, query)
    else:
        # fused projections hold q, k and v in family-specific orders: the output projection reads the
        # query heads alone, and only whole heads leave them (the forward spells out head_dim)
        width, lost = _linear_in(_child(module, OUTPUT_NAMES)), None
    if old_heads is None:
        old_heads = (width + (len(lost) if lost is not None else 0)) // head_dim
    heads, dim = head_layout(width, old_heads, head_dim, lost)
    if heads * dim != width:
        return None
    key = _child(module, KEY_NAMES)
    kv_heads = None
    if key is not None and _linear_out(key) % dim == 0:
        kv_heads = _linear_out(key) // dim
    elif fused is not None and query is None:
        rest = _linear_out(fused) // dim - heads
        kv_heads = rest // 2 if rest > 0 and rest % 2 == 0 else None
    return HeadLayout(heads, dim, kv_heads)


def write_layout(module, layout: HeadLayout) -> None:
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


def generic_attention(module, removed=None) -> None:
    layout = read_layout(module, removed)
    if layout is not None:
        write_layout(module, layout)


def _follows_for(module) -> tuple:
    return tuple(name for name in HEAD_COUNT_NAMES + KV_HEAD_NAMES + ("all_head_size", "inner_dim", "split_size")
                 if isinstance(module.__dict__.get(name), int))


# -- BERT, ViT and GPT-2: layouts the generic rule does not cover -------------------------------------------
def is_bert_attention(module) -> bool:
    return (_from("transformers", module) and _child(module, QUERY_NAMES) is not None
            and _child(module, ("value", "value_proj")) is not None
            and hasattr(module, "attention_head_size") and hasattr(module, "num_attention_heads")
            and _child(module, OUTPUT_NAMES) is None)


def bert_attention(module, removed=None) -> None:
    """BERT-style self/cross attention (query/key/value Linears, output projection in a sibling module):
    views with ``attention_head_size`` (DeBERTa: query_proj/key_proj/value_proj, viewed as (heads, -1))."""
    query, key, value = _child(module, QUERY_NAMES), _child(module, KEY_NAMES), _child(module, ("value", "value_proj"))
    heads, dim = head_layout(query.out_features, module.num_attention_heads, module.attention_head_size,
                             _removed_of(removed, query, key, value))
    module.num_attention_heads, module.attention_head_size, module.all_head_size = heads, dim, heads * dim
    if hasattr(module, "scaling"):
        module.scaling = dim ** -0.5


def is_vit_attention(module) -> bool:
    """q_proj attention that records its head count (HF ViT, viewed as (-1, head_dim)); Llama-style
    decoders record none, and the config adapter derives their heads from q_proj and head_dim."""
    return (_from("transformers", module) and hasattr(module, "q_proj") and hasattr(module, "o_proj")
            and hasattr(module, "num_attention_heads") and hasattr(module, "head_dim"))


def vit_attention(module, removed=None) -> None:
    heads, dim = head_layout(module.q_proj.out_features, module.num_attention_heads, module.head_dim,
                             _removed_of(removed, module.q_proj, module.k_proj, module.v_proj))
    module.num_attention_heads, module.head_dim = heads, dim
    if hasattr(module, "scaling"):
        module.scaling = dim ** -0.5


def is_gpt2_attention(module) -> bool:
    return (_from("transformers", module) and hasattr(module, "c_attn") and hasattr(module, "split_size")
            and hasattr(module, "num_heads") and hasattr(module, "head_dim"))


def gpt2_attention(module, removed=None) -> None:
    """GPT-2 attention: fused ``c_attn`` (q, k, v) split by ``split_size`` and viewed with ``head_dim``;
    ``scaling`` recomputed as GPT2Attention.__init__ does."""
    blocks = 2 if getattr(module, "is_cross_attention", False) else 3
    heads, dim = head_layout(_linear_out(module.c_attn), module.num_heads, module.head_dim,
                             _removed_of(removed, module.c_attn), blocks=blocks)
    module.num_heads, module.head_dim = heads, dim
    module.split_size = module.embed_dim = heads * dim
    if hasattr(module, "scaling"):
        scaling = dim ** -0.5 if getattr(module, "scale_attn_weights", True) else 1.0
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            scaling /= float(module.layer_idx + 1)
        module.scaling = scaling


def is_bloom_attention(module) -> bool:
    return (_from("transformers", module) and type(module).__name__ == "BloomAttention"
            and _child(module, ("query_key_value",)) is not None and hasattr(module, "num_heads")
            and hasattr(module, "head_dim"))


def bloom_attention(module, removed=None) -> None:
    """BLOOM: fused ``query_key_value`` laid out per head as [heads, 3 (q, k, v), head_dim], viewed with
    both ``num_heads`` and ``head_dim``. ALiBi slopes are a function of the head count, so heads keep
    their number and narrow instead; the removed channels say which of the two changed."""
    fused = module.query_key_value
    heads, dim, width = module.num_heads, module.head_dim, _linear_out(fused)
    lost = _removed_of(removed, fused)
    if width != 3 * heads * dim and lost is not None and len(lost):
        kept = torch.ones(3 * heads * dim, dtype=torch.bool)
        kept[torch.as_tensor(lost, dtype=torch.long)] = False
        grid = kept.view(heads, 3, dim)
        new_heads, new_dim = int(grid.any(2).any(1).sum()), int(grid.any(1).any(0).sum())
        if 3 * new_heads * new_dim == width:
            heads, dim = new_heads, new_dim
    old_width = module.num_heads * module.head_dim
    for name in ("hidden_size", "split_size"):
        if module.__dict__.get(name) == old_width:
            setattr(module, name, heads * dim)
    module.num_heads, module.head_dim = heads, dim
    module.inv_norm_factor = 1.0 / math.sqrt(dim)


def _specific(module) -> bool:
    return (is_bert_attention(module) or is_vit_attention(module) or is_gpt2_attention(module)
            or is_bloom_attention(module))


ATTENTION_ADAPTERS = [
    Adapter("Hugging Face BERT attention (num_attention_heads, attention_head_size, all_head_size, scaling)",
            is_bert_attention, bert_attention, uses_removed=True, follows=("num_attention_heads", "attention_head_size")),
    Adapter("Hugging Face ViT attention (num_attention_heads, head_dim, scaling)", is_vit_attention,
            vit_attention, uses_removed=True),
    Adapter("Hugging Face BLOOM attention (num_heads, head_dim, hidden_size, split_size, inv_norm_factor)", is_bloom_attention,
            bloom_attention, uses_removed=True, follows=("num_heads", "head_dim")),
    Adapter("Hugging Face GPT-2 attention (num_heads, head_dim, split_size, embed_dim, scaling)",
            is_gpt2_attention, gpt2_attention, uses_removed=True, follows=("split_size",)),
]
