"""Per-family attribute adapters: model attributes that must follow pruned shapes.

Some models keep sizes in plain attributes that their forward reads (torchvision's ViT reshapes with
``self.hidden_dim``; Hugging Face attention reshapes with ``self.head_dim``). After every pruning step
each adapter whose ``applies`` matches a module recomputes those attributes from the layers' shapes.
Add a family with ``register_adapter``.

Attention adapters must tell whole heads from head dims: a q projection of 4 heads x 16 that lost 32
channels is either 2 heads x 16 or 4 heads x 8. An adapter declared with ``uses_removed`` is called as
``sync(module, removed)`` where ``removed`` maps each pruned layer to the output channels it just lost
(numbered as before the prune); the grid of kept (head, dim) pairs then gives the exact layout. Without
that information (``removed`` is None: a sync by hand, or a reload) the size the family's forward spells
out stays fixed, as the graph only lets the reshape dim written as -1 (or the innermost one) shrink.

Attention scales follow the head size the way each family's ``__init__`` computes them
(``head_dim ** -0.5``): Hugging Face models must equal what their config describes so that
``save_pretrained`` / ``from_pretrained`` round-trip, and timm's fused path (scaled_dot_product_attention
without ``scale``) already uses the actual head size.

Adapters marked ``late`` (model configs) run after the others, since they read the synced attributes.

``follows`` names attributes the adapter rewrites that the forward spells out in a reshape (timm's
``self.num_heads``): during the trace they are swapped for a marked int, and the graph lets those
reshape dims shrink too, so whole heads can go where the code would otherwise pin their number.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    name: str
    applies: Callable[[nn.Module], bool]
    sync: Callable[..., None]
    #: run after every other adapter (config adapters read attributes the module adapters just synced)
    late: bool = False
    #: call ``sync(module, removed)`` with {layer: removed output channel indices} of the pruned group
    uses_removed: bool = False
    #: int attributes ``sync`` rewrites that the forward spells out in a reshape (timm's num_heads): the
    #: graph lets those reshape dims shrink (whole heads go) because the adapter follows them
    follows: tuple = ()
    #: ``(name, formula)`` pairs: int attributes that are a formula of layer widths (ultralytics C2PSA's
    #: ``c = cv1.conv.out_channels // 2``). During the trace the formula runs on the layers' traced size
    #: attributes, so the graph evaluates the attribute exactly for any removal instead of trusting it
    #: (as ``follows`` does); ``sync`` should apply the same formulas (``sync_derived`` does)
    derives: tuple = ()


def sync_derived(module, derives) -> None:
    """Rewrite each derived attribute from its formula (an adapter's sync for ``derives``)."""
    for name, formula in derives:
        setattr(module, name, int(formula(module)))


def _class_named(*names: str) -> Callable[[nn.Module], bool]:
    return lambda module: type(module).__name__ in names


def _from(library: str, module) -> bool:
    return type(module).__module__.startswith(library)


def _linear_out(layer) -> int:
    """Output width of a Linear, a transformers Conv1D (``nf``) or a timm LeViT LinearNorm."""
    layer = getattr(layer, "linear", layer)
    if hasattr(layer, "out_features"):
        return layer.out_features
    return layer.weight.shape[1] if hasattr(layer, "nf") else layer.weight.shape[0]


def _linear_in(layer) -> int:
    layer = getattr(layer, "linear", layer)
    if hasattr(layer, "in_features"):
        return layer.in_features
    return layer.weight.shape[0] if hasattr(layer, "nx") else layer.weight.shape[1]


def head_layout(width: int, num_heads: int, head_dim: int, removed=None, blocks: int = 1,
                fixed: str = "head_dim") -> tuple[int, int]:
    """(num_heads, head_dim) of a projection holding ``blocks`` x heads x head_dim channels, now ``width`` wide.

    ``removed`` (indices into the old ``blocks * num_heads * head_dim`` channels) tells fewer heads from
    narrower heads exactly. Without it the size the family's forward spells out stays (``fixed``: the
    graph lets only the reshape dim written as -1, or the innermost one, shrink): ``view(..., -1,
    head_dim)`` keeps ``"head_dim"``, ``reshape(..., num_heads, head_dim)`` and ``reshape(..., num_heads,
    -1)`` keep ``"num_heads"``. A width no layout explains leaves both unchanged, so the forward fails
    loudly instead of regrouping channels silently.
    """
    old = blocks * num_heads * head_dim
    if width == old:
        return num_heads, head_dim
    if removed is not None and len(removed):
        kept = torch.ones(old, dtype=torch.bool)
        idxs = torch.as_tensor(removed, dtype=torch.long)
        if int(idxs.min()) >= 0 and int(idxs.max()) < old:
            kept[idxs] = False
            grid = kept.view(blocks, num_heads, head_dim)[0]
            heads, dims = int(grid.any(1).sum()), int(grid.any(0).sum())
            if blocks * heads * dims == width:
                return heads, dims
    per_block, rest = divmod(width, blocks)
    if rest == 0 and fixed == "head_dim" and per_block % head_dim == 0:
        return per_block // head_dim, head_dim
    if rest == 0 and fixed == "num_heads" and per_block % num_heads == 0:
        return num_heads, per_block // num_heads
    return num_heads, head_dim


def _removed_of(removed, *layers):
    """Removed output channels of the first of ``layers`` pruned in this step (None when unknown)."""
    if not removed:
        return None
    for layer in layers:
        if layer is not None and layer in removed:
            return removed[layer]
        inner = getattr(layer, "linear", None)
        if inner is not None and inner in removed:
            return removed[inner]
    return None


# -- torchvision -------------------------------------------------------------------------------------
def _torchvision_vit(module) -> None:
    module.hidden_dim = module.conv_proj.out_channels


def _torchvision_maxvit_attention(module) -> None:
    # q/k/v are reshaped with (n_heads, head_dim); head-dim pruning shrinks every head alike
    module.head_dim = module.merge.in_features // module.n_heads


# -- timm ----------------------------------------------------------------------------------------------
def _is_timm_attention(module) -> bool:
    return (_from("timm", module) and isinstance(getattr(module, "qkv", None), nn.Linear)
            and hasattr(module, "num_heads") and hasattr(module, "head_dim") and hasattr(module, "attn_dim"))


def _timm_attention(module, removed=None) -> None:
    """timm ``Attention`` (ViT, DeiT...): fused qkv reshaped to (3, num_heads, head_dim); ``attn_dim``
    sizes the output reshape and ``scale`` the unfused path."""
    heads, dim = head_layout(module.qkv.out_features, module.num_heads, module.head_dim,
                             _removed_of(removed, module.qkv), blocks=3, fixed="num_heads")
    module.num_heads, module.head_dim, module.attn_dim = heads, dim, heads * dim
    module.scale = dim ** -0.5


def _timm_window_attention(module, removed=None) -> None:
    """timm Swin ``WindowAttention``: qkv reshaped to (3, num_heads, -1); it stores no head_dim, but its
    ``scale`` is always ``head_dim ** -0.5``, which gives the layout before this prune."""
    old_dim = max(1, round(module.scale ** -2))
    heads, dim = head_layout(module.qkv.out_features, module.num_heads, old_dim,
                             _removed_of(removed, module.qkv), blocks=3, fixed="num_heads")
    module.num_heads = heads
    module.scale = dim ** -0.5


def _timm_levit_attention(module) -> None:
    """timm LeViT ``Attention`` / ``AttentionDownsample``: per-head q/k (``key_dim``) and v (``val_dim``)
    read from the projections; cached attention biases are dropped so they are re-gathered."""
    heads = module.attention_biases.shape[0]
    proj_in = _linear_in(module.proj.ln)
    module.num_heads = heads
    module.val_dim, module.val_attn_dim = proj_in // heads, proj_in
    if hasattr(module, "qkv"):
        module.key_dim = (_linear_out(module.qkv) // heads - module.val_dim) // 2
    else:
        module.key_dim = _linear_out(module.q.ln) // heads
    module.key_attn_dim = module.key_dim * heads
    module.scale = module.key_dim ** -0.5
    module.attention_bias_cache = {}


def _timm_metaformer_scale(module) -> None:
    """timm MetaFormer ``Scale`` (PoolFormer layer scale) views its vector with a stored shape."""
    if isinstance(getattr(module, "shape", None), tuple) and module.shape:
        module.shape = (module.scale.shape[0],) + tuple(module.shape[1:])


# -- Hugging Face --------------------------------------------------------------------------------------
def _is_hf_model(module) -> bool:
    config = getattr(module, "config", None)
    return (config is not None and hasattr(config, "num_attention_heads") and hasattr(config, "hidden_size")
            and hasattr(module, "get_input_embeddings") and _from("transformers", module))


def _is_hf_bert_attention(module) -> bool:
    return (_from("transformers", module) and hasattr(module, "query") and hasattr(module, "value")
            and hasattr(module, "attention_head_size") and hasattr(module, "num_attention_heads"))


def _hf_bert_attention(module, removed=None) -> None:
    """BERT-style self/cross attention (query/key/value Linears): views with ``attention_head_size``."""
    heads, dim = head_layout(module.query.out_features, module.num_attention_heads, module.attention_head_size,
                             _removed_of(removed, module.query, module.key, module.value))
    module.num_attention_heads, module.attention_head_size, module.all_head_size = heads, dim, heads * dim
    if hasattr(module, "scaling"):
        module.scaling = dim ** -0.5


def _is_hf_vit_attention(module) -> bool:
    """q_proj attention that records its head count (HF ViT, viewed as (-1, head_dim)); Llama-style
    decoders record none, and the config adapter derives their heads from q_proj and head_dim."""
    return (_from("transformers", module) and hasattr(module, "q_proj") and hasattr(module, "o_proj")
            and hasattr(module, "num_attention_heads") and hasattr(module, "head_dim"))


def _hf_vit_attention(module, removed=None) -> None:
    heads, dim = head_layout(module.q_proj.out_features, module.num_attention_heads, module.head_dim,
                             _removed_of(removed, module.q_proj, module.k_proj, module.v_proj))
    module.num_attention_heads, module.head_dim = heads, dim
    if hasattr(module, "scaling"):
        module.scaling = dim ** -0.5


def _is_hf_gpt2_attention(module) -> bool:
    return (_from("transformers", module) and hasattr(module, "c_attn") and hasattr(module, "split_size")
            and hasattr(module, "num_heads") and hasattr(module, "head_dim"))


def _hf_gpt2_attention(module, removed=None) -> None:
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


@lru_cache(maxsize=None)
def _declared_fields(config_type) -> frozenset:
    return frozenset(inspect.signature(config_type.__init__).parameters)


def _config_declares(config, field: str) -> bool:
    """Whether the config class takes ``field`` (LlamaConfig.head_dim), as opposed to a field we added."""
    return field in _declared_fields(type(config))


def _first(model, predicate):
    return next((m for m in model.modules() if predicate(m)), None)


def _hf_config(module) -> None:
    """Config fields follow the first layer of each kind, so save_pretrained / from_pretrained round-trip.

    Covers Llama-style decoders (q_proj with a fixed head_dim, up_proj MLP), BERT (query/key/value,
    ``intermediate.dense``), GPT-2 (``c_attn``, ``c_fc``: n_embd, n_head, n_inner) and ViT (q_proj with
    ``num_attention_heads``; ``config.head_dim`` is written when heads no longer split ``hidden_size``).
    Layers pruned unevenly cannot be described by one config; the fields then describe layer 0, and a
    config that cannot express the shapes (BERT and GPT-2 tie the attention width to ``hidden_size``)
    makes from_pretrained refuse the checkpoint.
    """
    config = module.config
    embeddings = module.get_input_embeddings()
    if embeddings is not None and hasattr(embeddings, "embedding_dim"):
        config.hidden_size = embeddings.embedding_dim
    else:
        norm = _first(module, lambda m: isinstance(m, nn.LayerNorm))
        if norm is not None:
            config.hidden_size = norm.normalized_shape[0]
    heads = head_dim = None
    attention = _first(module, lambda m: hasattr(m, "q_proj") and hasattr(m, "head_dim"))
    if attention is not None and _is_hf_vit_attention(attention):
        heads, head_dim = attention.num_attention_heads, attention.head_dim
    elif attention is not None:
        head_dim = attention.head_dim
        heads = attention.q_proj.out_features // head_dim
        if hasattr(attention, "k_proj") and hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = attention.k_proj.out_features // head_dim
    else:
        attention = _first(module, lambda m: _is_hf_bert_attention(m) or _is_hf_gpt2_attention(m))
        if attention is not None and _is_hf_bert_attention(attention):
            heads, head_dim = attention.num_attention_heads, attention.attention_head_size
        elif attention is not None:
            heads, head_dim = attention.num_heads, attention.head_dim
    if heads is not None:
        config.num_attention_heads = heads
        if _config_declares(config, "head_dim") or heads * head_dim != config.hidden_size:
            config.head_dim = head_dim
        else:
            config.__dict__.pop("head_dim", None)  # written while pruning half-way; hidden_size says it again
    mlp = _first(module, lambda m: hasattr(m, "up_proj") and hasattr(m, "down_proj"))
    if mlp is not None and hasattr(config, "intermediate_size"):
        config.intermediate_size = mlp.up_proj.out_features
        if hasattr(mlp, "intermediate_size"):
            for layer in module.modules():
                if hasattr(layer, "up_proj") and hasattr(layer, "intermediate_size"):
                    layer.intermediate_size = layer.up_proj.out_features
    elif hasattr(config, "intermediate_size"):
        # BERT: BertIntermediate.dense; ViT and friends: an MLP with fc1 / fc2
        first = _first(module, lambda m: type(m).__name__.endswith("Intermediate") and hasattr(m, "dense"))
        first = first.dense if first is not None else getattr(
            _first(module, lambda m: isinstance(getattr(m, "fc1", None), nn.Linear) and hasattr(m, "fc2")), "fc1", None)
        if first is not None:
            config.intermediate_size = first.out_features
    gpt2_mlp = _first(module, lambda m: hasattr(m, "c_fc") and hasattr(m, "c_proj"))
    if gpt2_mlp is not None and hasattr(config, "n_inner"):
        config.n_inner = _linear_out(gpt2_mlp.c_fc)
    for layer in module.modules():
        if hasattr(layer, "q_proj") and hasattr(layer, "num_key_value_groups") and hasattr(layer, "k_proj"):
            layer.num_key_value_groups = layer.q_proj.out_features // layer.k_proj.out_features
        if hasattr(layer, "hidden_size") and hasattr(layer, "o_proj"):
            layer.hidden_size = layer.o_proj.out_features


ADAPTERS: list[Adapter] = [
    Adapter("Hugging Face config (hidden_size, heads, head_dim, intermediate_size, n_inner)", _is_hf_model,
            _hf_config, late=True),
    Adapter("Hugging Face BERT attention (num_attention_heads, attention_head_size, all_head_size, scaling)",
            _is_hf_bert_attention, _hf_bert_attention, uses_removed=True),
    Adapter("Hugging Face ViT attention (num_attention_heads, head_dim, scaling)", _is_hf_vit_attention,
            _hf_vit_attention, uses_removed=True),
    Adapter("Hugging Face GPT-2 attention (num_heads, head_dim, split_size, embed_dim, scaling)",
            _is_hf_gpt2_attention, _hf_gpt2_attention, uses_removed=True, follows=("split_size",)),
    Adapter("timm Attention (num_heads, head_dim, attn_dim, scale)", _is_timm_attention, _timm_attention,
            uses_removed=True, follows=("num_heads", "head_dim", "attn_dim")),
    Adapter(
        "timm Swin WindowAttention (num_heads, scale)",
        lambda module: _from("timm", module) and _class_named("WindowAttention")(module)
        and hasattr(module, "relative_position_bias_table"),
        _timm_window_attention, uses_removed=True, follows=("num_heads",),
    ),
    Adapter(
        "timm LeViT attention (num_heads, key_dim, val_dim, scale, bias cache)",
        lambda module: _from("timm.models.levit", module) and hasattr(module, "attention_biases")
        and hasattr(module, "key_dim"),
        _timm_levit_attention, follows=("key_dim", "val_dim", "key_attn_dim", "val_attn_dim"),
    ),
    Adapter(
        "timm MetaFormer Scale.shape",
        lambda module: _from("timm", module) and _class_named("Scale")(module) and hasattr(module, "scale"),
        _timm_metaformer_scale, follows=("shape",),
    ),
    Adapter(
        "torchvision RelativePositionalMultiHeadAttention.head_dim",
        lambda module: _class_named("RelativePositionalMultiHeadAttention")(module) and hasattr(module, "merge"),
        _torchvision_maxvit_attention, follows=("head_dim",),
    ),
    Adapter(
        "torchvision VisionTransformer.hidden_dim",
        lambda module: _class_named("VisionTransformer")(module) and hasattr(module, "conv_proj"),
        _torchvision_vit, follows=("hidden_dim",),
    ),
]


from .timm_adapters import TIMM_ADAPTERS  # noqa: E402 - built on the helpers above
from .ultralytics_adapters import ULTRALYTICS_ADAPTERS  # noqa: E402

ADAPTERS.extend(TIMM_ADAPTERS + ULTRALYTICS_ADAPTERS)


def register_adapter(adapter: Adapter) -> None:
    ADAPTERS.append(adapter)


def matching_modules(model: nn.Module) -> list[tuple[nn.Module, Adapter]]:
    """(module, adapter) pairs for a model, ``late`` adapters last; module types do not change, so this
    is found once."""
    pairs = [(module, adapter) for module in model.modules() for adapter in ADAPTERS if adapter.applies(module)]
    return [pair for pair in pairs if not pair[1].late] + [pair for pair in pairs if pair[1].late]


def removed_outputs(group) -> dict:
    """{layer: removed output channel indices} of a group about to be (or just) pruned, in the numbering
    the group uses (current channels before the prune); what ``uses_removed`` adapters receive."""
    from .graph.dependency import is_out_channel_pruning_fn

    removed = {}
    for item in group:
        module = item.dep.target.module
        coupled = not isinstance(module, nn.Parameter) and item.dep.target.pruner.is_coupled(module)
        if isinstance(module, nn.Module) and (coupled or is_out_channel_pruning_fn(item.dep.handler)):
            removed[module] = torch.as_tensor(item.idxs, dtype=torch.long)
    return removed


def sync_attributes(model: nn.Module, matches: list | None = None, removed: dict | None = None) -> list[str]:
    """Run every matching adapter; returns what was synced (for logs and tests).

    ``removed`` ({layer: removed output channels}, see ``removed_outputs``) lets attention adapters tell
    removed heads from narrowed heads; pass it when syncing right after pruning a group.
    """
    done = []
    for module, adapter in matches if matches is not None else matching_modules(model):
        if adapter.uses_removed:
            adapter.sync(module, removed)
        else:
            adapter.sync(module)
        done.append(adapter.name)
    return done
