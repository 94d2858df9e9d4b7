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

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .graph.hooks import ModelHook, register_graph_hook, removed_outputs  # noqa: F401  (removed_outputs: its older home)


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


def _torchvision_mvit_attention(module, removed=None) -> None:
    """torchvision MViT ``MultiscaleAttention``: qkv reshaped to (3, num_heads, head_dim), the output to
    ``output_dim``; ``scaler`` is ``head_dim ** -0.5``."""
    heads, dim = head_layout(module.qkv.out_features, module.num_heads, module.head_dim,
                             _removed_of(removed, module.qkv), blocks=3, fixed="num_heads")
    module.num_heads, module.head_dim, module.output_dim = heads, dim, heads * dim
    module.scaler = dim ** -0.5


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


ADAPTERS: list[Adapter] = [
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
        "torchvision MViT MultiscaleAttention (num_heads, head_dim, output_dim, scaler)",
        lambda module: _from("torchvision", module) and _class_named("MultiscaleAttention")(module)
        and isinstance(getattr(module, "qkv", None), nn.Linear),
        _torchvision_mvit_attention, uses_removed=True, follows=("num_heads", "head_dim", "output_dim"),
    ),
    Adapter(
        "torchvision VisionTransformer.hidden_dim",
        lambda module: _class_named("VisionTransformer")(module) and hasattr(module, "conv_proj"),
        _torchvision_vit, follows=("hidden_dim",),
    ),
]


# Hugging Face families live in structprune.hf (attention, MLA, MLP sizes, the model config)
from .hf.adapters import HF_ADAPTERS  # noqa: E402 - needs Adapter and the helpers above
from .timm_adapters import TIMM_ADAPTERS  # noqa: E402 - built on the helpers above
from .ultralytics_adapters import ULTRALYTICS_ADAPTERS  # noqa: E402

ADAPTERS[:0] = HF_ADAPTERS
ADAPTERS.extend(TIMM_ADAPTERS + ULTRALYTICS_ADAPTERS)


def register_adapter(adapter: Adapter) -> None:
    ADAPTERS.append(adapter)


def matching_modules(model: nn.Module) -> list[tuple[nn.Module, Adapter]]:
    """(module, adapter) pairs for a model, ``late`` adapters last; module types do not change, so this
    is found once."""
    pairs = [(module, adapter) for module in model.modules() for adapter in ADAPTERS if adapter.applies(module)]
    return [pair for pair in pairs if not pair[1].late] + [pair for pair in pairs if pair[1].late]


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


#: model attribute set while a step defers its ``late`` adapters: "idle", or "pending" once a group was applied
_DEFERRED = "_structprune_deferred_late_sync"


@contextmanager
def deferred_late_sync(model: nn.Module):
    """Run ``late`` adapters (model configs) once when the block ends, not after every applied group.

    A config sync walks the whole model; a step that prunes 65 groups of a 32-layer Llama spent most of
    its time there. Nothing planned inside the block reads the config, and the forward check comes after.
    """
    state = model.__dict__
    if _DEFERRED in state:
        yield
        return
    state[_DEFERRED] = "idle"
    try:
        yield
    finally:
        if state.pop(_DEFERRED) == "pending":
            sync_attributes(model, [pair for pair in matching_modules(model) if pair[1].late])


def _graph_hook(model: nn.Module) -> ModelHook | None:
    """Every graph built for ``model`` syncs its adapters after each applied group; the removed indices tell
    an attention adapter fewer heads from narrower heads."""
    matches = matching_modules(model)  # module types do not change: found once per graph
    if not matches:
        return None
    early = [pair for pair in matches if not pair[1].late]
    late = [pair for pair in matches if pair[1].late]

    def after_apply(removed):
        sync_attributes(model, early, removed)
        if _DEFERRED in model.__dict__:
            model.__dict__[_DEFERRED] = "pending"
        else:
            sync_attributes(model, late, removed)

    return ModelHook(after_apply,
                     [(module, adapter.follows) for module, adapter in matches if adapter.follows],
                     [(module, adapter.derives) for module, adapter in matches if adapter.derives])


register_graph_hook(_graph_hook)
