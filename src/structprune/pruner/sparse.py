"""Sparse-training pruners on the regularizer engine: BN-scale (L1 on BatchNorm gammas) and group lasso."""
from __future__ import annotations

import torch
from torch import nn

from ..layers.registry import LayerRole, layer_types
from .base import BasePruner
from .regularizer import RegularizerEngine


class BNScalePruner(BasePruner):
    """Network slimming: ``regularize()`` adds ``reg * sign(gamma)`` to every BatchNorm weight gradient.

    With ``group_lasso=True`` the penalty is the group lasso of the BatchNorm gammas of each group instead.
    """

    def __init__(self, model: nn.Module, example_inputs, importance, reg: float = 1e-5, group_lasso: bool = False,
                 *args, **kwargs):
        super().__init__(model, example_inputs, importance, *args, **kwargs)
        self.reg = reg
        self.group_lasso = group_lasso
        self._engine = RegularizerEngine(layer_types(LayerRole.SCALED_NORM))
        self.update_regularizer()

    def update_regularizer(self) -> None:
        self._reg_groups = self._groups()
        self._engine.compile(self._reg_groups)
        self._sizes = [len(group[0].idxs) for group in self._reg_groups]
        self._engine.scatter([torch.full((n,), float(self.reg)) for n in self._sizes])

    def regularize(self, model: nn.Module = None, reg: float | None = None, bias: bool = False) -> None:
        if reg is not None and reg != self.reg:
            self.reg = reg
            self._engine.scatter([torch.full((n,), float(reg)) for n in self._sizes])
        if self.group_lasso:
            _group_lasso(self._engine, self._sizes, self.reg, bias)
        else:
            self._engine.apply(bias=bias, sign=True)


class GroupNormPruner(BasePruner):
    """Group-lasso sparse training (DepGraph): every channel's gradient gets ``reg * w / ||group channel||``,
    the norm taken over all coupled parameters of its group, so whole coupled channels shrink together."""

    def __init__(self, model: nn.Module, example_inputs, importance, reg: float = 1e-4, *args, **kwargs):
        super().__init__(model, example_inputs, importance, *args, **kwargs)
        self.reg = reg
        self._engine = RegularizerEngine()
        self.update_regularizer()

    def update_regularizer(self) -> None:
        self._reg_groups = self._groups()
        self._engine.compile(self._reg_groups)
        self._sizes = [len(group[0].idxs) for group in self._reg_groups]

    def regularize(self, model: nn.Module = None, reg: float | None = None, bias: bool = False) -> None:
        _group_lasso(self._engine, self._sizes, self.reg if reg is None else reg, bias)


def _group_lasso(engine: RegularizerEngine, sizes: list[int], reg: float, bias: bool) -> None:
    """The gradient of reg * sum ||channel||_2 is reg * w / ||channel|| on every coupled weight."""
    if not sizes:
        return
    norms = engine.root_norms(sum(sizes), bias=bias)
    values = (reg / (norms + 1e-12)).split(sizes)
    engine.scatter(list(values))
    engine.apply(bias=bias)
