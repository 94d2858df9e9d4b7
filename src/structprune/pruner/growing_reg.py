"""Growing-regularization pruning (Wang et al., "Neural Pruning via Growing Regularization", ICLR 2021)."""
from __future__ import annotations

import torch
from torch import nn

from .base import BasePruner
from .regularizer import DEFAULT_REG_TYPES, RegularizerEngine


class GrowingRegPruner(BasePruner):
    """BasePruner plus a per-channel L2 penalty that grows each ``update_reg()``, fastest for the least
    important channels, so that removing them at ``step()`` costs little.

    Training loop: ``update_reg()`` once per epoch, ``regularize(model)`` after every ``backward()``,
    then ``step()`` and ``update_regularizer()`` after each pruning step.
    """

    def __init__(self, model: nn.Module, example_inputs, importance, reg: float = 1e-5, delta_reg: float = 1e-5,
                 *args, reg_types=DEFAULT_REG_TYPES, **kwargs):
        super().__init__(model, example_inputs, importance, *args, **kwargs)
        if reg < 0 or delta_reg < 0:
            raise ValueError(f"reg and delta_reg must be >= 0, got reg={reg}, delta_reg={delta_reg}")
        self.base_reg = reg
        self.delta_reg = delta_reg
        self._engine = RegularizerEngine(reg_types)
        self.update_regularizer()

    def update_regularizer(self) -> None:
        """Refresh the groups from the (possibly pruned) model and reset every coefficient to ``reg``."""
        self._reg_groups = self._groups()
        self.group_reg = {
            group: torch.full((len(group[0].idxs),), float(self.base_reg)) for group in self._reg_groups
        }
        self._engine.compile(self._reg_groups)
        self._scatter()

    def _scatter(self) -> None:
        self._engine.scatter([self.group_reg[group] for group in self._reg_groups])

    def update_reg(self) -> None:
        """group_reg += delta_reg * standardized importance (least important channel -> +delta_reg)."""
        for group in self._reg_groups:
            imp = self.estimate_importance(group)
            if imp is None:
                continue
            imp = imp.detach().float().cpu()
            if torch.isnan(imp).any():
                continue
            standardized = (imp.max() - imp) / (imp.max() - imp.min() + 1e-8)
            self.group_reg[group] = self.group_reg[group] + self.delta_reg * standardized
        self._scatter()

    def regularize(self, model: nn.Module = None, bias: bool = False) -> None:
        """grad += gamma * weight for every regularized channel; call after backward(), before optimizer.step()."""
        self._engine.apply(bias)

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "current_step": self.current_step,
            "group_reg": {self._group_key(group): reg.clone() for group, reg in self.group_reg.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.current_step = int(state["current_step"])
        saved = state["group_reg"]
        for group in self._reg_groups:
            key = self._group_key(group)
            if key not in saved:
                raise KeyError(f"checkpoint has no regularization for group rooted at {key}; was the model pruned differently?")
            if saved[key].shape != self.group_reg[group].shape:
                raise ValueError(
                    f"group {key}: checkpoint holds {tuple(saved[key].shape)} values, the model has "
                    f"{len(group[0].idxs)} channels"
                )
            self.group_reg[group] = saved[key].clone().float()
        self._scatter()

    @staticmethod
    def _group_key(group) -> str:
        root = group[0].dep
        return f"{root.target.name}:{root.handler.__name__}"
