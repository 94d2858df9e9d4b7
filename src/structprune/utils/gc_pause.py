"""Garbage collection held off while the library works through one call.

Tracing, planning and pruning allocate bursts of small objects (index tensors, channel states, traced
sizes); every burst triggers collections that walk each object the process holds, hundreds of thousands
once torch, timm or transformers are imported: a fifth of a ResNet-50 step went there. Reference
counting still frees everything that is not in a cycle; what is waits until the call returns.
"""
from __future__ import annotations

import contextlib
import functools
import gc


@contextlib.contextmanager
def gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def without_gc(function):
    """Decorator: run ``function`` inside :func:`gc_paused`."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with gc_paused():
            return function(*args, **kwargs)
    return wrapper
