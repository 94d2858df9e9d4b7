"""Importance criteria: one score per root channel of a pruning group (torch_pruning names)."""
from .activation import ActivationImportance, CalibratedImportance, FluctuationImportance, WandaImportance
from .base import Importance
from .elementwise import DEFAULT_TARGET_TYPES, ElementwiseImportance
from .hessian import GroupHessianImportance, HessianImportance
from .magnitude import (
    BNScaleImportance,
    GroupMagnitudeImportance,
    GroupNormImportance,
    LAMPImportance,
    MagnitudeImportance,
)
from .normalizers import NORMALIZERS, get_normalizer
from .obdc import OBDCImportance
from .random_score import RandomImportance
from .reductions import REDUCTIONS, get_reduction
from .taylor import GroupTaylorImportance, TaylorImportance

__all__ = [
    "Importance",
    "ElementwiseImportance",
    "MagnitudeImportance",
    "GroupMagnitudeImportance",
    "GroupNormImportance",
    "BNScaleImportance",
    "LAMPImportance",
    "RandomImportance",
    "TaylorImportance",
    "GroupTaylorImportance",
    "HessianImportance",
    "GroupHessianImportance",
    "OBDCImportance",
    "CalibratedImportance",
    "ActivationImportance",
    "WandaImportance",
    "FluctuationImportance",
    "REDUCTIONS",
    "NORMALIZERS",
    "get_reduction",
    "get_normalizer",
    "DEFAULT_TARGET_TYPES",
]
