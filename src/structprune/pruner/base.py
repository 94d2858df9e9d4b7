"""BasePruner: turn ratios, scopes, rounding, channel groups and head rules into pruned groups."""
from __future__ import annotations

import warnings
from typing import Callable, Iterator

import torch
from torch import nn

from ..adapters.families import family_of
from ..graph.dependency import DependencyGraph
from ..graph.group import Group
from ..graph.side import Side
from ..layers.registry import LayerRole, layer_types
from ..utils.gc_pause import gc_paused
from ..utils.sharding import refuse_sharded
from .advice import warn_weight_only_criterion
from .compensation import Compensator, as_compensation, check_statistics_source
from .budget import BudgetMixin
from .experts import ExpertPlanner
from .heads import HeadPlanner
from .manual import ManualPruningMixin
from .optim_state import apply_optimizer_plan, plan_optimizer_state
from .options import PrunerOptions, split_ignored
from .planning import PlanningMixin
from .step_ratios import ScheduleMixin
from .signature import with_options_doc
from .ties import unbalanced_ties
from .config_fit import ConfigFit
from .alignment import KernelAlignment
from .schedulers import linear_scheduler
from .uniform import UniformWidths
from .report import ReportMixin
from .verify import VerifyMixin

_OPTION_NAMES = frozenset(PrunerOptions.names())


class BasePruner(ScheduleMixin, BudgetMixin, PlanningMixin, VerifyMixin, ManualPruningMixin, HeadPlanner, ExpertPlanner,
                 UniformWidths, ConfigFit, KernelAlignment, ReportMixin):
    """Structural pruner driven by an importance criterion (also exported as MetaPruner).

    Assembled from one mixin per job: ``step_ratios.py`` (ratios per step and scope), ``planning.py``
    (groups, kept counts, chosen channels), ``heads.py`` (whole heads), ``verify.py`` (the forward check
    and group-by-group retry) and ``manual.py`` (manual pruning and history); options in ``options.py``.

    ``pruning_ratio`` is the fraction of each group's original channels removed once all
    ``iterative_steps`` have run. Channel counts after a step are ``floor(original * (1 - ratio))``,
    at least one channel (or one channel group), rounded up to a multiple of ``round_to`` when given.
    Every keyword is documented on :class:`~structprune.pruner.options.PrunerOptions`; ``self.options``
    holds them as given (deprecated spellings resolved).

    ``uniform_config_widths`` (default: on for Hugging Face transformers models, which have a config)
    prunes every layer counted in one config field (``intermediate_size``, ``hidden_size``...) to the same
    width, so ``save_pretrained`` / ``from_pretrained`` round-trip; see ``pruner/uniform.py``. For those
    models the default ``output_transform`` keeps only the task outputs (logits) at their shape.

    Mixture-of-experts blocks lose intermediate width like any MLP (every expert the same channels);
    ``prune_num_experts=True`` also removes whole experts with their router rows, the fraction
    ``expert_pruning_ratio`` of each block's experts (``pruning_ratio`` when None), keeping at least top-k.
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
        prune_num_experts: bool = False,
        expert_pruning_ratio: float | None = None,
        uniform_config_widths: bool | None = None,
        target: dict | None = None,
        latency_profile=None,
        latency_fn: Callable | None = None,
        compensation=None,
    ):
        """``model`` is pruned in place; ``example_inputs`` are traced once to find the coupled channels
        (a tensor, a tuple of positional inputs or a dict of keyword inputs)."""
        # the keywords map onto PrunerOptions one to one (a test keeps the signature and the fields equal)
        options = PrunerOptions(**{name: value for name, value in locals().items() if name in _OPTION_NAMES})
        for note in options.resolve_deprecated():
            warnings.warn(note, DeprecationWarning, stacklevel=2)
        options.validate()
        self.options = options

        self.model = model
        self.example_inputs = example_inputs
        self.expert_pruning_ratio = (options.pruning_ratio if options.expert_pruning_ratio is None
                                     else options.expert_pruning_ratio)
        # what the model's family says about it (adapters/families.py): Hugging Face models keep their task
        # outputs, root their narrow embeddings too, and prune to widths their config describes
        family = family_of(model)
        roots = options.root_module_types
        self.root_module_types = tuple(roots) if roots else layer_types(LayerRole.ROOT) + family.extra_root_types
        self.output_transform = options.output_transform
        if self.output_transform is None:
            self.output_transform = family.task_outputs
        self.current_step = 0
        self._compensator = _compensator(options.compensation, options.importance)
        warn_weight_only_criterion(model, options.importance, family)

        self.ignored_layers, ignored_params = split_ignored(options.ignored_layers)
        self.in_channel_groups = dict(options.in_channel_groups or {})
        self.out_channel_groups = dict(options.out_channel_groups or {})
        self.num_heads = dict(options.num_heads or {})

        with gc_paused():  # tracing and discovery allocate in bursts (utils/gc_pause.py)
            self.DG = DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=self.forward_fn, output_transform=self.output_transform,
                unwrapped_parameters=options.unwrapped_parameters, customized_pruners=options.customized_pruners,
                ignored_layers=self.ignored_layers, ignored_params=ignored_params,
            )
            self._init_scopes(options.pruning_ratio_dict, options.head_pruning_ratio_dict)
            self.layer_init_out_ch = {}
            self.layer_init_in_ch = {}
            for module, node in self.DG.module2node.items():
                if isinstance(module, nn.Parameter):
                    continue
                self.layer_init_out_ch[module] = self.DG._safe_channels(node, Side.OUT)
                self.layer_init_in_ch[module] = self.DG._safe_channels(node, Side.IN)
            self.init_num_heads = dict(self.num_heads)
            self._init_planning()
            self._init_heads()
            self._init_uniform(model, options.uniform_config_widths, family.config)
            self._init_config_fit(family.config)
            self._init_alignment()
            # after the parts that round widths: a budget's floors are kept counts (profiles the model when asked)
            self._init_budget(options)
            self._init_verify()
            self._init_report()

    __init__.__doc__ = with_options_doc(__init__.__doc__)

    # -- hooks for sparse-training subclasses ---------------------------------------------------------
    def update_regularizer(self) -> None:
        """No regularizer here; GrowingRegPruner and friends rebuild theirs after a step."""

    def regularize(self, model: nn.Module = None, loss: torch.Tensor | None = None) -> None:
        """Plain pruning adds nothing to the gradients (torch_pruning's ``regularize(model, loss)``); the
        sparse-training pruners (GrowingRegPruner, GroupNormPruner, BNScalePruner) override it."""

    def _check_layers_unchanged(self) -> None:
        """The graph holds the layers it traced; one replaced since (``model.fc = nn.Linear(...)``) would be
        pruned in the graph's copy only, silently. Say which, instead."""
        modules = dict(self.model.named_modules(remove_duplicate=False))
        params = dict(self.model.named_parameters(remove_duplicate=False))
        inner = getattr(self.DG, "_inner_owner", {})  # an MoE block's expert widths live inside their owner
        for layer, node in self.DG.module2node.items():
            if layer in inner:
                continue
            current = params.get(node.name) if isinstance(layer, nn.Parameter) else modules.get(node.name)
            if current is not layer:
                raise RuntimeError(
                    f"{node.name} is no longer the {'parameter' if isinstance(layer, nn.Parameter) else 'layer'} "
                    f"this pruner traced (it was replaced or removed after the pruner was built); build a new "
                    f"pruner for the model as it is now"
                )

    def _parameter_names(self) -> dict:
        """{parameter: its name in the model}, so penalties can find parameters a wrapper replaced."""
        return {param: name for name, param in self.model.named_parameters(remove_duplicate=False)}

    # -- stepping --------------------------------------------------------------------------------------
    def step(self, interactive: bool = False, optimizer=None):
        """Advance the schedule by one step and prune; with ``interactive`` yield groups to prune yourself."""
        if any(param.is_meta for param in self.model.parameters()):
            raise RuntimeError(
                "the model's parameters are on the meta device: importance needs real weight values; materialise "
                "the model (to_empty + load weights) or prune explicit groups with DependencyGraph instead"
            )
        refuse_sharded(self.model, "step()")
        self._check_layers_unchanged()
        self.current_step += 1
        if self.current_step > self.iterative_steps:
            warnings.warn("pruning schedule already finished; step() does nothing", stacklevel=2)
            self.current_step = self.iterative_steps
            return iter(()) if interactive else None
        if interactive:
            if self._compensator is not None:
                warnings.warn("compensation is applied by step() only: groups handed out by step(interactive=True) "
                              "are pruned as they are; call step() to compensate", stacklevel=2)
            return self._interactive(self._plan(), optimizer)
        with gc_paused():
            checkpoint = self._checkpoint()
            step_record = self._begin_step_record()
            try:
                optimizer_plans = self._step_checked(optimizer, checkpoint)
                # a Hugging Face config must describe what was pruned (pruner/config_fit.py)
                optimizer_plans = self._fit_config(optimizer, checkpoint, optimizer_plans)
            except BaseException:
                # a step that fails leaves the model, its config and the schedule as they were
                checkpoint.restore()
                self.current_step -= 1
                raise
            for plan in optimizer_plans:
                apply_optimizer_plan(plan)
            self._warn_heads_refused()
            self._warn_held_back()
            if self._compensator is not None:
                self._compensator.warn()
            self._end_step_record(step_record)
        return None

    def _interactive(self, plan, optimizer) -> Iterator[Group]:
        sizes = self._sizes()
        step_record = self._begin_step_record()
        pruned, left = [], []
        for group in plan:
            if group.size_ties and unbalanced_ties(pruned + [group]):
                # the model must run after every group the caller prunes, so a group whose reshape tie only
                # another group of the step could balance is not handed out (step() prunes such pairs together)
                left.append(group[0].dep.target.name)
                continue
            root = group[0].dep.target
            width = self.DG._safe_channels(root, group[0].side)
            yield group
            if width is not None and self.DG._safe_channels(root, group[0].side) < width:
                self._count_removed_heads(group)  # the caller pruned it
                pruned.append(group)
        if left:
            warnings.warn(
                "left unpruned in this interactive step because a reshape ties their width to another group's: "
                + ", ".join(left) + "; step() without interactive prunes tied groups together", stacklevel=2)
        self._warn_heads_refused()
        self._end_step_record(step_record, warn=False)  # the caller chose what to prune
        self._after_step(sizes)

    def _compensation_in_use(self) -> Compensator | None:
        """The compensator step() applies, for a schedule that compensates earlier (GReg-1's fade)."""
        return self._compensator

    def _compensation_notes(self) -> list:
        """What compensation did this step, for the report."""
        return self._compensator.step_notes() if self._compensator is not None else []

    def _prune_group(self, group: Group, optimizer=None) -> list:
        """Prune now; return the optimizer-state slicing to apply once the whole step is kept."""
        plan = plan_optimizer_state(optimizer, group) if optimizer is not None else []
        if self._compensator is not None:
            self._compensator.before_prune(group)
        group.prune()
        follow = getattr(self.importance, "on_pruned", None)  # calibrated statistics drop the removed channels
        if follow is not None:
            follow(group)
        self._count_removed_heads(group)
        return plan


def _option_attribute(name: str) -> property:
    def read(self):
        return getattr(self.options, name)

    def write(self, value):
        setattr(self.options, name, value)

    return property(read, write, doc=f"``self.options.{name}`` under torch_pruning's attribute name")


#: options torch_pruning's pruners keep as attributes: here they read and write ``self.options``, the one copy
OPTION_ATTRIBUTES = ("importance", "global_pruning", "pruning_ratio", "max_pruning_ratio", "iterative_steps",
                     "iterative_pruning_ratio_scheduler", "round_to", "isomorphic", "prune_num_heads",
                     "prune_head_dims", "head_pruning_ratio", "prune_num_experts", "forward_fn", "verify")
for _name in OPTION_ATTRIBUTES:
    setattr(BasePruner, _name, _option_attribute(_name))

MetaPruner = BasePruner


def _compensator(option, importance) -> Compensator | None:
    compensation = as_compensation(option)
    check_statistics_source(importance, compensation)
    return None if compensation is None else Compensator(compensation, importance)


def is_loss(value) -> bool:
    """A tensor where a pruner's ``regularize`` takes a flag or a strength: torch_pruning's BasePruner call
    form ``regularize(model, loss)``, which our penalties (acting on gradients) do not need."""
    return isinstance(value, torch.Tensor)
