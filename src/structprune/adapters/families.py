"""The registry of model families: what the pruner asks a family about a whole model.

Adapters (``adapters/core.py``) keep single modules' attributes in step with their layers. A few questions
are about the whole model and the step instead: which outputs must keep their shape, which extra layer types
root groups, what state outside the layers a rolled-back step must put back (Hugging Face configs), which
config field each width is counted in and whether the config class can describe the pruned widths. The
pruner core asks this registry; a family module registers its :class:`ModelFamily` at import, the way its
adapters register (``adapters/hf/family.py`` for transformers), so the core imports no family.

A model no family claims gets :data:`PLAIN`: nothing extra, every option at its plain-PyTorch default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class ConfigWidths:
    """How a family's config counts layer widths, and which widths its config class can describe.

    Read by ``pruner/uniform.py`` (one width per config field) and ``pruner/config_fit.py`` (a step the
    config cannot describe is planned again towards the nearest config the class accepts).
    """

    #: ``layer_fields(model)`` -> {module: field key}: the config field each root's width is counted in
    layer_fields: Callable[[nn.Module], dict]
    #: ``head_size_ties(model)`` -> {attention module: (field key, blocks)} where the head size is derived
    #: from another field (BERT: hidden size / heads)
    head_size_ties: Callable[[nn.Module], dict]
    #: ``sync(model)``: write every config field from the layers now
    sync: Callable[[nn.Module], list]
    #: ``mismatches(model)`` -> problems a model rebuilt from its config would have (empty: it describes it)
    mismatches: Callable[[nn.Module], list]
    #: ``width_fields(before, planned)`` -> the integer fields a step may move (config dicts before and planned)
    width_fields: Callable
    #: ``field_values(field, unit=1)`` -> the values to try for one field, nearest to the plan first
    field_values: Callable
    #: ``dependencies(model, before, fields, widths)`` -> {field: names of the widths that follow it}
    dependencies: Callable
    #: ``candidates(model, planned, choices, max_configs=..., refusals=None)`` -> configs the class accepts
    #: (each with the model it builds on the meta device and the fields it moved), nearest first
    candidates: Callable
    #: config fields that count heads, and that state a head size (frozen when the options forbid moving them)
    head_count_fields: frozenset
    head_size_fields: frozenset
    #: ``head_count(module)`` / ``head_size(module)`` -> the int an attention module states, or None
    head_count: Callable[[nn.Module], int | None]
    head_size: Callable[[nn.Module], int | None]
    #: ``heads_fit(module, built, narrow_with_heads)``: the built module has no more and no wider heads
    heads_fit: Callable[..., bool]
    #: ``heads_stayed_wide(model, built_modules)`` -> names of attention modules that lost the heads the
    #: config builds but kept wider heads than it builds
    heads_stayed_wide: Callable[[nn.Module, dict], set]


@dataclass(frozen=True)
class ModelFamily:
    name: str
    #: whether this family knows ``model`` (the model the pruner was given, not its submodules)
    claims: Callable[[nn.Module], bool]
    #: layer types that root groups of their own beside the default roots (ALBERT's narrow embeddings)
    extra_root_types: tuple = ()
    #: the default ``output_transform``: the outputs that keep their shape (None: every output)
    task_outputs: Callable | None = None
    #: trained models of the family carry a few hidden units with outsized activations, so criteria that
    #: read weights only remove what the model relies on (pruner/advice.py warns)
    activation_outliers: bool = False
    #: config-aware widths; None when the family's models have no config describing their widths
    config: ConfigWidths | None = None
    #: ``snapshot(model)`` -> ``restore()``: state outside the layers that the family's adapters rewrite.
    #: Run for every model, claimed or not: a wrapper the family does not claim may hold its models
    snapshot: Callable[[nn.Module], Callable[[], None]] | None = None
    #: attribute names an attention module may state its head size under (``head_dim`` is always read)
    head_size_names: tuple = ()


#: the family of a model no registered family claims
PLAIN = ModelFamily("plain PyTorch", lambda model: False)
#: the spelling of a head size every family shares (torchvision, timm); families add theirs
GENERIC_HEAD_SIZE_NAMES = ("head_dim",)

#: every registered family, in registration order (the first that claims a model is its family)
FAMILIES: list[ModelFamily] = []


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry; registering the same family again changes nothing.

    Raises ValueError for a different family under a registered name.
    """
    if family in FAMILIES:
        return family
    if any(other.name == family.name for other in FAMILIES):
        raise ValueError(f"a model family named {family.name!r} is already registered; give yours another name, "
                         f"or unregister_family() the old one first")
    FAMILIES.append(family)
    return family


def unregister_family(family: ModelFamily) -> None:
    """Remove ``family``; pruners built before keep what they asked it."""
    if family in FAMILIES:
        FAMILIES.remove(family)


def family_of(model: nn.Module) -> ModelFamily:
    """The first registered family that claims ``model``, else :data:`PLAIN`."""
    return next((family for family in FAMILIES if family.claims(model)), PLAIN)


def snapshot_families(model: nn.Module) -> Callable[[], None]:
    """``restore()`` putting back the state every family's adapters may rewrite outside ``model``'s layers."""
    restores = [family.snapshot(model) for family in FAMILIES if family.snapshot is not None]

    def restore() -> None:
        for each in restores:
            each()

    return restore


def head_size_names() -> tuple:
    """Attribute names under which an attention module may state its head size, every family's together."""
    names = list(GENERIC_HEAD_SIZE_NAMES)
    for family in FAMILIES:
        names += [name for name in family.head_size_names if name not in names]
    return tuple(names)
