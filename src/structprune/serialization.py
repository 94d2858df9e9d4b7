"""Saving and loading pruned models.

A pruned model cannot be loaded with ``model.load_state_dict``: a freshly built model has the original
shapes. The functions here store, next to the weights, a *plan* describing the pruned architecture
(every parameter/buffer shape and dtype, and the size attributes of every module) so a fresh instance
can be resized in place and then receive the weights.

Two storage forms share one plan format:

* ``save_pruned(model, path)`` / ``load_pruned(fresh_model, path)``: a directory with
  ``model.safetensors`` (each distinct tensor once) and ``plan.json``.
* ``state_dict(model)`` / ``load_state_dict(fresh_model, sd)``: a plain dict for ``torch.save`` that
  survives ``torch.load(..., weights_only=True)``.

Plan format (version 1), as written to ``plan.json`` and stored under ``"plan"`` in ``state_dict``::

    {
      "format": "structprune.pruned",
      "version": 1,
      "tensors": {                      # every parameter and buffer, in model order
        "conv1.weight": {"kind": "parameter", "shape": [32, 3, 7, 7], "dtype": "float32"},
        "fc2.weight":   {"kind": "parameter", "shape": [8, 8], "dtype": "float32",
                         "alias_of": "fc1.weight"},   # tied: the very same tensor object
        ...
      },
      "modules": {                      # every module ("" is the root), in model order
        "conv1": {"class": "Conv2d", "attrs": {"in_channels": 3, "out_channels": 32, "groups": 1}},
        "ln":    {"class": "LayerNorm", "attrs": {"normalized_shape": [16]}},
        ...
      },
      "history": null,                  # caller-supplied, informational (e.g. DG.pruning_history())
      "weights_sha256": "..."           # plan.json only: checksum of model.safetensors
    }

``state_dict(model)`` returns ``{"format", "version", "full_state_dict", "plan"}`` where
``full_state_dict`` maps each non-aliased tensor name to its tensor (buffers included, also
non-persistent ones, since their shapes follow pruning too).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .adapters.core import sync_attributes
from .layers.axes import swap_data
from .graph.snapshot import Snapshot
from .layers.registry import RECORDED_SIZE_NAMES

FORMAT_NAME = "structprune.pruned"
FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"

#: Size attributes recorded for every module that has them (and restored on load); see layers/registry.py
RECORDED_ATTRIBUTES: tuple[str, ...] = RECORDED_SIZE_NAMES

_KINDS = ("parameter", "buffer")
_MISSING = object()
_TUPLE_TAG = "__tuple__"


# ---------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------
def save_pruned(model: nn.Module, path: str | os.PathLike, history: Any = None) -> Path:
    """Write ``model`` to directory ``path`` as ``model.safetensors`` + ``plan.json``; returns the path.

    ``history`` (JSON-serializable, e.g. ``DG.pruning_history()``) is stored for reference only.
    """
    save_file = _safetensors_module().save_file
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    plan = build_plan(model, history)
    weights_path = directory / WEIGHTS_FILE
    # Temp file + rename: an interrupted save never leaves a half-written file under the final name.
    tmp_weights = weights_path.with_name(WEIGHTS_FILE + ".tmp")
    save_file(_tensors_for_safetensors(model, plan), str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, weights_path)
    plan["weights_sha256"] = _sha256(weights_path)
    _write_text_atomic(directory / PLAN_FILE, json.dumps(plan, indent=1))
    return directory


def load_pruned(fresh_model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Resize ``fresh_model`` in place to the pruned architecture saved in ``path`` and load its weights.

    Everything is read and checked before the model is touched: a mismatching architecture or a
    corrupted/truncated file raises ``ValueError`` and leaves ``fresh_model`` unchanged.
    ``strict=False`` tolerates plan entries the model lacks and model tensors the plan lacks.
    """
    directory = Path(path)
    plan = _read_plan(directory / PLAN_FILE)
    tensors = _read_weights(directory / WEIGHTS_FILE, plan.get("weights_sha256"))
    _check_weights_match_plan(plan, tensors, WEIGHTS_FILE)
    _check_model_matches_plan(fresh_model, plan, strict)
    _apply_plan(fresh_model, plan, tensors)
    return fresh_model


def state_dict(model: nn.Module, history: Any = None) -> dict:
    """A ``torch.save``-able dict holding the pruned model's tensors and its plan (see module doc).

    Tensors are detached but not copied, like ``nn.Module.state_dict``.
    """
    plan = build_plan(model, history)
    named = _named_tensors(model)
    full = {name: named[name][0].detach() for name, entry in plan["tensors"].items() if "alias_of" not in entry}
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "full_state_dict": full, "plan": plan}


def load_state_dict(model: nn.Module, state_dict: dict, strict: bool = True) -> nn.Module:
    """Resize ``model`` in place to the architecture in ``state_dict`` (from :func:`state_dict`) and load it.

    Same checks and all-or-nothing behaviour as :func:`load_pruned`.
    """
    if not isinstance(state_dict, dict) or "plan" not in state_dict or "full_state_dict" not in state_dict:
        raise ValueError(
            "not a structprune pruned state dict: expected a dict with 'plan' and 'full_state_dict' keys "
            "as returned by structprune.state_dict(model)"
        )
    plan = state_dict["plan"]
    _check_plan_schema(plan)
    tensors = state_dict["full_state_dict"]
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError("corrupted pruned state dict: 'full_state_dict' must map names to tensors")
    _check_weights_match_plan(plan, tensors, "full_state_dict")
    _check_model_matches_plan(model, plan, strict)
    # Copy now so the loaded model never shares storage with the model the dict came from.
    _apply_plan(model, plan, {name: t.detach().clone() for name, t in tensors.items()})
    return model


# ---------------------------------------------------------------------------------------------------
# building the plan
# ---------------------------------------------------------------------------------------------------
def build_plan(model: nn.Module, history: Any = None) -> dict:
    """The plan (shapes, dtypes, aliases, module classes and size attributes) describing ``model``."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tensors": _tensor_entries(model),
        "modules": _module_entries(model),
        "history": _normalize_history(history),
    }


def _named_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, str]]:
    """name -> (tensor, kind) for every parameter and buffer, tied names included."""
    named: dict[str, tuple[torch.Tensor, str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        named[name] = (param, "parameter")
    for name, buffer in model.named_buffers(remove_duplicate=False):
        named[name] = (buffer, "buffer")
    return named


def _tensor_entries(model: nn.Module) -> dict[str, dict]:
    named = _named_tensors(model)
    # Tying is object identity (two modules holding the same Parameter): store it once, alias the rest.
    aliases = _aliases(named)
    entries: dict[str, dict] = {}
    for name, (tensor, kind) in named.items():
        entries[name] = {"kind": kind, "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
        if name in aliases:
            entries[name]["alias_of"] = aliases[name]
    return entries


def _module_entries(model: nn.Module) -> dict[str, dict]:
    return {
        name: {"class": type(module).__name__, "attrs": _recorded_attrs(module), "extras": _plain_attrs(module)}
        for name, module in model.named_modules(remove_duplicate=False)
    }


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    """Every other public plain attribute (``model.customized_value = 8``, a layer's ``eps``), as torch_pruning's
    state dicts carry them; values that JSON cannot hold (configs, callables, tensors) are left out."""
    extras = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training" or name in RECORDED_ATTRIBUTES:
            continue
        encoded = _encode_plain(value)
        if encoded is not _MISSING:
            extras[name] = encoded
    return extras


def _encode_plain(value: Any) -> Any:
    """JSON form of a plain value; tuples are tagged so they come back as tuples. _MISSING if not plain."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value if type(value) in (bool, int, float, str, type(None)) else _MISSING
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        items = [_encode_plain(item) for item in value]
        if any(item is _MISSING for item in items):
            return _MISSING
        return {_TUPLE_TAG: items} if isinstance(value, tuple) else items
    if type(value) is dict and all(isinstance(key, str) for key in value) and _TUPLE_TAG not in value:
        items = {key: _encode_plain(item) for key, item in value.items()}
        return _MISSING if any(item is _MISSING for item in items.values()) else items
    return _MISSING


def _decode_plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_plain(item) for item in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE_TAG}:
            return tuple(_decode_plain(item) for item in value[_TUPLE_TAG])
        return {key: _decode_plain(item) for key, item in value.items()}
    return value


def _recorded_attrs(module: nn.Module) -> dict[str, int | list[int]]:
    attrs: dict[str, int | list[int]] = {}
    # vars(): only plain instance attributes, never properties or class constants we could not set back.
    for name, value in vars(module).items():
        if name in RECORDED_ATTRIBUTES and _is_size_value(value):
            attrs[name] = list(value) if isinstance(value, (tuple, list)) else int(value)
    return attrs


def _is_size_value(value: Any) -> bool:
    def is_int(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool)

    return is_int(value) or isinstance(value, (tuple, list)) and all(is_int(item) for item in value)


def _normalize_history(history: Any) -> Any:
    """JSON round trip: tuples become lists, and anything unserializable fails at save time, not load."""
    if history is None:
        return None
    try:
        return json.loads(json.dumps(history))
    except (TypeError, ValueError) as error:
        raise TypeError(f"history must be JSON-serializable (lists, dicts, str, numbers): {error}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: Any) -> torch.dtype | None:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


# ---------------------------------------------------------------------------------------------------
# reading and checking
# ---------------------------------------------------------------------------------------------------
def _safetensors_module():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "saving and loading pruned models needs the 'safetensors' package: "
            "pip install safetensors (or pip install 'structprune[demo]')"
        ) from None
    return safetensors.torch


def _read_plan(path: Path) -> dict:
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"corrupted plan file {path}: not valid JSON ({error})") from None
    _check_plan_schema(plan)
    return plan


def _read_weights(path: Path, expected_sha256: Any) -> dict[str, torch.Tensor]:
    safetensors_torch = _safetensors_module()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; save the model with structprune.save_pruned")
    if expected_sha256 is not None and _sha256(path) != expected_sha256:
        raise ValueError(f"{path} does not match the checksum recorded in {PLAN_FILE}: the file is corrupted "
                         f"or was written by another save")
    try:
        loaded = safetensors_torch.load_file(str(path))
    except Exception as error:  # SafetensorError has no importable base class in every version
        raise ValueError(f"corrupted or truncated weights file {path}: {error}") from None
    # load_file memory-maps the file; clone so the model never depends on (or sees changes to) it.
    return {name: tensor.clone() for name, tensor in loaded.items()}


def _check_plan_schema(plan: Any) -> None:
    """Raise ValueError unless ``plan`` is a well-formed plan of a supported version."""
    if not isinstance(plan, dict) or plan.get("format") != FORMAT_NAME:
        raise ValueError(f"corrupted plan: expected a dict with format '{FORMAT_NAME}'")
    version = plan.get("version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"unsupported plan version {version!r}; this structprune reads up to {FORMAT_VERSION}")
    tensors, modules = plan.get("tensors"), plan.get("modules")
    if not isinstance(tensors, dict) or not isinstance(modules, dict):
        raise ValueError("corrupted plan: 'tensors' and 'modules' must be dicts")
    for name, entry in tensors.items():
        _check_tensor_entry(name, entry, tensors)
    for name, entry in modules.items():
        _check_module_entry(name, entry)


def _check_tensor_entry(name: str, entry: Any, tensors: dict) -> None:
    if not isinstance(entry, dict) or entry.get("kind") not in _KINDS:
        raise ValueError(f"corrupted plan: tensor '{name}' has no valid kind")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise ValueError(f"corrupted plan: tensor '{name}' has invalid shape {shape!r}")
    if _parse_dtype(entry.get("dtype")) is None:
        raise ValueError(f"corrupted plan: tensor '{name}' has unknown dtype {entry.get('dtype')!r}")
    target = entry.get("alias_of")
    if "alias_of" in entry and (target not in tensors or "alias_of" in tensors[target]):
        raise ValueError(f"corrupted plan: tensor '{name}' aliases '{target}', which is not a stored tensor")


def _check_module_entry(name: str, entry: Any) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
        raise ValueError(f"corrupted plan: module '{name}' has no class name")
    attrs = entry.get("attrs")
    if not isinstance(attrs, dict) or not all(_is_size_value(v) for v in attrs.values()):
        raise ValueError(f"corrupted plan: module '{name}' has invalid attrs {attrs!r}")
    if not isinstance(entry.get("extras", {}), dict):
        raise ValueError(f"corrupted plan: module '{name}' has invalid extras {entry.get('extras')!r}")


def _check_weights_match_plan(plan: dict, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every stored (non-alias) tensor of the plan is present with the recorded shape and dtype."""
    for name, entry in plan["tensors"].items():
        if "alias_of" in entry:
            continue
        if name not in tensors:
            raise ValueError(f"corrupted save: tensor '{name}' is in the plan but missing from {source}")
        tensor = tensors[name]
        if list(tensor.shape) != entry["shape"] or _dtype_name(tensor.dtype) != entry["dtype"]:
            raise ValueError(
                f"corrupted save: tensor '{name}' in {source} is {_dtype_name(tensor.dtype)}{list(tensor.shape)}, "
                f"the plan says {entry['dtype']}{entry['shape']}"
            )


def _check_model_matches_plan(model: nn.Module, plan: dict, strict: bool) -> None:
    """Raise ValueError naming the first module path where ``model`` differs from the plan."""
    for problem in _model_mismatches(model, plan, strict):
        raise ValueError(f"pruned model plan does not match the model: {problem}")


def _model_mismatches(model: nn.Module, plan: dict, strict: bool) -> Iterator[str]:
    modules = dict(model.named_modules(remove_duplicate=False))
    for path, entry in plan["modules"].items():
        module = modules.get(path, _MISSING)
        if module is _MISSING:
            if strict:
                yield f"module '{path}' ({entry['class']}) does not exist in the model"
            continue
        if type(module).__name__ != entry["class"]:
            yield f"module '{path}' is a {type(module).__name__} in the model but a {entry['class']} in the plan"
        for attr in entry["attrs"]:
            if strict and attr not in vars(module):
                yield f"module '{path}' has no attribute '{attr}' recorded in the plan"
    if strict:
        yield from (f"module '{path}' ({type(m).__name__}) is not in the plan"
                    for path, m in modules.items() if path not in plan["modules"])
    yield from _tensor_mismatches(model, plan, strict)


def _tensor_mismatches(model: nn.Module, plan: dict, strict: bool) -> Iterator[str]:
    named = _named_tensors(model)
    model_aliases = _aliases(named)
    for name, entry in plan["tensors"].items():
        where = _owner_path(name)
        if name not in named:
            if strict:
                yield f"module '{where}' has no {entry['kind']} '{name}'"
            continue
        tensor, kind = named[name]
        if kind != entry["kind"]:
            yield f"module '{where}': '{name}' is a {kind} in the model but a {entry['kind']} in the plan"
        elif tensor.dim() != len(entry["shape"]):
            yield (f"module '{where}': '{name}' has rank {tensor.dim()} in the model but "
                   f"{len(entry['shape'])} in the plan (shape {entry['shape']})")
        elif model_aliases.get(name) != entry.get("alias_of"):
            yield (f"module '{where}': '{name}' is tied to {model_aliases.get(name)!r} in the model "
                   f"but to {entry.get('alias_of')!r} in the plan")
    if strict:
        yield from (f"module '{_owner_path(name)}': {kind} '{name}' is not in the plan"
                    for name, (_, kind) in named.items() if name not in plan["tensors"])


def _aliases(named: dict[str, tuple[torch.Tensor, str]]) -> dict[str, str]:
    """name -> first name holding the same tensor object, for every name that is not the first."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, (tensor, _) in named.items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _owner_path(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


# ---------------------------------------------------------------------------------------------------
# applying
# ---------------------------------------------------------------------------------------------------
def _apply_plan(model: nn.Module, plan: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Resize tensors, restore attributes and sync model-level attributes; all or nothing."""
    snapshot = Snapshot([model])
    try:
        with torch.no_grad():
            _load_tensors(model, plan, tensors)
        _set_attrs(model, plan)
        sync_attributes(model)
        _refresh_rnns(model)
        _set_extras(model, plan)
    except BaseException:
        snapshot.restore()
        # Recompute adapter attributes from the restored shapes; the original error is what matters.
        with contextlib.suppress(Exception):
            sync_attributes(model)
        raise


def _load_tensors(model: nn.Module, plan: dict, tensors: dict[str, torch.Tensor]) -> None:
    named = _named_tensors(model)
    for name, entry in plan["tensors"].items():
        # Aliases share the canonical tensor object, so loading the canonical name covers them.
        if "alias_of" in entry or name not in named:
            continue
        current = named[name][0]
        value = tensors[name].to(device=current.device, dtype=_parse_dtype(entry["dtype"]))
        if isinstance(current, nn.Parameter):
            if current.grad is not None and current.grad.shape != value.shape:
                current.grad = None  # a gradient of the old shape would break the next optimizer step
            swap_data(current, value)  # same Parameter object: optimizers and tied modules keep holding it
        else:
            owner_path, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner_path), attr, value)


def _set_attrs(model: nn.Module, plan: dict) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    for path, entry in plan["modules"].items():
        module = modules.get(path)
        if module is None:
            continue
        for attr, value in entry["attrs"].items():
            if attr not in vars(module):
                continue  # only reachable with strict=False
            current = vars(module)[attr]
            setattr(module, attr, _like(current, value))


def _set_extras(model: nn.Module, plan: dict) -> None:
    """Plain attributes last, written to ``__dict__`` (nothing can fail after the tensors are in)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for path, entry in plan["modules"].items():
        module = modules.get(path)
        if module is None:
            continue
        for attr, value in entry.get("extras", {}).items():
            if attr in module._parameters or attr in module._buffers or attr in module._modules:
                continue
            module.__dict__[attr] = _decode_plain(value)


def _like(current: Any, value: int | list[int]) -> Any:
    """``value`` in the container type the module uses (torch keeps normalized_shape as a tuple)."""
    if isinstance(value, list):
        return list(value) if isinstance(current, list) else tuple(value)
    return value


def _refresh_rnns(model: nn.Module) -> None:
    # cuDNN wants RNN weights in one flat buffer; after resizing they are separate tensors again.
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------
def _tensors_for_safetensors(model: nn.Module, plan: dict) -> dict[str, torch.Tensor]:
    """Each non-aliased tensor as a contiguous CPU tensor with storage of its own.

    safetensors refuses tensors sharing storage; identity ties are aliases in the plan already, and
    distinct tensors that merely share storage (views of one buffer) are copied and reload untied.
    """
    named = _named_tensors(model)
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, entry in plan["tensors"].items():
        if "alias_of" in entry:
            continue
        tensor = named[name][0].detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
