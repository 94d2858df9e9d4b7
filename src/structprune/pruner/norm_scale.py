"""Norm layers keep their output scale when they lose channels.

LayerNorm and RMSNorm divide by a deviation taken over the channel dim. Growing regularization drives the
channels it removes to zero everywhere, so at pruning time their inputs to every norm of a transformer's
hidden width are zero: they add nothing to the sum of squares but still count in the average, and once
they are gone the average is over fewer channels, so every kept output shrinks by ``sqrt(H_kept / H)``
(exactly, for RMSNorm; LayerNorm also shifts by the mean). On all-MiniLM-L6-v2 with half the hidden width
removed after GReg-1 that alone cost 0.05 of embedding cosine. The right factor depends on what the removed
inputs held, so it is measured on the example inputs: each norm's weight is multiplied by the mean over
positions of (deviation over the kept channels) / (deviation over all channels). That is
``sqrt(H / H_kept)`` when the removed inputs were zero (and then keeps an RMSNorm's output exactly) and
about 1 when they looked like the kept ones.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..graph.group import Group
from ..utils.nested import call_model, evaluating


def _norm_kind(module) -> str | None:
    """'centered' (LayerNorm), 'rms' (RMSNorm) or None for layers this does not rescale."""
    shape = getattr(module, "normalized_shape", (None,))
    if isinstance(shape, (tuple, list)) and len(shape) > 1:
        return None  # normalised over several dims (C, H, W): the channel is not the last one
    if isinstance(module, nn.LayerNorm):
        return "centered"
    if isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm"):
        return "rms"  # Hugging Face's LlamaRMSNorm, Qwen2RMSNorm...: their weight is an unwrapped parameter
    return None


def norms_in(model: nn.Module, group: Group) -> list[tuple[nn.Module, nn.Parameter | None, torch.Tensor]]:
    """(norm module, its weight, removed channel indices) for every LayerNorm/RMSNorm the group narrows."""
    found, seen = [], set()
    for item in group:
        target = item.dep.target
        module = target.module
        if isinstance(module, nn.Parameter):  # an RMSNorm weight traced as a bare parameter
            owner_name = target.name.rsplit(".", 1)[0] if "." in target.name else ""
            owner = model.get_submodule(owner_name) if owner_name else model
            if getattr(owner, "weight", None) is not module:
                continue
            module, weight = owner, owner.weight
        else:
            weight = getattr(module, "weight", None)
        if _norm_kind(module) is None or id(module) in seen:
            continue
        seen.add(id(module))
        found.append((module, weight, torch.as_tensor(item.idxs, dtype=torch.long)))
    return found


@torch.no_grad()
def capture_inputs(model: nn.Module, example_inputs, forward_fn=None) -> dict:
    """{id(norm): its input on the example inputs} for every LayerNorm/RMSNorm, from one forward pass.

    Taken before a step prunes anything: halfway through a step the model need not run (a head's width
    and the attribute spelling it out are updated by different groups).
    """
    inputs: dict = {}
    handles = []
    for module in model.modules():
        if _norm_kind(module) is None:
            continue

        def hook(layer, args, kwargs, key=id(module)):
            value = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(value, torch.Tensor):
                inputs.setdefault(key, value.detach())

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    if not handles:
        return inputs  # no norm to rescale (a CNN): spare the forward pass
    try:
        with evaluating(model) as running:
            forward_fn(running, example_inputs) if forward_fn is not None else call_model(running, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def measure_scales(norms: list, inputs: dict) -> list[float]:
    """Per norm: mean over positions of deviation(kept channels) / deviation(all channels) of its input."""
    scales = []
    for module, weight, removed in norms:
        value = inputs.get(id(module))
        if value is None or len(removed) == 0 or (weight is not None and weight.shape[-1] != value.shape[-1]):
            scales.append(1.0)  # not reached by the example inputs, or narrowed since they were taken
            continue
        value = value.float().reshape(-1, value.shape[-1])
        keep = torch.ones(value.shape[-1], dtype=torch.bool)
        keep[removed] = False
        eps = float(getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-6) or 1e-6)
        scales.append(float((_deviation(value[:, keep], module, eps) / _deviation(value, module, eps)).mean()))
    return scales


def _deviation(value: torch.Tensor, module, eps: float) -> torch.Tensor:
    if _norm_kind(module) == "centered":
        return (value.var(-1, unbiased=False) + eps).sqrt()
    return (value.pow(2).mean(-1) + eps).sqrt()


def rescale(norms: list, scales: list[float]) -> None:
    """Multiply each (already narrowed) norm weight by its measured scale."""
    missing = []
    with torch.no_grad():
        for (module, weight, _), scale in zip(norms, scales):
            if weight is None:
                missing.append(type(module).__name__)
                continue
            weight.mul_(scale)
    if missing:
        warnings.warn(
            f"rescale_norms: {', '.join(sorted(set(missing)))} without an affine weight lost channels; its output "
            f"scale changed and could not be kept (train on, or pass rescale_norms=False to silence this)",
            stacklevel=4,
        )
