"""What a pruner did and did not do: ``pruner.report()``, and the warning that points to it.

A pruner that quietly removes less than asked is worse than one that fails, so every step is recorded
against its target: each group root's width before and after, the channels the ratio asked of it, and why
a group kept more (a structured :class:`~structprune.graph.refusal.Refusal`, or the forward check's
error when the verified fallback left it). ``step()`` warns once per step whenever it removed fewer
channels than its schedule asked, naming the groups and pointing here.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..graph.refusal import Refusal
from .heads import subset_may_pass


@dataclass
class GroupRecord:
    """One group root in one step: widths, what the ratio asked of it, and why it kept more."""

    root: str
    side: str
    before: int
    after: int
    #: channels the step asked this group to lose: its local target, or under global pruning the share the
    #: global ranking gave it (a group the ranking passed over is asked for none)
    target: int
    #: why it kept more than asked: a Refusal (kind, layer, detail), or the fallback's error text
    reason: str | None = None

    @property
    def removed(self) -> int:
        return self.before - self.after


@dataclass
class StepRecord:
    step: int
    groups: list = field(default_factory=list)
    #: groups the verified fallback could not keep (the model stopped running after pruning them)
    fallback: list = field(default_factory=list)
    #: other notes of the step (heads kept, uniform config widths held back)
    notes: list = field(default_factory=list)
    #: global pruning: the channels the step asked of all groups together
    global_target: int | None = None
    #: a budget step (``target=``): ``{"metric", "budget", "predicted", "calibrated", "measured"}`` after the
    #: step; for latency also ``"start"`` (the latency when the step began), ``"passes"`` (each pass's target,
    #: predicted, calibrated and measured ms),
    #: ``"calibration"`` (the calibration's slope after it: ms timed per ms the profile predicts) and
    #: ``"stopped"`` (why the passes ended short of the budget, or None)
    budget: dict | None = None

    @property
    def removed(self) -> int:
        return sum(record.removed for record in self.groups)

    @property
    def target(self) -> int:
        return self.global_target if self.global_target is not None else sum(r.target for r in self.groups)

    def short(self) -> list:
        """Groups that lost fewer channels than their target."""
        return [record for record in self.groups if record.removed < record.target]


@dataclass
class PruningReport:
    """``pruner.report()``: every group the graph refuses whole, and what each step removed and why not more.

    ``refused`` lists ``(root, Refusal)`` for groups no channel subset can leave (a model output, a
    constant, a buffer...); ``steps`` holds one :class:`StepRecord` per ``step()``. ``str(report)`` is a
    readable summary.
    """

    groups: int
    refused: list
    steps: list

    def __str__(self) -> str:
        lines = [f"{self.groups} prunable group(s); {len(self.refused)} refused whole by the graph"]
        for root, refusal in self.refused:
            kind = refusal.kind.value if isinstance(refusal, Refusal) else "refused"
            lines.append(f"  refused  {root}: {kind} ({refusal})")
        for step in self.steps:
            lines.append(f"step {step.step}: removed {step.removed} of {step.target} planned channels")
            if step.budget is not None:
                lines += budget_lines(step.budget)
            for record in step.groups:
                if record.removed or record.target:
                    mark = "" if record.removed >= record.target else "  <- " + (record.reason or "kept")
                    lines.append(f"  {record.root} ({record.side}): {record.before} -> {record.after}, "
                                 f"target -{record.target}{mark}")
            lines += [f"  fallback: {entry}" for entry in step.fallback]
            lines += [f"  note: {note}" for note in step.notes]
        return "\n".join(lines)


@dataclass
class ReportState:
    """What the report keeps: every step's record, and the notes of the step being taken."""

    records: list = field(default_factory=list)
    #: this step: {group root path: the planner's reason it kept more channels}
    refusals: dict = field(default_factory=dict)
    #: this step: "root (error)" of each group the verified fallback left unpruned
    fallback: list = field(default_factory=list)
    #: {group root path: channels} a ranking over all groups gave each (global pruning, a budget); None
    #: while no such ranking planned a step
    shares: dict | None = None
    #: this step, with prune_num_heads: (root node, side, width, head_dim) of every attention head group
    heads_before: list = field(default_factory=list)


class ReportMixin:
    """Mixin of BasePruner: records each step against its targets and renders ``report()``. Its state is
    ``self._report`` (:class:`ReportState`)."""

    def _init_report(self) -> None:
        self._report = ReportState()
        # whole heads are tried on head groups whatever refuses their channels one by one
        if not any(all(subset_may_pass(reason) for reason in group.blocked)
                   or (self.prune_num_heads and self._is_head_group(group)) for group in self._root_groups(heads=True)):
            warnings.warn(
                f"{type(self).__name__}: the graph found no prunable group in {type(self.model).__name__} (every "
                f"root layer is ignored, or its channels reach outputs, constants or buffers); step() will remove "
                f"nothing. pruner.report() lists each refused group and why",
                stacklevel=3,
            )

    def _root_groups(self, heads: bool = False) -> list:
        """Every group the pruner may root at, refused ones included; attention head groups only with
        ``heads`` (heads have their own planning and warnings)."""
        return [group for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                                          root_module_types=self.root_module_types,
                                                          include_blocked=True)
                if heads or not self._is_head_group(group)]

    def _begin_step_record(self) -> list:
        self._report.refusals = {}
        self._report.fallback = []
        self._report.heads_before = []
        entries = []
        # one walk over the groups: attention head groups are noted for the whole-head lines (prune_num_heads),
        # the rest are held to their targets
        for group in self._root_groups(heads=True):
            root = group[0].dep.target
            current = len(group[0].idxs)
            if self._is_head_group(group):
                if self.prune_num_heads:
                    self._report.heads_before.append((root, group[0].side, current,
                                                      self._head_dim(root.module, current)))
                continue
            blocks = self._channel_groups(group)
            target = 0
            if current % blocks == 0:
                ratio = self.get_target_pruning_ratio(root.module)
                target = max(0, current - self._n_keep(root.module, current, ratio, blocks))
            hard = [reason for reason in group.blocked if not subset_may_pass(reason)]
            entries.append((root, group[0].side, current, target, hard[0] if hard else None))
        return entries

    def _whole_head_lines(self) -> list[str]:
        """Whole heads this step removed, one line per change (e.g. 4 -> 2 heads in 18 layers)."""
        changes: dict = {}
        for root, side, width, head_dim in self._report.heads_before:
            after = self.DG._safe_channels(root, side)
            if after is not None and after < width:
                key = (width // head_dim, after // head_dim, head_dim)
                changes.setdefault(key, []).append(root.name)
        notes = []
        for (before, after, head_dim), roots in changes.items():
            named = ", ".join(roots[:3]) + (f" and {len(roots) - 3} more" if len(roots) > 3 else "")
            notes.append(f"whole heads {before} -> {after} (head_dim {head_dim}) in {len(roots)} head group(s): {named}")
        return notes

    def _end_step_record(self, entries: list, warn: bool = True) -> None:
        state = self._report
        record = StepRecord(self.current_step, fallback=list(state.fallback))
        if self.global_pruning and not self.target:
            ratio = self.per_step_pruning_ratio[min(self.current_step, self.iterative_steps)]
            current = sum(entry[2] for entry in entries if entry[4] is None)
            original = sum(self.layer_init_out_ch.get(entry[0].module) or entry[2] for entry in entries)
            record.global_target = max(0, current - int(original * (1 - ratio)))
        # a budget allocates shares as the global ranking does
        shares = state.shares if self.global_pruning or self.target else None
        for root, side, before, target, hard in entries:
            if shares is not None:
                # one total for all groups: each is held to the share the global ranking gave it
                target = shares.get(root.name, 0)
            after = self.DG._safe_channels(root, side)
            after = before if after is None else after
            reason = hard or state.refusals.get(root.name)
            if reason is None and after > before - target:
                reason = next((entry for entry in record.fallback if entry.startswith(root.name + " ")), None)
            record.groups.append(GroupRecord(root.name, side.name.lower(), before, after, target, reason))
        record.notes += self._whole_head_lines()
        record.notes += [f"uniform config widths held back {note}" for note in self._held_back_notes()]
        record.notes += self._config_fit_notes()
        record.notes += self._compensation_notes()
        record.budget = self._budget_outcome()
        state.records.append(record)
        if warn:
            self._warn_short(record)

    def _note_refusal(self, root, refusal: Refusal | str | None) -> None:
        """The planner's reason for a group it wanted to prune but could not (kept for the report); ``root``
        is the group's root node, its module or its path."""
        name = root if isinstance(root, str) else root.name if hasattr(root, "name") else self.DG._name(root)
        self._report.refusals[name] = refusal

    def _reset_shares(self) -> None:
        """A ranking over all groups starts planning the step: forget the last one's shares."""
        self._report.shares = {}

    def _add_share(self, root_name: str, channels: int) -> None:
        """The ranking gave this group ``channels`` more to lose: the report holds it to its share instead of
        its own ratio (a later correction of the same step adds to it)."""
        state = self._report
        if state.shares is None:
            state.shares = {}
        state.shares[root_name] = state.shares.get(root_name, 0) + channels

    def _note_fallback(self, skipped: list[str]) -> None:
        """The groups this step's verified fallback left unpruned, as "root (error)" (kept for the report)."""
        self._report.fallback = list(skipped)

    def _warn_short(self, record: StepRecord) -> None:
        if record.removed >= record.target:
            return
        short = record.short()
        named = "; ".join(f"{r.root} ({r.removed} of {r.target}: {_kind(r.reason)})" for r in short[:6])
        more = f"; and {len(short) - 6} more" if len(short) > 6 else ""
        if not short:
            # global pruning, every group got its share: the shares themselves fell short of the total
            named = (f"the global ranking's per-group shares, rounded to whole channel blocks and capped by "
                     f"max_pruning_ratio, add up to {sum(r.target for r in record.groups)}")
        warnings.warn(
            f"step() removed {record.removed} of the {record.target} channels its schedule asked for: {named}{more}. "
            f"pruner.report() lists every group and why it kept channels",
            stacklevel=3,
        )

    def report(self) -> PruningReport:
        """What every step removed against its target, the groups the graph refuses whole and why."""
        refused, prunable = [], 0
        for group in self._root_groups():
            hard = [reason for reason in group.blocked if not subset_may_pass(reason)]
            if hard:
                refused.append((group[0].dep.target.name, hard[0]))
            else:
                prunable += 1
        return PruningReport(prunable, refused, list(self._report.records))


def budget_lines(budget: dict) -> list[str]:
    """A budget step's lines: the profile's prediction, the calibrated one (latency) and the measurement,
    then each pass of a latency step."""
    calibrated = (f", calibrated {budget['calibrated']:.6g}" if budget["metric"] == "latency_ms" else "")
    lines = [f"  {budget['metric']} budget {budget['budget']:.6g}: predicted {budget['predicted']:.6g}{calibrated}, "
             f"measured {budget['measured']:.6g}"]
    for index, entry in enumerate(budget.get("passes", ()), start=1):
        measured = "not timed" if entry["measured"] is None else f"measured {entry['measured']:.6g}"
        lines.append(f"    pass {index} to {entry['target']:.6g}: predicted {entry['predicted']:.6g}, "
                     f"calibrated {entry['calibrated']:.6g}, {measured}")
    if budget.get("stopped"):
        lines.append(f"    passes stopped: {budget['stopped']}")
    return lines


def _kind(reason: str | None) -> str:
    if isinstance(reason, Refusal):
        return reason.kind.value
    if reason is None:
        return "no reason recorded"
    return reason if len(reason) < 80 else reason[:77] + "..."


__all__ = ["GroupRecord", "StepRecord", "PruningReport", "ReportMixin"]
