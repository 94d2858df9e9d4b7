"""Whole-head planning for attention: which blocks of a projection's channels form heads, and which
head removals the dependency graph accepts (plain, grouped-query and fused q/k/v layouts)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..adapters.families import head_size_names
from ..graph.group import Group
from ..graph.refusal import Refusal
from ..graph.side import Side


def subset_may_pass(reason: Refusal) -> bool:
    """Whether a reason a group is refused at full width may not apply to a symmetric subset of it."""
    return reason.kind.may_pass_for_subset


@dataclass
class HeadNotes:
    """What the warnings of a step name about attention heads; reset when a step is planned."""

    #: attention roots whose heads no removal could take: (root, side, width, heads, head_dim)
    refused: list = field(default_factory=list)
    #: head groups the graph refused to narrow: (root path, the refusal)
    narrow_refused: list = field(default_factory=list)


@dataclass
class HeadState:
    """The head planner's state."""

    #: module -> its parent, built on first use
    parent_of: dict | None = None
    notes: HeadNotes = field(default_factory=HeadNotes)


class HeadPlanner:
    """Mixin of BasePruner: ``prune_num_heads`` planning and the warnings about untouched attention. Its state
    is ``self._head_state`` (:class:`HeadState`)."""

    def _init_heads(self) -> None:
        self._head_state = HeadState()

    def _reset_head_notes(self) -> None:
        self._head_state.notes = HeadNotes()

    def _head_notes(self) -> HeadNotes:
        """A copy of what this step noted so far (a re-planned step merges it back: :meth:`_merge_head_notes`)."""
        return HeadNotes(list(self._head_state.notes.refused), list(self._head_state.notes.narrow_refused))

    def _merge_head_notes(self, earlier: HeadNotes) -> None:
        """Add what an earlier planning of this step noted (a re-planned step keeps what the graph refused)."""
        notes = self._head_state.notes
        notes.refused += [entry for entry in earlier.refused if entry not in notes.refused]
        notes.narrow_refused += [entry for entry in earlier.narrow_refused if entry not in notes.narrow_refused]

    def _note_narrow_refused(self, root_name: str, refusal: Refusal) -> None:
        """The graph refused to narrow the heads of this group (warned after the step)."""
        self._head_state.notes.narrow_refused.append((root_name, refusal))

    def _is_head_group(self, group: Group) -> bool:
        """Channels that attention splits into heads: rooted under a module with heads, and either blocked
        at full width (a head count or head_dim is spelled out) or split into blocks by a reshape (BERT's
        view to (-1, attention_head_size), which its adapter rewrites). o_proj's group is the hidden
        width, which no reshape splits, not this."""
        return _splits_into_heads(group) and self._head_dim(group[0].dep.target.module, len(group[0].idxs)) is not None

    def _warn_heads_refused(self) -> None:
        """Name the attention layers that prune_num_heads could not touch and nothing else narrowed."""
        untouched = []
        for root, side, total, heads, head_dim in self._head_state.notes.refused:
            width = (self.DG.get_out_channels if side is Side.OUT else self.DG.get_in_channels)(root)
            if width == total:
                untouched.append(f"{self.DG._name(root)} ({heads} blocks of {head_dim} channels)")
        narrow = [f"{name} ({refusal})" for name, refusal in self._head_state.notes.narrow_refused]
        if narrow:
            warnings.warn(
                "prune_head_dims: the graph refused to narrow the heads of " + "; ".join(narrow)
                + ". They keep their width; pass prune_num_heads=True to remove whole heads instead (rotary "
                "embeddings and code that spells out head_dim pin the head width)",
                stacklevel=3,
            )
        if untouched:
            warnings.warn(
                "prune_num_heads: the graph accepted no whole-head removal and no narrower heads for "
                + "; ".join(untouched) + ". Their heads stay; check num_heads for these layers or register an "
                "adapter for their attention module (structprune.adapters.register_adapter)",
                stacklevel=3,
            )

    def _note_pinned_heads(self) -> None:
        """With prune_head_dims alone: name head groups refused for a reason no subset avoids (a rotary
        table, a buffer), which are never tried, beside those whose narrowing the graph refused."""
        if self.prune_num_heads or not self.prune_head_dims:
            return
        for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                            root_module_types=self.root_module_types, include_blocked=True):
            hard = [reason for reason in group.blocked if not subset_may_pass(reason)]
            if hard and self._is_head_group(group) and not self._per_head_table_only(group):
                self._note_narrow_refused(self.DG._name(group[0].dep.target.module), hard[0])

    def _plan_whole_heads(self) -> Iterator[Group]:
        """With ``prune_num_heads``: groups that cannot lose arbitrary channels may lose whole heads.

        Heads are contiguous blocks of the root's channels (``head_dim`` from ``num_heads`` or the
        attention module's own ``head_dim``); grouped-query attention needs whole key/value groups, so
        ever larger multiples are tried until the graph accepts one.
        """
        self._reset_head_notes()
        if not self.prune_num_heads:
            return
        found = False
        for group, root, total, head_dim in self._head_candidates():
            found = True
            preset = self._preselected_heads(group)
            candidate = None if preset is None else self._accepted_heads(root, group[0].side, preset)
            if candidate is not None:
                yield candidate
                continue
            ratio = self.get_target_head_pruning_ratio(root)
            heads = total // head_dim
            imp = self._importance(group)
            if imp is None or torch.isnan(imp).any():
                continue
            scores = imp.detach().cpu().view(heads, head_dim).sum(1)
            # the target counts from the original heads: v's heads may already have gone with q's
            original = (self.layer_init_out_ch.get(root) or total) // head_dim
            keep = self._fitted_head_keep(root, max(1, int(math.floor(original * (1 - ratio) + 1e-9))))
            tried = 0
            for idxs in _head_removals(scores, head_dim, min(1.0, keep / heads)):
                tried += 1
                candidate = self._accepted_heads(root, group[0].side, idxs)
                if candidate is not None:
                    yield candidate
                    break
            else:
                if tried:
                    self._head_state.notes.refused.append((root, group[0].side, total, heads, head_dim))
        if not found and not self.num_heads and self.current_step == 1:
            warnings.warn(
                "prune_num_heads=True found no attention heads to remove: heads are read from num_heads={layer: "
                "heads} or from a head_dim / attention_head_size attribute of the attention module, and no layer "
                "of this model has either. Pass num_heads for the q/k/v projections; pruner.report() shows what "
                "each step removed",
                stacklevel=4,
            )

    def _preselected_heads(self, group: Group):
        """Root channels of whole heads chosen before this step (GReg-1 overrides it), or None: choose now."""
        return None

    def _heads_removed(self, group: Group) -> dict:
        """{layer in ``num_heads``: heads this whole-head group removes from it}: the group removes the same
        fraction of each coupled projection's heads (key/value heads go with the query heads they serve)."""
        removed = {}
        for item in group:
            module = item.dep.target.module
            if module in self.num_heads and item.side is Side.OUT:
                width = self.DG.get_out_channels(module)
                removed[module] = round(self.num_heads[module] * len(item.idxs) / width) if width else 0
        return removed

    def _count_removed_heads(self, group: Group) -> None:
        """Keep ``num_heads`` current once a whole-head group was pruned, as torch_pruning does: user code
        reads ``pruner.num_heads[layer]`` to fix its attention attributes, and later steps derive head_dim
        from it."""
        for module, count in group.heads_removed.items():
            self.num_heads[module] = self.num_heads[module] - count

    def _accepted_heads(self, root, side, idxs):
        """The group removing these heads, if the graph accepts it as planned and it takes no other head
        projection below its own target (a key/value head takes its query heads along: after q lost one
        head per group, removing a kv group as well would leave a quarter of the q heads)."""
        candidate = self.DG.get_group_by_side(root, side, idxs.tolist())
        if not self._accepts(candidate, idxs):
            return None
        candidate.heads_removed = self._heads_removed(candidate)
        candidate.whole_heads = True
        for item in list(candidate)[1:]:
            module = item.dep.target.module
            if isinstance(module, torch.nn.Parameter) or item.side is not Side.OUT:
                continue
            width = self.DG.get_out_channels(module)
            original = self.layer_init_out_ch.get(module)
            head_dim = self._head_dim(module, width) if width else None
            if head_dim is None or not original:
                continue
            keep = max(1, int(math.floor(original // head_dim * (1 - self.get_target_head_pruning_ratio(module))
                                         + 1e-9)))
            keep = self._fitted_head_keep(module, keep)
            if (width - len(item.idxs)) // head_dim < keep:
                return None
        return candidate

    def _head_candidates(self) -> Iterator[tuple]:
        """(group, root, width, head_dim) of every group split into heads (or blocked) whose root has heads.

        Key/value roots first: a key/value head takes the query heads it serves along, so planned first
        every layer loses whole key/value groups alike; planned after the query heads, a layer whose
        weakest query heads sit in different groups keeps every key/value head (and config fields hold one
        head count for all layers). Lazy on purpose: groups are discovered after the heads before them
        were pruned (removing q's heads removes v's too, and v's own group must see that).
        """
        for key_value_pass in (True, False):
            for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                                root_module_types=self.root_module_types, include_blocked=True):
                if not _splits_into_heads(group):
                    continue
                root = group[0].dep.target.module
                total = len(group[0].idxs)
                head_dim = self._head_dim(root, total)
                if head_dim is not None and self._serves_wider_heads(group, total) == key_value_pass:
                    yield group, root, total, head_dim

    def _serves_wider_heads(self, group: Group, total: int) -> bool:
        """Whether removing the root's heads removes heads of a wider head projection (GQA's k/v -> q)."""
        for item in list(group)[1:]:
            module = item.dep.target.module
            if isinstance(module, torch.nn.Parameter) or item.side is not Side.OUT:
                continue
            width = self.DG.get_out_channels(module)
            if width and width > total and self._head_dim(module, width) is not None:
                return True
        return False

    def _head_dim(self, root, total: int) -> int | None:
        if root in self.num_heads and total % self.num_heads[root] == 0:
            return total // self.num_heads[root]
        parent = self._parents().get(root)
        for name in head_size_names():  # BERT names it attention_head_size, T5 key_value_proj_dim
            head_dim = getattr(parent, name, None)
            if isinstance(head_dim, int) and head_dim > 0 and total % head_dim == 0 and total >= head_dim:
                return head_dim
        return None

    def _parents(self) -> dict:
        state = self._head_state
        if state.parent_of is None:
            state.parent_of = {child: module for module in self.model.modules() for child in module.children()}
        return state.parent_of


def _splits_into_heads(group: Group) -> bool:
    return bool(group.blocked) or group.block_hint > 1


def _head_removals(scores: torch.Tensor, head_dim: int, keep_fraction: float) -> Iterator[torch.Tensor]:
    """Channel sets that remove the lowest-scoring heads, most specific first.

    A root's channels are ``len(scores)`` head blocks of ``head_dim``. Contiguous runs of 1, 2, 3...
    heads cover plain attention and grouped-query attention (q heads that share a key/value head);
    then the same head taken from each of 2, 3 or 4 equal fused blocks covers fused projections
    (GPT-2's c_attn holds q, k and v one after the other, each split into the same heads).
    """
    heads = len(scores)

    def removal(block_scores, width, stride, fused):
        blocks = len(block_scores)
        n_blocks = blocks - max(1, int(math.floor(blocks * keep_fraction + 1e-9)))
        if n_blocks <= 0:
            return None
        chosen = torch.argsort(block_scores)[:n_blocks]
        starts = (chosen[:, None] * width + torch.arange(fused)[None, :] * stride).reshape(-1)
        return (starts[:, None] + torch.arange(width)[None, :]).reshape(-1).sort().values

    # runs of 3 blocks: a head of fused [heads, 3, head_dim] projections (GPT-NeoX, BLOOM)
    for multiple in [m for m in range(1, heads // 2 + 1) if heads % m == 0]:
        idxs = removal(scores.view(heads // multiple, multiple).sum(1), head_dim * multiple, 0, 1)
        if idxs is None:
            break
        yield idxs
    for fused in (3, 2, 4):
        if heads % fused == 0 and heads // fused > 1:
            per_block = heads // fused
            idxs = removal(scores.view(fused, per_block).sum(0), head_dim, per_block * head_dim, fused)
            if idxs is not None:
                yield idxs
