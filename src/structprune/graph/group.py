"""Node, Dependency and Group: the torch_pruning-shaped view of coupled channels."""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn

from .refusal import Refusal, RefusalKind
from .side import Side, is_in_channel_pruning_fn, is_out_channel_pruning_fn, side_of_pruning_fn  # noqa: F401


def item_axes(item) -> list:
    """The axes a group item removes: out_axes for output-side items, else in_axes (coupled layers
    declare in_axes as their out_axes, so both sides agree)."""
    node = item.dep.target
    if item.side is Side.OUT:
        return node.pruner.out_axes(node.module)
    return node.pruner.in_axes(node.module)


class Node:
    """A prunable thing in the graph: a declared module or an unwrapped parameter."""

    def __init__(self, module, name: str, pruner, pruning_dim: int | None = None):
        self.module = module
        self.name = name
        self.pruner = pruner
        self.pruning_dim = pruning_dim
        self.inputs: list[Node] = []
        self.outputs: list[Node] = []

    @property
    def enable_index_mapping(self) -> bool:
        """torch_pruning's switch for concat/split index mapping; structprune always maps indices exactly."""
        return True

    @enable_index_mapping.setter
    def enable_index_mapping(self, value: bool) -> None:
        if not value:
            warnings.warn(f"{self.name}: enable_index_mapping=False is ignored; structprune maps the indices "
                          f"of every op exactly, so there is nothing to switch off", stacklevel=2)

    @property
    def type(self):
        return type(self.module)

    @property
    def dependencies(self) -> list:
        """torch_pruning's per-node edges: removing this node's outputs removes the inputs of the layers it
        feeds, and removing its inputs removes the outputs of the layers feeding it (direct neighbours of
        the traced forward; index maps through ops such as concat live in the groups, not here)."""
        deps = [Dependency(self.pruner.prune_out_channels,
                           out.pruner.prune_in_channels if Side.IN in out.sides else out.pruner.prune_out_channels,
                           self, out, Side.IN) for out in self.outputs]
        if Side.IN in self.sides:
            deps += [Dependency(self.pruner.prune_in_channels, inp.pruner.prune_out_channels, self, inp, Side.OUT)
                     for inp in self.inputs]
        else:  # coupled (BatchNorm, depthwise): its one set of channels is its inputs' outputs too
            deps += [Dependency(self.pruner.prune_out_channels, inp.pruner.prune_out_channels, self, inp, Side.OUT)
                     for inp in self.inputs]
        return deps

    def side_for(self, side: Side) -> Side:
        """The side ``side`` means on this node: parameters and coupled layers (norms, depthwise convs)
        have one set of channels, their outputs."""
        if isinstance(self.module, nn.Parameter) or self.pruner.is_coupled(self.module):
            return Side.OUT
        return side

    @property
    def sides(self) -> tuple[Side, ...]:
        """The sides whose channels can be told apart on this node."""
        return (Side.OUT,) if self.side_for(Side.IN) is Side.OUT else (Side.OUT, Side.IN)

    def __repr__(self):
        return f"<Node: ({self.name} ({type(self.module).__name__}))>"


class Dependency:
    """Pruning ``trigger`` on ``source`` requires pruning ``handler`` on ``target``'s ``side``.

    Group discovery gives the side; a Dependency built by hand (torch_pruning style) takes it from the
    handler's name once, here.
    """

    def __init__(self, trigger, handler, source: Node, target: Node, side: Side | None = None):
        self.trigger = trigger
        self.handler = handler
        self.source = source
        self.target = target
        self.side = target.side_for(side_of_pruning_fn(handler) if side is None else Side(side))

    @property
    def layer(self):
        return self.target.module

    @property
    def pruning_fn(self):
        return self.handler

    def __call__(self, idxs):
        return self.handler(self.target.module, idxs)

    def is_triggered_by(self, pruning_fn) -> bool:
        return pruning_fn == self.trigger

    def __repr__(self):
        return (f"[DEP] {_fn_name(self.trigger)} on {self.source.name} => "
                f"{_fn_name(self.handler)} on {self.target.name}")

    def __eq__(self, other):
        return isinstance(other, Dependency) and (self.source, self.target, self.trigger, self.handler) == (
            other.source, other.target, other.trigger, other.handler)

    def __hash__(self):
        return hash((id(self.source), id(self.target)))


def _fn_name(fn) -> str:
    owner = getattr(fn, "__self__", None)
    base = getattr(fn, "__name__", str(fn))
    return f"{type(owner).__name__}.{base}" if owner is not None else base


class _DepAndIdxs(NamedTuple):
    dep: Dependency
    idxs: list


class GroupItem(_DepAndIdxs):
    """One coupled layer of a group: unpacks as ``dep, idxs`` (torch_pruning's protocol) and also
    carries ``root_idxs``, the root channel each index comes from."""

    def __new__(cls, dep: Dependency, idxs: list, root_idxs: list | None = None):
        item = super().__new__(cls, dep, idxs)
        item.root_idxs = idxs if root_idxs is None else root_idxs
        return item

    def __getnewargs__(self):
        # copy/pickle rebuild through __new__; the two-field default would drop root_idxs
        return self.dep, self.idxs, self.root_idxs

    @property
    def side(self) -> Side:
        return self.dep.side

    def __repr__(self):
        return f"({self.dep}, {self.idxs})"


class Group:
    """Layers whose channels must be removed together, with the matching indices for each."""

    def __init__(self, graph=None):
        self._group: list[GroupItem] = []
        self._tensors: list = []
        self._DG = graph
        #: why the group cannot be pruned as a whole (empty: it can); each a Refusal (kind, layer, message)
        self.blocked: list[Refusal] = []
        #: {layer: heads removed} when the pruner planned this group as whole attention heads
        self.heads_removed: dict = {}
        #: planned as whole attention heads (heads_removed only counts the layers in the user's num_heads)
        self.whole_heads: bool = False
        #: built for an explicit request (``get_pruning_group``): prune() honours a model-output refusal
        self.explicit: bool = False
        #: widths this removal changes that a reshape ties to a size read from another tensor (graph/size_checks.py)
        self.size_ties: list = []
        #: blocks a removal must be symmetric over for every reshape the group passes (q/k/v x heads): the
        #: planner tries this before coarser guesses, each of which costs a discovery
        self.block_hint: int = 1
        #: the discovery's walk when every map in it went channel by channel (graph/projection.py), else None
        self.walk = None

    def add_dep(self, dep: Dependency, idxs, root_idxs=None):
        tensors = None
        if isinstance(idxs, torch.Tensor):
            roots = idxs if root_idxs is None else root_idxs
            tensors = (idxs, roots)
            idxs, root_idxs = idxs.tolist(), roots.tolist()
        else:
            idxs = [int(i) for i in idxs]
            root_idxs = idxs if root_idxs is None else [int(i) for i in root_idxs]
        self._group.append(GroupItem(dep, idxs, root_idxs))
        self._tensors.append(tensors)

    def item_tensors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(idxs, root_idxs) of item k as LongTensors, kept from discovery so hot paths skip list round trips."""
        if self._tensors[k] is None:
            item = self._group[k]
            self._tensors[k] = (torch.tensor(item.idxs, dtype=torch.long), torch.tensor(item.root_idxs, dtype=torch.long))
        return self._tensors[k]

    add_and_merge = add_dep

    def exec(self) -> None:
        """torch_pruning's older name for :meth:`prune`."""
        self.prune()

    def __getitem__(self, k) -> GroupItem:
        return self._group[k]

    def __iter__(self):
        return iter(self._group)

    def __len__(self):
        return len(self._group)

    @property
    def items(self):
        return self._group

    def has_dep(self, dep: Dependency) -> bool:
        return any(item.dep == dep for item in self._group)

    def has_pruning_op(self, dep: Dependency, idxs) -> bool:
        wanted = set(int(i) for i in idxs)
        return any(
            item.dep.target == dep.target and item.dep.handler == dep.handler and wanted <= set(item.idxs)
            for item in self._group
        )

    @property
    def root(self) -> GroupItem:
        return self._group[0]

    def prune(self, idxs=None, record_history: bool = True):
        """Remove the group's channels (or, with ``idxs``, those root indices) from every coupled layer."""
        if idxs is not None:
            root = self._group[0]
            fresh = self._DG.get_group_by_side(root.dep.target.module, root.side, idxs, explicit=self.explicit)
            return fresh.prune(record_history=record_history)
        outputs = [reason for reason in self.blocked if getattr(reason, "kind", None) is RefusalKind.MODEL_OUTPUT]
        if self.blocked and not (self.explicit and len(outputs) == len(self.blocked)):
            raise RuntimeError(
                f"cannot prune group rooted at {self._group[0].dep.target.name}: " + "; ".join(self.blocked)
            )
        if outputs:
            shapes = ", ".join(reason.detail.split("model output ", 1)[-1].split(";")[0] for reason in outputs)
            warnings.warn(
                f"pruning {self._group[0].dep.target.name} changes the shape of model output(s) {shapes}, as you "
                f"asked explicitly (the pruners never plan this: an output keeps its shape there)",
                stacklevel=2,
            )
        self._DG._apply_group(self)
        if record_history:
            root = self._group[0]
            self._DG._record(root.dep.target, root.side, root.idxs)

    def details(self) -> str:
        width = 30
        lines = ["", "-" * width, " " * 8 + "Pruning Group", "-" * width]
        for index, item in enumerate(self._group):
            tag = "(root)" if index == 0 else ""
            lines.append(f"[{index}] {item.dep}, len(idxs)={len(item.idxs)} {tag}".rstrip())
            lines.append(f"    idxs={item.idxs}")
        lines.append("-" * width)
        return "\n".join(lines)

    def __str__(self):
        width = 30
        lines = ["", "-" * width, " " * 8 + "Pruning Group", "-" * width]
        for index, item in enumerate(self._group):
            tag = "(root)" if index == 0 else ""
            lines.append(f"[{index}] {item.dep}, len(idxs)={len(item.idxs)} {tag}".rstrip())
        lines.append("-" * width)
        return "\n".join(lines)

    __repr__ = __str__
