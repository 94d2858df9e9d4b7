"""``uniform_config_widths``: keep one width per config field, so a Hugging Face config describes the model.

A transformers config holds one ``intermediate_size`` for every layer, one ``hidden_size``, one head count.
Local pruning at one ratio already gives every layer the same width, unless a layer cannot be pruned (its
group is refused) or ratios differ per layer; global pruning gives each layer its own. With this option
the pruner finds, for every group, the config field its root's width is counted in (the model family's
``ConfigWidths.layer_fields``, ``structprune.hf.config`` for transformers) and prunes all groups of a field by the same amount: the smallest
planned (local) or the mean (global). Groups held back this way are named in a warning.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field as state_field

import torch
from torch import nn

from ..adapters.families import ConfigWidths


@dataclass
class UniformState:
    """What ``uniform_config_widths`` knows of the model, and what it held back in the step being planned."""

    #: {root module: key of the config field its width is counted in}; empty when the option is off
    field_of: dict = state_field(default_factory=dict)
    #: the transformers nn.MultiheadAttention modules (SigLIP's pooling head): their width goes by whole heads
    config_heads: set = state_field(default_factory=set)
    #: {attention module: (field key, blocks)} where the config derives the head size from that field
    head_ties: dict = state_field(default_factory=dict)
    #: {field key: width of its groups' roots} as last planned
    field_widths: dict = state_field(default_factory=dict)
    #: "root (field: wanted -> allowed)" for each group held to its field this step (warned, reported)
    held_back: list = state_field(default_factory=list)


class UniformWidths:
    """Mixin of BasePruner; its state is ``self._uniform`` (:class:`UniformState`)."""

    def _init_uniform(self, model, uniform_config_widths: bool | None, config: ConfigWidths | None) -> None:
        """``config``: how the model's family counts widths in its config (None: it has no such config)."""
        if uniform_config_widths is None:
            uniform_config_widths = config is not None
        self.uniform_config_widths = bool(uniform_config_widths)
        self._uniform = UniformState()
        if self.uniform_config_widths and config is not None:
            state = self._uniform
            state.field_of = config.layer_fields(model)
            if state.field_of:
                state.config_heads = {module for module in model.modules() if isinstance(module, nn.MultiheadAttention)}
                state.head_ties = config.head_size_ties(model)

    def _follows_config(self) -> bool:
        """Whether widths are held to config fields (the option is on and the model's config counts them)."""
        return bool(self._uniform.field_of)

    def _field_key(self, group):
        """The config field the root's width is counted in (None: no field, or the option is off)."""
        return self._uniform.field_of.get(group[0].dep.target.module)

    def _uniform_limits(self, planned: dict) -> dict:
        """{field: channels every group of it may lose}: the fewest any of its groups plans to lose, 0 when
        one of them is refused. ``planned`` maps each group root (module, side) to its count."""
        if not self._follows_config():
            return {}
        limits: dict = {}
        for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                            root_module_types=self.root_module_types, include_blocked=True):
            key = self._field_key(group)
            if key is None or self._is_head_group(group):
                continue
            root = (group[0].dep.target.module, group[0].side)
            count = planned.get(root, 0)
            limits[key] = min(limits.get(key, count), count)
            self._uniform.field_widths[key] = len(group[0].idxs)
        return limits

    def _head_size_cap(self, group, n_prune: int, losses: dict) -> int:
        """Channels a head group may lose when its config derives the head size from the hidden size
        (BertConfig): the attention width may shrink to the hidden width this step leaves, not below."""
        widths = self._uniform.field_widths
        tie, blocks = self._uniform.head_ties.get(group[0].dep.target.module, (None, 1))
        if tie is None or n_prune <= 0 or tie not in widths:
            return n_prune
        hidden_after = widths[tie] - losses.get(tie, 0)
        allowed = max(0, len(group[0].idxs) - blocks * hidden_after)
        self._note_held_back(group, f"head size = {tie[1]} / heads", n_prune, allowed)
        return min(n_prune, allowed)

    def _uniform_global(self, counts: dict) -> dict:
        """{field: channels each of its groups loses} in global pruning: the mean of what the global ranking
        gives them, or 0 when one of them is refused."""
        if not self._follows_config():
            return {}
        members: dict = {}
        for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                            root_module_types=self.root_module_types, include_blocked=True):
            key = self._field_key(group)
            if key is not None and not self._is_head_group(group):
                root = (group[0].dep.target.module, group[0].side)
                members.setdefault(key, []).append(counts.get(root))
                self._uniform.field_widths[key] = len(group[0].idxs)
        return {key: 0 if None in values else sum(values) // len(values) for key, values in members.items()}

    def _whole_head_blocks(self, group) -> int | None:
        """Head count of a transformers nn.MultiheadAttention in the group (SigLIP's pooling head): its
        config builds it with the config's head count, so its width goes by whole heads, never by narrower
        ones."""
        if not self._follows_config():
            return None
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.MultiheadAttention) and module in self._uniform.config_heads:
                return module.num_heads
        return None

    def _choose_whole_heads(self, group, imp, n_prune: int, heads: int):
        width = len(imp) // heads
        n_heads = n_prune // width
        if n_heads <= 0 or n_heads >= heads or len(imp) % heads:
            return None
        chosen = torch.argsort(imp.detach().cpu().view(heads, width).sum(1))[:n_heads]
        idxs = (chosen[:, None] * width + torch.arange(width)[None, :]).reshape(-1).sort().values
        candidate = self.DG.get_group_by_side(group[0].dep.target.module, group[0].side, idxs.tolist())
        return candidate if self._accepts(candidate, idxs) else None

    def _reset_held_back(self) -> None:
        """A ranking (local, or one global bucket) starts: what an earlier one held back is not this one's."""
        self._uniform.held_back = []

    def _held_back_notes(self) -> list:
        """What the step held back, for the report."""
        return list(self._uniform.held_back)

    def _note_held_back(self, group, field: str, wanted: int, allowed: int) -> None:
        if wanted > allowed:
            self._uniform.held_back.append(f"{self.DG._name(group[0].dep.target.module)} ({field}: {wanted} -> {allowed})")
            self._note_refusal(group[0].dep.target, f"uniform_config_widths: held to {allowed} so that {field} "
                                                    f"still fits every layer")

    def _warn_held_back(self) -> None:
        held = self._uniform.held_back
        if held:
            warnings.warn(
                "uniform_config_widths: pruned less than planned so that one config field still describes every "
                "layer (another layer of the same field could not be pruned as much): " + "; ".join(held)
                + ". Pass uniform_config_widths=False to prune them anyway, then save with tp.save_pruned",
                stacklevel=3,
            )
