"""Ratios per step and per scope: what each step of the schedule asks of a layer."""
from __future__ import annotations

from torch import nn


class ScheduleMixin:
    """Mixin of BasePruner: per-step ratios, per-scope ratios and the step counter."""

    # -- scopes and targets --------------------------------------------------------------------------
    def _init_scopes(self, pruning_ratio_dict, head_pruning_ratio_dict):
        steps = self.iterative_steps
        schedule = self.iterative_pruning_ratio_scheduler
        self.per_step_pruning_ratio = schedule(self.pruning_ratio, steps)
        self.pruning_ratio_dict = {}
        for key, ratio in (pruning_ratio_dict or {}).items():
            modules = key if isinstance(key, (tuple, list)) else (key,)
            expanded = []
            for module in modules:
                if isinstance(module, nn.Module):
                    expanded.extend(m for m in module.modules() if m in self.DG.module2node)
                    expanded.extend(self.DG.inner_layers_of(module))  # an MoE block's expert widths
                else:
                    expanded.append(module)
            scope = tuple(expanded)
            for module in scope:
                self.pruning_ratio_dict[module] = (scope, schedule(ratio, steps))
        self.per_step_head_pruning_ratio = schedule(self.head_pruning_ratio, steps)
        self.per_step_expert_pruning_ratio = schedule(self.expert_pruning_ratio, steps)
        self.head_pruning_ratio_dict = {
            module: schedule(ratio, steps) for module, ratio in (head_pruning_ratio_dict or {}).items()
        }

    def get_target_pruning_ratio(self, module) -> float:
        step = min(self.current_step, self.iterative_steps)
        if module in self.pruning_ratio_dict:
            return self.pruning_ratio_dict[module][1][step]
        return self.per_step_pruning_ratio[step]

    def get_target_head_pruning_ratio(self, module) -> float:
        step = min(self.current_step, self.iterative_steps)
        if module in self.head_pruning_ratio_dict:
            return self.head_pruning_ratio_dict[module][step]
        return self.per_step_head_pruning_ratio[step]

    def reset(self) -> None:
        self.current_step = 0
