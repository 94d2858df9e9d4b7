"""Whole-expert planning for mixture-of-experts blocks (``prune_num_experts``)."""
from __future__ import annotations

import math
import warnings
from typing import Iterator

import torch

from ..graph.group import Group
from ..graph.side import Side
from ..layers.moe import ExpertCount, fewest_experts, routing_groups


class ExpertPlanner:
    """Mixin of BasePruner: removes the lowest-scoring experts of every MoE block.

    Experts are the channels of the :class:`ExpertCount` layer the graph adds beside fused experts: expert
    ``e`` in every fused tensor and the router's row ``e``. Each block keeps
    ``floor(experts * (1 - expert_pruning_ratio))`` of its original experts, never fewer than the router's
    ``top_k`` (and, with group-limited routing, the same number in every routing group). Blocks are planned
    one by one, also under global pruning: experts of different blocks are not compared.
    """

    def _expert_groups(self) -> Iterator[Group]:
        """The full expert group of every MoE block whose experts and router are not ignored."""
        if not self.prune_num_experts:
            return
        for module, node in self.DG.module2node.items():
            if isinstance(module, ExpertCount):
                total = node.pruner.get_out_channels(module)
                yield self.DG.get_group_by_side(module, Side.OUT, list(range(total)))

    def get_target_expert_pruning_ratio(self, module) -> float:
        return self.per_step_expert_pruning_ratio[min(self.current_step, self.iterative_steps)]

    def _plan_experts(self) -> Iterator[Group]:
        if not self.prune_num_experts:
            return
        refused, found = [], False
        for group in self._expert_groups():
            found = True
            proxy = group[0].dep.target.module
            current = len(group[0].idxs)
            original = self.layer_init_out_ch.get(proxy) or current
            ratio = self.get_target_expert_pruning_ratio(proxy)
            keep = fewest_experts(proxy.router, int(math.floor(original * (1 - ratio) + 1e-9)), current)
            if keep >= current:
                continue
            imp = self._importance(group)
            name = self.DG._name(proxy)
            if imp is None or torch.isnan(imp).any():
                refused.append(f"{name} (the importance criterion gave the experts no score)")
                continue
            idxs = _lowest_per_group(imp.detach().cpu(), current - keep, routing_groups(proxy.router))
            candidate = self.DG.get_group_by_side(proxy, group[0].side, idxs.tolist())
            if self._accepts(candidate, idxs):
                yield candidate
            else:
                refused.append(f"{name} ({candidate.blocked[0] if candidate.blocked else 'refused by the graph'})")
        if not found:
            warnings.warn(
                "prune_num_experts: the model has no mixture-of-experts block structprune recognises (fused "
                "expert tensors with a top-k router beside them); no expert was removed",
                stacklevel=4,
            )
        if refused:
            warnings.warn("prune_num_experts: experts kept in " + "; ".join(refused), stacklevel=4)


def _lowest_per_group(scores: torch.Tensor, n_prune: int, groups: int) -> torch.Tensor:
    """The ``n_prune`` lowest-scoring experts, the same number from each of ``groups`` equal routing groups."""
    per_group = len(scores) // groups
    chosen = [torch.argsort(block)[: n_prune // groups] + index * per_group
              for index, block in enumerate(scores.view(groups, per_group))]
    return torch.cat(chosen).sort().values
