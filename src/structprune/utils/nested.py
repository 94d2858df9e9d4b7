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
from torch.utils import _pytree as pytree

__all__ = ["flatten_as_list", "call_model", "eval_mode", "evaluating", "first_tensor"]


_SCALARS = frozenset({int, float, bool, str, type(None)})


def container_contents(leaf: Any) -> Any:
    """The contents of a leaf of torch's pytree that is a container all the same, or None.

    pytree walks the containers it knows (tuples, lists, dicts, named tuples, Hugging Face ``ModelOutput``,
    which registers itself) and keeps anything else whole: an object with ``to_tuple()`` (checked first:
    ModelOutput-likes drop their ``None`` fields), any other mapping, a list or tuple subclass.
    """
    if type(leaf) in _SCALARS or isinstance(leaf, torch.Tensor):
        return None
    to_tuple = getattr(leaf, "to_tuple", None)
    if callable(to_tuple):
        return to_tuple()
    if isinstance(leaf, Mapping):
        return dict(leaf)
    if isinstance(leaf, (tuple, list)) and not isinstance(leaf, torch.Size):
        return list(leaf)
    return None


def flatten_as_list(obj: Any) -> list[torch.Tensor]:
    """Return every tensor found in a nested structure, in traversal order.

    Tuples, lists (including named tuples), mappings (values, in insertion
    order) and objects exposing ``to_tuple()`` (such as Hugging Face
    ``ModelOutput``) are descended into; anything that is not a tensor or a
    container (``None``, ints, strings, ...) is dropped.
    """
    if isinstance(obj, torch.Tensor):
        return [obj]
    found = []
    for leaf in pytree.tree_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
            continue
        contents = container_contents(leaf)
        if contents is not None:
            found.extend(flatten_as_list(contents))
    return found


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
