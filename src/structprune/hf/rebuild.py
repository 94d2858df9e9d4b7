"""Does the config describe the pruned model? Rebuild it from the config on the meta device and compare.

``check_pretrained_config(model)`` builds ``type(model)(model.config)`` without allocating memory and
compares every state-dict entry (name and shape) with the pruned model's. The pruners install it in
front of the model's ``save_pretrained`` (``install_save_check``), so a checkpoint that
``from_pretrained`` could not load is never written: the error names the tensors that differ, the config
fields involved and the way out (keep one width per field with ``uniform_config_widths=True``, or save
with ``tp.save_pruned``, which records every shape).
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .attention import HEAD_COUNT_NAMES, HEAD_SIZE_NAMES, KV_HEAD_NAMES, SCALE_NAMES
from .config import is_config, layer_roles_summary, sync_config


class ConfigMismatchError(ValueError):
    """The model's config cannot describe its pruned shapes, so save_pretrained would write a checkpoint
    that from_pretrained cannot load."""


def rebuild(model: nn.Module) -> nn.Module:
    """``type(model)`` built on the meta device (no memory, no init) from ``model.config`` after the trip
    through a dict that save_pretrained / from_pretrained make: the config class validates it again, and
    fields it recomputes from others (``intermediate_size = expand * hidden_size``) are recomputed."""
    config = model.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = type(config).from_dict(copy.deepcopy(config.to_dict()))
        config._attn_implementation = model.config._attn_implementation
        with torch.device("meta"):
            return type(model)(config)


#: attributes forwards read as head layouts, widths and scales; a stale copy elsewhere (a decoder layer's
#: unused ``hidden_size``) is not compared
COMPARED_ATTRIBUTES = frozenset(
    HEAD_COUNT_NAMES + KV_HEAD_NAMES + HEAD_SIZE_NAMES + SCALE_NAMES
    + ("num_key_value_groups", "all_head_size", "inner_dim", "split_size", "model_dim", "scalar_embed_scale",
       "intermediate_size", "kv_lora_rank", "q_lora_rank", "qk_head_dim", "qk_nope_head_dim", "v_head_dim")
)


def _sizes(module: nn.Module) -> dict:
    """Int and float attributes a forward reads as head layouts or scales (num_heads, head_dim, scaling...)."""
    return {name: value for name, value in vars(module).items()
            if name in COMPARED_ATTRIBUTES and type(value) in (int, float)}


def config_mismatches(model: nn.Module) -> list[str]:
    """What differs between the pruned model and one built from its config: tensor shapes, and the size
    attributes of every module (a head count is no shape: 4 heads of 8 and 2 of 16 hold the same tensors)."""
    try:
        fresh = rebuild(model)
    except Exception as error:  # noqa: BLE001 - a config the class refuses is a mismatch too
        return [f"{type(model).__name__}(config) fails to build: {type(error).__name__}: {error}"]
    expected = {name: tuple(tensor.shape) for name, tensor in fresh.state_dict().items()}
    actual = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    problems = _shape_problems(actual, expected, dict(model.named_modules()))
    fresh_modules = dict(fresh.named_modules())
    for name, module in model.named_modules():
        other = fresh_modules.get(name)
        if other is None or type(other) is not type(module):
            continue
        mine, theirs = _sizes(module), _sizes(other)
        for attr, value in mine.items():
            if attr in theirs and theirs[attr] != value and not (
                    isinstance(value, float) and abs(theirs[attr] - value) <= 1e-6 * max(1.0, abs(value))):
                problems.append(f"{name or type(model).__name__}.{attr} is {value} but the config builds {theirs[attr]}")
    return problems


def _shape_problems(actual: dict, expected: dict, modules: dict) -> list[str]:
    """Shapes the config rebuilds differently. A tensor the config builds in a module the model does not have
    at all is a constructor argument (``ViTModel(config, add_pooling_layer=False)``), not a pruned shape: the
    same ``from_pretrained(..., add_pooling_layer=False)`` that loaded the unpruned model leaves it out again."""
    problems = []
    for name, shape in actual.items():
        if name not in expected:
            problems.append(f"{name} {list(shape)} has no counterpart in a model built from the config")
        elif expected[name] != shape:
            problems.append(f"{name} is {list(shape)} but the config builds {list(expected[name])}")
    for name, shape in expected.items():
        if name not in actual and name.rpartition(".")[0] in modules:
            problems.append(f"the config builds {name} {list(shape)}, which the pruned model does not have")
    return problems


def check_pretrained_config(model: nn.Module) -> None:
    """Sync ``model.config`` with the layers and raise ``ConfigMismatchError`` if it still cannot describe them.

    Call it before ``save_pretrained`` when the model was pruned by hand (``DependencyGraph`` groups); the
    pruners install it in front of ``model.save_pretrained`` themselves.
    """
    if not is_config(model.__dict__.get("config")):
        raise TypeError(f"{type(model).__name__} has no Hugging Face config; save it with tp.save_pruned(model, path)")
    notes = sync_config(model)
    problems = config_mismatches(model)
    if not problems:
        return
    shown = problems[:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6 else [])
    lines = [f"{type(model.config).__name__} cannot describe the pruned {type(model).__name__}, so "
             f"save_pretrained would write a checkpoint that from_pretrained cannot load (nothing was written):"]
    lines += [f"  - {problem}" for problem in shown]
    if notes:
        lines.append("Widths that differ between layers, which one config field cannot hold:")
        lines += [f"  - {note}" for note in notes[:6]]
    else:
        lines.append("What the layers hold: " + _summary(model))
        lines.append("The config class derives these shapes from fewer fields than were pruned (for example "
                     "an attention width tied to hidden_size, or an MLP fixed at 4 x hidden_size).")
    lines.append("Prune with uniform_config_widths=True (the default for models with a config) and the same "
                 "ratio for heads and hidden size where the family ties them, or save and load with "
                 "tp.save_pruned(model, path) / tp.load_pruned(fresh_model, path), which record every shape.")
    raise ConfigMismatchError("\n".join(lines))


def _summary(model) -> str:
    parts = [f"{label} {values if len(values) > 1 else values[0]}" for label, values in layer_roles_summary(model).items()]
    return "; ".join(parts) or "nothing recognised"


class _CheckedSavePretrained:
    """``model.save_pretrained`` after pruning: check the config first, then save as transformers does.

    A plain object (not a bound method) so that the model still pickles and deep-copies.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        check_pretrained_config(self.model)
        return type(self.model).save_pretrained(self.model, *args, **kwargs)


def install_save_check(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` run ``check_pretrained_config`` before writing (idempotent)."""
    if isinstance(model.__dict__.get("save_pretrained"), _CheckedSavePretrained):
        return
    if callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = _CheckedSavePretrained(model)
