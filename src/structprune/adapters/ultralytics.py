"""ultralytics: block attributes that are formulas of conv widths.

YOLO11's and YOLOv10's PSA blocks use ``ultralytics.nn.modules.block.Attention``: a fused qkv conv viewed
as (num_heads, 2 * key_dim + head_dim, N) and split into key_dim, key_dim and head_dim rows per head;
C2f and its kin (C3k2, C2PSA, C2fAttn, C2fCIB, RepNCSPELAN4...) split their first conv's output with
``split((self.c, self.c))`` (ONNX export runs their ``forward_split``). Those sizes are formulas of conv
widths (``derives``), so the graph evaluates them exactly for any removal and the adapters rewrite them
from the convs after each prune.

RT-DETR's ``MSDeformAttn`` views its value projection as (n_heads, d_model // n_heads) and its sampling
offsets and attention weights as (n_heads, n_levels * n_points[, 2]); deriving ``n_heads`` from the
attention weights' width and ``d_model`` from the value projection's lets the graph narrow the head dim
(value_proj / output_proj) or remove whole heads (with their offsets and weights, which ``grid_sample``
ties to the values of the same head), and refuse anything else exactly.

Predicates test where a class is defined, so nothing here imports ultralytics.
"""
from __future__ import annotations

from torch import nn

from .core import adapter, sync_derived
from .layout import class_named, from_library


def _conv_of(layer: nn.Module) -> nn.Module:
    """ultralytics ``Conv`` wraps an ``nn.Conv2d`` as ``.conv``."""
    return getattr(layer, "conv", layer)


PSA_SIZES = (
    ("head_dim", lambda module: _conv_of(module.proj).in_channels // module.num_heads),
    ("key_dim", lambda module: (_conv_of(module.qkv).out_channels // module.num_heads
                                - _conv_of(module.proj).in_channels // module.num_heads) // 2),
)
SPLIT_SIZES = (("c", lambda module: _conv_of(module.cv1).out_channels // 2),)
DEFORMABLE_SIZES = (
    ("n_heads", lambda module: module.attention_weights.out_features // (module.n_levels * module.n_points)),
    ("d_model", lambda module: module.value_proj.out_features),
)


@adapter("ultralytics PSA Attention (head_dim, key_dim, scale)",
         lambda module: from_library("ultralytics", module) and class_named("Attention")(module)
         and hasattr(module, "key_dim") and hasattr(module, "qkv") and hasattr(module, "pe"),
         derives=PSA_SIZES)
def psa_attention(module: nn.Module) -> None:
    sync_derived(module, PSA_SIZES)
    module.scale = module.key_dim ** -0.5


@adapter("ultralytics C2f-style split size c (C2f, C3k2, C2PSA, C2fAttn, C2fCIB, RepNCSPELAN4...)",
         lambda module: from_library("ultralytics", module) and type(module.__dict__.get("c")) is int
         and hasattr(module, "cv1") and hasattr(module, "cv2"),
         derives=SPLIT_SIZES)
def split_block(module: nn.Module) -> None:
    sync_derived(module, SPLIT_SIZES)


@adapter("ultralytics RepVGGDW width (dim)",
         lambda module: from_library("ultralytics", module) and class_named("RepVGGDW")(module)
         and isinstance(getattr(getattr(module, "conv", None), "conv", None), nn.Conv2d))
def repvgg_dw(module: nn.Module) -> None:
    module.dim = module.conv.conv.out_channels


@adapter("ultralytics RT-DETR MSDeformAttn (n_heads, d_model)",
         lambda module: from_library("ultralytics", module) and class_named("MSDeformAttn")(module)
         and hasattr(module, "value_proj") and hasattr(module, "attention_weights"),
         derives=DEFORMABLE_SIZES)
def deformable_attention(module: nn.Module) -> None:
    sync_derived(module, DEFORMABLE_SIZES)


@adapter("ultralytics RTDETRDecoder (hidden_dim, nhead)",
         lambda module: from_library("ultralytics", module) and class_named("RTDETRDecoder")(module)
         and hasattr(module, "enc_output") and hasattr(module, "decoder"))
def rtdetr_decoder(module: nn.Module) -> None:
    """``hidden_dim`` and ``nhead`` only describe the head (its forward reads the layers): keep them true."""
    width = module.enc_output[0].out_features
    module.hidden_dim = module.decoder.hidden_dim = width
    module.nhead = module.decoder.layers[0].self_attn.num_heads
