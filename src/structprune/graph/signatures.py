"""Arguments of recorded calls by name: ``argument(call, "groups")`` instead of ``call.args[6]``.

The traced op name is the same for ``torch.f(x, ...)`` and ``x.f(...)``, and both put the tensor first,
so one positional signature serves both spellings.
"""
from __future__ import annotations

from typing import Any

from .trace import Call

_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_REDUCTION = ("input", "dim", "keepdim")

#: positional parameter names of the ops whose arguments the index maps read
SIGNATURES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("cat", "concat", "concatenate"), ("tensors", "dim")),
    "split": ("tensor", "split_size_or_sections", "dim"),
    "split_with_sizes": ("input", "split_sizes", "dim"),
    "chunk": ("input", "chunks", "dim"),
    "tensor_split": ("input", "indices_or_sections", "dim"),
    "narrow": ("input", "dim", "start", "length"),
    **dict.fromkeys(("conv1d", "conv2d", "conv3d"), _CONV),
    "einsum": ("equation",),
    "norm": ("input", "p", "dim", "keepdim"),
    **dict.fromkeys(("sum", "mean", "amax", "amin", "max", "min", "var", "std", "prod", "logsumexp", "nansum",
                     "nanmean", "var_mean", "std_mean", "median", "nanmedian"), _REDUCTION),
}


def argument(call: Call, name: str, default: Any = None) -> Any:
    """The argument ``name`` of ``call``, given by keyword or by position, else ``default``."""
    if name in call.kwargs:
        return call.kwargs[name]
    names = SIGNATURES.get(call.name, ())
    if name in names:
        position = names.index(name)
        if position < len(call.args):
            return call.args[position]
    return default


def shape_argument(call: Call) -> list:
    """The shape a ``view``/``reshape`` asks for, written as varargs (``x.view(b, -1)``), as one sequence
    (``x.reshape((b, -1))``) or by keyword (``torch.reshape(x, shape=...)``, ``x.view(size=...)``)."""
    for name in ("shape", "size"):
        if name in call.kwargs:
            return list(call.kwargs[name])
    requested = [a for a in call.args[1:] if a is not None]
    if len(requested) == 1 and isinstance(requested[0], (tuple, list)):
        return list(requested[0])
    return requested
