"""Allocating a cost budget to groups: drop the channels that cost least importance per unit of cost saved.

A greedy solution of the knapsack latency-saliency pruning poses (Shen et al., "Structural Pruning via
Latency-Saliency Knapsack", NeurIPS 2022): every move removes one width step from one candidate; the move
taken next is the one whose removed importance per saved cost is lowest, until the predicted cost fits
the budget. A layer's cost depends on two groups (the one narrowing its outputs and the one narrowing its
inputs), so after a move the candidates sharing a layer with it are priced again.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from ..utils.cost_profile import CostProfile


@dataclass
class Candidate:
    """Groups that lose channels together (one group, or every group of one config field)."""

    key: object
    #: root width now, and the fewest channels it may keep
    width: int
    floor: int
    #: channels a move removes (a multiple of the channel groups)
    step: int
    #: importance of each root channel in the order the criterion removes them; a move removes the next
    #: ``step`` of them
    scores: list[float]
    #: ``(layer name, "out" | "in", layer channels per root channel)`` narrowed with the root
    items: list[tuple[str, str, float]] = field(default_factory=list)


def allocate(profile: CostProfile, candidates: list[Candidate], widths: dict, budget: float) -> tuple[dict, float]:
    """``({candidate key: root channels to remove}, predicted cost)`` for the cheapest-importance removals
    that bring ``profile``'s predicted cost to ``budget`` (or as close as the floors allow).

    ``widths`` maps layer names to their ``[in_width, out_width]`` now and is updated to the result.
    """
    scale = profile.total / profile.layer_sum() if profile.metric == "latency_ms" and profile.layer_sum() > 0 else 1.0
    cost = profile.predict(_as_tuples(widths))
    kept = {candidate.key: candidate.width for candidate in candidates}
    by_layer: dict = {}
    for index, candidate in enumerate(candidates):
        for name, _, _ in candidate.items:
            by_layer.setdefault(name, set()).add(index)
    version = [0] * len(candidates)
    heap: list = []

    def push(index: int) -> None:
        version[index] += 1
        move = _move(profile, candidates[index], kept[candidates[index].key], widths, scale)
        if move is not None:
            heapq.heappush(heap, (move[0], index, version[index], move))

    for index in range(len(candidates)):
        push(index)
    while cost > budget and heap:
        _, index, seen, (_, saving, new_width, new_widths) = heapq.heappop(heap)
        if seen != version[index]:
            continue  # priced before a neighbour moved
        candidate = candidates[index]
        kept[candidate.key] = new_width
        widths.update(new_widths)
        cost -= saving
        touched = {other for name, _, _ in candidate.items for other in by_layer.get(name, ())}
        for other in touched:
            push(other)
    return {candidate.key: candidate.width - kept[candidate.key] for candidate in candidates}, cost


def _move(profile: CostProfile, candidate: Candidate, kept: int, widths: dict, scale: float):
    """``(importance per saved cost, saved cost, new root width, new layer widths)`` of the next step down
    that saves something: a width the table prices no cheaper than the current one (a staircase, or timing
    noise) is passed over to the next, so the candidate does not drop out of the allocation."""
    target = (kept - 1) // candidate.step * candidate.step
    fallback = None
    while target >= max(candidate.floor, 1):
        move = _priced(profile, candidate, kept, target, widths, scale)
        if move[1] > 0:
            return move
        fallback = fallback or move
        target -= candidate.step
    if fallback is not None and fallback[1] == 0:
        return fallback  # costs nothing to remove: taken last, cheapest importance first
    return None


def _priced(profile: CostProfile, candidate: Candidate, kept: int, target: int, widths: dict, scale: float):
    removed_before = candidate.width - kept
    removed_after = candidate.width - target
    lost = sum(candidate.scores[removed_before:removed_after])
    new_widths = {}
    saving = 0.0
    for name in dict.fromkeys(name for name, _, _ in candidate.items):
        layer = profile.layers.get(name)
        if layer is None:
            continue
        now = widths[name]
        after = list(new_widths.get(name, now))
        for item_name, side, per_root in candidate.items:
            if item_name == name:
                position = 1 if side == "out" or layer.coupled else 0
                if after[position] is not None:
                    after[position] = after[position] - per_root * (kept - target)
        new_widths[name] = after
        saving += (layer.at(*now) - layer.at(*after)) * layer.calls * scale
    if saving <= 0:
        return (math.inf if lost > 0 else 0.0, saving, target, new_widths)
    return (lost / saving, saving, target, new_widths)


def _as_tuples(widths: dict) -> dict:
    return {name: tuple(value) for name, value in widths.items()}
