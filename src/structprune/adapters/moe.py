"""Mixture of experts: expert modules, routers and Hugging Face config fields follow pruned shapes.

Fused experts and routers read their sizes from attributes (``num_experts`` sizes one-hot masks and
``grouped_mm`` histograms, ``hidden_dim`` reshapes the router input); their pruning functions keep them in
step, and the adapters here do it again after a reload (``load_pruned`` resizes tensors, then syncs).

The config adapter runs after the Hugging Face config adapter (order ``MODEL + 20`` against ``MODEL``) and writes
what that one does not know: the experts' intermediate width (``moe_intermediate_size``, or ``intermediate_size`` in families
such as Mixtral whose experts read that), the expert count under every name the config answers to
(``num_experts``, ``num_local_experts``, ``n_routed_experts``...), and the shared experts' width
(Qwen2-MoE's ``shared_expert_intermediate_size``; DeepSeek's shared experts are
``moe_intermediate_size * n_shared_experts`` wide, so ``n_shared_experts`` follows when that divides).
Fields describe the first MoE block; blocks pruned to other sizes cannot be described by one config.
"""
from __future__ import annotations

from torch import nn

from ..layers.moe import hidden_width, intermediate_width, is_fused_experts, is_router, sync_experts, sync_router
from .core import MODEL, adapter
from .layout import from_library

#: config fields (and model attributes) holding the number of routed experts, across families
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _is_hf_moe_model(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return (config is not None and from_library("transformers", module) and hasattr(module, "get_input_embeddings")
            and any(isinstance(getattr(config, name, None), int) for name in EXPERT_COUNT_FIELDS))


def _first_moe_block(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(block, experts) of the first module holding fused experts, in model order."""
    return next(((block, child) for block in model.modules() for child in block.children()
                 if is_fused_experts(child, sized=False)), None)


def _mlp_width(mlp: nn.Module) -> int | None:
    up = getattr(mlp, "up_proj", None)
    return up.weight.shape[0] if isinstance(up, nn.Linear) else None


def _set_present(owner, names, value: int) -> None:
    for name in names:
        if isinstance(getattr(owner, name, None), int) and not isinstance(getattr(owner, name), bool):
            setattr(owner, name, value)


@adapter("Hugging Face MoE config (moe_intermediate_size, num_experts, shared expert sizes)", _is_hf_moe_model,
         order=MODEL + 20)
def hf_moe_config(model: nn.Module) -> None:
    found = _first_moe_block(model)
    if found is None:
        return
    config = model.config
    block, experts = found
    count, width = experts.down_proj.shape[0], intermediate_width(experts)
    _set_present(config, EXPERT_COUNT_FIELDS, count)
    _set_present(model, EXPERT_COUNT_FIELDS, count)  # XForCausalLM.num_experts sizes the auxiliary loss
    field = "moe_intermediate_size" if isinstance(getattr(config, "moe_intermediate_size", None), int) \
        else "intermediate_size"
    setattr(config, field, width)
    shared = _mlp_width(getattr(block, "shared_expert", None))
    if shared is not None and hasattr(config, "shared_expert_intermediate_size"):
        config.shared_expert_intermediate_size = shared
    shared = _mlp_width(getattr(block, "shared_experts", None))
    if shared is not None and isinstance(getattr(config, "n_shared_experts", None), int) and shared % width == 0:
        config.n_shared_experts = shared // width


def _holds_experts(module: nn.Module) -> bool:
    return any(is_fused_experts(child, sized=False) for child in module.children())


@adapter("MoE block around fused experts (num_experts, hidden_dim, input_size)", _holds_experts,
         follows=("input_size",))
def moe_block(block: nn.Module) -> None:
    """The module around fused experts: Granite-MoE views its output with ``input_size``."""
    experts = next(child for child in block.children() if is_fused_experts(child, sized=False))
    _set_present(block, ("num_experts",), experts.down_proj.shape[0])
    _set_present(block, ("hidden_dim", "input_size"), hidden_width(experts))


adapter("fused MoE experts (num_experts, hidden_dim, intermediate_dim)",
        lambda module: is_fused_experts(module, sized=False))(sync_experts)
adapter("MoE router (num_experts, hidden_dim)", lambda module: is_router(module, sized=False))(sync_router)
