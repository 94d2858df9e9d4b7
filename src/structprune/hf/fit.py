"""Configs near a pruned model's widths that the config class itself accepts, nearest first.

A step plans widths layer by layer; a Hugging Face config states them as a few fields from which the
model class derives every shape (``head_dim = hidden_size // num_attention_heads``, a pooler as wide as
the hidden size, RoPE wanting an even head size). Which width sets a family accepts is the config class's
knowledge, not ours: each candidate here is the dict ``save_pretrained`` would write, with some width
fields moved, turned back into a config by the class (its validators run) and built on the meta device
(its ``__init__`` checks run and every shape it implies appears). The pruner then plans the step towards
the shapes of the first candidate its graph can reach (``structprune.pruner.config_fit``).

Fields moved are the integer fields the step changed and the ones every family derives shapes from
(hidden size, head counts, head size, inner widths), each over values between a little below what the step
planned and what the model had before it, never wider. Candidates are visited by their summed distance
relative to each field's width before the step, so 42 -> 40 hidden channels comes long before 4 -> 3 heads.
"""
from __future__ import annotations

import copy
import heapq
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .attention import HEAD_COUNT_NAMES, HEAD_SIZE_NAMES, KV_HEAD_NAMES, _int_attr
from .config import HEAD_SIZE_FIELDS, ROLE_FIELDS

#: head counts move over every value from one head to the count before the step
HEAD_COUNT_FIELDS = frozenset({"num_attention_heads", "num_key_value_heads", "num_kv_heads", "n_head", "n_heads",
                               "num_heads", "encoder_attention_heads", "decoder_attention_heads"})
#: fields a family derives shapes from, moved even when the step left them alone
SHAPE_FIELDS = frozenset({field for fields in ROLE_FIELDS.values() for field in fields}
                         | set(HEAD_SIZE_FIELDS) | HEAD_COUNT_FIELDS)


@dataclass(frozen=True)
class WidthField:
    """One integer field of the config tree: its path of sub-config keys, its value before the step and the
    value the step's own plan wrote."""

    path: tuple
    name: str
    before: int
    planned: int

    @property
    def label(self) -> str:
        return ".".join(self.path + (self.name,))


@dataclass
class Candidate:
    """A config the class accepts, the model it builds (meta device) and the fields it moved from the plan."""

    config: object
    model: nn.Module
    moved: list  # [(WidthField, value)] where value != field.planned


def width_fields(before: dict, planned: dict, path: tuple = ()) -> list[WidthField]:
    """The integer fields of two ``config.to_dict()`` trees that may move: changed by the step, or a shape field."""
    fields = []
    for key, value in planned.items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            fields += width_fields(old, value, path + (key,))
        elif _is_int(value) and _is_int(old) and old > 0 and (value != old or key in SHAPE_FIELDS):
            fields.append(WidthField(path, key, old, value))
    return fields


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def field_values(field: WidthField, unit: int = 1) -> list[int]:
    """Values a field may take, nearest to the planned value first (ties: the wider, which keeps more).

    Widths stay multiples of ``unit`` (``round_to``) where any such value lies in range; head counts go from
    one to the count before the step.
    """
    if field.name in HEAD_COUNT_FIELDS:
        values = range(1, field.before + 1)
    else:
        # a little narrower than planned may be the nearest width the config accepts (42 -> 40 for 4 heads)
        low = max(1, field.planned - max(8, field.before // 8))
        values = [value for value in range(low, field.before + 1)]
        aligned = [value for value in values if value % unit == 0 or value in (field.before, field.planned)]
        values = aligned if len(aligned) > 2 else values
    return sorted(values, key=lambda value: (abs(value - field.planned), -value))


def _with(tree: dict, moves) -> dict:
    tree = copy.deepcopy(tree)
    for field, value in moves:
        node = tree
        for key in field.path:
            node = node[key]
        node[field.name] = value
    return tree


def build_from(model: nn.Module, config) -> nn.Module:
    """``type(model)(config)`` on the meta device: no memory, no init, every shape and ``__init__`` check."""
    config._attn_implementation = model.config._attn_implementation
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return type(model)(config)


def dependencies(model: nn.Module, before: dict, fields: list, widths, tries: int = 12) -> dict:
    """{field: names whose width ``widths(built model)`` changes when the field alone moves}, None where the
    class refuses every move of it alone that was tried. ``widths`` maps a model built from a config to
    {layer name: width}; the field moves to its planned value, or the nearest one the class accepts alone
    (hidden 44 with 8 heads is refused, 40 is not)."""
    reference = widths(build_from(model, _config(model, before)))
    found = {}
    for field in fields:
        found[field] = None
        moves = [value for value in field_values(field) if value != field.before][:tries]
        for value in moves:
            try:
                moved = widths(build_from(model, _config(model, _with(before, [(field, value)]))))
            except Exception:  # noqa: BLE001 - not describable alone; try the next value
                continue
            found[field] = {name for name, width in moved.items() if reference.get(name) != width}
            break
    return found


def _config(model: nn.Module, tree: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model.config).from_dict(copy.deepcopy(tree))


def candidates(model: nn.Module, planned: dict, choices: list, max_configs: int = 400,
               refusals: list | None = None) -> Iterator[Candidate]:
    """Configs the class accepts, nearest to ``planned`` (the step's own ``config.to_dict()``) first.

    ``choices`` holds (field, values nearest first) for every field that may move. ``refusals`` receives
    why the class refused the planned config itself, if it did ("hidden_size must be divisible by
    num_heads"), for the report.
    """
    fields = [field for field, _ in choices]
    values = [vals for _, vals in choices]
    config_type = type(model.config)

    def cost(state):
        return sum(abs(vals[index] - field.planned) / field.before
                   for index, field, vals in zip(state, fields, values))

    start = tuple(0 for _ in fields)
    heap, seen, tried = [(cost(start), start)], {start}, 0
    while heap and tried < max_configs:
        _, state = heapq.heappop(heap)
        tried += 1
        for position in range(len(fields)):
            if state[position] + 1 < len(values[position]):
                child = state[:position] + (state[position] + 1,) + state[position + 1:]
                if child not in seen:
                    seen.add(child)
                    heapq.heappush(heap, (cost(child), child))
        moves = [(field, vals[index]) for field, vals, index in zip(fields, values, state)]
        moved = [(field, value) for field, value in moves if value != field.planned]
        try:
            config = _config(model, _with(planned, moves))
            fresh = build_from(model, config)
        except Exception as error:  # noqa: BLE001 - the class's refusal is the answer we ask for
            if refusals is not None and not moved and not refusals:
                refusals.append(f"{config_type.__name__} refuses the planned widths: {describe_error(error)}")
            continue
        yield Candidate(config, fresh, moved)


def describe_error(error: BaseException) -> str:
    """The line of a config error that says what is wrong (validators wrap it in 'Class validation error')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.lower().startswith("class validation error")]
    return (useful or lines or [type(error).__name__])[-1][:200]


def heads_fit(module, fresh, narrow_with_heads: bool = True) -> bool:
    """Heads only go and only narrow: ``fresh`` (``module`` as a candidate config builds it) has no more heads
    and no wider ones than now (and, once the graph showed it cannot, does not lose whole heads and narrow the
    rest in the same step)."""
    if fresh is None:
        return True
    counts = []
    for names in (HEAD_COUNT_NAMES, KV_HEAD_NAMES, HEAD_SIZE_NAMES):
        name, value = _int_attr(module, names)
        built = fresh.__dict__.get(name) if name is not None else None
        if isinstance(built, int) and built > value:
            return False
        counts.append(isinstance(built, int) and built < value)
    return narrow_with_heads or not ((counts[0] or counts[1]) and counts[2])


def heads_stayed_wide(model, fresh_modules: dict) -> set:
    """Names of attention modules that lost the heads the config builds but kept wider heads than it builds."""
    found = set()
    for name, module in model.named_modules():
        fresh = fresh_modules.get(name)
        if fresh is None:
            continue
        _, heads = _int_attr(module, HEAD_COUNT_NAMES)
        size_name, size = _int_attr(module, HEAD_SIZE_NAMES)
        built_size = fresh.__dict__.get(size_name) if size_name is not None else None
        built_heads = _int_attr(fresh, HEAD_COUNT_NAMES)[1]
        if heads is not None and heads == built_heads and isinstance(built_size, int) and size > built_size:
            found.add(name)
    return found
