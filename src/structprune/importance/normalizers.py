"""Normalizers: rescale a group's scores so that groups of different layers compare.

Each function maps a 1-D score vector to one of the same length. A zero denominator leaves the
scores unchanged (rather than producing NaN) so an all-zero group stays all-zero.
"""
from __future__ import annotations

from typing import Callable

import torch

Normalizer = Callable[[torch.Tensor], torch.Tensor]

_EPS = 1e-8  # torch_pruning's epsilon for the min-max and gaussian forms


def _safe_div(scores: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return scores if float(denominator) == 0.0 else scores / denominator


def normalize_sum(scores: torch.Tensor) -> torch.Tensor:
    """x / sum(x)."""
    return _safe_div(scores, scores.sum())


def normalize_mean(scores: torch.Tensor) -> torch.Tensor:
    """x / mean(x)."""
    return _safe_div(scores, scores.mean())


def normalize_max(scores: torch.Tensor) -> torch.Tensor:
    """x / max(x)."""
    return _safe_div(scores, scores.max())


def normalize_minmax(scores: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min + 1e-8): what torch_pruning calls "standarization"."""
    return (scores - scores.min()) / (scores.max() - scores.min() + _EPS)


def normalize_gaussian(scores: torch.Tensor) -> torch.Tensor:
    """(x - mean) / (std + 1e-8), unbiased std; a single score maps to 0."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / (scores.std() + _EPS)


def normalize_lamp(scores: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al. 2021): x_i / sum of the scores ranked at or above x_i (ascending order)."""
    flat = scores.reshape(-1)
    ordered, order = flat.sort()
    # Sum of each score and every larger one: a reversed cumulative sum.
    tails = ordered.flip(0).cumsum(0).flip(0)
    ratios = torch.where(tails > 0, ordered / tails.clamp(min=torch.finfo(tails.dtype).tiny), torch.zeros_like(ordered))
    result = torch.empty_like(flat)
    result[order] = ratios
    return result.reshape(scores.shape)


def normalize_none(scores: torch.Tensor) -> torch.Tensor:
    """Scores unchanged."""
    return scores


NORMALIZERS: dict = {
    None: normalize_none,
    "sum": normalize_sum,
    "mean": normalize_mean,
    "max": normalize_max,
    "standarization": normalize_minmax,
    "standardization": normalize_minmax,
    "gaussian": normalize_gaussian,
    "lamp": normalize_lamp,
}


def get_normalizer(name: str | Normalizer | None) -> Normalizer:
    """The normalizer for a name (or a callable on a 1-D tensor, returned as is)."""
    if callable(name):
        return name
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {name!r}; choose one of {list(NORMALIZERS)} or pass a callable")
    return NORMALIZERS[name]


def apply_normalizer(normalizer: Normalizer, scores: torch.Tensor) -> torch.Tensor:
    """Normalize a score vector, or each row of an unreduced ``[items, n]`` stack separately."""
    if scores.dim() == 2:
        return torch.stack([normalizer(row) for row in scores]) if len(scores) else scores
    return normalizer(scores)
