"""Growing-regularization pruning (Wang et al., "Neural Pruning via Growing Regularization", ICLR 2021)."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from ..utils.sharding import refuse_sharded
from .base import BasePruner, is_loss
from .fading import FadeCompensator
from .norm_scale import capture_inputs, measure_scales, norms_in, rescale
from .regularizer import EVERY_DECLARED_LAYER, RegularizerEngine
from .schedulers import linear_scheduler
from .signature import option_values, with_options_doc


#: the seed rule's standardized growth counted as "nearly the whole delta_reg", and the share of channels
#: getting it past which the schedule no longer singles anything out
SEED_NEAR_FULL = 0.9
SEED_HEAVY_SHARE = 0.8


class GrowingRegPruner(BasePruner):
    """BasePruner plus a per-channel L2 penalty that grows each ``update_reg()``, fastest for the least
    important channels, so that removing them at ``step()`` costs little.

    Training loop: ``update_reg()`` once per epoch, ``regularize(model)`` after every ``backward()``,
    then ``step()`` and ``update_regularizer()`` after each pruning step.
    """

    SCHEDULES = ("seed", "greg1", "greg2")
    #: key prefix of GReg-1's whole-head choices (a head group and its layer's channel group share a root)
    HEADS = "heads:"

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        importance: Callable | None = None,
        reg: float = 1e-5,
        delta_reg: float = 1e-5,
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
        *,
        reg_types=EVERY_DECLARED_LAYER,
        schedule: str = "seed",
        reg_ceiling: float = 1.0,
        magnitude_ratio: float = 1e4,
        rescale_norms: bool = True,
        compensate_fade: bool = True,
    ):
        """``reg``: every channel's penalty starts here (and returns here at ``update_regularizer()``).
        ``delta_reg``: what ``update_reg()`` adds, scaled by standardized importance (least important
        channel: the whole ``delta_reg``); :func:`structprune.pruner.delta_reg_for` derives it from the
        learning rate and the number of iterations. Both as the seed documents them; then BasePruner's
        keywords (each documented on PrunerOptions; help() lists them below), then ours, keyword-only:

        ``schedule`` picks how reg grows on each ``update_reg()``:

        - ``"seed"``: every channel grows by ``delta_reg * standardized importance`` (the documented rule).
        - ``"greg1"`` (the paper's GReg-1): the channels to remove are chosen once by importance at the
          first ``update_reg()`` of a pruning round; only they grow, by ``delta_reg`` a call, capped at
          ``reg_ceiling``; the others stay at ``reg``; ``step()`` removes exactly those channels.
        - ``"greg2"`` (GReg-2): every channel grows by ``delta_reg`` a call up to ``reg_ceiling``; ``step()``
          then picks by importance (magnitude) as usual.
        ``ready_to_prune()`` turns True once every growing reg reached ``reg_ceiling`` or, for the paper's
        schedules, once the kept channels' mean magnitude exceeds ``magnitude_ratio`` times the rest.

        ``reg_types``: by default every parameter a declared layer holds on a group's channel axis takes the
        penalty (Conv/Linear/Conv1D, norms, embeddings, attention and LSTM tensors, unwrapped parameters), so
        a transformer's hidden width shrinks too. A tuple of layer types penalises only their ``weight`` and
        ``bias`` (``regularizer.DEFAULT_REG_TYPES`` is the seed's Conv, Linear and BatchNorm).

        ``rescale_norms``: when ``step()`` narrows a LayerNorm/RMSNorm, its weight is multiplied by the change
        of its input's deviation measured on the example inputs, so that removing channels regularized to
        zero does not rescale every kept output (see :mod:`.norm_scale`; not in ``step(interactive=True)``).

        ``compensate_fade``: with ``compensation`` and ``schedule="greg1"``, the layers reading the chosen
        channels take back their change after every ``regularize()`` (the refit's least-squares map, or the
        mean into the bias), instead of once at ``step()``, when the penalty has already faded the channels to
        about zero and there is little left to hand over (see :mod:`.fading`). False compensates at step().
        """
        super().__init__(model, example_inputs, **option_values(locals()))
        if reg < 0 or delta_reg < 0:
            raise ValueError(f"reg and delta_reg must be >= 0, got reg={reg}, delta_reg={delta_reg}")
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule must be one of {self.SCHEDULES}, got {schedule!r}")
        self.base_reg = reg
        self.delta_reg = delta_reg
        self.schedule = schedule
        self.reg_ceiling = reg_ceiling
        self.magnitude_ratio = magnitude_ratio
        self.rescale_norms = rescale_norms
        self._engine = RegularizerEngine(reg_types)
        self._seed_warned = False
        self._fade = None
        compensator = self._compensation_in_use()
        if compensate_fade and schedule == "greg1" and compensator is not None:
            self._fade = FadeCompensator(compensator)
        self.update_regularizer()

    __init__.__doc__ = with_options_doc(__init__.__doc__)

    def update_regularizer(self) -> None:
        """Refresh the groups from the (possibly pruned) model and reset every coefficient to ``reg``."""
        self._reg_groups = self._groups()
        self.group_reg = {
            group: torch.full((len(group[0].idxs),), float(self.base_reg)) for group in self._reg_groups
        }
        self._selected = None  # GReg-1's channels to remove in the coming step, by root key
        self._engine.compile(self._reg_groups, self._parameter_names())
        self._scatter()
        if self._fade is not None:
            self._fade.reset()

    def _scatter(self) -> None:
        self._engine.scatter([self.group_reg[group] for group in self._reg_groups])

    def update_reg(self) -> None:
        """group_reg += delta_reg * standardized importance (least important channel -> +delta_reg)."""
        refuse_sharded(self.model, "update_reg()")
        if self.schedule == "greg1":
            return self._update_greg1()
        if self.schedule == "greg2":
            for group in self._reg_groups:
                self.group_reg[group] = (self.group_reg[group] + self.delta_reg).clamp(max=self.reg_ceiling)
            return self._scatter()
        near_full = total = 0
        for group in self._reg_groups:
            imp = self.estimate_importance(group)
            if imp is None:
                continue
            imp = imp.detach().float().cpu()
            if torch.isnan(imp).any():
                continue
            standardized = (imp.max() - imp) / (imp.max() - imp.min() + 1e-8)
            self.group_reg[group] = self.group_reg[group] + self.delta_reg * standardized
            near_full += int((standardized >= SEED_NEAR_FULL).sum())
            total += len(standardized)
        self._scatter()
        self._warn_heavy_tail(near_full, total)

    def _warn_heavy_tail(self, near_full: int, total: int) -> None:
        """The seed rule scales by (max - imp) / (max - min): with a few outlying scores (an LLM's activation
        statistics) nearly every channel gets nearly the whole delta_reg, and the penalty shrinks the layers
        wholesale instead of the channels to remove (Gemma 3 270M: perplexity 30 -> 2e9 in 10 updates)."""
        if self._seed_warned or not total or near_full < SEED_HEAVY_SHARE * total:
            return
        self._seed_warned = True
        warnings.warn(
            f"GrowingRegPruner(schedule='seed'): {near_full} of {total} channels get at least "
            f"{SEED_NEAR_FULL:.0%} of delta_reg at each update_reg(), because a few channels score far above the "
            f"rest; the penalty will shrink nearly every channel, not the ones step() removes. Use "
            f"schedule='greg1' (only the chosen channels grow) or a criterion with less outlying scores; "
            f"pruner.report() lists what each step removed",
            stacklevel=3,
        )

    # -- the paper's schedules -----------------------------------------------------------------------
    def _update_greg1(self) -> None:
        if self._selected is None:
            self._selected = self._choose_for_next_step()
            self._attach_head_penalties()
            self._start_fade()
        for group in self._reg_groups:
            chosen = self._chosen_in(group)
            if chosen is None or len(chosen) == 0:
                continue
            reg = self.group_reg[group].clone()
            reg[chosen] = (reg[chosen] + self.delta_reg).clamp(max=self.reg_ceiling)
            self.group_reg[group] = reg
        self._scatter()

    def _start_fade(self) -> None:
        """The fade's readers: the IN side of each chosen channel set's removal group (whole heads' groups
        hold their removal already)."""
        if self._fade is None or self._selected is None:
            return
        groups = []
        for group in self._reg_groups:
            chosen = self._chosen_in(group)
            if chosen is None or len(chosen) == 0:
                continue
            groups.append(group if _head_penalty(group) is not None else self._removal_group(group, chosen))
        self._fade.start(groups)

    def step(self, interactive: bool = False, optimizer=None):
        if self._fade is not None and self._fade.started:
            self._fade.transfer()
            # the layers the fade compensated are not compensated again at removal
            self._fade.compensator.faded = self._fade.covered()
        return super().step(interactive=interactive, optimizer=optimizer)

    step.__doc__ = BasePruner.step.__doc__

    def _compensation_notes(self) -> list:
        notes = super()._compensation_notes()
        if self._fade is not None and self._fade.started:
            notes += [f"compensation during the fade left out {name} ({why}); it was compensated at removal"
                      for name, why in self._fade.skipped.items()]
        return notes

    def _chosen_in(self, group) -> torch.Tensor | None:
        """GReg-1's chosen channels as positions in ``group``'s coefficients (a whole-head group holds the
        heads' removal, with coefficients over its root's full width)."""
        if _head_penalty(group) is not None:
            return self._selected[group.head_penalty]
        return None if self._selected is None else self._selected.get(self._group_key(group))

    def _reg_key(self, group) -> str:
        return _head_penalty(group) or self._group_key(group)

    def _attach_head_penalties(self) -> None:
        """Whole heads GReg-1 chose get the growing penalty too. Channel groups cannot carry it: a head's
        channels map onto head_dim-wide tensors every head shares (q_norm, the key projection), so the
        heads' removal groups (their query rows, output columns, ...) join the regularized groups, replacing
        any attached before (a checkpoint loaded over a running choice)."""
        attached = [g for g in self._reg_groups if _head_penalty(g) is not None]
        for group in attached:
            self._reg_groups.remove(group)
            del self.group_reg[group]
        added = False
        nodes = {}
        for key, idxs in self._selected.items():
            if not key.startswith(self.HEADS):
                continue
            if not nodes:
                nodes = {self._group_key(group): group[0] for group in self.DG.get_all_groups(
                    root_module_types=self.root_module_types, include_blocked=True)}
            root = nodes.get(key[len(self.HEADS):])
            if root is None:
                continue
            group = self.DG.get_group_by_side(root.dep.target.module, root.side, idxs.tolist())
            group.head_penalty, group.reg_width = key, len(root.idxs)
            self._reg_groups.append(group)
            self.group_reg[group] = torch.full((len(root.idxs),), float(self.base_reg))
            added = True
        if added or attached:
            self._engine.compile(self._reg_groups, self._parameter_names())

    def _choose_for_next_step(self) -> dict:
        """Root channels the next step() will remove, chosen by importance now (GReg-1); whole heads under
        ``HEADS`` + their root's key."""
        saved = self.current_step
        self.current_step = min(saved + 1, self.iterative_steps)
        try:
            # a budget plans locally (pruner/budget.py), without the measuring a real step does
            plan = list(self._plan_global() if self.global_pruning and not self.target else self._plan_local())
        finally:
            self.current_step = saved
        chosen = {}
        # a root whose channel group is regularized (BERT's heads with prune_head_dims) takes its whole-head
        # choice through that group, as its channels map one to one; the others need a group of their own
        regularized = {self._group_key(g) for g in self._reg_groups if _head_penalty(g) is None}
        for group in _as_applied(plan):
            key = self._group_key(group)
            if group.whole_heads and key not in regularized:
                key = self.HEADS + key
            chosen[key] = torch.tensor(group[0].idxs, dtype=torch.long)
        return chosen

    def _preselected_heads(self, group):
        """step() removes exactly the heads GReg-1 penalised, whatever the criterion says now (a Taylor score
        needs gradients the training loop has cleared; a magnitude one sees the penalty)."""
        if self.schedule != "greg1" or self._selected is None or self._later_budget_pass():
            return None
        key = self.HEADS + self._group_key(group)
        penalised = next((g for g in self._reg_groups if _head_penalty(g) == key), None)
        if penalised is None or penalised.reg_width != len(group[0].idxs):
            return None  # chosen on another width (an earlier head group of this step narrowed the layer)
        return self._selected[key]

    def _choose(self, group, imp, n_prune, channel_groups):
        # the channels chosen ahead were chosen on the widths the step starts from: a latency budget's later
        # passes (pruner/latency_loop.py) choose among what is left by importance
        if self.schedule == "greg1" and self._selected is not None and not self._later_budget_pass():
            chosen = self._selected.get(self._group_key(group))
            if chosen is not None and n_prune < len(chosen) and channel_groups == 1 and imp is not None:
                # a latency budget's first pass stops short of the budget the channels were chosen for: it
                # takes the least important of them
                chosen = chosen[imp.detach().cpu()[chosen].argsort()[:n_prune]]
            if chosen is not None and len(chosen):
                return self._removal_group(group, chosen)
        return super()._choose(group, imp, n_prune, channel_groups)

    def _removal_group(self, group, chosen: torch.Tensor):
        """The group removing the root channels ``chosen`` of ``group``, with every coupled layer's indices."""
        root = group[0]
        return self.DG.get_group_by_side(root.dep.target.module, root.side, chosen.tolist())

    def _prune_group(self, group, optimizer=None) -> list:
        if not self.rescale_norms:
            return super()._prune_group(group, optimizer)
        if getattr(self, "_norm_inputs_step", None) != self.current_step:
            # the first group of a step: the norms' inputs before anything is pruned (halfway through a step
            # the model need not run); a step redone group by group restores the model and keeps them
            self._norm_inputs = capture_inputs(self.model, self.example_inputs, self.forward_fn)
            self._norm_inputs_step = self.current_step
        norms = norms_in(self.model, group)
        scales = measure_scales(norms, self._norm_inputs) if norms else []
        plan = super()._prune_group(group, optimizer)
        rescale(norms, scales)
        return plan

    def ready_to_prune(self) -> bool:
        """True when growing regularization has done its work and step() will cost little."""
        growing = self._growing_values()
        if growing is not None and len(growing) and bool((growing >= self.reg_ceiling).all()):
            return True
        if self.schedule == "seed":
            return False
        return self._magnitude_ratio() >= self.magnitude_ratio

    def _growing_values(self):
        if self.schedule == "greg1":
            if not self._selected:
                return None
            values = [self.group_reg[g][self._chosen_in(g)] for g in self._reg_groups
                      if self._chosen_in(g) is not None]
        else:
            values = list(self.group_reg.values())
        return torch.cat(values) if values else None

    def _magnitude_ratio(self) -> float:
        """Mean |importance| of channels to keep over that of channels to remove (GReg's signal)."""
        chosen = self._selected if self.schedule == "greg1" else self._choose_for_next_step()
        if not chosen:
            return 0.0
        kept, removed = [], []
        for group in self._reg_groups:
            if _head_penalty(group) is not None:
                continue  # only the heads being removed: nothing kept to compare with
            idxs = chosen.get(self._group_key(group))
            if idxs is None or len(idxs) == 0:
                continue
            imp = self.estimate_importance(group)
            if imp is None:
                continue
            imp = imp.detach().float().cpu().abs()
            mask = torch.zeros(len(imp), dtype=torch.bool)
            mask[idxs] = True
            kept.append(imp[~mask])
            removed.append(imp[mask])
        if not removed:
            return 0.0
        return float(torch.cat(kept).mean() / torch.cat(removed).mean().clamp(min=1e-12))

    def regularize(self, model: nn.Module = None, bias: bool = False, decoupled: bool = False,
                   lr: float | None = None) -> None:
        """grad += gamma * weight for every regularized channel; call after backward(), before optimizer.step().

        With ``decoupled=True`` the penalty skips the gradient and shrinks the weights directly,
        ``w *= 1 - lr * gamma`` (AdamW's decoupled weight decay, per channel), with ``lr`` the optimizer's
        current learning rate: use it with Adam/AdamW, whose normalisation of the gradient otherwise
        cancels most of the gradient penalty (see docs/growing_regularization.md). ``regularize(model, loss)`` (BasePruner's
        torch_pruning call form) is accepted: the loss is not needed.
        """
        bias = False if is_loss(bias) else bool(bias)
        model = self.model if model is None else model
        if self._fade is not None and self._selected is not None and not self._fade.started:
            self._start_fade()  # a checkpoint loaded mid-round: the fade goes on from the weights as they are
        if not decoupled:
            if lr is not None:
                raise ValueError(
                    f"regularize(lr={lr}) without decoupled=True: the gradient penalty does not use a learning "
                    f"rate; pass decoupled=True to shrink the weights by lr * gamma, or drop lr"
                )
            self._engine.apply(bias, model=model)
            return self._after_penalty(model)
        if lr is None or not lr >= 0:
            raise ValueError(
                f"regularize(decoupled=True) needs lr >= 0, the optimizer's current learning rate "
                f"(optimizer.param_groups[0]['lr']), got lr={lr!r}"
            )
        self._engine.decay(float(lr), bias, model=model)
        self._after_penalty(model)

    def _after_penalty(self, model: nn.Module) -> None:
        """Compensation during the fade: the removed columns' change since the last call (the optimizer's
        step, a decoupled penalty) goes to the kept ones."""
        if self._fade is not None and self._fade.started:
            # the pruner's own model needs no lookup of which parameters it trains
            self._fade.transfer(None if model is self.model else model)

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "current_step": self.current_step,
            "schedule": self.schedule,
            "group_reg": {self._reg_key(group): reg.clone() for group, reg in self.group_reg.items()},
            "selected": None if self._selected is None else {k: v.clone() for k, v in self._selected.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.current_step = int(state["current_step"])
        selected = state.get("selected")
        self._selected = None if selected is None else {k: v.clone() for k, v in selected.items()}
        if self._selected is not None and self.schedule == "greg1":
            self._attach_head_penalties()
        if self._fade is not None:
            self._fade.reset()
        saved = state["group_reg"]
        for group in self._reg_groups:
            key = self._reg_key(group)
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


def _head_penalty(group) -> str | None:
    """The ``HEADS`` key of a whole-head removal group GReg-1 regularizes, None for a channel group."""
    return getattr(group, "head_penalty", None)


def _as_applied(plan: list) -> list:
    """The planned groups a step would still take once the earlier ones are applied.

    Planning runs here without pruning in between, so a head group whose layer an earlier head group
    already narrowed is planned on the full width: BERT's value heads have a group of their own, and the
    query/key heads' group removes them too. step() re-plans the value group on the narrowed layer, where
    its head target is met and it takes nothing; penalising its own choice of heads as well would drive
    half of the kept heads' values to zero. (``Group.heads_removed`` only counts the user's ``num_heads``
    layers: ``whole_heads`` marks a head group.)
    """
    narrowed, kept = set(), []
    for group in plan:
        # the same holds for a root's channel (head-dim) group planned after its whole heads: step() finds
        # its target met by the heads
        if (group[0].dep.target.module, group[0].side) in narrowed:
            continue
        kept.append(group)
        if group.whole_heads:
            narrowed.update((item.dep.target.module, item.side) for item in group)
    return kept
