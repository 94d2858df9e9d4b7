"""Warnings about a criterion that will ruin the model although every shape comes out right.

Weight magnitude does not see activations. In a trained transformer a few hidden units carry activations
hundreds of times larger than the rest and the weights reading them are small, so magnitude pruning removes
exactly what the model relies on: Gemma 3 270M with 20% of its MLP width pruned by L2 magnitude goes from
perplexity 30 to 24,000 (benchmarks/quality/gemma.py), while WandaImportance with compensation="refit" stays
near the original. The step itself is exact, so nothing else would tell the user.
"""
from __future__ import annotations

import warnings

from torch import nn

from ..adapters.families import ModelFamily



def warn_weight_only_criterion(model: nn.Module, importance, family: ModelFamily) -> None:
    """Warn when a weight-only criterion prunes a trained model of a family with activation outliers
    (transformers; trained: its norms' scales differ, which random initialisation never gives)."""
    from ..importance.magnitude import MagnitudeImportance

    if not isinstance(importance, MagnitudeImportance) or not family.activation_outliers:
        return
    if not _trained(model):
        return
    warnings.warn(
        f"{type(importance).__name__} scores channels by weight magnitude only; on a trained "
        f"{type(model).__name__} it removes channels that carry large activations (Gemma 3 270M, 20% of the MLP: "
        f"perplexity 30 -> 24,000). Calibrate an activation-aware criterion instead: imp = "
        f"tp.importance.WandaImportance(gram=True); with imp.calibrating(model): model(batch) for a few batches; "
        f"then prune with compensation='refit' (docs/llm.md). pruner.report() lists what each step removed",
        stacklevel=3,
    )


def _trained(model: nn.Module) -> bool:
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if "Norm" in type(module).__name__ and isinstance(weight, nn.Parameter) and weight.numel() > 1:
            if weight.detach().float().std() > 1e-6:
                return True
    return False
