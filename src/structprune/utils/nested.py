"""Plumbing for nested model inputs and outputs.

Models take their example inputs in three shapes (a single tensor, a tuple/list
of positional arguments or a dict of keyword arguments) and return arbitrarily
nested containers. The helpers here let the op counter, the benchmarks and the
pruning code treat all of them uniformly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["flatten_as_list", "call_model", "eval_mode", "evaluating", "first_tensor"]


def flatten_as_list(obj: Any) -> list[torch.Tensor]:
    """Return every tensor found in a nested structure, in traversal order.

    Tuples, lists (including named tuples), mappings (values, in insertion
    order) and objects exposing ``to_tuple()`` (such as Hugging Face
    ``ModelOutput``) are descended into; anything that is not a tensor or a
    container (``None``, ints, strings, ...) is dropped.
    """
    if isinstance(obj, torch.Tensor):
        return [obj]
    # ModelOutput is also a Mapping; to_tuple() is checked first because it
    # already drops the ``None`` fields and keeps the declared field order.
    to_tuple = getattr(obj, "to_tuple", None)
    if callable(to_tuple):
        return flatten_as_list(to_tuple())
    if isinstance(obj, Mapping):
        return [t for value in obj.values() for t in flatten_as_list(value)]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in flatten_as_list(item)]
    return []


def first_tensor(obj: Any) -> torch.Tensor | None:
    """Return the first tensor of a nested structure, or ``None`` if it has none."""
    tensors = flatten_as_list(obj)
    return tensors[0] if tensors else None


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Run ``model`` on example inputs.

    A dict is passed as keyword arguments, a tuple or list as positional
    arguments and anything else (typically one tensor) as the only argument.
    Named tuples such as ``PackedSequence`` are one structured value, not an
    argument list, so they are passed whole.
    """
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)) and not hasattr(example_inputs, "_fields"):
        return model(*example_inputs)
    return model(example_inputs)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then give every submodule its own flag back.

    Restoring only the root with ``model.train(mode)`` would switch submodules that the caller had
    deliberately frozen in eval mode (frozen BatchNorms in fine-tuning) back to training.
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`eval_mode` under ``torch.no_grad()``, even if the block raises."""
    with eval_mode(model), torch.no_grad():
        yield model
