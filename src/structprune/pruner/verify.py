"""A step's safety nets: balance the size ties it touched, run the model, and when a group broke it, redo
the step one group at a time (recorded in ``pruner.fallback_history``)."""
from __future__ import annotations

import warnings

import torch

from ..adapters.core import deferred_late_sync
from ..adapters.families import snapshot_families
from ..graph.snapshot import Checkpoint
from ..utils.nested import call_model, evaluating
from .diagnose import explain, layer_widths, size_attributes, stale_attributes
from .fallback import FallbackRecord
from .ties import touches, unbalanced_ties


class VerifyMixin:
    """Mixin of BasePruner: the forward check after a step and the group-by-group retry."""

    def _init_verify(self) -> None:
        #: one FallbackRecord per step whose one-shot prune broke the model (see pruner/fallback.py)
        self.fallback_history: list[FallbackRecord] = []

    def _step_checked(self, optimizer, checkpoint: Checkpoint) -> list:
        """Prune the planned step; if the model then stops running (a size the graph cannot see, e.g. a
        reshape to an input's width), redo it one group at a time, keeping only the groups after which it
        still runs."""
        plans = self._step_balanced(optimizer, checkpoint)
        error = self._forward_error() if self.verify else None
        if error is not None:
            checkpoint.restore()
            record = FallbackRecord(self.current_step, error)
            self.fallback_history.append(record)
            plans = self._step_verified(optimizer, record)
        return plans

    def _step_balanced(self, optimizer, checkpoint: Checkpoint) -> list:
        """Prune every planned group; if the step leaves a size tie unbalanced (two widths a reshape needs
        equal, pruned by different amounts), redo it without the groups that touch such ties.

        Planning with one ratio removes equal counts from tied widths, so this redo is rare; it costs a
        second planning pass, not a forward per group.
        """
        excluded: set = set()
        while True:
            plans, pruned, left = [], [], []
            with deferred_late_sync(self.model):  # the config is synced once, before the forward check
                for group in self._plan():
                    if excluded and touches(group, excluded):
                        left.append(group[0].dep.target.name)
                        continue
                    plans.append(self._prune_group(group, optimizer))
                    pruned.append(group)
            unbalanced = unbalanced_ties(pruned) - excluded
            if not unbalanced:
                break
            checkpoint.restore()
            excluded |= unbalanced
        for name in left:
            self._note_refusal(name, "a reshape ties its width to another group's, pruned by a different amount")
        if left:
            warnings.warn(
                "left unpruned because a reshape ties their width to another group's, which this step prunes by "
                "a different amount: " + ", ".join(left), stacklevel=4)
        return plans

    def _step_verified(self, optimizer, record: FallbackRecord | None = None) -> list:
        record = record if record is not None else FallbackRecord(self.current_step, "")
        plans, skipped = [], []
        for group in self._plan():
            checkpoint = self._checkpoint()
            sizes = self._sizes()
            plan = self._prune_group(group, optimizer)
            error = self._forward_error()
            if error is None:
                plans.append(plan)
                record.kept.append(group[0].dep.target.name)
            else:
                hint = self._stale_hint(sizes)
                checkpoint.restore()
                skipped.append(f"{group[0].dep.target.name} ({error}{hint})")
                record.skipped.append((group[0].dep.target.name, error))
        self._note_fallback(skipped)
        if skipped:
            warnings.warn(
                "left unpruned because the model stopped running after pruning them: " + "; ".join(skipped),
                stacklevel=3,
            )
        return plans

    def _checkpoint(self) -> Checkpoint:
        graph = self.DG.checkpoint()
        num_heads = dict(self.num_heads)  # whole-head pruning keeps it current; an undone group restores it
        restore_families = snapshot_families(self.model)  # Hugging Face configs the adapters rewrite
        # calibrated importances slice their statistics with each pruned group (importance/activation.py)
        statistics = getattr(self.importance, "snapshot_statistics", None)
        statistics = statistics() if statistics is not None else None

        def restore_graph():
            graph._restore_graph()
            self.num_heads = dict(num_heads)
            restore_families()
            if statistics is not None:
                self.importance.restore_statistics(statistics)

        return Checkpoint(graph.snapshot, restore_graph)

    def _sizes(self) -> tuple:
        """Size attributes and layer widths now, to name stale attributes if the model stops running."""
        return size_attributes(self.model), layer_widths(self.DG)

    def _stale_hint(self, sizes: tuple) -> str:
        attributes, widths = sizes
        return explain(stale_attributes(attributes, size_attributes(self.model), widths, layer_widths(self.DG)))

    def _after_step(self, sizes: tuple | None = None) -> None:
        if self.verify:
            error = self._forward_error()
            if error is not None:
                hint = self._stale_hint(sizes) if sizes is not None else ""
                raise RuntimeError(
                    f"the pruned model no longer runs on the example inputs: {error}{hint}. A module attribute "
                    f"probably disagrees with the new shapes; register an adapter "
                    f"(structprune.adapters.register_adapter) for this model family or report it"
                )

    def _forward_error(self) -> str | None:
        try:
            # a check of shapes, not a training pass: no autograd graph to record and free
            with evaluating(self.model) as model, torch.no_grad():
                if self.forward_fn is not None:
                    self.forward_fn(model, self.example_inputs)
                else:
                    call_model(model, self.example_inputs)
        except Exception as error:  # noqa: BLE001 - any failure means the pruned model is broken
            return f"{type(error).__name__}: {error}"
        return None
