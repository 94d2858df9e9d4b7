"""Adapters for ultralytics blocks (see adapters.py for what an adapter is).

YOLO11's and YOLOv10's PSA blocks use ``ultralytics.nn.modules.block.Attention``: a fused qkv conv viewed
as (num_heads, 2 * key_dim + head_dim, N) and split into key_dim, key_dim and head_dim rows per head;
C2PSA / C2f split their first conv's output with ``split((self.c, self.c))``. Those sizes are formulas of
conv widths (``derives``), so the graph evaluates them exactly for any removal and the adapters rewrite
them from the convs after each prune.
"""
from __future__ import annotations

from .adapters import Adapter, _class_named, _from, sync_derived


def _conv_of(layer):
    """ultralytics ``Conv`` wraps an ``nn.Conv2d`` as ``.conv``."""
    return getattr(layer, "conv", layer)


PSA_SIZES = (
    ("head_dim", lambda module: _conv_of(module.proj).in_channels // module.num_heads),
    ("key_dim", lambda module: (_conv_of(module.qkv).out_channels // module.num_heads
                                - _conv_of(module.proj).in_channels // module.num_heads) // 2),
)
SPLIT_SIZES = (("c", lambda module: _conv_of(module.cv1).out_channels // 2),)


def _psa_attention(module) -> None:
    sync_derived(module, PSA_SIZES)
    module.scale = module.key_dim ** -0.5


ULTRALYTICS_ADAPTERS = [
    Adapter("ultralytics PSA Attention (head_dim, key_dim, scale)",
            lambda module: _from("ultralytics", module) and _class_named("Attention")(module)
            and hasattr(module, "key_dim") and hasattr(module, "qkv") and hasattr(module, "pe"),
            _psa_attention, derives=PSA_SIZES),
    Adapter("ultralytics C2PSA / C2f / C2fAttn split size c",
            lambda module: _from("ultralytics", module) and isinstance(getattr(module, "c", None), int)
            and hasattr(module, "cv1") and hasattr(module, "cv2"),
            lambda module: sync_derived(module, SPLIT_SIZES), derives=SPLIT_SIZES),
]
