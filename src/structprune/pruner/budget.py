"""Budgets instead of ratios (``target={"latency_ms": x}`` / ``{"macs": x}`` / ``{"params": x}``) and
hardware-aware widths (``round_to="auto"``), both planned on a :class:`~structprune.utils.cost_profile.CostProfile`.

The budget is reached along the schedule: ``iterative_pruning_ratio_scheduler`` spreads the fraction of
cost to remove over the steps, and each step allocates its share with :func:`.knapsack.allocate` over the
groups as they are then. A latency budget plans on the ``"auto"`` widths unless ``round_to`` is given:
planning at one-channel steps would pick the widths the profile says are slow. After a budget step the
model's cost is measured (timed, or counted), shown in ``report()``, and a latency measurement that
disagrees with the prediction corrects the next step's plan.
"""
from __future__ import annotations

import math
import warnings

from torch import nn

from ..graph.side import Side
from ..utils.cost_profile import CostProfile
from ..utils.latency import cost_profile, measure_cost
from .knapsack import Candidate, allocate

#: a step ``s`` lowers a group's latency when timing ``anchor - s`` channels costs at most
#: ``1 - PROPORTIONAL * s / anchor + NOISE`` of the anchor's time: half its share of the channels, within
#: the timing noise of interleaved medians
PROPORTIONAL = 0.5
NOISE = 0.02
#: times a latency step is measured and planned again while it is slower than its budget
CORRECTIONS = 2
#: a measurement this many times the prediction means the profile does not describe the model: no correction
TRUSTED = 1.5
#: one correction scales the prediction by at most this: on a loaded machine one slow measurement must not
#: cut the model to its floors (an efficientnet_b0 budget of 0.29 of its latency went to 0.06 before)
STEP_CORRECTION = 1.2


class BudgetMixin:
    """Mixin of BasePruner: cost profiles, ``round_to="auto"`` steps and the budget of each step."""

    def _init_budget(self, target: dict | None, profile: CostProfile | None) -> None:
        self.target = dict(target) if target else None
        self._profiles: dict = {}
        if profile is not None:
            self._profiles["latency_ms"] = profile
        self._auto_steps: dict | None = None  # picked once a latency profile exists
        self._calibration = 1.0  # measured / predicted latency after the last budget step
        self._pass_calibration = 1.0  # the same within this planning pass, corrections included
        self._budget_plan: dict | None = None
        self._budget_schedule: list | None = None
        if self.round_to == "auto":
            self._auto_steps = self._pick_steps(self._profile("latency_ms"))
        if not self.target:
            return
        metric, value = next(iter(self.target.items()))
        current = self._profile(metric).total
        if metric == "latency_ms":
            # a cached profile may come from a quieter or busier moment (or another process's threads): its
            # layers' shares still hold, its level is re-anchored on the model timed now
            current = measure_cost(self.model, self.example_inputs, metric)
            self._calibration = self._pass_calibration = current / self._profile(metric).total
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
        self._budget_schedule = [current * (1.0 - share) for share in schedule]

    def _plan(self):
        # a budget sets every group's count itself, under global_pruning too
        return self._plan_to_budget() if self.target else super()._plan()

    def _plan_to_budget(self):
        """The step's groups for its budget; for latency, then measured, and while the model is slower than
        the budget, planned again from there with the prediction scaled to the measurement (layers timed
        alone do not add up to the model exactly)."""
        self._reset_shares()
        # a planning pass may be redone (a size tie left unbalanced, the verified fallback): each pass starts
        # from the calibration the last step left, or the redo would compound this pass's corrections
        self._pass_calibration = self._calibration
        yield from self._plan_local()
        metric = next(iter(self.target))
        for _ in range(CORRECTIONS if metric == "latency_ms" else 0):
            plan = self._budget_plan
            try:
                measured = measure_cost(self.model, self.example_inputs, metric)
            except Exception:  # noqa: BLE001 - mid-step the model may not run yet (a config synced at the end)
                return
            if plan is None or measured <= plan["budget"] * (1 + NOISE) or plan["predicted"] <= 0:
                return
            if measured > plan["predicted"] * TRUSTED:
                return  # the timings alone are no guide for this model (overheads dominate): warned at the end
            self._pass_calibration *= _bounded(measured / plan["predicted"])
            yield from self._plan_local()

    # -- profiles ----------------------------------------------------------------------------------------
    def _profile(self, metric: str) -> CostProfile:
        if metric not in self._profiles:
            self._profiles[metric] = cost_profile(self.model, self.example_inputs, metric,
                                                  units=self._profile_units())
        return self._profiles[metric]

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
            if self._auto_steps is None and "latency_ms" in self._profiles:
                self._auto_steps = self._pick_steps(self._profiles["latency_ms"])
            return (self._auto_steps or {}).get(root)
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
        calibration = self._pass_calibration if metric == "latency_ms" else 1.0
        return profile.predict({name: tuple(width) for name, width in widths.items()}) * calibration

    def _budget_counts(self, groups: list) -> dict:
        """{group root key: channels to remove this step} from the knapsack over this step's budget."""
        from .planning import _root_key

        metric, _ = next(iter(self.target.items()))
        profile = self._profile(metric)
        step = min(self.current_step, self.iterative_steps)
        budget = self._budget_schedule[step]
        calibration = self._pass_calibration if metric == "latency_ms" else 1.0
        budget /= calibration  # the profile predicted this much less (more) than was measured
        bundles: dict = {}
        for group in groups:
            current = len(group[0].idxs)
            blocks = self._channel_groups(group)
            if current % blocks:
                continue
            imp = self._importance(group)
            if self._unscored(group, imp):
                continue
            imp = imp.detach().float().cpu()
            if blocks > 1:
                imp = imp.view(blocks, -1).mean(0).repeat(blocks)
            root = group[0].dep.target.module
            field = self._field_key(group)
            key = (field, current) if field is not None else _root_key(group)
            entry = bundles.setdefault(key, {"groups": [], "width": current, "scores": None, "items": [],
                                              "step": 1, "floor": 0})
            entry["groups"].append(group)
            ranked = imp.sort().values
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
        self._budget_plan = {"metric": metric, "budget": self._budget_schedule[step],
                             "predicted": predicted * calibration}
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
        """After a budget step: its budget, the cost the plan predicted and the cost measured now."""
        if not self.target or self._budget_plan is None:
            return None
        outcome, self._budget_plan = dict(self._budget_plan), None
        metric = outcome["metric"]
        outcome["measured"] = measure_cost(self.model, self.example_inputs, metric)
        if metric == "latency_ms" and outcome["predicted"] > 0:
            self._calibration = self._pass_calibration * _bounded(outcome["measured"] / outcome["predicted"])
        final = self.current_step >= self.iterative_steps
        # MACs and parameters are counted exactly; a latency within timing noise of its budget is met
        if final and outcome["measured"] > outcome["budget"] * (1.1 if metric == "latency_ms" else 1.0):
            warnings.warn(
                f"step() left {metric} at {outcome['measured']:.6g}, above the budget {outcome['budget']:.6g} "
                f"(predicted {outcome['predicted']:.6g}): groups reached max_pruning_ratio or their floors, or the "
                f"layers timed alone mispredict the model. pruner.report() shows each step", stacklevel=4)
        return outcome


def _bounded(factor: float) -> float:
    return min(max(factor, 1.0 / STEP_CORRECTION), STEP_CORRECTION)


def pick_step(profile: CostProfile, items: list, blocks: int) -> int | None:
    """The finest step (a multiple of ``blocks``) at which removing channels lowers the group's cost:
    the smallest whose timed ``anchor - step`` costs at most ``1 - PROPORTIONAL * step / anchor + NOISE``
    of the anchor, summed over the group's layers. None when no layer of the group has step timings."""
    anchor_cost, below = 0.0, {}
    for name, side, per_root in items:
        layer = profile.layers.get(name)
        table = layer.side(side) if layer is not None else None
        if table is None or table.anchor is None or not table.steps:
            continue
        base = table.anchor_cost() * layer.calls
        anchor_cost += base
        for step, cost in table.steps.items():
            root_step = step / per_root
            if root_step % blocks or not float(root_step).is_integer():
                continue
            entry = below.setdefault(int(root_step), [0.0, 0.0])
            entry[0] += cost * layer.calls - base
            entry[1] += base * step / table.anchor
    if not below:
        return None
    for step in sorted(below):
        change, share = below[step]
        if change <= -PROPORTIONAL * share + NOISE * anchor_cost:
            return step
    return max(below)
