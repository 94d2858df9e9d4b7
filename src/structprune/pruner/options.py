"""Every keyword BasePruner takes, documented once, with the checks made before anything is traced."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

from torch import nn

from ..layers.registry import LayerRole, layer_types
from ..utils.cost_profile import METRICS, CostProfile

from .schedulers import linear_scheduler


@dataclass
class PrunerOptions:
    """The keywords of ``BasePruner`` (torch_pruning's ``MetaPruner`` spelling, in its order); the pruner
    keeps each under the same attribute name.

    Ratios are fractions of a group's original channels removed once every step has run.
    """

    #: scores a group's root channels (``tp.importance.MagnitudeImportance()``...); None: manual pruning only
    importance: Callable | None = None
    #: rank all groups together against one threshold instead of pruning each group by its own ratio
    global_pruning: bool = False
    #: fraction of channels removed after ``iterative_steps`` steps
    pruning_ratio: float = 0.5
    #: ``{module or (modules...): ratio}``: another ratio for the groups rooted in these modules and their
    #: submodules
    pruning_ratio_dict: dict | None = None
    #: no group loses more than this fraction of its original channels (global pruning may want more)
    max_pruning_ratio: float = 1.0
    #: how many ``step()`` calls reach ``pruning_ratio``
    iterative_steps: int = 1
    #: ``scheduler(ratio, steps) -> [ratio after step 0, 1, ..., steps]``
    iterative_pruning_ratio_scheduler: Callable = linear_scheduler
    #: modules, module types or ``nn.Parameter``s left whole (a group that would cut them is skipped)
    ignored_layers: list | None = None
    #: kept channel counts are rounded up to a multiple of this; ``"auto"``: per group, the finest step at which
    #: the latency profile's timings drop (pruner/budget.py)
    round_to: int | str | None = None
    #: global pruning ranks only groups of the same structure against each other
    isomorphic: bool = False
    #: ``{module: n}``: input channels come in n blocks pruned alike (overrides the layer's declaration)
    in_channel_groups: dict | None = None
    #: ``{module: n}``: output channels come in n blocks pruned alike (grouped convs, heads)
    out_channel_groups: dict | None = None
    #: ``{layer: heads}``: the layer's output channels form this many heads
    num_heads: dict | None = None
    #: remove whole heads (``head_pruning_ratio`` of them) where the graph allows
    prune_num_heads: bool = False
    #: narrow every head alike (off: head groups keep their width)
    prune_head_dims: bool = True
    #: fraction of heads removed with ``prune_num_heads``
    head_pruning_ratio: float = 0.0
    #: ``{module: ratio}``: another head ratio for these layers
    head_pruning_ratio_dict: dict | None = None
    #: ``{layer type or instance: BasePruningFunc}`` for layers the library does not declare
    customized_pruners: dict | None = None
    #: ``[(parameter, dim)]`` (or a dict): bare parameters used in forward and the dim their channels are on
    unwrapped_parameters: Any = None
    #: layer types that root groups (default: convs, linears, LSTMs and Linear-like optional layers)
    root_module_types: Any = None
    #: ``forward_fn(model, example_inputs)`` when the model is not called as ``model(*inputs)``
    forward_fn: Callable | None = None
    #: maps the model's output to the tensors that count as outputs (e.g. ``lambda out: out["logits"]``)
    output_transform: Callable | None = None
    #: deprecated spelling of ``out_channel_groups``
    channel_groups: dict | None = None
    #: deprecated spelling of ``pruning_ratio``
    ch_sparsity: float | None = None
    #: deprecated spelling of ``pruning_ratio_dict``
    ch_sparsity_dict: dict | None = None
    #: run the model after each step; a step that breaks it is redone group by group, keeping what runs
    verify: bool = True
    #: also remove whole experts of mixture-of-experts blocks, with their router rows (at least top-k stay)
    prune_num_experts: bool = False
    #: fraction of each MoE block's experts removed with ``prune_num_experts`` (None: ``pruning_ratio``)
    expert_pruning_ratio: float | None = None
    #: prune every layer counted in one config field (``intermediate_size``, ``hidden_size``...) to the same
    #: width so ``save_pretrained``/``from_pretrained`` round-trip (None: on for Hugging Face models)
    uniform_config_widths: bool | None = None
    #: a budget instead of ratios, ``{"latency_ms": x}``, ``{"macs": x}`` or ``{"params": x}``: reached along the
    #: schedule by removing the channels of least importance per unit of cost saved (pruner/budget.py)
    target: dict | None = None
    #: a ``tp.utils.latency_profile(...)`` to plan ``round_to="auto"`` and latency budgets on (None: measured on
    #: the model's device when needed, cached on disk)
    latency_profile: Any = None
    #: ``latency_fn(model, example_inputs) -> ms``: how a latency budget times the whole model after each pass
    #: (None: as its latency profile timed the model, ``tp.utils.latency.profile_timer``); a deterministic
    #: stand-in in tests, another device's timer in deployment
    latency_fn: Callable | None = None
    #: None, ``"bias"`` or ``"refit"`` (or a ``tp.pruner.Compensation``): the layers reading removed channels
    #: absorb their calibration contribution (needs an activation-aware importance; pruner/compensation.py)
    compensation: Any = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def resolve_deprecated(self) -> list[str]:
        """Move the deprecated spellings onto the current ones; returns what to warn about."""
        notes = []
        if self.ch_sparsity is not None:
            notes.append("ch_sparsity is deprecated; use pruning_ratio")
            self.pruning_ratio = self.ch_sparsity
        if self.ch_sparsity_dict is not None:
            notes.append("ch_sparsity_dict is deprecated; use pruning_ratio_dict")
            self.pruning_ratio_dict = self.ch_sparsity_dict
        if self.channel_groups:
            notes.append("channel_groups is deprecated; use out_channel_groups")
            self.out_channel_groups = {**(self.out_channel_groups or {}), **self.channel_groups}
        return notes

    def validate(self) -> None:
        """Raise ValueError for a ratio, step count or rounding that makes no sense."""
        check_ratio("pruning_ratio", self.pruning_ratio)
        check_ratio("head_pruning_ratio", self.head_pruning_ratio)
        if self.expert_pruning_ratio is not None:
            check_ratio("expert_pruning_ratio", self.expert_pruning_ratio)
        if not 0.0 < self.max_pruning_ratio <= 1.0:
            raise ValueError(f"max_pruning_ratio must lie in (0, 1], got {self.max_pruning_ratio}")
        if not isinstance(self.iterative_steps, int) or self.iterative_steps <= 0:
            raise ValueError(f"iterative_steps must be a positive integer, got {self.iterative_steps!r}")
        if self.round_to is not None and self.round_to != "auto" and (
                not isinstance(self.round_to, int) or isinstance(self.round_to, bool) or self.round_to <= 0):
            raise ValueError(f"round_to must be a positive integer, 'auto' or None, got {self.round_to!r}")
        check_target(self)
        for key, ratio in (self.pruning_ratio_dict or {}).items():
            check_ratio(f"pruning_ratio_dict[{_describe(key)}]", ratio)


def check_target(options: PrunerOptions) -> None:
    """Raise ValueError for a budget that is not one positive number of a known metric, or that another
    option contradicts."""
    target, profile = options.target, options.latency_profile
    if profile is not None and (not isinstance(profile, CostProfile) or profile.metric != "latency_ms"):
        raise ValueError(f"latency_profile must be what tp.utils.latency_profile(model, example_inputs) returns, "
                         f"got {type(profile).__name__}")
    timer = options.latency_fn
    if timer is not None and not callable(timer):
        raise ValueError(f"latency_fn must be a callable (model, example_inputs) -> ms, got {type(timer).__name__}")
    if timer is not None and not (isinstance(target, dict) and "latency_ms" in target):
        raise ValueError("latency_fn times the model for a latency budget only; pass target={'latency_ms': x} "
                         "with it, or leave latency_fn out")
    if target is None:
        return
    if not isinstance(target, dict) or len(target) != 1:
        raise ValueError(f"target must be a dict holding one budget ({{'latency_ms': x}}, {{'macs': x}} or "
                         f"{{'params': x}}), got {target!r}")
    (metric, value), = target.items()
    if metric not in METRICS:
        raise ValueError(f"target has an unknown budget {metric!r}; use one of {', '.join(METRICS)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"target {metric} must be a positive number, got {value!r}")
    if options.pruning_ratio_dict:
        raise ValueError("target and pruning_ratio_dict do not combine: a budget sets every group's ratio itself; "
                         "keep layers whole with ignored_layers, cap every group with max_pruning_ratio")
    if options.isomorphic:
        raise ValueError("target and isomorphic do not combine: a budget ranks every group against every other "
                         "by importance per unit of cost")


def check_ratio(name: str, ratio) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {ratio!r}")


def _describe(key) -> str:
    return type(key).__name__ if not isinstance(key, (tuple, list)) else "(" + ", ".join(type(k).__name__ for k in key) + ")"


def split_ignored(ignored) -> tuple[list, list]:
    """``ignored_layers`` as (modules and module types, parameters)."""
    layers, params = [], []
    for item in ignored or []:
        if isinstance(item, nn.Parameter):
            params.append(item)
        elif isinstance(item, nn.Module):
            # a container means the layers in it, as in torch_pruning (``ignored_layers=[model.pooler]``): they
            # root no group; its norms still follow the layers that feed them (LeViT's NormLinear head)
            roots = layer_types(LayerRole.ROOT)
            layers.extend(module for module in item.modules()
                          if (module is item or isinstance(module, roots)) and not any(module is seen for seen in layers))
        elif isinstance(item, type):
            layers.append(item)
        else:
            raise TypeError(
                f"ignored_layers accepts modules, module types and nn.Parameters; got {type(item).__name__} "
                f"({item!r})"
            )
    return layers, params
