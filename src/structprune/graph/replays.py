"""One label replay for every call that does the same thing.

A transformer repeats the same reshapes, permutes and splits in every block (ViT: 12 times, a 32-layer
Llama: 32 times). The replay of a movement op on integer labels, and the channel plans derived from it
(channels.py), depend only on the function, its non-tensor arguments, the input shapes and dtypes, and
which input carries the labels; calls that agree on all of that share one replay, so each distinct op
is worked out once per model instead of once per block.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch

#: replays by signature; an entry lives as long as some recorded call holds it
_SHARED: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()

#: the largest label range handed out, while some replay still holds a view of it
_LABELS: "weakref.ref | None" = None

#: index tensors larger than this are compared by identity (no sharing) instead of by content
_CONTENT_LIMIT = 1 << 16


class Replay(list):
    """The outputs of one replay (a list that weak references may point at)."""


def shared_replay(call, source: int, replay: Callable[[], list]) -> Replay:
    """The replay of ``call`` with labels on input ``source``: from a call with the same signature, or new."""
    key = _signature(call, source)
    found = _SHARED.get(key) if key is not None else None
    if found is not None:
        return found
    outputs = Replay(replay())
    if key is not None:
        _SHARED[key] = outputs
    return outputs


def shared_labels(shape) -> torch.Tensor:
    """``arange(numel).view(shape)`` as a view of one range that replays share, for ops that write into no
    input: a fresh range of a video model's feature map (millions of elements) cost more in page faults than
    the replay it labels. Its values are its storage positions, as :func:`blocks.mark_views` needs."""
    global _LABELS
    numel = 1
    for size in shape:
        numel *= size
    base = _LABELS() if _LABELS is not None else None
    if base is None or len(base) < numel:
        base = torch.arange(numel)
        _LABELS = weakref.ref(base)  # a view keeps its base alive (``view._base``), so it lives as they do
    return base[:numel].view(shape)


def _signature(call, source: int):
    try:
        return (call.target, source, tuple(map(tuple, call.in_shapes)), tuple(map(tuple, call.out_shapes)),
                tuple(call.input_slots), tuple(call.input_dtypes), replay_key(call.args), replay_key(call.kwargs))
    except Unshareable:
        return None


class Unshareable(Exception):
    pass


def replay_key(obj):
    """A hashable description of an argument that fixes what the replay does with it."""
    if isinstance(obj, int) and not isinstance(obj, bool):
        return ("int", int(obj))  # a traced size replays as its value
    if obj is None or isinstance(obj, (bool, float, str, torch.dtype, torch.device, torch.memory_format)):
        return (type(obj).__name__, obj)
    if obj is Ellipsis:
        return ("ellipsis",)
    if isinstance(obj, slice):
        return ("slice", replay_key(obj.start), replay_key(obj.stop), replay_key(obj.step))
    if isinstance(obj, torch.Tensor):
        if obj.numel() > _CONTENT_LIMIT or obj.is_floating_point() or obj.is_complex():
            raise Unshareable
        return ("tensor", obj.dtype, tuple(obj.shape), tuple(obj.reshape(-1).tolist()))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(replay_key(item) for item in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((key, replay_key(value)) for key, value in obj.items()))
    raise Unshareable  # anything else might change the replay in ways a key cannot see
