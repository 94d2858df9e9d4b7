"""Hugging Face configs follow the pruned layers, so ``type(model)(model.config)`` rebuilds their shapes.

Every layer is read, not the first only: attention modules give their heads, key/value heads and head
size, MLPs their inner width and the residual (hidden) width they write back, embeddings their width.
Each such role is written to the field the model's own config class declares for it (``intermediate_size``,
``d_ff``, ``ffn_dim``, ``encoder_ffn_dim``...; ``attribute_map`` spells ``n_embd``/``d_model``/``dim`` as
``hidden_size``), in the sub-config the layers belong to (CLIP's ``text_config`` and ``vision_config``).
Fields kept per stage (Swin's ``num_heads``, ConvNeXt's ``hidden_sizes``) get one value per stage.

A field one value cannot describe (layers pruned to different widths) keeps the first layer's value and
is reported in the notes ``sync_config`` returns; ``structprune.hf.check_pretrained_config`` turns them
into an error before anything is written. Whether the config really describes the model is decided by
rebuilding it (``structprune.hf.rebuild``), not by these rules.
"""
from __future__ import annotations

import copy
import inspect
import math
import re
from functools import lru_cache

import torch
from torch import nn

from ..adapters.layout import from_library, out_width
from .attention import (
    FUSED_NAMES,
    HEAD_SIZE_NAMES,
    KEY_NAMES,
    OUTPUT_NAMES,
    QUERY_NAMES,
    _child,
    _int_attr,
    is_bert_attention,
    is_generic_attention,
    is_gpt2_attention,
    is_mla_attention,
    is_vit_attention,
    read_layout,
)

#: config fields that may hold each role, the first one the config class has wins
ROLE_FIELDS = {
    "hidden": ("hidden_size", "hidden_sizes"),
    "embedding": ("embedding_size", "word_embed_proj_dim"),
    "intermediate": ("intermediate_size", "d_ff", "ffn_dim", "n_inner", "ffn_hidden_size", "hidden_dim"),
    "heads": ("num_attention_heads",),
    "kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "q_lora_rank": ("q_lora_rank",),
    "kv_lora_rank": ("kv_lora_rank",),
    "qk_nope_head_dim": ("qk_nope_head_dim",),
    "v_head_dim": ("v_head_dim",),
    "projection": ("projection_size", "projection_dim"),
    "pooler": ("pooler_hidden_size",),
}
#: Linear layers projecting a tower's output into the space two towers share (CLIP, SigLIP)
PROJECTION_NAMES = ("head", "text_projection", "visual_projection")
#: encoder-decoder configs (BART, Whisper) keep some roles per stack
PREFIXED_FIELDS = {"intermediate": "{}ffn_dim", "heads": "{}attention_heads"}
#: roles written only to a field the config class itself declares (Whisper maps num_key_value_heads
#: onto encoder_attention_heads, which the decoder's layers must not overwrite)
DECLARED_ONLY = {"kv_heads"}

#: (inner layer, layer writing back to the residual, inner channels per unit) of MLP-like blocks
MLP_PAIRS = (
    ("up_proj", "down_proj", 1), ("gate_up_proj", "down_proj", 2), ("fc1", "fc2", 1), ("c_fc", "c_proj", 1),
    ("fc_in", "fc_out", 1), ("dense_h_to_4h", "dense_4h_to_h", 1), ("ffn", "ffn_output", 1),
    ("lin1", "lin2", 1), ("wi", "wo", 1), ("wi_0", "wo", 1), ("pwconv1", "pwconv2", 1),
    ("intermediate.dense", "output.dense", 1),
)

#: the gate of gated MLPs (SwiGLU / GeGLU), beside the inner layer of MLP_PAIRS
GATE_NAMES = ("gate_proj", "wi_1")

_STAGE = re.compile(r"(?:^|\.)(?:stages|layers)\.(\d+)\.")


def is_config(value) -> bool:
    """A transformers configuration object (duck-typed: transformers is imported only by its users)."""
    return hasattr(value, "to_dict") and hasattr(value, "attribute_map") and hasattr(value, "__dict__")


@lru_cache(maxsize=None)
def declared_fields(config_type) -> frozenset:
    return frozenset(inspect.signature(config_type.__init__).parameters)


#: fields a config computes in ``__post_init__`` unless given (DeBERTa's pooler_hidden_size = hidden_size)
GIVEN_OR_COMPUTED = ("pooler_hidden_size",)


def _has_field(config, field: str) -> bool:
    return (field in declared_fields(type(config)) or field in getattr(config, "attribute_map", {})
            or (field in GIVEN_OR_COMPUTED and field in vars(config)))


def _resolve(module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _prefix(name: str) -> str:
    parts = name.split(".")
    if "decoder" in parts:
        return "decoder_"
    if "encoder" in parts:
        return "encoder_"
    return ""


# -- reading roles from the layers ----------------------------------------------------------------------
def _attention_roles(module) -> dict | None:
    if is_mla_attention(module):
        groups = getattr(module, "num_key_value_groups", 1) or 1  # the config's kv heads only size this ratio
        return {"heads": module.num_heads, "kv_heads": max(1, module.num_heads // groups), "q_lora_rank": module.q_lora_rank,
                "kv_lora_rank": module.kv_lora_rank, "qk_nope_head_dim": module.qk_nope_head_dim,
                "v_head_dim": module.v_head_dim}
    if is_bert_attention(module):
        return {"heads": module.num_attention_heads, "head_dim": module.attention_head_size,
                "head_dim_name": "attention_head_size"}
    if is_gpt2_attention(module):
        return {"heads": module.num_heads, "head_dim": module.head_dim, "head_dim_name": "head_dim"}
    if is_vit_attention(module):
        return {"heads": module.num_attention_heads, "head_dim": module.head_dim, "head_dim_name": "head_dim"}
    if is_generic_attention(module):
        layout = read_layout(module)
        if layout is None:
            return None
        roles = {"heads": layout.heads, "head_dim": layout.head_dim,
                 "head_dim_name": _int_attr(module, HEAD_SIZE_NAMES)[0]}
        if layout.kv_heads is not None:
            roles["kv_heads"] = layout.kv_heads
        return roles
    return None


def _mlp_roles(module, name: str) -> dict | None:
    if "expert" in name:  # mixture-of-experts blocks have their own fields
        return None
    for inner_path, back_path, per_unit in MLP_PAIRS:
        inner, back = _resolve(module, inner_path), _resolve(module, back_path)
        if inner is None or back is None or not hasattr(inner, "weight") or not hasattr(back, "weight"):
            continue
        if isinstance(inner, nn.Conv2d) or isinstance(back, nn.Conv2d):
            continue
        return {"intermediate": out_width(inner) // per_unit, "hidden": out_width(back)}
    return None


def _projection_roles(module, name: str) -> dict | None:
    if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTION_NAMES:
        return {"projection": module.out_features}
    if name.rsplit(".", 1)[-1] == "pooler" and isinstance(getattr(module, "dense", None), nn.Linear):
        return {"pooler": module.dense.out_features}  # DeBERTa's ContextPooler: pooler_hidden_size
    return None


def _mamba_roles(module) -> dict | None:
    if type(module).__name__.endswith("Mixer") and hasattr(module, "conv1d") and hasattr(module, "out_proj"):
        return {"intermediate": module.conv1d.out_channels, "hidden": out_width(module.out_proj)}
    return None


def config_tree(config) -> list:
    """``config`` and every sub-config it holds (CLIP's text_config and vision_config), each once."""
    found, stack = {}, [config]
    while stack:
        current = stack.pop()
        if id(current) in found:
            continue
        found[id(current)] = current
        stack.extend(value for value in vars(current).values() if is_config(value))
    return list(found.values())


def snapshot_configs(model) -> list:
    """Every config the model's modules hold (and their sub-configs), with a copy of their fields."""
    configs: dict = {}
    for module in model.modules():
        config = module.__dict__.get("config")
        if is_config(config):
            for each in config_tree(config):
                configs.setdefault(id(each), each)
    return [(config, {key: value if is_config(value) else copy.deepcopy(value) for key, value in vars(config).items()})
            for config in configs.values()]


def restore_configs(saved: list) -> None:
    """Put back the fields ``snapshot_configs`` copied, in place: modules keep holding the same objects."""
    for config, fields in saved:
        config.__dict__.clear()
        config.__dict__.update({key: value if is_config(value) else copy.deepcopy(value) for key, value in fields.items()})


def walk(model):
    """(module, name, config) for every module of ``model`` with the config (or sub-config) it counts for.

    Layers count for the config of ``model`` their nearest owner holds; T5 hands each stack a private
    copy of the config, whose layers count for the model's own config.
    """
    top = model.__dict__.get("config")
    known = {id(config) for config in config_tree(top)} if is_config(top) else set()

    def config_of(module, inherited):
        config = module.__dict__.get("config")
        return config if is_config(config) and id(config) in known else inherited

    stack = [(model, "", config_of(model, None))]
    while stack:
        module, name, config = stack.pop()
        config = config_of(module, config)
        yield module, name, config
        for child_name, child in reversed(list(module.named_children())):
            stack.append((child, f"{name}.{child_name}" if name else child_name, config))


def collect_roles(model) -> dict:
    """{config id: (config, {(role, prefix): [(module name, value)]})} over every layer of ``model``."""
    found: dict = {}
    for module, name, config in walk(model):
        if config is not None:
            _, roles = found.setdefault(id(config), (config, {}))
            prefix = _prefix(name)
            for reading in (_attention_roles(module), _mlp_roles(module, name), _mamba_roles(module),
                            _projection_roles(module, name)):
                if not reading:
                    continue
                head_dim_name = reading.pop("head_dim_name", None)
                if reading is not None and "heads" in reading and "hidden" not in reading:
                    # the attention's output projection writes the residual stream: the hidden width of models
                    # whose MLPs are mixture-of-experts blocks (no plain MLP says it)
                    output = _child(module, OUTPUT_NAMES)
                    if output is not None and hasattr(output, "weight"):
                        reading["hidden"] = out_width(output)
                for role, value in reading.items():
                    roles.setdefault((role, prefix), []).append((name, value))
                if head_dim_name:
                    roles.setdefault(("head_dim_name", prefix), []).append((name, head_dim_name))
    return found


def layer_fields(model) -> dict:
    """{layer: (config id, field, stage)}: the config field each layer's output width is counted in.

    Inner MLP layers count in the intermediate field, layers writing to the residual stream (output
    projections, MLP down projections, embeddings) in the hidden field (ALBERT's and ELECTRA's embeddings
    in ``embedding_size``), q/k/v projections in the head fields, tower projections in theirs.
    """
    fields = {}

    def note(layer, config, role, prefix, name):
        field = _field(config, role, prefix) if layer is not None else None
        if field is not None:
            per_stage = isinstance(getattr(config, field, None), (list, tuple))
            fields.setdefault(layer, (id(config), field, _stage(name + ".") if per_stage else None))

    for module, name, config in walk(model):
        if config is None:
            continue
        prefix = _prefix(name)
        if isinstance(module, nn.Embedding):
            note(module, config, "embedding" if _field(config, "embedding", "") else "hidden", prefix, name)
            continue
        if _mlp_roles(module, name) is not None:
            for inner_path, back_path, _ in MLP_PAIRS:
                inner, back = _resolve(module, inner_path), _resolve(module, back_path)
                if inner is not None and back is not None:
                    note(inner, config, "intermediate", prefix, name)
                    note(back, config, "hidden", prefix, name)
                    for gate in GATE_NAMES:  # gated MLPs: the gate is as wide as the inner layer
                        note(_resolve(module, gate), config, "intermediate", prefix, name)
                    break
        if _attention_roles(module) is not None:
            note(_child(module, OUTPUT_NAMES), config, "hidden", prefix, name)
            note(_child(module, QUERY_NAMES) or _child(module, FUSED_NAMES), config, "heads", prefix, name)
            note(_child(module, KEY_NAMES), config, "kv_heads", prefix, name)
        if _projection_roles(module, name) is not None:
            note(module if isinstance(module, nn.Linear) else getattr(module, "dense", None), config,
                 "projection" if isinstance(module, nn.Linear) else "pooler", prefix, name)
    return fields


# -- writing them ---------------------------------------------------------------------------------------
#: config fields that state a head size of their own (otherwise the family derives it as hidden / heads)
HEAD_SIZE_FIELDS = ("head_dim", "attention_head_size", "d_kv", "key_value_proj_dim", "kv_channels", "head_size")


def head_size_ties(model) -> dict:
    """{query layer: ((config id, hidden field, stage), blocks)} for attention whose config states no head
    size; ``blocks`` is how many hidden widths the layer holds (3 for a fused q/k/v projection).

    BertConfig builds every head as ``hidden_size // num_attention_heads`` wide: narrower heads are
    describable only while heads x head size still equals the hidden size, so the planner narrows them
    no further than the hidden width goes.
    """
    ties = {}
    for module, name, config in walk(model):
        if config is None or _attention_roles(module) is None:
            continue
        if any(_has_field(config, field) for field in HEAD_SIZE_FIELDS):
            continue
        query = _child(module, QUERY_NAMES) or _child(module, FUSED_NAMES)
        prefix = _prefix(name)
        hidden = _field(config, "hidden", prefix)
        if query is None or hidden is None:
            continue
        width = getattr(config, hidden, None)
        if not isinstance(width, int) or width <= 0 or out_width(query) % width:
            continue  # per-stage widths (Swin) or an attention narrower than the hidden size by design
        ties[query] = ((id(config), hidden, None), out_width(query) // width)
    return ties


def _field(config, role: str, prefix: str) -> str | None:
    candidates = ()
    if prefix and role in PREFIXED_FIELDS:
        candidates = (PREFIXED_FIELDS[role].format(prefix),)
    candidates += ROLE_FIELDS.get(role, ())
    for field in candidates:
        if role in DECLARED_ONLY and field not in declared_fields(type(config)):
            continue
        if _has_field(config, field):
            return field
    return None


def _stage(name: str) -> int | None:
    match = _STAGE.search(name)
    return int(match.group(1)) if match else None


def _write(config, field: str, values: list, notes: list) -> None:
    current = getattr(config, field, None)
    if isinstance(current, (list, tuple)) and current and all(isinstance(v, int) for v in current):
        per_stage = {}
        for name, value in values:
            stage = _stage(name)
            if stage is not None and stage < len(current):
                per_stage.setdefault(stage, []).append((name, value))
        updated = list(current)
        for stage, stage_values in per_stage.items():
            updated[stage] = _one_value(config, f"{field}[{stage}]", stage_values, notes)
        if updated != list(current):
            setattr(config, field, type(current)(updated))
        return
    value = _one_value(config, field, values, notes)
    if current != value:
        setattr(config, field, value)


def _one_value(config, field: str, values: list, notes: list) -> int:
    distinct = sorted({value for _, value in values})
    if len(distinct) > 1:
        layers = ", ".join(f"{name} {value}" for name, value in values[:8])
        more = f" and {len(values) - 8} more" if len(values) > 8 else ""
        notes.append(f"{type(config).__name__}.{field} is one number but the layers hold {distinct} "
                     f"({layers}{more})")
    return values[0][1]


def _write_head_dim(config, roles: dict, notes: list) -> None:
    """head_dim where the config declares it (LlamaConfig.head_dim, T5's d_kv) or where heads x head size no
    longer equals the hidden size; a family that reads neither fails the rebuild check, loudly."""
    for prefix in sorted({prefix for role, prefix in roles if role == "head_dim"}):
        values = roles[("head_dim", prefix)]
        names = [value for _, value in roles.get(("head_dim_name", prefix), [])]
        field = "head_dim" if _has_field(config, "head_dim") else (names[0] if names else "head_dim")
        if field == "key_value_proj_dim":
            field = "head_dim"
        if isinstance(getattr(type(config), field, None), property):
            continue  # derived (FalconConfig.head_dim = hidden_size // heads): the rebuild check decides
        heads_field = _field(config, "heads", prefix)
        if heads_field is not None and isinstance(getattr(config, heads_field, None), (list, tuple)):
            continue  # heads per stage (Swin): each stage's width / heads gives its head size
        value = _one_value(config, field, values, notes)
        heads = roles.get(("heads", prefix), [(None, None)])[0][1]
        hidden = getattr(config, "hidden_size", None)
        if _has_field(config, field) or heads is None or not isinstance(hidden, int) or heads * value != hidden:
            setattr(config, field, value)
        else:
            config.__dict__.pop(field, None)  # written while pruning half-way; hidden_size says it again


def _write_embedding(model, config, notes: list) -> None:
    embeddings = _input_embeddings(model)
    if embeddings is None or not hasattr(embeddings, "embedding_dim"):
        return
    field = _field(config, "embedding", "")
    if field is not None:
        _write(config, field, [("embeddings", embeddings.embedding_dim)], notes)


def _input_embeddings(model):
    try:
        return model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # Swin, ConvNeXt: no token embeddings
        return None


def _fold_embedding_scale(model, config) -> None:
    """Gemma multiplies its token embeddings by ``sqrt(hidden_size)``, fixed when the model is built.

    The pruned model keeps multiplying by the old scale (it must behave as before), while a model built
    from the config scales by the new one; folding the ratio into the embedding weights makes both
    the same. A tied LM head reads those weights too, so the inverse ratio goes into the final norm
    (Gemma's ``x * (1 + weight)``), which scales what the head sees by exactly that much.
    """
    embeddings = _input_embeddings(model)
    old = getattr(embeddings, "scalar_embed_scale", None)
    if not isinstance(old, float) or not isinstance(getattr(embeddings, "embedding_dim", None), int):
        return
    new = embeddings.embedding_dim ** 0.5
    built_from = config.__dict__.get("hidden_size")
    if math.isclose(old, new) or not isinstance(built_from, int) or not math.isclose(old, built_from ** 0.5):
        return
    ratio = old / new
    weight = embeddings.weight
    with torch.no_grad():
        weight.data = weight.data * ratio  # out of place: a pruner checkpoint holds the old tensor
        embeddings.scalar_embed_scale = new
        if isinstance(getattr(embeddings, "embed_scale", None), torch.Tensor):
            embeddings.embed_scale = torch.tensor(new, dtype=embeddings.embed_scale.dtype,
                                                  device=embeddings.embed_scale.device)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and head.weight is weight:
            norm = _final_norm(model)
            if norm is None:
                raise RuntimeError(
                    f"{type(model).__name__}: the token embeddings are scaled by sqrt(hidden_size) and tied to the "
                    f"LM head, and no final norm was found to compensate; save with tp.save_pruned instead"
                )
            norm.weight.data = (1.0 + norm.weight.data.float()).div(ratio).sub(1.0).to(norm.weight.dtype)


def _fold_output_scale(model, config) -> None:
    """T5 multiplies the decoder output by ``model_dim ** -0.5`` (``scale_decoder_outputs``), with
    ``model_dim`` read from the config when the model is built. The pruned model keeps the old factor by
    folding the ratio into the decoder's final norm, and ``model_dim`` takes the new width, which is what a
    model built from the config uses."""
    old = model.__dict__.get("model_dim")
    embeddings = _input_embeddings(model)
    new = getattr(embeddings, "embedding_dim", None)
    if not isinstance(old, int) or not isinstance(new, int) or old == new:
        return
    if getattr(config, "scale_decoder_outputs", False):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        norm = getattr(decoder, "final_layer_norm", None)
        if norm is None or not isinstance(getattr(norm, "weight", None), torch.Tensor):
            raise RuntimeError(
                f"{type(model).__name__} scales its decoder output by model_dim ** -0.5 and no decoder final norm "
                f"was found to keep that scale after pruning; save with tp.save_pruned instead"
            )
        with torch.no_grad():
            norm.weight.data = norm.weight.data * (new / old) ** 0.5
    model.model_dim = new


def _final_norm(model):
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    norm = getattr(base, "norm", None)
    if norm is not None and isinstance(getattr(norm, "weight", None), torch.Tensor):
        return norm
    return None


def sync_config(model) -> list[str]:
    """Write every config field of ``model`` (and its sub-configs) from the layer shapes.

    Returns notes on fields that one value cannot describe (widths differing between layers).
    """
    notes: list[str] = []
    top = model.__dict__.get("config")
    if not is_config(top):
        return notes
    _fold_embedding_scale(model, top)
    _fold_output_scale(model, top)
    for config, roles in collect_roles(model).values():
        for (role, prefix), values in roles.items():
            if role in ("head_dim", "head_dim_name"):
                continue
            field = _field(config, role, prefix)
            if field is not None:
                _write(config, field, values, notes)
        _write_head_dim(config, roles, notes)
        _family_fields(config, roles, notes)
    _write_embedding(model, top, notes)
    return notes


def _family_fields(config, roles: dict, notes: list) -> None:
    """Fields a family derives from others in ``__post_init__`` (Swin's stage widths from ``embed_dim``)."""
    name = type(config).__name__
    if name == "MambaConfig" and ("intermediate", "") in roles:
        # computed from expand x hidden_size in __post_init__; a stored value overrides it on reload
        config.intermediate_size = _one_value(config, "intermediate_size", roles[("intermediate", "")], notes)
    if name == "SwinConfig" and ("hidden", "") in roles:
        stages: dict = {}
        for layer, value in roles[("hidden", "")]:
            stages.setdefault(_stage(layer), []).append((layer, value))
        if 0 in stages:
            config.embed_dim = _one_value(config, "embed_dim", stages[0], notes)
        last = max((stage for stage in stages if stage is not None), default=None)
        if last is not None:
            config.hidden_size = stages[last][0][1]


def layer_roles_summary(model) -> dict:
    """{"ConfigClass.field": sorted distinct values}: what the layers hold, for error messages (a role
    without a field of its own is named after the role: "BertConfig head size")."""
    summary = {}
    for config, roles in collect_roles(model).values():
        for (role, prefix), values in roles.items():
            if role == "head_dim_name":
                continue
            field = _field(config, role, prefix) if role != "head_dim" else (
                "head_dim" if _has_field(config, "head_dim") else None)
            label = field or f"{prefix.replace('_', ' ')}{role.replace('_', ' ').replace('dim', 'size')}"
            summary.setdefault(f"{type(config).__name__}.{label}" if field else
                               f"{type(config).__name__} {label}", set()).update(v for _, v in values)
    return {key: sorted(values) for key, values in summary.items()}


def uses_transformers(model) -> bool:
    return from_library("transformers", model) and is_config(model.__dict__.get("config"))



def task_outputs(output):
    """The task outputs of a transformers ``ModelOutput`` (``logits``, ``logits_per_image``, ``start_logits``...).

    The default ``output_transform`` of the pruners for transformers models: only these keep their shape,
    so the hidden size may shrink although ``encoder_last_hidden_state`` or CLIP's ``text_model_output``
    expose it. Without task outputs (``BertModel``) every output is kept.
    """
    if hasattr(output, "items"):
        picked = {key: value for key, value in output.items() if "logits" in key and isinstance(value, torch.Tensor)}
        if picked:
            return picked
    return output
