"""Sparse-training pruners on the regularizer engine: BN-scale (L1 on BatchNorm gammas) and group lasso."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..layers.registry import LayerRole, layer_types
from .base import BasePruner, is_loss
from .regularizer import RegularizerEngine
from .schedulers import linear_scheduler
from .signature import option_values, with_options_doc


class BNScalePruner(BasePruner):
    """Network slimming: ``regularize()`` adds ``reg * sign(gamma)`` to every BatchNorm weight gradient.

    With ``group_lasso=True`` the penalty is the group lasso of the BatchNorm gammas of each group instead.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        importance: Callable | None = None,
        reg: float = 1e-5,
        group_lasso: bool = False,
        global_pruning: bool = False,
        pruning_ratio: float = 0.5,
        pruning_ratio_dict: dict | None = None,
        max_pruning_ratio: float = 1.0,
        iterative_steps: int = 1,
        iterative_pruning_ratio_scheduler: Callable = linear_scheduler,
        ignored_layers: list | None = None,
        round_to: int | None = None,
        isomorphic: bool = False,
        in_channel_groups: dict | None = None,
        out_channel_groups: dict | None = None,
        num_heads: dict | None = None,
        prune_num_heads: bool = False,
        prune_head_dims: bool = True,
        head_pruning_ratio: float = 0.0,
        head_pruning_ratio_dict: dict | None = None,
        customized_pruners: dict | None = None,
        unwrapped_parameters=None,
        root_module_types=None,
        forward_fn: Callable | None = None,
        output_transform: Callable | None = None,
        channel_groups: dict | None = None,
        ch_sparsity: float | None = None,
        ch_sparsity_dict: dict | None = None,
        verify: bool = True,
        prune_num_experts: bool = False,
        expert_pruning_ratio: float | None = None,
        uniform_config_widths: bool | None = None,
        target: dict | None = None,
        latency_profile=None,
        latency_fn: Callable | None = None,
        compensation=None,
    ):
        """``reg``: the L1 strength on BatchNorm gammas (``regularize(model, reg=...)`` changes it);
        ``group_lasso``: the group lasso of each group's gammas instead. Both as torch_pruning orders them,
        before BasePruner's keywords (each documented on PrunerOptions; help() lists them below)."""
        super().__init__(model, example_inputs, **option_values(locals()))
        self.reg = reg
        self.group_lasso = group_lasso
        self._engine = RegularizerEngine(layer_types(LayerRole.SCALED_NORM))
        self.update_regularizer()

    __init__.__doc__ = with_options_doc(__init__.__doc__)

    def update_regularizer(self) -> None:
        self._reg_groups = self._groups()
        self._engine.compile(self._reg_groups, self._parameter_names())
        self._engine.scatter([torch.full((n,), float(self.reg)) for n in self._engine.group_sizes])

    def regularize(self, model: nn.Module = None, reg: float | None = None, bias: bool = False) -> None:
        """``reg * sign(gamma)`` on BatchNorm weight gradients; ``regularize(model, loss)`` (BasePruner's
        torch_pruning call form) is accepted: the penalty acts on gradients and needs no loss."""
        reg = None if is_loss(reg) else reg
        if reg is not None and reg != self.reg:
            self.reg = reg
            self._engine.scatter([torch.full((n,), float(reg)) for n in self._engine.group_sizes])
        if self.group_lasso:
            _group_lasso(self._engine, self.reg, bias, model=self.model if model is None else model)
        else:
            self._engine.apply(bias=bias, sign=True, model=self.model if model is None else model)


class GroupNormPruner(BasePruner):
    """Group-lasso sparse training (DepGraph): every channel's gradient gets ``reg * gamma * w / ||group
    channel||``, the norm taken over all coupled parameters of its group, so whole coupled channels shrink
    together. ``gamma = 2 ** (alpha * s)`` with ``s = (max - norm) / (max - min)`` of the group's channel
    norms (Fang et al., DepGraph, CVPR 2023): weaker channels are pushed harder; ``alpha=0`` is plain
    group lasso.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        importance: Callable | None = None,
        reg: float = 1e-4,
        alpha: float = 4,
        global_pruning: bool = False,
        pruning_ratio: float = 0.5,
        pruning_ratio_dict: dict | None = None,
        max_pruning_ratio: float = 1.0,
        iterative_steps: int = 1,
        iterative_pruning_ratio_scheduler: Callable = linear_scheduler,
        ignored_layers: list | None = None,
        round_to: int | None = None,
        isomorphic: bool = False,
        in_channel_groups: dict | None = None,
        out_channel_groups: dict | None = None,
        num_heads: dict | None = None,
        prune_num_heads: bool = False,
        prune_head_dims: bool = True,
        head_pruning_ratio: float = 0.0,
        head_pruning_ratio_dict: dict | None = None,
        customized_pruners: dict | None = None,
        unwrapped_parameters=None,
        root_module_types=None,
        forward_fn: Callable | None = None,
        output_transform: Callable | None = None,
        channel_groups: dict | None = None,
        ch_sparsity: float | None = None,
        ch_sparsity_dict: dict | None = None,
        verify: bool = True,
        prune_num_experts: bool = False,
        expert_pruning_ratio: float | None = None,
        uniform_config_widths: bool | None = None,
        target: dict | None = None,
        latency_profile=None,
        latency_fn: Callable | None = None,
        compensation=None,
    ):
        """``reg``: the group-lasso strength; ``alpha``: how much harder weaker channels are pushed
        (``gamma = 2 ** (alpha * s)``, 0: plain group lasso). Both as torch_pruning orders them, before
        BasePruner's keywords (each documented on PrunerOptions; help() lists them below)."""
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        super().__init__(model, example_inputs, **option_values(locals()))
        self.reg = reg
        self.alpha = alpha
        self._engine = RegularizerEngine()
        self.update_regularizer()

    __init__.__doc__ = with_options_doc(__init__.__doc__)

    def update_regularizer(self) -> None:
        self._reg_groups = self._groups()
        self._engine.compile(self._reg_groups, self._parameter_names())

    def regularize(self, model: nn.Module = None, alpha: float | None = None, bias: bool = False,
                   reg: float | None = None) -> None:
        """``alpha`` here is the base of the strength, torch_pruning's call form ``regularize(model,
        alpha=2**4)``: ``gamma = alpha ** s``; by default ``2 ** self.alpha``. ``regularize(model, loss)``
        (BasePruner's call form) is accepted too: the penalty needs no loss."""
        base = 2.0 ** self.alpha if alpha is None or is_loss(alpha) else float(alpha)
        _group_lasso(self._engine, self.reg if reg is None else reg, bias, base,
                     model=self.model if model is None else model)


def _group_lasso(engine: RegularizerEngine, reg: float, bias: bool, base: float = 1.0,
                 model: nn.Module | None = None) -> None:
    """The gradient of reg * sum gamma ||channel||_2 is reg * gamma * w / ||channel|| on every coupled weight."""
    sizes = engine.group_sizes
    if not sizes:
        return
    engine.resolve(model, bias)  # the norms must be those of the parameters being trained
    norms = engine.root_norms(sum(sizes), bias=bias)
    values = []
    for group_norms in norms.split(sizes):
        strength = reg / (group_norms + 1e-12)
        if base != 1.0 and len(group_norms) > 1:
            spread = group_norms.max() - group_norms.min()
            strength = strength * base ** ((group_norms.max() - group_norms) / (spread + 1e-12))
        values.append(strength)
    engine.scatter(values)
    engine.apply(bias=bias, model=model)
