"""Iterative pruning schedules: the ratio reached after each of ``steps`` steps."""
from __future__ import annotations


def linear_scheduler(pruning_ratio: float, steps: int) -> list[float]:
    """[0, r/n, 2r/n, ..., r]: entry k is the ratio after step k."""
    return [pruning_ratio * index / float(steps) for index in range(steps + 1)]
