"""Hugging Face attention modules: which they are and the head layout their layers hold now.

Every family stores a head count, a head size and a few products of them as plain ints (``num_heads``,
``n_heads``, ``num_key_value_heads``, ``head_dim``, ``attention_head_size``, ``all_head_size``,
``inner_dim``...). The layout comes from the query projection (or, for fused q/k/v projections, the
output projection's input width), fewer heads told from narrower heads by the removed channels when the
pruner passes them. Key/value heads come from the key projection or, fused, from what is left of the
fused width.

This is reading only, shared by the config sync (``hf.config``) and the attention adapters that rewrite
the attributes (``adapters/hf/attention.py``); BERT-, ViT-, GPT-2- and BLOOM-style attention have layouts
of their own (``is_specific_attention``). DeepSeek's latent attention is told apart by its low-rank
projections (``is_mla_attention``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..adapters.layout import from_library, head_layout, in_width, out_width, removed_of

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


def head_count(module) -> int | None:
    """The number of query heads an attention module states (None: it states none)."""
    return _int_attr(module, HEAD_COUNT_NAMES)[1]


def head_size(module) -> int | None:
    """The size of one head an attention module states (None: it states none)."""
    return _int_attr(module, HEAD_SIZE_NAMES)[1]


@dataclass(frozen=True)
class HeadLayout:
    heads: int
    head_dim: int
    kv_heads: int | None


def is_generic_attention(module) -> bool:
    """A transformers attention module with a head size attribute and q/k/v (or fused) projections
    next to an output projection (BERT keeps its output projection in a sibling module)."""
    if not from_library("transformers", module) or _int_attr(module, HEAD_SIZE_NAMES)[0] is None:
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
        width, lost = out_width(query), removed_of(removed, query)
    else:
        # fused projections hold q, k and v in family-specific orders: the output projection reads the
        # query heads alone, and only whole heads leave them (the forward spells out head_dim)
        width, lost = in_width(_child(module, OUTPUT_NAMES)), None
    if old_heads is None:
        old_heads = (width + (len(lost) if lost is not None else 0)) // head_dim
    heads, dim = head_layout(width, old_heads, head_dim, lost)
    if heads * dim != width:
        return None
    key = _child(module, KEY_NAMES)
    kv_heads = None
    if key is not None and out_width(key) % dim == 0:
        kv_heads = out_width(key) // dim
    elif fused is not None and query is None:
        rest = out_width(fused) // dim - heads
        kv_heads = rest // 2 if rest > 0 and rest % 2 == 0 else None
    return HeadLayout(heads, dim, kv_heads)


# -- BERT, ViT, GPT-2 and BLOOM: layouts the generic rule does not cover ---------------------------------------
def is_bert_attention(module) -> bool:
    return (from_library("transformers", module) and _child(module, QUERY_NAMES) is not None
            and _child(module, ("value", "value_proj")) is not None
            and hasattr(module, "attention_head_size") and hasattr(module, "num_attention_heads")
            and _child(module, OUTPUT_NAMES) is None)


def is_vit_attention(module) -> bool:
    """q_proj attention that records its head count (HF ViT, viewed as (-1, head_dim)); Llama-style
    decoders record none, and the config adapter derives their heads from q_proj and head_dim."""
    return (from_library("transformers", module) and hasattr(module, "q_proj") and hasattr(module, "o_proj")
            and hasattr(module, "num_attention_heads") and hasattr(module, "head_dim"))


def is_gpt2_attention(module) -> bool:
    return (from_library("transformers", module) and hasattr(module, "c_attn") and hasattr(module, "split_size")
            and hasattr(module, "num_heads") and hasattr(module, "head_dim"))


def is_bloom_attention(module) -> bool:
    return (from_library("transformers", module) and type(module).__name__ == "BloomAttention"
            and _child(module, ("query_key_value",)) is not None and hasattr(module, "num_heads")
            and hasattr(module, "head_dim"))


def is_specific_attention(module) -> bool:
    """BERT-, ViT-, GPT-2- or BLOOM-style attention: a layout of its own, not the generic reading."""
    return (is_bert_attention(module) or is_vit_attention(module) or is_gpt2_attention(module)
            or is_bloom_attention(module))


def is_mla_attention(module) -> bool:
    """DeepSeek-V2/V3 multi-head latent attention: low-rank q and kv projections around whole heads."""
    return (from_library("transformers", module) and hasattr(module, "kv_a_proj_with_mqa")
            and hasattr(module, "kv_b_proj") and isinstance(getattr(module, "v_head_dim", None), int)
            and hasattr(module, "o_proj"))
