"""Config-aware steps: a Hugging Face model is pruned only to widths its config class can describe.

With ``uniform_config_widths`` (the default for models with a config) a step is planned as usual, then the
config it produces is checked the way ``save_pretrained`` / ``from_pretrained`` will check it
(the family's ``ConfigWidths.mismatches``, ``structprune.hf.rebuild.config_mismatches`` for transformers:
the class validates it, a model built from it has the
pruned shapes). A plan the config cannot describe (hidden 42 with 4 heads in a config that derives
``head_dim = hidden / heads``; heads narrowed in a family without a head size field; a pooler or a
classifier the user ignored that the config builds as hidden x hidden) is undone, and the step is planned
again towards the shapes of the nearest config the class accepts (``ConfigWidths.candidates``,
``structprune.hf.fit``): every group root
pruned to the width that config builds for it, whole heads to its head counts. A layer the graph cannot
bring to such a width pins it, and the next candidate is tried. ``pruner.report()`` names the fields moved
and why; if no candidate fits, the step is kept as planned with a warning (``tp.save_pruned`` still saves).

Everything it knows of configs comes from the model family (``adapters/families.py``); this module imports
no family.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field as state_field

from torch import nn

from ..adapters.families import ConfigWidths
from ..graph.side import Side
from ..layers.moe import ExpertCount, ExpertWidth

#: suffix of the names that stand for an attention module's head count in field dependencies
HEADS = "#heads"
#: re-planned steps tried before giving up (each costs one planning pass and a meta-device build)
MAX_REPLANS = 5


@dataclass
class ConfigFitState:
    """What the config fit knows: the family's config reading, and the step being re-planned."""

    #: how the model's family counts widths in its config (None: no config, the fit never runs)
    config: ConfigWidths | None = None
    #: during a re-planned step: {root module: out width the chosen config builds for it}
    width_targets: dict | None = None
    #: during a re-planned step: {module name: module} of the model the chosen config builds (meta)
    fit_modules: dict | None = None
    #: what the last step adjusted, for report()
    notes: list = state_field(default_factory=list)
    #: attention modules a re-planned step showed cannot lose whole heads and narrow the rest at once
    wide_heads: set = state_field(default_factory=set)
    #: {name: module} of the model the last re-planned candidate builds
    last_fresh: dict = state_field(default_factory=dict)
    #: id(layer) -> its name in the model, built on first use
    module_names: dict | None = None


class ConfigFit:
    """Mixin of BasePruner: re-plan a step whose widths the model's config class cannot describe. Its state is
    ``self._fit`` (:class:`ConfigFitState`)."""

    def _init_config_fit(self, config: ConfigWidths | None) -> None:
        self._fit = ConfigFitState(config)

    def _replanning(self) -> bool:
        """Whether the step being planned is re-planned towards a config's widths (each group has its target)."""
        return self._fit.width_targets is not None

    def _config_fit_notes(self) -> list:
        """What the last step adjusted, for the report."""
        return list(self._fit.notes)

    # -- hooks the planners call --------------------------------------------------------------------
    def _fitted_n_prune(self, group, n_prune: int) -> int:
        """Channels a group loses: what it planned, or in a re-planned step what reaches the config's width."""
        if self._fit.width_targets is None:
            return n_prune
        target = self._fit.width_targets.get(group[0].dep.target.module)
        current = len(group[0].idxs)
        return 0 if target is None or group[0].side is not Side.OUT else max(0, current - target)

    def _fitted_head_keep(self, module, keep: int) -> int:
        """Heads a projection keeps: ``keep``, or in a re-planned step the heads the chosen config builds."""
        built = self._fit.fit_modules
        if built is None:
            return keep
        name = self.DG._name(module)
        fresh = built.get(name)
        fresh_parent = built.get(name.rsplit(".", 1)[0]) if "." in name else None
        head_dim = self._fit.config.head_size(fresh_parent) if fresh_parent is not None else None
        width = self._fresh_out(module, fresh)
        if not head_dim or width is None:
            return keep
        return max(1, width // head_dim)

    # -- the step --------------------------------------------------------------------------------------
    def _config_fit_active(self) -> bool:
        return self._follows_config() and self._fit.config is not None and not self._replanning()

    def _fit_config(self, optimizer, checkpoint, plans: list) -> list:
        """Keep the step if its config describes the model; otherwise re-plan towards one that does."""
        state = self._fit
        state.notes = []
        if not self._config_fit_active() or not state.config.mismatches(self.model):
            return plans
        config = state.config
        config.sync(self.model)
        planned = self.model.config.to_dict()
        head_notes = self._head_notes()
        roots = self._fit_roots()
        by_name = {self.DG._name(module): module for module in roots}
        achieved = {module: self.DG.get_out_channels(module) for module in roots}
        checkpoint.restore()
        before = self.model.config.to_dict()
        widths = {module: self.DG.get_out_channels(module) for module in roots}
        shapes = {name: tuple(tensor.shape) for name, tensor in self.model.state_dict().items()}
        # an ignored layer keeps its width, and so does every config field that width follows
        pinned = {module: widths[module] for module in roots if self._is_ignored_layer(module)}
        fields = [field for field in config.width_fields(before, planned) if field.name not in self._frozen_fields()]
        depends = config.dependencies(self.model, before, fields, lambda fresh: self._built_widths(fresh, by_name))
        refusals: list = []
        mismatched, moved = self._mismatched_roots(planned, fields, by_name, achieved, refusals)
        replans = 0
        state.wide_heads = set()  # attention modules that cannot lose whole heads and narrow in one step

        def unreachable(candidate) -> set:
            return self._violations(candidate.model, roots, widths, achieved, shapes, pinned)[1]

        while replans < MAX_REPLANS:
            learned = False
            choices = self._choices(fields, depends, pinned, widths, mismatched, moved)
            for candidate in self._per_config(planned, choices, depends, unreachable):
                targets = self._candidate_targets(candidate.model, roots, widths, achieved, shapes, pinned)
                if targets is None:
                    # a layer this config builds or leaves out (ELECTRA's embeddings_project when the embedding
                    # width equals the hidden one): the fields it follows may move too
                    unlike = _layers_built_otherwise(candidate.model, shapes, by_name) - mismatched
                    if unlike:
                        mismatched |= unlike
                        learned = True
                        break
                    continue
                replans += 1
                state.last_fresh = dict(candidate.model.named_modules())
                state.width_targets, state.fit_modules = targets, state.last_fresh
                try:
                    fitted = self._step_balanced(optimizer, checkpoint)
                finally:
                    state.width_targets, state.fit_modules = None, None
                if self._forward_error() is None and not config.mismatches(self.model):
                    self._note_config_fit(candidate, refusals, achieved)
                    # what the graph refused while planning still holds; targets of its width were not tried
                    self._merge_head_notes(head_notes)
                    return fitted
                for module, target in targets.items():
                    width = self.DG.get_out_channels(module)
                    if width != target and width == widths[module] and module not in pinned:
                        pinned[module] = width  # the graph cannot narrow it; later candidates keep its width
                        learned = True
                wide = config.heads_stayed_wide(self.model, state.last_fresh) - state.wide_heads
                if wide:
                    # the graph traced the old head count: these lost whole heads and could not narrow the rest
                    state.wide_heads |= wide
                    learned = True
                checkpoint.restore()
                if learned or replans >= MAX_REPLANS:
                    break
            else:
                break  # no candidate left
        return self._unfitted_step(optimizer, checkpoint, refusals)

    def _built_widths(self, fresh, by_name: dict) -> dict:
        """{root name: out width} of a built model, and {attention name + "#heads": head count}, so that a
        field's dependencies say which head counts follow it."""
        modules = dict(fresh.named_modules())
        found = {name: self._fresh_out(module, self._counterpart(module, modules)) for name, module in by_name.items()}
        for name, module in modules.items():
            heads = self._fit.config.head_count(module)
            if heads is not None:
                found[name + HEADS] = heads
        return found

    def _choices(self, fields, depends, pinned, widths, mismatched: set, moved: set) -> list:
        """(field, values nearest first) per field: held where a pinned width follows it; free where a layer
        the nearest buildable config builds wrong follows it, where that config had to move it, and for head
        counts the step changed (a few values, and another hidden width may need another); else as planned."""
        held = {self.DG._name(module) for module, width in pinned.items() if widths.get(module) == width}
        held |= {name + HEADS for name in self._fit.wide_heads}  # they keep their heads and narrow instead
        unit = self.round_to if isinstance(self.round_to, int) else 1
        choices = []
        for field in fields:
            names = depends.get(field)
            if names is not None and names & held:
                choices.append((field, [field.before]))
            elif names is None or field.label in moved or names & mismatched or (
                    field.name in self._fit.config.head_count_fields and field.planned != field.before):
                choices.append((field, self._fit.config.field_values(field, unit)))
        return choices

    def _mismatched_roots(self, planned: dict, fields: list, by_name: dict, achieved: dict,
                          refusals: list) -> tuple[set, set]:
        """(roots built at another width than the step left them, fields moved) by the planned config, or, when
        the class refuses it, by the nearest config it accepts."""
        config = self._fit.config
        every = [(field, config.field_values(field)) for field in fields]
        nearest = next(iter(config.candidates(self.model, planned, every, max_configs=200, refusals=refusals)), None)
        if nearest is None:
            return set(by_name), {field.label for field in fields}
        built = self._built_widths(nearest.model, by_name)
        mismatched = {name for name, module in by_name.items() if built.get(name) not in (None, achieved[module])}
        return mismatched, {field.label for field, _ in nearest.moved}

    def _unfitted_step(self, optimizer, checkpoint, refusals: list) -> list:
        """No config near the plan could be reached: prune as planned, and say that save_pretrained refuses."""
        plans = self._step_checked(optimizer, checkpoint)
        problems = self._fit.config.mismatches(self.model)
        if problems:
            why = refusals[0] if refusals else problems[0]
            self._fit.notes = [f"no config near this step's widths describes the model ({why}); "
                                  f"save_pretrained will refuse, tp.save_pruned saves it"]
            warnings.warn(
                f"uniform_config_widths: {type(self.model.config).__name__} describes none of the widths near this "
                f"step's ({why}), so save_pretrained will refuse the model; save it with tp.save_pruned, or prune "
                f"with other ratios. pruner.report() shows the step",
                stacklevel=4,
            )
        return plans

    # -- candidates ------------------------------------------------------------------------------------
    def _fit_roots(self) -> list:
        return [module for module in self.DG.module2node
                if not isinstance(module, nn.Parameter) and isinstance(module, self.root_module_types)
                and self.DG.get_out_channels(module) is not None]

    def _is_ignored_layer(self, module) -> bool:
        return any(item is module or (isinstance(item, type) and isinstance(module, item))
                   for item in self.ignored_layers)

    def _frozen_fields(self) -> frozenset:
        """Fields the options forbid moving: head counts without prune_num_heads or where the caller counts the
        heads itself (torch_pruning's ``num_heads=``, whose examples then set the head attributes by hand),
        stated head sizes without prune_head_dims."""
        frozen = set()
        if not self.prune_num_heads or self.options.num_heads:
            frozen |= self._fit.config.head_count_fields
        if not self.prune_head_dims:
            frozen |= self._fit.config.head_size_fields
        return frozenset(frozen)

    def _counterpart(self, module, fresh_modules: dict):
        """The layer of the built model that stands where ``module`` stands: by name, or for the graph's
        proxies of fused experts (their inner width, their count) the same proxy around the built experts."""
        if isinstance(module, ExpertWidth):
            experts = self._counterpart(module.experts, fresh_modules)
            return ExpertWidth(experts) if experts is not None else None
        if isinstance(module, ExpertCount):
            experts, router = (self._counterpart(part, fresh_modules) for part in (module.experts, module.router))
            return ExpertCount(experts, router) if experts is not None and router is not None else None
        if self._fit.module_names is None:
            self._fit.module_names = {id(layer): name for name, layer in self.model.named_modules()}
        name = self._fit.module_names.get(id(module))
        return fresh_modules.get(name) if name is not None else None

    def _fresh_out(self, module, fresh) -> int | None:
        if fresh is None:
            return None
        pruner = self.DG.get_pruner_of_module(module)
        try:
            return pruner.get_out_channels(fresh) if pruner is not None else None
        except (AttributeError, NotImplementedError, TypeError):
            return None

    def _candidate_targets(self, fresh, roots, widths, achieved, shapes, pinned) -> dict | None:
        """{root: out width} the candidate builds, or None when the graph cannot reach it from here."""
        targets, unreachable = self._violations(fresh, roots, widths, achieved, shapes, pinned)
        return None if unreachable else targets

    def _violations(self, fresh, roots, widths, achieved, shapes, pinned) -> tuple[dict, set]:
        """({root: out width} the candidate builds, names of what the graph cannot reach from here): a layer
        only one of the models has, a tensor wider than now, heads wider or more than now, a pinned width
        moved, a width a kernel needs aligned that is not (names of layers; attention + HEADS for heads)."""
        unreachable = set()
        expected = {name: tuple(tensor.shape) for name, tensor in fresh.state_dict().items()}
        for name in expected.keys() ^ shapes.keys():
            unreachable.add(name.rsplit(".", 1)[0])
        for name, shape in expected.items():
            old = shapes.get(name)
            if old is not None and (len(shape) != len(old) or any(new > was for new, was in zip(shape, old))):
                unreachable.add(name.rsplit(".", 1)[0])
        modules = dict(fresh.named_modules())
        for name, module in self.model.named_modules():
            if not self._fit.config.heads_fit(module, modules.get(name), name not in self._fit.wide_heads):
                unreachable.add(name + HEADS)
        targets = {}
        for module in roots:
            name = self.DG._name(module)
            target = self._fresh_out(module, self._counterpart(module, modules))
            if target is None:
                target = achieved[module]  # a proxy of the graph (fused experts' width): as planned
            if target > widths[module] or (module in pinned and target != pinned[module]) or (
                    target != widths[module] and target % self._alignment(module)):  # pruner/alignment.py
                unreachable.add(name)
            targets[module] = target
        return targets, unreachable

    def _per_config(self, planned: dict, choices: list, depends: dict, reach):
        """Candidates for a model with sub-configs (SigLIP's text and vision towers): each sub-config's fields
        moved on their own, the others held, until no layer they reach is unreachable; then every
        combination as one search. ``reach(candidate)`` gives the names the graph cannot reach."""
        paths = sorted({field.path for field, _ in choices})
        if len(paths) > 1:
            current = {field: values[0] for field, values in choices}
            for path in paths:
                names = set().union(*(depends.get(field) or set() for field, _ in choices if field.path == path))
                held = [(field, values if field.path == path else [current[field]]) for field, values in choices]
                for candidate in self._fit.config.candidates(self.model, planned, held, max_configs=150):
                    if not any(_claims(names, name) for name in reach(candidate)):
                        moved = dict(candidate.moved)
                        for field, _ in choices:
                            if field.path == path:
                                current[field] = moved.get(field, field.planned)
                        break
            yield from self._fit.config.candidates(self.model, planned,
                                                   [(field, [current[field]]) for field, _ in choices])
        yield from self._fit.config.candidates(self.model, planned, choices)

    def _note_config_fit(self, candidate, refusals: list, achieved: dict) -> None:
        moved = ", ".join(f"{field.label} {field.planned} -> {value}" for field, value in candidate.moved)
        why = refusals[0] if refusals else "a model built from the planned config has other shapes"
        self._fit.notes = [f"config widths adjusted ({moved or 'same fields, layers brought to them'}): {why}"]
        label = moved or type(candidate.config).__name__
        kept = []
        for module, planned in achieved.items():
            width = self.DG.get_out_channels(module)
            if width is not None and planned is not None and width > planned:
                kept.append(f"{self.DG._name(module)} ({planned} -> {width})")
                self._note_refusal(module, f"uniform_config_widths: held to {width} so that the config describes "
                                           f"the model ({label})")
        if kept:
            warnings.warn(
                f"uniform_config_widths: kept more channels than planned so that {type(candidate.config).__name__} "
                f"describes the pruned model ({label}; {why}): " + "; ".join(kept[:6])
                + (f"; and {len(kept) - 6} more" if len(kept) > 6 else "") + ". pruner.report() shows the step; "
                "pass uniform_config_widths=False to prune as planned and save with tp.save_pruned",
                stacklevel=4,
            )

def _claims(names: set, name: str) -> bool:
    """Whether an unreachable ``name`` (a layer, or attention + HEADS) lies among the layers ``names`` reach."""
    base = name.split(HEADS)[0]
    return any(other == name or other.startswith(base + ".") or base.startswith(other + ".") or other == base
               for other in names)


def _layers_built_otherwise(fresh, shapes: dict, by_name: dict) -> set:
    """Root names with a tensor that only one of the built model and the model has."""
    keys = set(fresh.state_dict()) ^ set(shapes)
    return {key.rsplit(".", 1)[0] for key in keys} & set(by_name)
