"""Planning a step: which groups, how many channels each keeps, and which channels go."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..graph.group import Group
from ..graph.refusal import Refusal, RefusalKind
from ..graph.side import Side
from ..importance.elementwise import sharing_position_sums
from .heads import subset_may_pass


@dataclass
class PlanningState:
    """What planning keeps between groups of a step, and between steps."""

    #: this step's up-front importance of every candidate group, by root (see _prescore)
    scores: dict = field(default_factory=dict)
    #: why _choose's last candidate was refused (the most symmetric one tried)
    refusal: Refusal | None = None
    #: this step: (layers, width, blocks, count) -> (first root, refusal) of a shape every candidate failed
    refused_shapes: dict = field(default_factory=dict)
    #: this step: roots whose groups get one symmetric candidate only (per-head tables, see _groups)
    one_try: set = field(default_factory=set)
    #: every step: (layers, width, blocks, block hint) -> the block count the graph accepted for that shape
    learned_blocks: dict = field(default_factory=dict)


class PlanningMixin:
    """Mixin of BasePruner: candidate groups, kept counts, scores and the chosen channels. Its state is
    ``self._planning`` (:class:`PlanningState`)."""

    def _init_planning(self) -> None:
        self._planning = PlanningState()

    # -- groups ----------------------------------------------------------------------------------------
    def _groups(self) -> list[Group]:
        """Prunable groups, plus those refused at full width only for reasons a subset may avoid.

        A reshape that spells out a head count refuses "every channel" (that would zero the count) while
        the same channel in every head is fine; a per-head table reached along its head dim (LeViT's
        attention biases) is reached only when whole heads go. Outputs, constants and buffers refuse any
        subset, and trying subsets costs a discovery each, so groups that reach them are not tried.
        """
        groups = []
        self._planning.one_try = set()
        for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                            root_module_types=self.root_module_types, include_blocked=True):
            if not self.prune_head_dims and self._is_head_group(group):
                continue  # heads keep their width; only prune_num_heads may touch them
            if group.blocked and not all(subset_may_pass(reason) for reason in group.blocked):
                if not (self.prune_head_dims and self._per_head_table_only(group)):
                    continue
                # BLOOM's ALiBi slopes: a table per head, reached only when whole heads go; narrower
                # heads may pass, and one symmetric candidate tells
                self._planning.one_try.add(_root_key(group))
            groups.append(group)
        return groups

    def _per_head_table_only(self, group: Group) -> bool:
        """Refused at full width only for a constant or buffer, in a group a reshape splits into heads."""
        hard = {reason.kind for reason in group.blocked if not subset_may_pass(reason)}
        return (group.block_hint > 1 and hard <= {RefusalKind.CONSTANT_OR_INPUT, RefusalKind.BUFFER}
                and self._is_head_group(group))

    def estimate_importance(self, group: Group) -> torch.Tensor | None:
        if self.importance is None:
            raise ValueError("this pruner has no importance criterion; pass importance=tp.importance....")
        return self.importance(group)

    def _channel_groups(self, group: Group) -> int:
        """Channels of a group must go symmetrically across this many blocks (grouped convs, heads)."""
        count = 1
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.Parameter):
                continue
            pruner = item.dep.target.pruner
            if item.side is Side.OUT:
                value = self.out_channel_groups.get(module, pruner.get_out_channel_groups(module))
            else:
                value = self.in_channel_groups.get(module, pruner.get_in_channel_groups(module))
            if module in self.num_heads and self.prune_head_dims and not self.prune_num_heads:
                value = max(value, self.num_heads[module])
            count = max(count, value or 1)
        return count

    def _n_keep(self, module, current: int, ratio: float, channel_groups: int) -> int:
        original = self.layer_init_out_ch.get(module) or current
        keep = int(math.floor(original * (1 - ratio) + 1e-9))
        keep = max(keep, int(math.ceil(original * (1 - self.max_pruning_ratio))))
        return self._rounded_keep(keep, current, channel_groups, module)

    def _rounded_keep(self, keep: int, current: int, channel_groups: int, root=None) -> int:
        """Round a kept-channel count up to whole channel groups and ``round_to`` (with ``"auto"``, the
        step of the group rooted at ``root``), at least one unit."""
        unit = channel_groups
        step = self._width_step(root)
        if step:
            unit = unit * step // math.gcd(unit, step)
        unit = math.lcm(unit, self._alignment(root))  # kernels that need aligned rows (pruner/alignment.py)
        return min(current, max(unit, int(math.ceil(keep / unit)) * unit))

    def _plan(self) -> Iterator[Group]:
        # a step re-planned towards a config's widths (config_fit.py) gives each group its own target
        return self._plan_global() if self.global_pruning and not self._replanning() else self._plan_local()

    def _select(self, group: Group, imp: torch.Tensor, n_prune: int, channel_groups: int) -> torch.Tensor:
        """Lowest-importance root channels, the same local positions in each of ``channel_groups`` blocks."""
        total = len(imp)
        if channel_groups > 1 and total % channel_groups == 0:
            per_block = imp.view(channel_groups, -1).mean(0)
            local = torch.argsort(per_block)[: n_prune // channel_groups]
            block = total // channel_groups
            return (local[None, :] + torch.arange(channel_groups)[:, None] * block).reshape(-1)
        return torch.argsort(imp)[:n_prune]

    def _prescore(self) -> None:
        """Score every candidate group before any is pruned.

        Groups share layers (conv2's output group holds conv2, whose inputs belong to conv1's group), so
        a group scored after its neighbour was pruned would see a narrowed layer; criteria that keep
        per-parameter statistics (Hessian, OBDC) are tied to the unpruned shapes.
        """
        scores = self._planning.scores = {}
        self._planning.refused_shapes = {}
        heads = list(self._head_candidates()) if self.prune_num_heads else []
        with sharing_position_sums():
            for group in [entry[0] for entry in heads] + list(self._expert_groups()) + self._groups():
                key = _root_key(group)
                if key not in scores:
                    scores[key] = self.estimate_importance(group)

    def _importance(self, group: Group) -> torch.Tensor | None:
        """The step's up-front score of a group; scored afresh only if whole heads changed its width."""
        imp = self._planning.scores.get(_root_key(group))
        if imp is not None and len(imp) == len(group[0].idxs):
            return imp
        return self.estimate_importance(group)

    def _local_n_prune(self, group: Group) -> int:
        root = group[0].dep.target.module
        current = len(group[0].idxs)
        channel_groups = self._channel_groups(group)
        if current % channel_groups:
            return 0
        ratio = self.get_target_pruning_ratio(root)
        return max(0, current - self._n_keep(root, current, ratio, channel_groups))

    def _plan_local(self) -> Iterator[Group]:
        self._prescore()
        yield from self._plan_experts()
        yield from self._plan_whole_heads()
        self._note_pinned_heads()
        self._reset_held_back()
        groups = self._groups()
        planned = (self._budget_counts(groups) if self.target
                   else {_root_key(group): self._local_n_prune(group) for group in groups})
        limits = self._uniform_limits(planned)
        for group in groups:
            n_prune = planned[_root_key(group)]
            fresh = self._as_now(group)
            if fresh is not group:
                # an earlier group of this step already took some of this root's channels
                n_prune -= len(group[0].idxs) - len(fresh[0].idxs)
                group = fresh
            root = group[0].dep.target.module
            current = len(group[0].idxs)
            channel_groups = self._channel_groups(group)
            if current % channel_groups:
                continue
            key = self._field_key(group)
            if key in limits and limits[key] < n_prune:
                self._note_held_back(group, key[1], n_prune, limits[key])
                n_prune = current - self._rounded_keep(current - limits[key], current, channel_groups, root)
            capped = self._head_size_cap(group, n_prune, limits)
            if capped < n_prune:
                n_prune = current - self._rounded_keep(current - capped, current, channel_groups, root)
            n_prune = self._fitted_n_prune(group, n_prune)
            if n_prune <= 0:
                continue
            imp = self._importance(group)
            if self._unscored(group, imp):
                continue
            chosen = self._choose(group, imp, n_prune, channel_groups)
            if chosen is not None:
                yield chosen
                continue
            self._note_refusal(group[0].dep.target, self._planning.refusal)
            if self.target:
                self._budget_refused(group)
            if not self.prune_num_heads and self._is_head_group(group):
                self._note_narrow_refused(self.DG._name(root), self._planning.refusal)

    def _unscored(self, group: Group, imp) -> bool:
        """Whether the criterion gave no usable score for a group (noted for the report: it keeps its channels)."""
        if imp is None:
            self._note_refusal(group[0].dep.target, f"{type(self.importance).__name__} gave this group no score")
            return True
        if bool(torch.isnan(imp).any()):
            self._note_refusal(group[0].dep.target, f"{type(self.importance).__name__} gave NaN scores")
            return True
        return False

    def _as_now(self, group: Group) -> Group:
        """The group over its root's channels as they are now, not as when the step's groups were listed.

        A root reached several channels per root channel from another group's root (a depthwise conv
        after a ghost module's concat, EdgeNeXt's XCA projection) keeps a group of its own, and the other
        group, pruned first, narrows it; planning on the listed width would pick channels that are gone.
        """
        root = group[0].dep.target.module
        node = self.DG.module2node[root]
        if self.DG._safe_channels(node, Side.OUT) == len(group[0].idxs):
            return group
        return self.DG._cached_group(node)

    def _accepts(self, candidate: Group, idxs: torch.Tensor) -> bool:
        """Prunable, and exactly the planned root channels: a product (q * k) can pull in more of the
        root than asked for (q head 0 with k head 1 means both heads of both), which would overshoot."""
        return len(candidate[0].idxs) == len(idxs) and self.DG.check_pruning_group(candidate)

    def _choose(self, group, imp, n_prune, channel_groups):
        """A prunable group for the lowest-scoring channels; regrouped symmetrically if the graph asks.

        When none is accepted, ``self._planning.refusal`` keeps the graph's reason for the most symmetric
        candidate.
        """
        root = group[0]
        state = self._planning
        state.refusal = Refusal(RefusalKind.NO_CANDIDATE, root.dep.target.name, "no candidate")
        heads = self._whole_head_blocks(group)
        if heads is not None:
            return self._choose_whole_heads(group, imp, n_prune, heads)
        # blocks that worked for a group of the same layers and width (the next block of the same stage),
        # and, within this step, the refusal of one whose every candidate failed
        learned = state.learned_blocks
        shape = (_signature(group), len(imp), channel_groups, group.block_hint)
        one_try = _root_key(group) in state.one_try
        known = learned.get(shape)
        refused = state.refused_shapes.get(shape + (n_prune,))
        if refused is not None:
            # every candidate of a group of the same layers and width was refused (a size the forward spells
            # out, a table): trying them again for each block costs a discovery per candidate and decides nothing
            first, refusal = refused
            state.refusal = Refusal(refusal.kind, root.dep.target.name,
                                    f"{refusal.detail} (as for {first}, which has the same layers)")
            return None
        candidates = _block_candidates(channel_groups, len(imp), n_prune, group.block_hint, known,
                                       limit=1 if one_try else 24)
        for blocks in candidates:
            idxs = self._select(group, imp.detach().cpu(), n_prune - n_prune % blocks, blocks)
            if len(idxs) == 0:
                return None
            candidate = self.DG._chosen_group(root.dep.target.module, root.side, idxs)
            if self._accepts(candidate, idxs):
                learned[shape] = blocks
                if len(idxs) < n_prune:
                    # the same positions in each of ``blocks`` equal blocks: a count they do not divide rounds down
                    self._note_refusal(root.dep.target, f"a split, chunk or head reshape takes {blocks} channels "
                                                        f"at a time: {len(idxs)} of {n_prune} went")
                return candidate
            state.refusal = _refusal(candidate, idxs)
        if state.refusal.kind is not RefusalKind.NO_CANDIDATE:
            state.refused_shapes[shape + (n_prune,)] = (root.dep.target.name, state.refusal)
        return None

    def _plan_global(self) -> Iterator[Group]:
        self._prescore()
        yield from self._plan_experts()
        yield from self._plan_whole_heads()
        self._note_pinned_heads()
        entries = []
        self._reset_shares()
        for group in self._groups():
            imp = self._importance(group)
            if self._unscored(group, imp):
                continue
            entries.append((group, imp.detach().cpu(), self._channel_groups(group)))
        if not entries:
            return
        if self.isomorphic:
            buckets: dict = {}
            for entry in entries:
                buckets.setdefault(_signature(entry[0]), []).append(entry)
            for bucket in buckets.values():
                yield from self._global_bucket(bucket)
        else:
            yield from self._global_bucket(entries)

    def _global_bucket(self, entries):
        self._reset_held_back()
        scores = []
        total_original = 0
        total_current = 0
        for group, imp, blocks in entries:
            root = group[0].dep.target.module
            total_original += self.layer_init_out_ch.get(root) or len(imp)
            total_current += len(imp)
            scores.append(imp.view(blocks, -1).mean(0) if blocks > 1 and len(imp) % blocks == 0 else imp)
        ratio = self.per_step_pruning_ratio[min(self.current_step, self.iterative_steps)]
        n_prune = total_current - int(total_original * (1 - ratio))
        if n_prune <= 0:
            return
        flat = torch.cat([s.repeat(b) if b > 1 and len(i) % b == 0 else s
                          for s, (_, i, b) in zip(scores, entries)])
        threshold = torch.kthvalue(flat, min(n_prune, len(flat))).values
        counts = {}
        for (group, imp, blocks), score in zip(entries, scores):
            root = group[0].dep.target.module
            current = len(imp)
            limit = current - self._n_keep(root, current, self.max_pruning_ratio, blocks)
            wanted = int((score <= threshold).sum()) * (blocks if len(score) != current else 1)
            counts[_root_key(group)] = (min(wanted, limit), limit)
        shared = self._uniform_global({key: count for key, (count, _) in counts.items()})
        for (group, imp, blocks), score in zip(entries, scores):
            current = len(imp)
            wanted, limit = counts[_root_key(group)]
            field = self._field_key(group)
            if field in shared:
                wanted = min(shared[field], limit)
            wanted = self._head_size_cap(group, wanted, shared)
            n = current - self._rounded_keep(current - wanted, current, blocks, group[0].dep.target.module)
            if n <= 0:
                continue
            self._add_share(group[0].dep.target.name, n)  # the report checks the group against it
            fresh = self._as_now(group)
            if fresh is not group:
                # an earlier group of this step already took some of this root's channels
                n -= current - len(fresh[0].idxs)
                if n <= 0:
                    continue
                group, imp = fresh, self._importance(fresh)
                if self._unscored(group, imp):
                    continue
                imp = imp.detach().cpu()
            chosen = self._choose(group, imp, n, blocks)
            if chosen is not None:
                yield chosen
            else:
                self._note_refusal(group[0].dep.target, self._planning.refusal)


def _block_candidates(channel_groups: int, total: int, n_prune: int, hint: int = 1, learned: int | None = None,
                      limit: int = 24):
    """Block counts to try, each costing a discovery: what worked for the same layers before, the graph's
    hint (the blocks of every reshape the group passes), its multiples (a fused q/k/v chunked inside each
    head needs three per head), then the declared grouping and ever coarser symmetric groupings: a
    channel shuffle or a fused q/k/v reshape only accepts the same local channels in every block."""
    def fits(blocks):
        return blocks <= n_prune and total % blocks == 0 and blocks % channel_groups == 0

    hinted = math.lcm(hint, channel_groups)
    last = min(total, n_prune)
    order = itertools.chain(
        [learned] if learned is not None else [],
        range(hinted, last + 1, hinted) if hinted > channel_groups else [],
        range(channel_groups, last + 1),
    )
    seen = set()
    for blocks in order:
        if blocks in seen or not fits(blocks):
            continue
        if len(seen) >= limit:
            return
        seen.add(blocks)
        yield blocks


def _refusal(candidate: Group, idxs: torch.Tensor) -> Refusal:
    if candidate.blocked:
        # a reason no other selection avoids (a rotary table) says more than a reshape's spelled-out size
        hard = [reason for reason in candidate.blocked if not subset_may_pass(reason)]
        return (hard or candidate.blocked)[0]
    root = candidate[0].dep.target.name
    if len(candidate[0].idxs) != len(idxs):
        return Refusal(RefusalKind.WIDENED, root,
                       f"the graph widens {len(idxs)} planned channels to {len(candidate[0].idxs)}")
    return Refusal(RefusalKind.CHECK_FAILED, root, "a layer would lose every channel")


def _root_key(group: Group) -> tuple:
    return group[0].dep.target.module, group[0].side


def _signature(group: Group) -> tuple:
    return tuple((type(item.dep.target.module).__name__, item.side) for item in group)
