"""Pruner subclasses list every BasePruner keyword in their own signature (IDEs, ``help()`` and keyword
checking see them, as in torch_pruning): passing those keywords on, and describing them in ``help()``.

The keywords are documented once, as ``#:`` comments on :class:`PrunerOptions`; ``options_doc`` renders
those comments so a subclass's docstring can show them without a second copy to keep in step.
"""
from __future__ import annotations

import inspect
from dataclasses import MISSING, fields

from .options import PrunerOptions


def option_values(namespace: dict) -> dict:
    """The PrunerOptions keywords out of a subclass ``__init__``'s ``locals()``, to hand to BasePruner."""
    names = PrunerOptions.names()
    missing = [name for name in names if name not in namespace]
    if missing:
        # a developer added an option to PrunerOptions and not to this subclass (tests/pruner catches it too)
        raise TypeError(f"this pruner's signature does not list the BasePruner options {missing}; add them")
    return {name: namespace[name] for name in names}


def options_doc() -> str:
    """``name (default): description`` for every PrunerOptions field, from its ``#:`` comment."""
    comments = _field_comments()
    lines = ["Keywords every pruner takes (BasePruner's, in torch_pruning's order; see PrunerOptions):"]
    for field in fields(PrunerOptions):
        default = "required" if field.default is MISSING else _describe_default(field.default)
        text = comments.get(field.name, "")
        lines.append(f"    {field.name} ({default}): {text}".rstrip(": "))
    return "\n".join(lines)


def with_options_doc(doc: str | None) -> str:
    """``doc`` followed by the rendered BasePruner keywords (for a subclass's ``__init__.__doc__``)."""
    return inspect.cleandoc(doc or "") + "\n\n" + options_doc()


def _describe_default(value) -> str:
    return getattr(value, "__name__", None) or repr(value)


def _field_comments() -> dict:
    try:
        source = inspect.getsource(PrunerOptions)
    except (OSError, TypeError):  # no source shipped (a frozen app): the names and defaults still show
        return {}
    comments, pending = {}, []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        name = stripped.split(":", 1)[0]
        if pending and name.isidentifier():
            comments[name] = " ".join(pending)
        pending = []
    return comments
