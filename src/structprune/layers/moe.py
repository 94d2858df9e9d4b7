"""Mixture-of-experts layers: fused expert tensors, their router, and the two widths the graph cannot see.

transformers stores the experts of one MoE block as fused 3-D parameters (one decorator,
``use_experts_implementation``, builds 60+ such classes), ``gate_up_proj`` ``[experts, 2 * inner, hidden]``
and ``down_proj`` ``[experts, hidden, inner]`` (``is_transposed`` swaps the last two dims, ``has_gate=False``
names the first one ``up_proj``, ``has_bias`` adds ``*_bias`` ``[experts, width]``). The router beside them
(``gate`` or ``router``) holds ``weight`` ``[experts, hidden]``. Both are recognised by what they hold, not
by class name.

Their forward passes show the graph only the hidden width (experts read and write hidden channels, the
router reads them). Two more widths live inside:

* the intermediate width, shared by every expert (one fused tensor has one size): :class:`ExpertWidth`,
  whose channel ``j`` is row ``j`` of gate and up and column ``j`` of down in every expert. It roots
  groups like a Linear, scored over all experts at once;
* the number of experts: :class:`ExpertCount`, whose channel ``e`` is expert ``e`` in every fused tensor,
  the router's row ``e`` and its per-expert buffers (DeepSeek's ``e_score_correction_bias``). It is pruned
  only when asked (``prune_num_experts``): the router must keep at least ``top_k`` experts, and
  group-limited routing (``num_group``) needs the same number of experts in every group.

Both are small proxy modules built by the graph (:meth:`ExpertsPruner.inner_layers`); they are not part of
the model, hold no tensors of their own and reach the real ones through declared axes.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .axes import Axis
from .base import BasePruningFunc, as_index_tensor

#: router attributes naming its per-expert buffers; any other tensor on a router stops it being recognised
_ROUTER_TENSORS = ("weight", "bias", "e_score_correction_bias")


# -- recognising the layers ----------------------------------------------------------------------------
def _param(module: nn.Module, name: str) -> nn.Parameter | None:
    value = module._parameters.get(name) if hasattr(module, "_parameters") else None
    return value if isinstance(value, nn.Parameter) else None


def _first_weight(experts: nn.Module) -> nn.Parameter | None:
    return _param(experts, "gate_up_proj") if getattr(experts, "has_gate", True) else _param(experts, "up_proj")


def is_fused_experts(module: nn.Module, sized: bool = True) -> bool:
    """Experts stored as fused 3-D tensors with their count in ``num_experts`` (``sized=False``: whatever
    the count says, as after a reload resized the tensors and before the attributes follow)."""
    first, down = _first_weight(module), _param(module, "down_proj")
    count = module.__dict__.get("num_experts")
    return (first is not None and down is not None and first.dim() == 3 and down.dim() == 3
            and isinstance(count, int) and first.shape[0] == down.shape[0] and (count == down.shape[0] or not sized))


def is_router(module: nn.Module, sized: bool = True) -> bool:
    """A top-k router: ``weight`` [num_experts, hidden] and per-expert vectors only, ``top_k`` beside it."""
    weight = _param(module, "weight")
    count = module.__dict__.get("num_experts")
    if weight is None or weight.dim() != 2 or not isinstance(count, int) or (sized and weight.shape[0] != count):
        return False
    if not isinstance(module.__dict__.get("top_k"), int) or any(True for _ in module.children()):
        return False
    experts = weight.shape[0]
    tensors = {**module._parameters, **module._buffers}
    return all(name in _ROUTER_TENSORS and (name == "weight" or value is None or tuple(value.shape) == (experts,))
               for name, value in tensors.items())


def holds_fused_tensors(module) -> bool:
    """Fused experts or one of their inner layers: weights named ``gate_up_proj``/``down_proj``, not ``weight``."""
    return isinstance(module, (ExpertWidth, ExpertCount)) or (isinstance(module, nn.Module)
                                                               and is_fused_experts(module, sized=False))


def _transposed(experts) -> bool:
    return bool(getattr(experts, "is_transposed", False))


def _first_name(experts) -> str:
    return "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"


def _blocks(experts) -> int:
    return 2 if getattr(experts, "has_gate", True) else 1


def intermediate_width(experts: nn.Module) -> int:
    down = experts.down_proj
    return down.shape[1] if _transposed(experts) else down.shape[2]


def hidden_width(experts: nn.Module) -> int:
    down = experts.down_proj
    return down.shape[2] if _transposed(experts) else down.shape[1]


def _set_int(module, names, value: int) -> None:
    """Write ``value`` into whichever of ``names`` the module holds as a plain int."""
    for name in names:
        if type(module.__dict__.get(name)) is int:
            setattr(module, name, int(value))


def sync_experts(experts: nn.Module) -> None:
    """Size attributes of a fused experts module, read back from its tensors (its forward and the
    ``grouped_mm`` path read ``num_experts``; families name the widths ``*_dim`` or ``*_size``)."""
    _set_int(experts, ("num_experts",), experts.down_proj.shape[0])
    _set_int(experts, ("hidden_dim", "hidden_size"), hidden_width(experts))
    _set_int(experts, ("intermediate_dim", "intermediate_size"), intermediate_width(experts))


def sync_router(router: nn.Module) -> None:
    """A router reshapes its input with ``hidden_dim`` and views its scores with ``num_experts``."""
    count, hidden = router.weight.shape
    _set_int(router, ("num_experts", "out_features"), count)  # Phi-MoE's router is an nn.Linear
    _set_int(router, ("hidden_dim", "hidden_size", "in_features"), hidden)


# -- declarations of the real layers --------------------------------------------------------------------
class ExpertsPruner(BasePruningFunc):
    """Fused experts: the hidden channels they read (input) and write (output).

    Removing hidden channel ``c`` removes it from every expert. The intermediate width and the expert
    count are declared as inner layers (:class:`ExpertWidth`, :class:`ExpertCount`).
    """

    out_tensor_dim = -1
    in_tensor_dim = -1
    channel_inputs = (0,)  # the routing indices and weights carry no hidden channels

    def out_axes(self, layer):
        transposed = _transposed(layer)
        axes = [Axis("down_proj", 2 if transposed else 1), Axis("down_proj_bias", 1)]
        norm = getattr(layer, "post_expert_norm", None) if getattr(layer, "has_post_expert_norm", False) else None
        if norm is not None:
            axes += [Axis("post_expert_norm.weight", 0), Axis("post_expert_norm.bias", 0)]
        return axes

    def in_axes(self, layer):
        return [Axis(_first_name(layer), 1 if _transposed(layer) else 2)]

    def get_out_channels(self, layer):
        return hidden_width(layer)

    def get_in_channels(self, layer):
        first = getattr(layer, _first_name(layer))
        return first.shape[1] if _transposed(layer) else first.shape[2]

    def update_attrs(self, layer):
        sync_experts(layer)
        norm = getattr(layer, "post_expert_norm", None)
        weight = getattr(norm, "weight", None)
        if weight is not None:
            for name in ("hidden_size", "dim"):
                _set_int(norm, (name,), weight.shape[0])

    def inner_layers(self, layer, parent):
        inner = []
        if getattr(layer, "is_concatenated", True):
            inner.append(ExpertWidth(layer))
        else:
            # interleaved gate/up rows (gpt-oss) put channel j at 2j and 2j+1, a layout Axis does not describe
            warnings.warn(
                f"{type(layer).__name__} stores gate and up rows interleaved; structprune keeps its intermediate "
                f"width (its hidden width and, with prune_num_experts, its experts still prune)",
                stacklevel=2,
            )
        router = _router_beside(layer, parent)
        if router is not None:
            inner.append(ExpertCount(layer, router))
        return inner


def _router_beside(experts, parent) -> nn.Module | None:
    if parent is None:
        return None
    for child in parent.children():
        if child is not experts and is_router(child) and child.weight.shape[0] == experts.num_experts:
            return child
    return None


class RouterPruner(BasePruningFunc):
    """A top-k router reads hidden channels (weight dim 1). Its rows (the last dim of its scores) are
    experts, removed only with the experts themselves (:class:`ExpertCount`): alone they are refused."""

    out_tensor_dim = -1
    in_tensor_dim = -1
    channel_inputs = (0,)

    def check_structure(self, layer, idxs, side):
        if side == "output" and len(as_index_tensor(idxs)):
            raise ValueError(
                f"{type(layer).__name__}: its rows are experts, which go with their expert weights; prune them "
                f"through the ExpertCount layer the graph adds beside the experts (prune_num_experts=True)"
            )

    def prune_out_channels(self, layer, idxs):
        self.check_structure(layer, idxs, "output")
        return layer

    def in_axes(self, layer):
        return [Axis("weight", 1)]

    def get_out_channels(self, layer):
        return None

    def get_in_channels(self, layer):
        return layer.weight.shape[1]

    def update_attrs(self, layer):
        sync_router(layer)


# -- inner layers ----------------------------------------------------------------------------------------
class ExpertWidth(nn.Module):
    """The intermediate width of a fused experts module (a proxy the graph builds; not part of the model)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def extra_repr(self) -> str:
        return f"{intermediate_width(self.experts)} channels x {self.experts.down_proj.shape[0]} experts"


class ExpertCount(nn.Module):
    """The experts of one MoE block, with the router rows that choose them (a proxy the graph builds)."""

    def __init__(self, experts: nn.Module, router: nn.Module):
        super().__init__()
        self.experts = experts
        self.router = router

    def extra_repr(self) -> str:
        return f"{self.experts.down_proj.shape[0]} experts, top_k={self.router.top_k}"


class ExpertWidthPruner(BasePruningFunc):
    """Channel ``j``: row ``j`` of gate and of up, and column ``j`` of down, in every expert at once."""

    out_tensor_dim = None
    in_tensor_dim = None

    def out_axes(self, layer):
        experts = layer.experts
        first, blocks = _first_name(experts), _blocks(experts)
        transposed = _transposed(experts)
        return [Axis(f"experts.{first}", 2 if transposed else 1, blocks=blocks),
                Axis(f"experts.{first}_bias", 1, blocks=blocks),
                Axis("experts.down_proj", 1 if transposed else 2)]

    def get_out_channels(self, layer):
        return intermediate_width(layer.experts)

    def get_in_channels(self, layer):
        return None

    def update_attrs(self, layer):
        sync_experts(layer.experts)


class ExpertCountPruner(BasePruningFunc):
    """Channel ``e``: expert ``e`` in every fused tensor, the router's row ``e`` and per-expert buffers."""

    out_tensor_dim = None
    in_tensor_dim = None

    def out_axes(self, layer):
        experts = [Axis(f"experts.{name}", 0) for name in (_first_name(layer.experts), f"{_first_name(layer.experts)}_bias",
                                                           "down_proj", "down_proj_bias")]
        return experts + [Axis(f"router.{name}", 0) for name in _ROUTER_TENSORS]

    def get_out_channels(self, layer):
        return layer.experts.down_proj.shape[0]

    def get_in_channels(self, layer):
        return None

    def get_out_channel_groups(self, layer):
        return routing_groups(layer.router)

    def check_structure(self, layer, idxs, side):
        """Refuse what the router could no longer route: fewer experts than ``top_k``, or group-limited
        routing left with groups of unequal size (its view splits the experts into equal groups)."""
        idxs = as_index_tensor(idxs)
        total = self.get_out_channels(layer)
        left = total - len(torch.unique(idxs))
        router = layer.router
        if left < router.top_k:
            raise ValueError(
                f"{type(router).__name__} routes each token to top_k={router.top_k} experts; removing "
                f"{total - left} of {total} leaves {left}. Keep at least top_k experts"
            )
        groups = routing_groups(router)
        if groups > 1:
            per_group = total // groups
            counts = torch.bincount(idxs // per_group, minlength=groups)
            if bool((counts != counts[0]).any()):
                raise ValueError(
                    f"{type(router).__name__} splits its {total} experts into {groups} routing groups; removing "
                    f"{counts.tolist()} per group leaves them unequal. Remove the same number from every group"
                )
            chosen = int(getattr(router, "topk_group", groups))
            if left // groups < 2 or chosen * (left // groups) < router.top_k:
                raise ValueError(
                    f"{type(router).__name__}: {left // groups} experts per routing group cannot serve "
                    f"top_k={router.top_k} from {chosen} groups (each group keeps at least 2); keep more experts"
                )

    def update_attrs(self, layer):
        sync_experts(layer.experts)
        sync_router(layer.router)


def routing_groups(router: nn.Module) -> int:
    """Routing groups of group-limited top-k (DeepSeek's ``n_group``, stored as ``num_group``); 1 if none."""
    groups = getattr(router, "num_group", None)
    return groups if isinstance(groups, int) and groups > 1 else 1


def fewest_experts(router: nn.Module, wanted: int, total: int) -> int:
    """The smallest expert count >= ``wanted`` the router can still route: at least ``top_k``, and with
    group-limited routing a multiple of the group count, 2+ per group (its per-group top-2), and enough in
    the ``topk_group`` chosen groups to fill ``top_k``."""
    keep = max(wanted, router.top_k, 1)
    groups = routing_groups(router)
    if groups > 1:
        chosen = int(getattr(router, "topk_group", groups))
        per_group = max(-(-keep // groups), 2, -(-router.top_k // chosen))
        keep = per_group * groups
    return min(keep, total)


#: grouped matrix multiplications (torch._grouped_mm, which transformers runs fused experts through) need
#: every row of their operands to start on a 16-byte boundary
ROW_ALIGNMENT_BYTES = 16


def row_alignment(module: nn.Module) -> int | None:
    """Channels the hidden or inner width of fused experts must stay a multiple of (16 bytes of their dtype:
    4 in float32, 8 in bfloat16); None for other layers and for the expert count, which is no row."""
    experts = module.experts if isinstance(module, ExpertWidth) else module
    if not is_fused_experts(experts):
        return None
    weight = _first_weight(experts)
    return max(1, ROW_ALIGNMENT_BYTES // weight.element_size()) if weight is not None else None


EXPERTS = ExpertsPruner()
ROUTER = RouterPruner()

#: (predicate, pruning function) for layers recognised by what they hold (see ``register_optional_layers``)
MATCHED = ((is_fused_experts, EXPERTS), (is_router, ROUTER))

#: the proxies' own declarations (our types: registered like nn.Linear's)
INNER = {ExpertWidth: ExpertWidthPruner(), ExpertCount: ExpertCountPruner()}
