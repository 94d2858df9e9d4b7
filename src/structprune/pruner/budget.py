"""Budgets instead of ratios (``target={"latency_ms": x}`` / ``{"macs": x}`` / ``{"params": x}``) and
hardware-aware widths (``round_to="auto"``), both planned on a :class:`~structprune.utils.cost_profile.CostProfile`.

The budget is reached along the schedule: ``iterative_pruning_ratio_scheduler`` spreads the fraction of
cost to remove over the steps, and each step allocates its share with :func:`.knapsack.allocate` over the
groups as they are then. A latency budget plans on the ``"auto"`` widths unless ``round_to`` is given:
planning at one-channel steps would pick the widths the profile says are slow. MACs and parameters are
counted, so one pass meets them; a latency step runs the closed loop of :mod:`.latency_loop` (time the
whole model after each pass, calibrate the prediction, plan again), and the schedule's later steps start
from the latency and calibration the last one measured.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..graph.side import Side
from ..importance.elementwise import ElementwiseImportance, sharing_position_sums
from ..utils.cost_profile import CostProfile
from ..utils.latency import cost_profile, measure_cost, profile_timer
from .knapsack import Candidate, allocate
from .latency_loop import Calibration, LatencyLoop, miss_warning

#: a step ``s`` lowers a group's latency when timing ``anchor - s`` channels costs at most
#: ``1 - PROPORTIONAL * s / anchor`` of the anchor's time: half its share of the channels, which leaves the
#: other half for timing noise. (An allowance of a share of the anchor instead let a step that saves nothing
#: pass wherever ``s / anchor`` is below it: one-channel steps on every group 50 or more channels wide.)
PROPORTIONAL = 0.5
#: a finest step under this fraction of the anchor (1/FINE) saves less than timing noise: a second reading
#: of the anchor's cost
FINE = 32
#: a budget this share below what the floors reach is within the profile's noise of them
NOISE = 0.02


@dataclass
class BudgetState:
    """What the budget part keeps (``pruner._budget``); no other part reads it."""

    #: {metric: CostProfile}, measured or handed in once
    profiles: dict = field(default_factory=dict)
    #: the user's ``latency_fn`` (None: time the model as its profile timed the unpruned one)
    latency_fn: Callable | None = None
    #: round_to="auto": {layer: width step}, picked once a latency profile exists
    auto_steps: dict | None = None
    #: the profile's latency prediction mapped onto the whole model's last timings (latency budgets)
    calibration: Calibration | None = None
    #: this step's passes (latency budgets), and the budget in profile units the current pass plans to
    latency_loop: LatencyLoop | None = None
    pass_budget: float | None = None
    #: passes of this step planned before the current one (GReg-1's channels chosen ahead hold for the first)
    earlier_passes: int = 0
    #: root keys of the groups the graph refused this step: the knapsack stops spending the budget on them
    refused: set = field(default_factory=set)
    #: the knapsack's plan for this step, and the budget each step of the schedule aims at
    plan: dict | None = None
    schedule: list | None = None


class BudgetMixin:
    """Mixin of BasePruner: cost profiles, ``round_to="auto"`` steps and the budget of each step."""

    def _init_budget(self, options) -> None:
        target, profile = options.target, options.latency_profile
        self.target = dict(target) if target else None
        self._budget = BudgetState(latency_fn=options.latency_fn)
        if profile is not None:
            self._budget.profiles["latency_ms"] = profile
        if self.round_to == "auto":
            self._budget.auto_steps = self._pick_steps(self._profile("latency_ms"))
        if not self.target:
            return
        metric, value = next(iter(self.target.items()))
        current = self._profile(metric).total
        if metric == "latency_ms":
            # a cached profile may come from a quieter or busier moment (or another process's threads): its
            # layers' shares still hold, its level is re-anchored on the model timed now
            current = self._measure_latency()
            self._budget.calibration = Calibration.anchored(current, self._profile(metric).total)
        if value >= current:
            raise ValueError(
                f"target {metric}={value:g} is not below {type(self.model).__name__}'s current {metric} "
                f"({current:.6g}, measured on {self._profile(metric).device}); nothing to prune: pass a smaller "
                f"budget, or no target")
        floor = self._floor_cost(metric)
        if value < floor * (1 - NOISE):
            # the greedy would cut every group to its floor and still miss: say so instead of doing it
            raise ValueError(
                f"target {metric}={value:g} is below the {floor:.6g} the profile predicts for "
                f"{type(self.model).__name__} with every group at its floor (max_pruning_ratio="
                f"{self.max_pruning_ratio:g}): layers no group narrows, and the ops between layers, keep their cost; "
                f"pass a budget above it or a higher max_pruning_ratio")
        reduction = 1.0 - value / current
        schedule = self.iterative_pruning_ratio_scheduler(reduction, self.iterative_steps)
        self._budget.schedule = [current * (1.0 - share) for share in schedule]

    def _plan(self):
        # a budget sets every group's count itself, under global_pruning too
        return self._plan_to_budget() if self.target else super()._plan()

    def _plan_to_budget(self):
        """The step's groups for its budget: one pass for MACs and parameters (counted exactly), the passes
        of a :class:`.latency_loop.LatencyLoop` for latency. A redone planning pass (a size tie left
        unbalanced, the verified fallback) starts a new loop from the step's start."""
        self._reset_shares()
        self._budget.pass_budget = None
        self._budget.earlier_passes = 0
        self._budget.refused = set()
        metric = next(iter(self.target))
        if metric != "latency_ms":
            yield from self._plan_pass()
            return
        # a step re-planned towards a config's widths (config_fit.py) removes nothing after its first pass,
        # which ends the loop
        profile = self._profile(metric)
        step = min(self.current_step, self.iterative_steps)
        loop = self._budget.latency_loop = LatencyLoop(self._budget.schedule[step], copy.copy(self._budget.calibration))
        while (aim := loop.next_target()) is not None:
            self._budget.pass_budget = loop.profile_target(aim)
            before = self._predicted_now(profile)
            yield from self._plan_pass()
            predicted = self._predicted_now(profile)
            if predicted >= before * (1 - 1e-9):
                loop.stuck()
                break
            loop.plan(aim, predicted)
            try:
                measured = self._measure_latency()
            except Exception as error:  # noqa: BLE001 - mid-step the model may not run yet
                loop.untimed(error)
                break
            loop.observe(measured)
            self._budget.earlier_passes += 1
        self._budget.pass_budget = None
        self._budget.earlier_passes = 0

    def _plan_pass(self):
        """One pass of the knapsack, planned again without the groups the graph refused (rotary embeddings
        pin a head's width, a view spells out a size): the budget they were given goes to the others."""
        while True:
            refused = len(self._budget.refused)
            yield from self._plan_local()
            if len(self._budget.refused) == refused:
                return

    def _budget_refused(self, group) -> None:
        from .planning import _root_key

        self._budget.refused.add(_root_key(group))

    def _later_budget_pass(self) -> bool:
        """Whether this step already planned a latency pass before the current one."""
        return self._budget.earlier_passes > 0

    def _measure_latency(self) -> float:
        """The whole model's latency now: ``latency_fn``, or timed as its profile timed the unpruned model."""
        timer = self._budget.latency_fn or profile_timer(self._profile("latency_ms"))
        value = timer(self.model, self.example_inputs)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"latency_fn returned {value!r} for {type(self.model).__name__}; it must return the "
                             f"whole model's latency in ms, a positive number")
        return float(value)

    def _predicted_now(self, profile: CostProfile) -> float:
        return profile.predict({name: tuple(width) for name, width in self._layer_widths(profile).items()})

    # -- profiles ----------------------------------------------------------------------------------------
    def _profile(self, metric: str) -> CostProfile:
        if metric not in self._budget.profiles:
            self._budget.profiles[metric] = cost_profile(self.model, self.example_inputs, metric,
                                                  units=self._profile_units())
        return self._budget.profiles[metric]

    def _profile_units(self) -> dict:
        """``{(layer name, "out" | "in"): multiple}``: each side's width stays a multiple of its groups'
        channel groups (and heads), so the profile times only widths planning may choose."""
        units: dict = {}
        for group in self._groups():
            blocks = self._channel_groups(group)
            for name, side, per_root in self._group_items(group):
                unit = blocks * per_root
                unit = int(unit) if unit >= 1 and float(unit).is_integer() else blocks
                units[(name, side)] = math.lcm(units.get((name, side), 1), unit)
        return units

    def _group_items(self, group) -> list[tuple[str, str, float]]:
        """``(layer name, "out" | "in", layer channels per root channel)`` of a group's layers."""
        current = len(group[0].idxs) or 1
        items = []
        for item in group:
            node = item.dep.target
            if isinstance(node.module, nn.Parameter):
                continue
            side = "out" if node.side_for(item.side) is Side.OUT else "in"
            items.append((node.name, side, len(item.idxs) / current))
        return items

    # -- round_to="auto" ---------------------------------------------------------------------------------
    def _width_step(self, root) -> int | None:
        """The multiple a group rooted at ``root`` keeps: ``round_to``, its auto step, or None."""
        if isinstance(self.round_to, int):
            return self.round_to
        if self.round_to == "auto" or (self.target and "latency_ms" in self.target):
            if self._budget.auto_steps is None and "latency_ms" in self._budget.profiles:
                self._budget.auto_steps = self._pick_steps(self._budget.profiles["latency_ms"])
            return (self._budget.auto_steps or {}).get(root)
        return None

    def _pick_steps(self, profile: CostProfile) -> dict:
        """{root module: the finest step at which the profile's timings drop}, per group."""
        steps = {}
        for group in self._groups():
            blocks = self._channel_groups(group)
            step = pick_step(profile, self._group_items(group), blocks)
            if step is not None:
                steps[group[0].dep.target.module] = step
        return steps

    # -- budgets -----------------------------------------------------------------------------------------
    def _floor_cost(self, metric: str) -> float:
        """The cost the profile predicts with every group cut to its floor (max_pruning_ratio, one channel
        group): no budget below it can be met."""
        profile = self._profile(metric)
        widths = self._layer_widths(profile)
        for group in self._groups():
            current = len(group[0].idxs)
            blocks = self._channel_groups(group)
            if current % blocks:
                continue
            floor = self._n_keep(group[0].dep.target.module, current, self.max_pruning_ratio, blocks)
            for name, side, per_root in self._group_items(group):
                layer = profile.layers.get(name)
                if layer is None:
                    continue
                position = 1 if side == "out" or layer.coupled else 0
                if widths[name][position] is not None:
                    widths[name][position] = max(0.0, widths[name][position] - per_root * (current - floor))
        predicted = profile.predict({name: tuple(width) for name, width in widths.items()})
        return self._budget.calibration.calibrated(predicted) if metric == "latency_ms" else predicted

    def _budget_counts(self, groups: list) -> dict:
        """{group root key: channels to remove this step} from the knapsack over this step's budget."""
        from .planning import _root_key

        metric, _ = next(iter(self.target.items()))
        profile = self._profile(metric)
        step = min(self.current_step, self.iterative_steps)
        budget = self._budget.pass_budget
        if budget is None:
            # MACs, parameters, or a plan made ahead of the step (GReg-1): the step's budget in profile units
            budget = self._budget.schedule[step]
            if metric == "latency_ms":
                budget = self._budget.calibration.profile_target(budget)
        bundles: dict = {}
        values = comparable_values(self.importance)
        # every group is scored again on the shared scale: each weight once, however many groups read it
        with sharing_position_sums():
            for group in groups:
                current = len(group[0].idxs)
                blocks = self._channel_groups(group)
                if current % blocks:
                    continue
                if _root_key(group) in self._budget.refused:
                    continue
                imp = self._importance(group)
                if self._unscored(group, imp):
                    continue
                ranked = _ranked_values(imp, values(group, imp), blocks)
                root = group[0].dep.target.module
                field = self._field_key(group)
                key = (field, current) if field is not None else _root_key(group)
                entry = bundles.setdefault(key, {"groups": [], "width": current, "scores": None, "items": [],
                                                  "step": 1, "floor": 0})
                entry["groups"].append(group)
                entry["scores"] = ranked if entry["scores"] is None else entry["scores"] + ranked
                entry["items"] += [item for item in self._group_items(group) if item[0] in profile.layers]
                entry["step"] = math.lcm(entry["step"], blocks, self._width_step(root) or 1)
                entry["floor"] = max(entry["floor"], self._n_keep(root, current, self.max_pruning_ratio, blocks))
        candidates = [Candidate(key, entry["width"], entry["floor"], entry["step"], entry["scores"].tolist(),
                                entry["items"]) for key, entry in bundles.items()]
        counts, predicted = allocate(profile, candidates, self._layer_widths(profile), budget)
        planned = {_root_key(group): 0 for group in groups}
        for key, entry in bundles.items():
            for group in entry["groups"]:
                planned[_root_key(group)] = counts[key]
                if counts[key]:
                    # held to its share in the report, as under global pruning; a correction adds to the first plan
                    self._add_share(group[0].dep.target.name, counts[key])
        self._budget.plan = {"metric": metric, "budget": self._budget.schedule[step], "predicted": predicted}
        return planned

    def _layer_widths(self, profile: CostProfile) -> dict:
        """{profiled layer name: [in width, out width]} now."""
        modules = dict(self.model.named_modules())
        widths = {}
        for name, layer in profile.layers.items():
            node = self.DG.module2node.get(modules.get(name))
            if node is None:
                widths[name] = [None, None]
                continue
            out = self.DG._safe_channels(node, Side.OUT)
            widths[name] = [None if layer.coupled else self.DG._safe_channels(node, Side.IN), out]
        return widths

    def _budget_outcome(self) -> dict | None:
        """After a budget step: its budget, the cost predicted and the cost measured now (for latency also
        the calibrated prediction, each pass, and the calibration the next step starts from)."""
        if not self.target or self._budget.plan is None:
            return None
        plan, self._budget.plan = self._budget.plan, None
        metric = plan["metric"]
        final = self.current_step >= self.iterative_steps
        if metric != "latency_ms":
            outcome = dict(plan, calibrated=plan["predicted"])
            outcome["measured"] = measure_cost(self.model, self.example_inputs, metric)
            # MACs and parameters are counted exactly: any excess means groups ran out of channels
            if final and outcome["measured"] > outcome["budget"]:
                warnings.warn(
                    f"step() left {metric} at {outcome['measured']:.6g}, above the budget {outcome['budget']:.6g}: "
                    f"groups reached max_pruning_ratio or their floors. pruner.report() shows each step",
                    stacklevel=4)
            return outcome
        loop = self._budget.latency_loop
        if loop is None:  # an interactive step: the caller pruned what one pass planned
            loop = LatencyLoop(plan["budget"], copy.copy(self._budget.calibration))
        self._budget.latency_loop = None
        measured = self._measure_latency()
        outcome = loop.outcome(measured, self._predicted_now(self._profile(metric)))
        self._budget.calibration = loop.calibration  # the schedule's next step starts from it
        warning = miss_warning(outcome) if final else None
        if warning is not None:
            warnings.warn(warning, stacklevel=4)
        return outcome


def comparable_values(criterion) -> Callable:
    """``values(group, scores)``: each root channel's importance on a scale shared by all groups.

    The knapsack weighs one group's channels against another's, per millisecond saved. A criterion's
    normalizer (MagnitudeImportance's default divides each group by its own mean) and a mean over the
    group's layers make every group's channels worth about 1, whatever they hold: the greedy then takes
    whichever group saves most per channel, on a transformer the residual width that every block reads,
    cut deep. So a parameter-based criterion is asked again with its scores summed over the group's layers
    and left unnormalized: what removing the channel takes from all of them. Its own scores still order
    the channels within the group. Any other criterion's scores are used as they are.
    """
    if not isinstance(criterion, ElementwiseImportance) or (
            criterion.group_reduction == "sum" and criterion.normalizer is None):
        return lambda group, scores: scores
    # a fresh copy per plan: a calibrated criterion may have rebound its statistics since
    raw = criterion.rescored("sum", None)

    def values(group, scores):
        summed = raw(group)
        return scores if summed is None or len(summed) != len(scores) else summed
    return values


def _ranked_values(scores, values, blocks: int):
    """``values`` of the root channels in the order ``scores`` removes them (lowest first); with channel
    groups, positions go together across the blocks, each at its mean over them."""
    scores, values = scores.detach().float().cpu(), values.detach().float().cpu()
    if blocks > 1:
        scores, values = scores.view(blocks, -1).mean(0), values.view(blocks, -1).mean(0)
    ranked = values[scores.argsort(stable=True)]
    return ranked.repeat_interleave(blocks) if blocks > 1 else ranked


def pick_step(profile: CostProfile, items: list, blocks: int) -> int | None:
    """The finest step (a multiple of ``blocks``) at which removing channels lowers the group's cost:
    the smallest whose timed ``anchor - step`` costs at most ``1 - PROPORTIONAL * step / anchor`` of the
    anchor, summed over the group's layers. None when no layer of the group has step timings."""
    below: dict = {}
    for name, side, per_root in items:
        layer = profile.layers.get(name)
        table = layer.side(side) if layer is not None else None
        if table is None or table.anchor is None or not table.steps:
            continue
        legal = {step: cost for step, cost in table.steps.items()
                 if float(step / per_root).is_integer() and not (step / per_root) % blocks}
        if not legal:
            continue
        base = table.anchor_cost()
        if min(legal) * FINE < table.anchor:
            # a step this fine saves next to nothing, so its timing is a second reading of the anchor's: an
            # anchor timed slow (a busy moment) would let every step pass on noise alone (vit_small's MLP got
            # steps of 1 and 2 channels, and widths like 1521)
            base = min(base, legal[min(legal)])
        base *= layer.calls
        for step, cost in legal.items():
            root_step = step / per_root
            entry = below.setdefault(int(root_step), [0.0, 0.0])
            entry[0] += cost * layer.calls - base
            entry[1] += base * step / table.anchor
    if not below:
        return None
    for step in sorted(below):
        change, share = below[step]
        if change <= -PROPORTIONAL * share:
            return step
    return max(below)
