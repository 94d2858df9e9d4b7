"""Which parameters ``regularize()`` writes to: the compiled ones, or what replaced them in the model.

Wrappers replace parameters after a pruner compiled its penalties: FSDP2's ``fully_shard`` swaps every
parameter for a sharded DTensor one, a user may re-create a layer. The old objects then never receive a
gradient, and writing only to them would silently do nothing. A binding notices (a compiled parameter
without a gradient), looks the name up again in the model passed to ``regularize(model)`` (through
DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes) and rebinds, or raises naming the
parameter. Sharded parameters are penalised on their local shard with the matching slice of the
coefficients, which equals the unsharded computation exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from ..utils.sharding import is_sharded

# what DDP (``module.``) and torch.compile (``_orig_mod.``) put in front of every parameter name
_WRAPPER_PREFIXES = ("", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.")


def find_parameter(named: dict, name: str):
    """``name`` in a model's named parameters, looking through the prefixes wrappers add."""
    for prefix in _WRAPPER_PREFIXES:
        found = named.get(prefix + name)
        if found is not None:
            return found
    return None


class ParameterBinding:
    """The current objects behind a list of compiled parameters, found by name when they were replaced."""

    def __init__(self, params: list[nn.Parameter], names: dict):
        self.names = [names.get(param) for param in params]
        self.shapes = [tuple(param.shape) for param in params]
        self.current = list(params)
        self._checked = None  # positions without a gradient at the last lookup (unused this step)

    def resolve(self, model: nn.Module | None) -> list:
        """The parameters to write to now; rebinds by name when a compiled one got no gradient."""
        idle = frozenset(i for i, param in enumerate(self.current) if param.grad is None)
        if not idle or model is None or idle == self._checked:
            return self.current
        named = dict(model.named_parameters(remove_duplicate=False))
        for i in idle:
            name = self.names[i]
            replacement = find_parameter(named, name) if name is not None else None
            if replacement is None:
                raise RuntimeError(
                    f"regularize(): parameter {name or '(unnamed)'} that the pruner compiled is not in the model "
                    f"passed in, and the compiled object receives no gradient; pass the model being trained "
                    f"(regularize(model)), or call pruner.update_regularizer() after changing its layers"
                )
            if replacement is not self.current[i]:
                if tuple(replacement.shape) != self.shapes[i]:
                    raise RuntimeError(
                        f"regularize(): {name} is now {tuple(replacement.shape)} but the pruner compiled "
                        f"{self.shapes[i]}; call pruner.update_regularizer() after changing the model's layers"
                    )
                self.current[i] = replacement
        self._checked = frozenset(i for i, param in enumerate(self.current) if param.grad is None)
        return self.current


def local_terms(params: list, coefs: list, cache: dict) -> tuple[list, list, list]:
    """(gradients, values, coefficients) to combine in place, on local shards for sharded parameters."""
    grads, values, factors = [], [], []
    for param, coef in zip(params, coefs):
        grad = param.grad
        if grad is None:
            continue
        if is_sharded(param):
            key = (id(param), id(coef))
            if key not in cache:
                cache[key] = _local_coefficient(param, coef)
            grads.append(grad.to_local())
            values.append(param.detach().to_local())
            factors.append(cache[key])
        else:
            grads.append(grad)
            values.append(param.detach())
            factors.append(coef)
    return grads, values, factors


def _local_coefficient(param, coef: torch.Tensor) -> torch.Tensor:
    """The slice of a coefficient (broadcast along its channel dims) that this rank's shard needs."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = coef
    for dim, size in enumerate(local_shape):
        if coef.shape[dim] > 1 and size != coef.shape[dim]:
            local = local.narrow(dim, offset[dim], size)
    return local.to(param.to_local().device)
