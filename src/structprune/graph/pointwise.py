"""Whether a discovery moved channels one by one, so that its group restricted to some root channels is
the group those channels alone would find (graph/projection.py).

Most maps send each channel element to elements of its own, present exactly when it is: a renumbering
(reshape, permute, window partition), a slice, a layer's own channels. A discovery made only of those
is a union over its root channels, and each element it reaches remembers the one root that reached it.
The maps that decide an element from several channels at once (an element goes only when every channel
reading it goes, a coarse channel only when all its fine ones go, a key/value head only when its query
heads go) or whose result shape depends on which channels go call :func:`not_pointwise` while a
discovery records; such a group is rediscovered for each subset instead.
"""
from __future__ import annotations

import contextlib
import contextvars

_RECORD: contextvars.ContextVar = contextvars.ContextVar("structprune_pointwise", default=None)


def not_pointwise(reason: str) -> None:
    """Note that the discovery being recorded used a map that is not channel by channel."""
    record = _RECORD.get()
    if record is not None and reason not in record:
        record.append(reason)


def undecided() -> bool:
    """Whether a discovery is recording and has no reason yet: checks that cost work are skipped otherwise."""
    record = _RECORD.get()
    return record is not None and not record


@contextlib.contextmanager
def recording():
    """Collect the reasons of :func:`not_pointwise` calls made inside (empty list: every map was pointwise)."""
    reasons: list = []
    token = _RECORD.set(reasons)
    try:
        yield reasons
    finally:
        _RECORD.reset(token)
