"""The regularizer engine: per-parameter coefficient tensors applied with fused foreach calls.

Groups are compiled once (construction, update_regularizer) into terms (parameter, dim, positions,
root index). update_reg scatters per-group values into one coefficient tensor per parameter, shaped to
broadcast along its channel dims; regularize() is then one ``torch._foreach_addcmul_`` over the gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..graph.group import Group, item_axes
from ..utils.sharding import is_sharded
from .binding import ParameterBinding, local_terms
from ..layers.registry import ROLE_TYPES, LayerRole, resolve_layer_types
from ..layers.moe import holds_fused_tensors

DEFAULT_REG_TYPES = ROLE_TYPES[LayerRole.REGULARIZED]
#: ``target_types`` meaning every declared layer and unwrapped parameter (see ``RegularizerEngine``)
EVERY_DECLARED_LAYER = None


@dataclass
class _Term:
    group: int  # position in the compiled group list
    param: nn.Parameter
    dim: int
    positions: torch.Tensor  # along dim
    roots: torch.Tensor  # root index of each position
    is_bias: bool


class RegularizerEngine:
    """``target_types``: the layer types whose ``weight``/``bias`` take the penalty, or
    ``EVERY_DECLARED_LAYER`` (None) for every parameter a layer declares on a group's channel axis, whatever
    its type: embeddings, LayerNorm/RMSNorm, attention and LSTM tensors, unwrapped parameters too."""

    def __init__(self, target_types=DEFAULT_REG_TYPES):
        self.every_declared = target_types is EVERY_DECLARED_LAYER
        target_types = () if self.every_declared else target_types
        self.target_types = resolve_layer_types(target_types, LayerRole.REGULARIZED)
        self.terms: list[_Term] = []
        self.weights: list[nn.Parameter] = []
        self.weight_coefs: list[torch.Tensor] = []
        self.biases: list[nn.Parameter] = []
        self.bias_coefs: list[torch.Tensor] = []
        #: root channels of each compiled group, in compile order (what ``scatter`` takes one value per)
        self.group_sizes: list[int] = []

    def compile(self, groups: list[Group], names: dict | None = None) -> None:
        """Lay every (parameter, dim) coefficient vector out in one flat buffer, once per set of groups.

        ``names`` ({parameter: name in the model}) lets ``apply(model=...)`` find parameters a wrapper
        replaced (FSDP2) or a user re-created; without it such parameters raise.
        """
        self.terms = []
        for index, group in enumerate(groups):
            for k, item in enumerate(group):
                self.terms.extend(self._item_terms(index, item, group, k))
        # a group holding part of its root's channels (GReg-1's whole heads) keeps one coefficient per root
        # channel of the full width, as its items' root indices count them
        sizes = self.group_sizes = [getattr(group, "reg_width", None) or len(group[0].idxs) for group in groups]
        group_offsets = [0]
        for size in sizes[:-1]:
            group_offsets.append(group_offsets[-1] + size)
        slots: dict = {}  # (param, dim) -> buffer offset
        params: dict = {}  # param -> [(dim, offset)], insertion ordered
        length = 0
        position_offsets, root_offsets, counts = [], [], []
        for term in self.terms:
            key = (term.param, term.dim)
            if key not in slots:
                slots[key] = length
                params.setdefault(term.param, []).append((term.dim, length))
                length += term.param.shape[term.dim]
            position_offsets.append(slots[key])
            root_offsets.append(group_offsets[term.group])
            counts.append(len(term.positions))
        device = next(iter(params)).device if params else torch.device("cpu")
        if self.terms:
            # one cat and one repeat_interleave instead of two small tensor adds per term (DenseNet: 14k terms)
            counts = torch.tensor(counts)
            self._positions = (torch.cat([t.positions for t in self.terms])
                               + torch.tensor(position_offsets).repeat_interleave(counts)).to(device)
            self._roots = (torch.cat([t.roots for t in self.terms])
                           + torch.tensor(root_offsets).repeat_interleave(counts)).to(device)
            entry_groups = torch.tensor([t.group for t in self.terms]).repeat_interleave(counts).to(device)
        else:
            self._positions = self._roots = torch.zeros(0, dtype=torch.long, device=device)
            entry_groups = self._positions
        self._combine_shared_positions(entry_groups, len(groups), device)
        self._buffer = torch.zeros(length, device=device)
        is_bias = {term.param: term.is_bias for term in self.terms}
        self._layout, self._is_bias = params, is_bias
        self._single, self._pairs = {}, []
        for param, entries in params.items():
            views = [self._view(param, dim, offset) for dim, offset in entries]
            if len(views) == 1:
                self._single[param] = views[0]
            else:
                self._pairs.append((param, views))
        self.weights = [p for p in params if not is_bias[p]]
        self.biases = [p for p in params if is_bias[p]]
        self._weight_binding = ParameterBinding(self.weights, names or {})
        self._bias_binding = ParameterBinding(self.biases, names or {})
        self._local_coefs: dict = {}

    def _combine_shared_positions(self, entry_groups: torch.Tensor, n_groups: int, device) -> None:
        """How positions reached more than once get one coefficient: within a group (several channels on one
        position: grouped-conv inputs) their mean; across groups (the q- and v-rooted views of the same
        attention heads) the largest, so a group that does not grow a channel neither dilutes nor doubles
        the penalty another group gives it (GReg-1 chooses heads in one of them)."""
        keys = self._positions * max(n_groups, 1) + entry_groups
        unique, self._pair_of_entry = torch.unique(keys, return_inverse=True)
        self._pair_positions = unique // max(n_groups, 1)
        count = torch.zeros(len(unique), device=device).index_add_(
            0, self._pair_of_entry, torch.ones(len(keys), device=device))
        self._pair_inverse_count = 1.0 / count.clamp(min=1)

    def _view(self, param, dim, offset):
        shape = [1] * param.dim()
        shape[dim] = param.shape[dim]
        return self._buffer[offset: offset + param.shape[dim]].view(shape)

    def _item_terms(self, index, item, group, k):
        node = item.dep.target
        module = node.module
        if not self._covers(module):
            return []
        axes = item_axes(item)
        idxs = roots = None
        terms = []
        fused = holds_fused_tensors(module)  # MoE experts name their weights gate_up_proj, down_proj...
        for axis in axes:
            leaf = axis.name.rsplit(".", 1)[-1]
            tensor = self._penalised_tensor(module, axis, leaf, fused)
            if tensor is None:
                continue
            if idxs is None:
                idxs, roots = group.item_tensors(k)
            unit = axis.unit(tensor)
            local = idxs % unit if unit < tensor.shape[axis.dim] or axis.blocks == 1 else idxs
            if axis.blocks > 1:
                positions = torch.cat([local + block * unit for block in range(axis.blocks)])
                term_roots = roots.repeat(axis.blocks)
            else:
                positions, term_roots = local, roots
            terms.append(_Term(index, tensor, axis.dim, positions, term_roots, _is_bias(module, leaf)))
        return terms

    def _covers(self, module) -> bool:
        if self.every_declared:
            return True
        return not isinstance(module, nn.Parameter) and isinstance(module, self.target_types)

    def _penalised_tensor(self, module, axis, leaf: str, fused: bool = False) -> nn.Parameter | None:
        """The trainable parameter behind a declared axis, if this engine penalises it (MoE experts name
        their fused weights gate_up_proj, down_proj...)."""
        if isinstance(module, nn.Parameter):  # an unwrapped parameter is its own (only) tensor
            tensor = module
        elif not self.every_declared and not fused and leaf not in ("weight", "bias"):
            return None
        else:
            tensor = axis.tensor(module)
        if not isinstance(tensor, nn.Parameter) or not tensor.requires_grad:
            return None
        return tensor

    def scatter(self, group_values: list[torch.Tensor]) -> None:
        """Write one value per root channel per group into every coefficient (a handful of tensor ops)."""
        if not len(self._positions):
            self.weight_coefs, self.bias_coefs = [], []
            return
        flat = torch.cat(group_values).to(self._buffer.device, self._buffer.dtype)
        pair_values = torch.zeros(len(self._pair_positions), device=flat.device, dtype=flat.dtype)
        pair_values.index_add_(0, self._pair_of_entry, flat[self._roots]).mul_(self._pair_inverse_count)
        self._buffer.zero_()
        self._buffer.scatter_reduce_(0, self._pair_positions, pair_values, reduce="amax", include_self=False)
        coefs = dict(self._single)
        if self._pairs:
            # a conv weight in one group by its outputs and another by its inputs: the penalties add
            firsts = [views[0] for _, views in self._pairs]
            seconds = [views[1] for _, views in self._pairs]
            summed = torch._foreach_add(firsts, seconds)
            for (param, views), total in zip(self._pairs, summed):
                for extra in views[2:]:
                    total = total + extra
                coefs[param] = total
        self.weight_coefs = [coefs[p].to(p.dtype) for p in self.weights]
        self.bias_coefs = [coefs[p].to(p.dtype) for p in self.biases]

    def apply(self, bias: bool = False, sign: bool = False, model: nn.Module | None = None) -> None:
        """grad += coef * weight (L2) or coef * sign(weight) (L1) for every compiled parameter with a grad.

        With ``model``, parameters that no longer receive gradients are looked up again by name in it
        (see :mod:`.binding`), so wrappers that replace parameters (FSDP2) still get the penalty.
        """
        weights, biases = self.resolve(model, bias)
        self._apply(weights, self.weight_coefs, sign)
        if bias:
            self._apply(biases, self.bias_coefs, sign)

    def resolve(self, model: nn.Module | None, bias: bool = False) -> tuple[list, list]:
        """The weights (and biases) penalties go to now; see :mod:`.binding`."""
        weights = self._weight_binding.resolve(model)
        return weights, self._bias_binding.resolve(model) if bias else self._bias_binding.current

    def decay(self, lr: float, bias: bool = False, model: nn.Module | None = None) -> None:
        """w *= 1 - lr * coef, clamped at 0, for every compiled parameter with a grad: AdamW's decoupled
        weight decay with a per-channel coefficient. Call it around ``optimizer.step()``."""
        weights, biases = self.resolve(model, bias)
        self._decay(weights, self.weight_coefs, lr)
        if bias:
            self._decay(biases, self.bias_coefs, lr)

    def _decay(self, params, coefs, lr: float) -> None:
        _, values, factors = local_terms(params, coefs, self._local_coefs)
        if values:
            scales = torch._foreach_mul(factors, -float(lr))
            torch._foreach_add_(scales, 1.0)
            torch._foreach_clamp_min_(scales, 0.0)  # lr * coef > 1 zeroes the channel instead of flipping it
            with torch.no_grad():
                torch._foreach_mul_(values, scales)

    def _apply(self, params, coefs, sign: bool) -> None:
        grads, values, factors = local_terms(params, coefs, self._local_coefs)
        if grads:
            if sign:
                values = torch._foreach_sign(values)
            torch._foreach_addcmul_(grads, values, factors)

    def root_norms(self, n_roots: int, bias: bool = False) -> torch.Tensor:
        """L2 norm of every root channel over all its coupled weights (the group-lasso norm)."""
        squares = torch.zeros_like(self._buffer)
        current = dict(zip(self.weights + self.biases, self._weight_binding.current + self._bias_binding.current))
        for param, entries in self._layout.items():
            if self._is_bias[param] and not bias:
                continue
            value = current[param].detach()
            if is_sharded(value):
                raise NotImplementedError(
                    "group-lasso norms of sharded (FSDP2) parameters are not supported: GroupNormPruner and "
                    "BNScalePruner(group_lasso=True) need whole channels; use GrowingRegPruner under FSDP2"
                )
            for dim, offset in entries:
                others = [d for d in range(value.dim()) if d != dim]
                summed = value.pow(2).sum(dim=others) if others else value.pow(2)
                squares[offset: offset + value.shape[dim]] += summed.to(squares.dtype)
        per_root = torch.zeros(n_roots, device=squares.device).index_add_(0, self._roots, squares[self._positions])
        return per_root.sqrt()


def _is_bias(module, leaf: str) -> bool:
    """Biases take the penalty only with ``bias=True``: ``bias``, ``in_proj_bias``, ``bias_ih_l0``..."""
    return not isinstance(module, nn.Parameter) and "bias" in leaf
