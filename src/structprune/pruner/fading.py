"""Compensation spread over GReg-1's fade, instead of given once at removal.

GReg-1 shrinks the channels it chose over many training steps, so by ``step()`` their columns in the layers
that read them are near zero: compensation at removal (pruner/compensation.py) then has nothing left to
hand over, and what those channels contributed was lost on the way, to be relearnt by training alone.
Here each reader takes back its removed columns' change as it happens. After every ``regularize()``, with
``dW_R`` the change of the removed columns since the last call:

- ``"refit"`` (Linear layers with a calibration Gram): ``W_K -= dW_R M^T`` with
  ``M = (Sigma_KK + ridge)^-1 Sigma_KR``, the least-squares map from the removed inputs to the kept ones,
  so that once the removed columns reach zero the kept ones have absorbed exactly what the refit at removal
  would have given, with training in between. Centred, with the bias taking the mean, when the layer has a bias.
- ``"bias"`` (and refit's layers without a Gram, convs): ``b -= dW_R mean_R``, FLAP's mean contribution.

It assumes the removed inputs keep their calibration statistics; the penalty also shrinks the channels'
producers, so mid-fade it under-compensates, and is exact again once the columns are gone. Measured on
Gemma 3 270M (50% of the MLP): perplexity 43.1 after recovery against GReg-1's 49.6 (docs/benchmarks.md).

Memory: one ``kept x removed`` map and one ``out x removed`` copy per reader, on the layer's device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..graph.group import Group
from ..utils.sharding import is_sharded
from .binding import find_parameter
from .compensation import Compensator, readers, refit_system


@dataclass
class Fade:
    """One reader's fade: its removed input channels and how their change is handed on."""

    name: str
    layer: nn.Module
    removed: torch.Tensor  # sorted input channels, on the layer's device
    kept: torch.Tensor | None  # input channels absorbing the change (refit)
    map: torch.Tensor | None  # kept x removed: dW_K = -dW_R @ map.T
    offset: torch.Tensor | None  # per removed channel: db = -sum(dW_R * offset)
    previous: torch.Tensor  # W[:, removed] at the last transfer


class FadeCompensator:
    """The fades of one pruning round: built from GReg-1's choice, updated after each ``regularize()``."""

    def __init__(self, compensator: Compensator):
        self.compensator = compensator
        self.fades: list[Fade] = []
        self.started = False
        #: readers given nothing during the fade (no bias, no Gram), with why; step() compensates them
        self.skipped: dict[str, str] = {}

    @property
    def mode(self) -> str:
        return self.compensator.compensation.mode

    def reset(self) -> None:
        self.fades, self.started, self.skipped = [], False, {}

    def start(self, groups: list[Group]) -> None:
        """Build the fades for the removal ``groups`` (each reader's removed channels merged over them)."""
        removed: dict[nn.Module, tuple[str, set]] = {}
        for group in groups:
            for item, layer, name in readers(group):
                removed.setdefault(layer, (name, set()))[1].update(int(i) for i in item.idxs)
        self.reset()
        self.started = True
        for layer, (name, channels) in removed.items():
            fade = self._fade(layer, name, sorted(channels))
            if fade is not None:
                self.fades.append(fade)

    def _fade(self, layer: nn.Module, name: str, channels: list) -> Fade | None:
        record = self.compensator.importance.statistics(layer)
        if record is None:
            self.skipped[name] = "no calibration statistics"
            return None
        if getattr(layer, "groups", 1) != 1:
            self.skipped[name] = "grouped conv"
            return None
        device = layer.weight.device
        removed = torch.tensor(channels, dtype=torch.long, device=device)
        weight = layer.weight.detach()
        previous = weight.index_select(1, removed).clone()
        # bf16 weights: the map and the running sums stay in float32
        dtype = torch.promote_types(weight.dtype, torch.float32)
        if self.mode == "refit" and isinstance(layer, nn.Linear) and record.gram is not None:
            kept, moment, system, mean = refit_system(layer, record, removed, self.compensator.compensation.damping)
            mapping = torch.linalg.solve(system, moment[kept][:, removed])
            offset = None if mean is None else (mean[removed] - mapping.T @ mean[kept]).to(dtype)
            return Fade(name, layer, removed, kept, mapping.to(dtype), offset, previous)
        if layer.bias is None:
            self.skipped[name] = "no bias to take the mean and no Gram matrix to refit from"
            return None
        mean = record.in_mean().to(device)[removed].to(dtype)
        return Fade(name, layer, removed, None, None, mean, previous)

    @torch.no_grad()
    def transfer(self, model: nn.Module | None = None) -> None:
        """Hand each reader's removed columns' change since the last call to its kept columns / bias."""
        if not self.fades:
            return
        held = None if model is None else {id(param) for param in model.parameters()}
        named = None
        for fade in self.fades:
            weight, bias = fade.layer.weight, fade.layer.bias
            if held is not None and id(weight) not in held:
                # a copy or a wrapper that replaced the parameters is being trained: write to its tensors
                named = dict(model.named_parameters()) if named is None else named
                weight = self._bound(named, fade, "weight", weight)
                bias = None if bias is None else self._bound(named, fade, "bias", bias)
            now = weight.detach().index_select(1, fade.removed)
            change = (now - fade.previous).to(fade.offset.dtype if fade.map is None else fade.map.dtype)
            if fade.map is not None:
                weight.detach().index_add_(1, fade.kept, (-(change @ fade.map.T)).to(weight.dtype))
            if fade.offset is not None and bias is not None:
                shape = (1, -1) + (1,) * (change.dim() - 2)
                bias.detach().sub_((change * fade.offset.reshape(shape)).flatten(1).sum(1).to(bias.dtype))
            fade.previous = now

    def _bound(self, named: dict, fade: Fade, attribute: str, fallback: nn.Parameter) -> nn.Parameter:
        found = find_parameter(named, f"{fade.name}.{attribute}")
        if found is None:
            return fallback
        if is_sharded(found):
            raise RuntimeError(
                f"regularize(): {fade.name}.{attribute} is a sharded DTensor (FSDP2), and compensation during "
                f"GReg-1's fade writes whole layers; build GrowingRegPruner(..., compensate_fade=False) to "
                f"compensate at step() instead, or train the unsharded model"
            )
        return found

    def covered(self) -> dict:
        """{layer: removed channels} the fade compensated, for step()'s compensator to leave alone."""
        return {fade.layer: fade.removed for fade in self.fades}

