"""Why a group cannot be pruned, as data: a kind, the layer or op where it was found, and the message.

Decisions read the kind (``RefusalKind.may_pass_for_subset``); people read the message. A ``Refusal`` is
a ``str`` holding its message, so ``group.blocked`` still reads, joins and matches as the list of
messages it always was.
"""
from __future__ import annotations

from enum import Enum


class RefusalKind(Enum):
    """What stops the channels; the value says it in words (for reports)."""

    #: the channels reach a tensor the model returns: outputs keep their shape
    MODEL_OUTPUT = "reaches a model output"
    #: a constant tensor or a model input
    CONSTANT_OR_INPUT = "reaches a constant or a model input"
    #: a buffer of the model (a rotary table, a registered mask)
    BUFFER = "reaches a buffer"
    #: a declared layer's own parameter used outside that layer along an axis it does not declare
    DECLARED_PARAMETER = "reaches a layer's parameter used outside the layer"
    #: a parameter the user asked to leave alone
    IGNORED_PARAMETER = "reaches an ignored parameter"
    #: a bare parameter reached on another dim than the one it is pruned along
    DIM_MISMATCH = "reaches a parameter on another dim"
    #: a bare parameter reached along several dims at once
    SEVERAL_DIMS = "reaches a parameter along several dims"
    #: an argument that cannot lose channels (a layer's non-channel input, an op's constant or mask)
    UNPRUNABLE_ARGUMENT = "reaches an argument that cannot be pruned"
    #: a layer would keep part of a channel (channels arrive spread over dims it does not split)
    PARTIAL_CHANNEL = "would split a channel"
    #: a layer maps positions, not channels, along the channel dim (strided conv, patch embedding)
    SIZE_CHANGING_LAYER = "runs through a layer that changes the channel dim's size"
    #: an op (or a layer used bare) whose effect on channels cannot be mapped
    UNMAPPABLE_OP = "runs through an op that cannot be mapped"
    #: a split or slice whose literal sizes, bounds or indices would hand its pieces other channels
    SPELLED_OUT_PIECES = "a split or slice spells out its pieces"
    #: a reshape that spells out a size the removal would shrink (a fixed head count)
    SPELLED_OUT_SIZE = "a reshape spells out a size"
    #: channels spread over several dims would not keep a full grid (uneven heads)
    REGROUP = "would regroup channels unevenly"
    #: grouped-query attention would leave key/value heads serving unequal numbers of query heads
    GROUPED_QUERY = "would unbalance grouped-query heads"
    #: the pruner's planned channels grew into more root channels than planned
    WIDENED = "the graph widens the planned channels"
    #: the graph's final check refused the candidate (a layer left empty or uneven)
    CHECK_FAILED = "a layer would lose every channel"
    #: the pruner found no candidate to try
    NO_CANDIDATE = "no candidate"
    #: raised without a kind (code that still passes Blocked a plain message): give it one
    UNCLASSIFIED = "unclassified"

    @property
    def may_pass_for_subset(self) -> bool:
        """Whether a subset of the refused channels (the same index in every head, whole heads) may be
        accepted: sizes spelled out and regrouping refuse only some removals; outputs, constants and
        buffers refuse every one."""
        return self in _SUBSET_MAY_PASS


_SUBSET_MAY_PASS = frozenset({RefusalKind.SPELLED_OUT_PIECES, RefusalKind.SPELLED_OUT_SIZE, RefusalKind.REGROUP,
                              RefusalKind.DIM_MISMATCH})


class Refusal(str):
    """A reason channels cannot be removed: ``kind``, ``layer`` (the module path, parameter or op where it
    was found; None when the message names none) and ``detail`` (the message, which ``str()`` gives)."""

    kind: RefusalKind
    layer: str | None

    def __new__(cls, kind: RefusalKind, layer: str | None, detail: str) -> "Refusal":
        refusal = super().__new__(cls, detail)
        refusal.kind = RefusalKind(kind)
        refusal.layer = layer
        return refusal

    @property
    def detail(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Refusal({self.kind.name}, {self.layer!r}, {self.detail!r})"

    def __getnewargs__(self):
        return self.kind, self.layer, self.detail

    def as_row(self) -> tuple[str, str, str]:
        """(kind, layer, detail) as text, for reports."""
        return self.kind.name, self.layer or "-", self.detail


class Blocked(Exception):
    """These channels cannot be removed: they reach a constant, a model output, or an op we cannot map."""

    def __init__(self, kind: RefusalKind | str, layer: str | None = None, detail: str | None = None):
        if isinstance(kind, str) and detail is None:
            kind, detail = RefusalKind.UNCLASSIFIED, kind  # Blocked("message"): older spelling
        self.refusal = Refusal(kind, layer, detail)
        super().__init__(self.refusal.detail)
