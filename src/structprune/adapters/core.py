"""The adapter registry: model attributes that must follow pruned shapes, and when each sync runs.

Some models keep sizes in plain attributes that their forward reads (torchvision's ViT reshapes with
``self.hidden_dim``; Hugging Face attention reshapes with ``self.head_dim``). After every applied group
each adapter whose ``applies`` matches a module recomputes those attributes from the layers' shapes.
Family modules (``adapters/torchvision.py``, ``timm.py``, ``ultralytics.py``, ``moe.py``, ``hf/``)
register theirs with the :func:`adapter` decorator; this module imports none of them.

Order is explicit: adapters run by ``order``, each over its matching modules in model order. Adapters of
order :data:`MODEL` or more read what the others synced (model configs) and wait until a step's groups
are all applied (:func:`deferred_late_sync`). Adapters sharing a ``claim`` are alternatives for one
module: the lowest-ordered one that applies syncs it (timm's ``Attention`` before the generic fused-qkv
reading), so no predicate has to exclude the others.

Attention adapters must tell whole heads from head dims: a q projection of 4 heads x 16 that lost 32
channels is either 2 heads x 16 or 4 heads x 8. An adapter declared with ``uses_removed`` is called as
``sync(module, removed)`` where ``removed`` maps each pruned layer to the output channels it just lost
(numbered as before the prune); ``adapters.layout`` reads the exact layout from them. Without that
information (``removed`` is None: a sync by hand, or a reload) the size the family's forward spells out
stays fixed, as the graph only lets the reshape dim written as -1 (or the innermost one) shrink.

``follows`` names attributes the adapter rewrites that the forward spells out in a reshape (timm's
``self.num_heads``): during the trace they are swapped for a marked int, and the graph lets those
reshape dims shrink too, so whole heads can go where the code would otherwise pin their number.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from torch import nn

from ..graph.hooks import ModelHook, register_graph_hook

#: the order of adapters that sync one module's attributes from its own layers
MODULE = 100
#: adapters of this order or more read what the others synced (model configs); a step runs them once,
#: after its last group
MODEL = 1000


@dataclass(frozen=True)
class Adapter:
    name: str
    applies: Callable[[nn.Module], bool]
    sync: Callable[..., None]
    #: adapters run by order (ties: registration order); ``MODEL`` and above wait for the end of a step
    order: int = MODULE
    #: adapters with the same claim are alternatives: a module is synced by the lowest-ordered that applies
    claim: str | None = None
    #: call ``sync(module, removed)`` with {layer: removed output channel indices} of the pruned group
    uses_removed: bool = False
    #: int attributes ``sync`` rewrites that the forward spells out in a reshape (timm's num_heads): the
    #: graph lets those reshape dims shrink (whole heads go) because the adapter follows them
    follows: tuple = ()
    #: ``(name, formula)`` pairs: int attributes that are a formula of layer widths (ultralytics C2PSA's
    #: ``c = cv1.conv.out_channels // 2``). During the trace the formula runs on the layers' traced size
    #: attributes, so the graph evaluates the attribute exactly for any removal instead of trusting it
    #: (as ``follows`` does); ``sync`` should apply the same formulas (``sync_derived`` does)
    derives: tuple = ()

    @property
    def deferred(self) -> bool:
        """Whether a step runs this adapter once after its groups rather than after each (``order >= MODEL``)."""
        return self.order >= MODEL


#: every registered adapter, sorted by order (registration order among equals)
ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Add ``adapter`` to the registry; registering the same adapter again changes nothing.

    Raises ValueError for a different adapter under a registered name, or one whose claim already has an
    adapter of the same order (which of the two syncs a module would be left to registration order).
    """
    if adapter in ADAPTERS:
        return adapter
    for other in ADAPTERS:
        if other.name == adapter.name:
            raise ValueError(f"an adapter named {adapter.name!r} is already registered; give yours another name, "
                             f"or unregister_adapter() the old one first")
        if adapter.claim is not None and other.claim == adapter.claim and other.order == adapter.order:
            raise ValueError(f"adapters {other.name!r} and {adapter.name!r} both claim {adapter.claim!r} at order "
                             f"{adapter.order}: give one a lower order (it then syncs the modules both match)")
    ADAPTERS.append(adapter)
    ADAPTERS.sort(key=lambda registered: registered.order)  # stable: registration order among equals
    return adapter


def unregister_adapter(adapter: Adapter) -> None:
    """Remove ``adapter``; graphs built before keep the adapters they matched."""
    if adapter in ADAPTERS:
        ADAPTERS.remove(adapter)


def adapter(name: str, applies: Callable[[nn.Module], bool], *, order: int = MODULE, claim: str | None = None,
            uses_removed: bool = False, follows: tuple = (), derives: tuple = ()) -> Callable:
    """Register the decorated ``sync`` function as an :class:`Adapter` (a family module's one line per adapter)."""

    def register(sync: Callable[..., None]) -> Callable[..., None]:
        register_adapter(Adapter(name, applies, sync, order=order, claim=claim, uses_removed=uses_removed,
                                 follows=tuple(follows), derives=tuple(derives)))
        return sync

    return register


def sync_derived(module: nn.Module, derives) -> None:
    """Rewrite each derived attribute from its formula (an adapter's sync for ``derives``)."""
    for name, formula in derives:
        setattr(module, name, int(formula(module)))


def matching_modules(model: nn.Module) -> list[tuple[nn.Module, Adapter]]:
    """(module, adapter) pairs for a model in the order they sync: by adapter order, then model order.
    Module types do not change, so this is found once per graph."""
    pairs = []
    for module in model.modules():
        claimed = set()
        for registered in ADAPTERS:
            if registered.claim is not None and registered.claim in claimed:
                continue
            if registered.applies(module):
                pairs.append((module, registered))
                if registered.claim is not None:
                    claimed.add(registered.claim)
    pairs.sort(key=lambda pair: pair[1].order)  # stable: model order among equals
    return pairs


def sync_attributes(model: nn.Module, matches: list | None = None, removed: dict | None = None) -> list[str]:
    """Run every matching adapter; returns what was synced (for logs and tests).

    ``removed`` ({layer: removed output channels}, see ``graph.hooks.removed_outputs``) lets attention
    adapters tell removed heads from narrowed heads; pass it when syncing right after pruning a group.
    """
    done = []
    for module, matched in matches if matches is not None else matching_modules(model):
        if matched.uses_removed:
            matched.sync(module, removed)
        else:
            matched.sync(module)
        done.append(matched.name)
    return done


#: model attribute set while a step defers its ``MODEL``-order adapters: "idle", or "pending" once a group
#: was applied
_DEFERRED = "_structprune_deferred_late_sync"


@contextmanager
def deferred_late_sync(model: nn.Module) -> Iterator[None]:
    """Run the deferred adapters (order ``MODEL`` and above: model configs) once when the block ends, not
    after every applied group.

    A config sync walks the whole model; a step that prunes 65 groups of a 32-layer Llama spent most of
    its time there. Nothing planned inside the block reads the config, and the forward check comes after.
    """
    state = model.__dict__
    if _DEFERRED in state:
        yield
        return
    state[_DEFERRED] = "idle"
    try:
        yield
    finally:
        if state.pop(_DEFERRED) == "pending":
            sync_attributes(model, [pair for pair in matching_modules(model) if pair[1].deferred])


def _graph_hook(model: nn.Module) -> ModelHook | None:
    """Every graph built for ``model`` syncs its adapters after each applied group; the removed indices tell
    an attention adapter fewer heads from narrower heads."""
    matches = matching_modules(model)  # module types do not change: found once per graph
    if not matches:
        return None
    now = [pair for pair in matches if not pair[1].deferred]
    deferred = [pair for pair in matches if pair[1].deferred]

    def after_apply(removed):
        sync_attributes(model, now, removed)
        if _DEFERRED in model.__dict__:
            model.__dict__[_DEFERRED] = "pending"
        else:
            sync_attributes(model, deferred, removed)

    return ModelHook(after_apply,
                     [(module, matched.follows) for module, matched in matches if matched.follows],
                     [(module, matched.derives) for module, matched in matches if matched.derives])


register_graph_hook(_graph_hook)
