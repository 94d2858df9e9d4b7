"""BasePruner: turn ratios, scopes, rounding, channel groups and head rules into pruned groups."""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterator

import torch
from torch import nn

from ..graph.dependency import DependencyGraph, is_out_channel_pruning_fn
from ..graph.group import Group
from ..layers.base import as_index_tensor
from ..layers.declarations import default_root_types
from ..utils.nested import call_model, evaluating
from .diagnose import explain, layer_widths, size_attributes, stale_attributes
from .fallback import FallbackRecord
from .heads import HeadPlanner, subset_may_pass
from .optim_state import apply_optimizer_plan, plan_optimizer_state
from .schedulers import linear_scheduler
from .ties import touches, unbalanced_ties



class BasePruner(HeadPlanner):
    """Structural pruner driven by an importance criterion (also exported as MetaPruner).

    ``pruning_ratio`` is the fraction of each group's original channels removed once all
    ``iterative_steps`` have run. Channel counts after a step are ``floor(original * (1 - ratio))``,
    at least one channel (or one channel group), rounded up to a multiple of ``round_to`` when given.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        importance: Callable | None = None,
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
    ):
        if ch_sparsity is not None:
            warnings.warn("ch_sparsity is deprecated; use pruning_ratio", DeprecationWarning, stacklevel=2)
            pruning_ratio = ch_sparsity
        if ch_sparsity_dict is not None:
            warnings.warn("ch_sparsity_dict is deprecated; use pruning_ratio_dict", DeprecationWarning, stacklevel=2)
            pruning_ratio_dict = ch_sparsity_dict
        if channel_groups:
            warnings.warn("channel_groups is deprecated; use out_channel_groups", DeprecationWarning, stacklevel=2)
            out_channel_groups = {**(out_channel_groups or {}), **channel_groups}
        _check_ratio("pruning_ratio", pruning_ratio)
        _check_ratio("head_pruning_ratio", head_pruning_ratio)
        if not 0.0 < max_pruning_ratio <= 1.0:
            raise ValueError(f"max_pruning_ratio must lie in (0, 1], got {max_pruning_ratio}")
        if not isinstance(iterative_steps, int) or iterative_steps <= 0:
            raise ValueError(f"iterative_steps must be a positive integer, got {iterative_steps!r}")
        if round_to is not None and (not isinstance(round_to, int) or round_to <= 0):
            raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
        for key, ratio in (pruning_ratio_dict or {}).items():
            _check_ratio(f"pruning_ratio_dict[{_describe(key)}]", ratio)

        self.model = model
        self.example_inputs = example_inputs
        self.importance = importance
        self.global_pruning = global_pruning
        self.pruning_ratio = pruning_ratio
        self.max_pruning_ratio = max_pruning_ratio
        self.iterative_steps = iterative_steps
        self.iterative_pruning_ratio_scheduler = iterative_pruning_ratio_scheduler
        self.round_to = round_to
        self.isomorphic = isomorphic
        self.prune_num_heads = prune_num_heads
        self.prune_head_dims = prune_head_dims
        self.head_pruning_ratio = head_pruning_ratio
        self.root_module_types = tuple(root_module_types) if root_module_types else default_root_types()
        self.forward_fn = forward_fn
        self.output_transform = output_transform
        self.verify = verify
        self.current_step = 0

        self.ignored_layers, ignored_params = _split_ignored(ignored_layers)
        self.in_channel_groups = dict(in_channel_groups or {})
        self.out_channel_groups = dict(out_channel_groups or {})
        self.num_heads = dict(num_heads or {})

        self.DG = DependencyGraph().build_dependency(
            model, example_inputs, forward_fn=forward_fn, output_transform=output_transform,
            unwrapped_parameters=unwrapped_parameters, customized_pruners=customized_pruners,
            ignored_layers=self.ignored_layers, ignored_params=ignored_params,
        )
        self._init_scopes(pruning_ratio_dict, head_pruning_ratio_dict)
        self.layer_init_out_ch = {}
        self.layer_init_in_ch = {}
        for module, node in self.DG.module2node.items():
            if isinstance(module, nn.Parameter):
                continue
            self.layer_init_out_ch[module] = self.DG._safe_channels(node, "out")
            self.layer_init_in_ch[module] = self.DG._safe_channels(node, "in")
        self.init_num_heads = dict(self.num_heads)
        self._initial_groups = None
        #: one FallbackRecord per step whose one-shot prune broke the model (see pruner/fallback.py)
        self.fallback_history: list[FallbackRecord] = []

    # -- scopes and targets --------------------------------------------------------------------------
    def _init_scopes(self, pruning_ratio_dict, head_pruning_ratio_dict):
        steps = self.iterative_steps
        schedule = self.iterative_pruning_ratio_scheduler
        self.per_step_pruning_ratio = schedule(self.pruning_ratio, steps)
        self.pruning_ratio_dict = {}
        for key, ratio in (pruning_ratio_dict or {}).items():
            modules = key if isinstance(key, (tuple, list)) else (key,)
            expanded = []
            for module in modules:
                expanded.extend(m for m in module.modules() if m in self.DG.module2node) if isinstance(
                    module, nn.Module) else expanded.append(module)
            scope = tuple(expanded)
            for module in scope:
                self.pruning_ratio_dict[module] = (scope, schedule(ratio, steps))
        self.per_step_head_pruning_ratio = schedule(self.head_pruning_ratio, steps)
        self.head_pruning_ratio_dict = {
            module: schedule(ratio, steps) for module, ratio in (head_pruning_ratio_dict or {}).items()
        }

    def get_target_pruning_ratio(self, module) -> float:
        step = min(self.current_step, self.iterative_steps)
        if module in self.pruning_ratio_dict:
            return self.pruning_ratio_dict[module][1][step]
        return self.per_step_pruning_ratio[step]

    def get_target_head_pruning_ratio(self, module) -> float:
        step = min(self.current_step, self.iterative_steps)
        if module in self.head_pruning_ratio_dict:
            return self.head_pruning_ratio_dict[module][step]
        return self.per_step_head_pruning_ratio[step]

    def reset(self) -> None:
        self.current_step = 0

    # -- hooks for sparse-training subclasses ---------------------------------------------------------
    def update_regularizer(self) -> None:
        """No regularizer here; GrowingRegPruner and friends rebuild theirs after a step."""

    def regularize(self, model: nn.Module, *args, **kwargs) -> None:
        """No-op: plain pruning adds nothing to the gradients."""

    # -- groups ----------------------------------------------------------------------------------------
    def _groups(self) -> list[Group]:
        """Prunable groups, plus those refused at full width only for reasons a subset may avoid.

        A reshape that spells out a head count refuses "every channel" (that would zero the count) while
        the same channel in every head is fine; a per-head table reached along its head dim (LeViT's
        attention biases) is reached only when whole heads go. Outputs, constants and buffers refuse any
        subset, and trying subsets costs a discovery each, so groups that reach them are not tried.
        """
        groups = []
        for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                            root_module_types=self.root_module_types, include_blocked=True):
            if group.blocked and not all(subset_may_pass(reason) for reason in group.blocked):
                continue
            if not self.prune_head_dims and self._is_head_group(group):
                continue  # heads keep their width; only prune_num_heads may touch them
            groups.append(group)
        return groups

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
            if is_out_channel_pruning_fn(item.dep.handler):
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
        return self._rounded_keep(keep, current, channel_groups)

    def _rounded_keep(self, keep: int, current: int, channel_groups: int) -> int:
        """Round a kept-channel count up to whole channel groups and ``round_to``, at least one unit."""
        unit = channel_groups
        if self.round_to:
            unit = unit * self.round_to // math.gcd(unit, self.round_to)
        return min(current, max(unit, int(math.ceil(keep / unit)) * unit))

    # -- stepping --------------------------------------------------------------------------------------
    def step(self, interactive: bool = False, optimizer=None):
        """Advance the schedule by one step and prune; with ``interactive`` yield groups to prune yourself."""
        if any(param.is_meta for param in self.model.parameters()):
            raise RuntimeError(
                "the model's parameters are on the meta device: importance needs real weight values; materialise "
                "the model (to_empty + load weights) or prune explicit groups with DependencyGraph instead"
            )
        self.current_step += 1
        if self.current_step > self.iterative_steps:
            warnings.warn("pruning schedule already finished; step() does nothing", stacklevel=2)
            self.current_step = self.iterative_steps
            return iter(()) if interactive else None
        if interactive:
            return self._interactive(self._plan(), optimizer)
        checkpoint = self._checkpoint()
        optimizer_plans = self._step_balanced(optimizer, checkpoint)
        error = self._forward_error() if self.verify else None
        if error is not None:
            # some group broke the model (a size the graph cannot see, e.g. a reshape to an input's
            # width): redo the step one group at a time, keeping only the groups after which it still runs
            checkpoint.restore()
            record = FallbackRecord(self.current_step, error)
            self.fallback_history.append(record)
            optimizer_plans = self._step_verified(optimizer, record)
        for plan in optimizer_plans:
            apply_optimizer_plan(plan)
        self._warn_heads_refused()
        return None

    def _plan(self) -> Iterator[Group]:
        return self._plan_global() if self.global_pruning else self._plan_local()

    def _step_balanced(self, optimizer, checkpoint) -> list:
        """Prune every planned group; if the step leaves a size tie unbalanced (two widths a reshape needs
        equal, pruned by different amounts), redo it without the groups that touch such ties.

        Planning with one ratio removes equal counts from tied widths, so this redo is rare; it costs a
        second planning pass, not a forward per group.
        """
        excluded: set = set()
        while True:
            plans, pruned, left = [], [], []
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
        if skipped:
            warnings.warn(
                "left unpruned because the model stopped running after pruning them: " + "; ".join(skipped),
                stacklevel=3,
            )
        return plans

    def _checkpoint(self) -> "_PrunerCheckpoint":
        return _PrunerCheckpoint(self)

    def _interactive(self, plan, optimizer) -> Iterator[Group]:
        sizes = self._sizes()
        for group in plan:
            yield group
        self._warn_heads_refused()
        self._after_step(sizes)

    def _sizes(self) -> tuple:
        """Size attributes and layer widths now, to name stale attributes if the model stops running."""
        return size_attributes(self.model), layer_widths(self.DG)

    def _stale_hint(self, sizes: tuple) -> str:
        attributes, widths = sizes
        return explain(stale_attributes(attributes, size_attributes(self.model), widths, layer_widths(self.DG)))

    def _prune_group(self, group: Group, optimizer=None) -> list:
        """Prune now; return the optimizer-state slicing to apply once the whole step is kept."""
        plan = plan_optimizer_state(optimizer, group) if optimizer is not None else []
        group.prune()
        return plan

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
            with evaluating(self.model) as model:
                if self.forward_fn is not None:
                    self.forward_fn(model, self.example_inputs)
                else:
                    call_model(model, self.example_inputs)
        except Exception as error:  # noqa: BLE001 - any failure means the pruned model is broken
            return f"{type(error).__name__}: {error}"
        return None

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
        self._scores = {}
        heads = list(self._head_candidates()) if self.prune_num_heads else []
        for group in [entry[0] for entry in heads] + self._groups():
            key = _root_key(group)
            if key not in self._scores:
                self._scores[key] = self.estimate_importance(group)

    def _importance(self, group: Group) -> torch.Tensor | None:
        """The step's up-front score of a group; scored afresh only if whole heads changed its width."""
        imp = getattr(self, "_scores", {}).get(_root_key(group))
        if imp is not None and len(imp) == len(group[0].idxs):
            return imp
        return self.estimate_importance(group)

    def _plan_local(self) -> Iterator[Group]:
        self._prescore()
        yield from self._plan_whole_heads()
        self._note_pinned_heads()
        for group in self._groups():
            group = self._as_now(group)
            root = group[0].dep.target.module
            current = len(group[0].idxs)
            channel_groups = self._channel_groups(group)
            if current % channel_groups:
                continue
            ratio = self.get_target_pruning_ratio(root)
            n_prune = current - self._n_keep(root, current, ratio, channel_groups)
            if n_prune <= 0:
                continue
            imp = self._importance(group)
            if imp is None or torch.isnan(imp).any():
                continue
            chosen = self._choose(group, imp, n_prune, channel_groups)
            if chosen is not None:
                yield chosen
            elif not self.prune_num_heads and self._is_head_group(group):
                self._heads_narrow_refused.append(f"{self.DG._name(root)} ({self._refusal})")

    def _as_now(self, group: Group) -> Group:
        """The group over its root's channels as they are now, not as when the step's groups were listed.

        A root reached several channels per root channel from another group's root (a depthwise conv
        after a ghost module's concat, EdgeNeXt's XCA projection) keeps a group of its own, and the other
        group, pruned first, narrows it; planning on the listed width would pick channels that are gone.
        """
        root = group[0].dep.target.module
        node = self.DG.module2node[root]
        if self.DG._safe_channels(node, "out") == len(group[0].idxs):
            return group
        return self.DG._cached_group(node)

    def _accepts(self, candidate: Group, idxs: torch.Tensor) -> bool:
        """Prunable, and exactly the planned root channels: a product (q * k) can pull in more of the
        root than asked for (q head 0 with k head 1 means both heads of both), which would overshoot."""
        return len(candidate[0].idxs) == len(idxs) and self.DG.check_pruning_group(candidate)

    def _choose(self, group, imp, n_prune, channel_groups):
        """A prunable group for the lowest-scoring channels; regrouped symmetrically if the graph asks.

        When none is accepted, ``self._refusal`` keeps the graph's reason for the most symmetric candidate.
        """
        root = group[0].dep
        self._refusal = "no candidate"
        for blocks in _block_candidates(channel_groups, len(imp), n_prune):
            idxs = self._select(group, imp.detach().cpu(), n_prune - n_prune % blocks, blocks)
            if len(idxs) == 0:
                return None
            candidate = self.DG.get_pruning_group(root.target.module, root.handler, idxs.tolist())
            if self._accepts(candidate, idxs):
                return candidate
            self._refusal = _refusal(candidate, idxs)
        return None

    def _plan_global(self) -> Iterator[Group]:
        self._prescore()
        yield from self._plan_whole_heads()
        self._note_pinned_heads()
        entries = []
        for group in self._groups():
            imp = self._importance(group)
            if imp is None or torch.isnan(imp).any():
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
        for (group, imp, blocks), score in zip(entries, scores):
            root = group[0].dep.target.module
            current = len(imp)
            limit = current - self._n_keep(root, current, self.max_pruning_ratio, blocks)
            wanted = int((score <= threshold).sum()) * (blocks if len(score) != current else 1)
            n = current - self._rounded_keep(current - min(wanted, limit), current, blocks)
            if n <= 0:
                continue
            fresh = self._as_now(group)
            if fresh is not group:
                # an earlier group of this step already took some of this root's channels
                n -= current - len(fresh[0].idxs)
                if n <= 0:
                    continue
                group, imp = fresh, self._importance(fresh)
                if imp is None or torch.isnan(imp).any():
                    continue
                imp = imp.detach().cpu()
            chosen = self._choose(group, imp, n, blocks)
            if chosen is not None:
                yield chosen

    # -- manual and history --------------------------------------------------------------------------
    def manual_prune_width(self, layer: nn.Module, pruning_fn, ratio_or_idxs) -> None:
        """Prune a layer's group by a ratio (lowest importance first) or by explicit indices."""
        if isinstance(ratio_or_idxs, float):
            _check_ratio("ratio", ratio_or_idxs)
            node = self.DG.module2node[layer]
            total = self.DG._channels(node, "out" if is_out_channel_pruning_fn(pruning_fn) else "in")
            group = self.DG.get_pruning_group(layer, pruning_fn, list(range(total)))
            imp = self.estimate_importance(group)
            idxs = torch.argsort(imp)[: int(total * ratio_or_idxs)].tolist()
        else:
            idxs = as_index_tensor(ratio_or_idxs).tolist()
        self.DG.get_pruning_group(layer, pruning_fn, idxs).prune()

    def pruning_history(self):
        return self.DG.pruning_history()

    def load_pruning_history(self, history) -> None:
        self.DG.load_pruning_history(history)


MetaPruner = BasePruner


class _PrunerCheckpoint:
    """Model tensors and attributes plus the graph's bookkeeping, to undo part of a step."""

    def __init__(self, pruner: BasePruner):
        from ..graph.snapshot import Snapshot

        self.pruner = pruner
        self.snapshot = Snapshot(list(pruner.model.modules()))
        self.alive = dict(pruner.DG._alive)
        self.position_maps = dict(pruner.DG._position_maps)
        self.history = len(pruner.DG._history)

    def restore(self) -> None:
        self.snapshot.restore()
        graph = self.pruner.DG
        graph._alive = dict(self.alive)
        graph._position_maps = dict(self.position_maps)
        del graph._history[self.history:]


def _block_candidates(channel_groups: int, total: int, n_prune: int, limit: int = 24):
    """The declared grouping first, then ever coarser symmetric groupings the graph may require: a
    channel shuffle or a fused q/k/v reshape only accepts the same local channels in every block."""
    yield channel_groups
    tried = 1
    for blocks in range(channel_groups + 1, total + 1):
        if tried >= limit or blocks > n_prune:
            return
        if total % blocks == 0 and blocks % channel_groups == 0:
            tried += 1
            yield blocks


def _refusal(candidate: Group, idxs: torch.Tensor) -> str:
    if candidate.blocked:
        return candidate.blocked[0]
    if len(candidate[0].idxs) != len(idxs):
        return f"the graph widens {len(idxs)} planned channels to {len(candidate[0].idxs)}"
    return "a layer would lose every channel"


def _root_key(group: Group) -> tuple:
    return group[0].dep.target.module, group[0].dep.handler.__name__


def _signature(group: Group) -> tuple:
    return tuple((type(item.dep.target.module).__name__, item.dep.handler.__name__) for item in group)


def _check_ratio(name: str, ratio) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {ratio!r}")


def _describe(key) -> str:
    return type(key).__name__ if not isinstance(key, (tuple, list)) else "(" + ", ".join(type(k).__name__ for k in key) + ")"


def _split_ignored(ignored) -> tuple[list, list]:
    layers, params = [], []
    for item in ignored or []:
        if isinstance(item, nn.Parameter):
            params.append(item)
        elif isinstance(item, nn.Module) or isinstance(item, type):
            layers.append(item)
        else:
            raise TypeError(
                f"ignored_layers accepts modules, module types and nn.Parameters; got {type(item).__name__} "
                f"({item!r})"
            )
    return layers, params
