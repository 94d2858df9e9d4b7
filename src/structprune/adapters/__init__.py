"""Model-family knowledge: adapters that keep a model's size attributes in step with its pruned layers.

``core`` holds the registry (what an adapter is, its order, matching and syncing, the graph hook);
``layout`` the helpers adapters read layers with; each family module registers its own adapters when
imported, which happens here, once, at ``import structprune``. Add a family: docs/adding_a_family.md.
"""
from . import hf, moe, timm, torchvision, ultralytics  # noqa: F401  (each registers its adapters)
from .core import (
    ADAPTERS,
    MODEL,
    MODULE,
    Adapter,
    adapter,
    deferred_late_sync,
    matching_modules,
    register_adapter,
    sync_attributes,
    sync_derived,
    unregister_adapter,
)
from .layout import head_layout

__all__ = ["ADAPTERS", "MODEL", "MODULE", "Adapter", "adapter", "deferred_late_sync", "head_layout",
           "matching_modules", "register_adapter", "sync_attributes", "sync_derived", "unregister_adapter"]
