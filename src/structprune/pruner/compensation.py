"""Compensation at removal: the layers reading removed channels absorb what those channels contributed.

One-shot pruning of a pretrained model loses most of its quality not in the channels' weights but in their
share of every output they fed. With calibration statistics (gathered by an activation-aware importance, see
``importance/activation.py``) the consuming layer can take most of it back, before any training:

- ``"bias"`` (FLAP): a removed input ``x_j`` is replaced by its calibration mean, so ``W[:, j] * mean_j`` is
  added to the layer's bias (a bias is created, at zero, where the layer had none). Exact for channels that
  are constant on the data; for the rest the loss left is the channel's fluctuation.
- ``"refit"``: the kept columns are refitted by least squares on the calibration inputs,
  ``W_K = W Sigma[:, K] (Sigma[K, K] + damping)^-1`` with ``Sigma = E[x x^T]`` (centred, with the bias
  taking the mean, when the layer has a bias), the closed form of ``min E||W x - W_K x_K||^2``. Needs the
  importance built with ``gram=True``; Linear layers only (convs get ``"bias"``).

Weights are replaced, never written into: a step's checkpoint keeps the old tensors and puts them back
when the step is undone.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..graph.group import Group
from ..graph.side import Side
from ..layers.axes import swap_data

MODES = ("bias", "refit")


@dataclass(frozen=True)
class Compensation:
    """``compensation=`` of a pruner: a mode from :data:`MODES`, and the refit's ridge damping as a fraction
    of the mean diagonal of the kept channels' second moments (the calibration set is usually smaller than
    a wide layer, so its Gram matrix is singular without it)."""

    mode: str
    damping: float = 0.01

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"compensation must be one of {MODES} or None, got {self.mode!r}")
        if not self.damping > 0:
            raise ValueError(f"compensation damping must be positive, got {self.damping!r}")


def as_compensation(value) -> Compensation | None:
    """The option as given (None, a mode name or a :class:`Compensation`) as a Compensation or None."""
    if value is None or isinstance(value, Compensation):
        return value
    if isinstance(value, str):
        return Compensation(value)
    raise TypeError(f"compensation must be None, one of {MODES} or a tp.pruner.Compensation, got {value!r}")


def check_statistics_source(importance, compensation: Compensation | None) -> None:
    """Compensation reads calibration statistics: refuse at construction when the importance has none."""
    if compensation is None:
        return
    if not hasattr(importance, "statistics"):
        raise ValueError(
            f"compensation={compensation.mode!r} needs calibration statistics, which {type(importance).__name__} "
            f"does not gather; use tp.importance.ActivationImportance, WandaImportance or FluctuationImportance "
            f"(register(model), forward calibration batches, remove_hooks()) as the importance"
        )
    if compensation.mode == "refit" and not getattr(importance, "gram", False):
        raise ValueError(
            f"compensation='refit' needs each layer's input Gram matrix: build the importance with gram=True "
            f"({type(importance).__name__}(gram=True)) and calibrate again"
        )


class Compensator:
    """Applies a compensation to the readers of each group a step prunes; remembers what it could not do."""

    def __init__(self, compensation: Compensation, importance):
        self.compensation = compensation
        self.importance = importance
        #: module paths where a bias was created to hold the compensation
        self.created_biases: list[str] = []
        #: module path -> why that reader got no (or only bias) compensation
        self.notes: dict[str, str] = {}
        #: layer -> the input channels whose compensation GReg-1's fade already gave (pruner/fading.py)
        self.faded: dict[nn.Module, torch.Tensor] = {}
        #: module paths the fade compensated, this step
        self.faded_names: list[str] = []

    def before_prune(self, group: Group) -> None:
        for item, layer, name in readers(group):
            record = self.importance.statistics(layer)
            if record is None:
                self.notes[name] = "no calibration statistics (not run while the importance's hooks were on)"
                continue
            removed = torch.as_tensor(item.idxs, dtype=torch.long, device=layer.weight.device)
            if self._faded(layer, removed):
                # a second refit on columns already faded to ~0 would only shrink the kept ones by the ridge
                self.faded_names.append(name)
                continue
            if getattr(layer, "groups", 1) != 1:
                self.notes[name] = "grouped conv: not compensated"
                continue
            if self.compensation.mode == "refit" and isinstance(layer, nn.Linear) and record.gram is not None:
                refit(layer, record, removed, self.compensation.damping)
                continue
            if self.compensation.mode == "refit":
                self.notes[name] = ("bias compensation instead of refit (convs and layers wider than max_gram_size "
                                    "have no Gram matrix)")
            if layer.bias is None and name not in self.created_biases:  # a re-planned step creates it again
                self.created_biases.append(name)
            add_mean_contribution(layer, record, removed)

    def _faded(self, layer: nn.Module, removed: torch.Tensor) -> bool:
        faded = self.faded.get(layer)
        return faded is not None and torch.equal(faded.to(removed.device), removed.sort().values)

    def step_notes(self) -> list[str]:
        """The step's notes for ``report()`` (then forgotten: each step reports its own)."""
        notes = [f"compensation ({self.compensation.mode}) skipped {name}: {why}" for name, why in self.notes.items()]
        notes += [f"compensation created a bias on {name} (it had none)" for name in self.created_biases]
        if self.faded_names:
            names = ", ".join(self.faded_names[:6]) + ("..." if len(self.faded_names) > 6 else "")
            notes.append(f"compensation ({self.compensation.mode}) was given during the fade, not at removal, on "
                         f"{len(self.faded_names)} layer(s): {names}")
        self.notes, self.created_biases, self.faded, self.faded_names = {}, [], {}, []
        return notes

    def warn(self) -> None:
        if self.created_biases:
            names = ", ".join(self.created_biases[:4]) + ("..." if len(self.created_biases) > 4 else "")
            warnings.warn(
                f"compensation='bias' created a bias on {len(self.created_biases)} layer(s) that had none ({names}); "
                f"a config that declares no such biases drops them on from_pretrained: prefer compensation='refit' "
                f"for such models, or save with tp.save_pruned. pruner.report() lists them", stacklevel=4)


def readers(group: Group):
    """``(item, layer, module path)`` for each layer of ``group`` that reads its channels (the IN side of a
    Linear or conv): the layers compensation can hand the removed channels' share to."""
    for item in group:
        layer = item.dep.target.module
        if item.side is Side.IN and isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            yield item, layer, item.dep.target.name


def _replace(param: nn.Parameter, value: torch.Tensor) -> None:
    swap_data(param, value.to(param.dtype).contiguous())


def _removed_contribution(layer: nn.Module, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``sum over removed j of W[:, j, ...] * mean_j``, one value per output channel."""
    weight = layer.weight.detach().double()
    columns = weight.index_select(1, removed)
    return (columns * mean[removed].reshape(1, -1, *[1] * (weight.dim() - 2))).flatten(1).sum(1)


def add_mean_contribution(layer: nn.Module, record, removed: torch.Tensor) -> None:
    mean = record.in_mean().to(layer.weight.device)
    delta = _removed_contribution(layer, mean, removed)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                              device=layer.weight.device))
    _replace(layer.bias, layer.bias.detach().double() + delta)


def refit_system(layer: nn.Linear, record, removed: torch.Tensor, damping: float):
    """The least-squares problem of refitting ``layer``'s kept columns: ``(kept, moment, system, mean)`` with
    ``system = Sigma_KK + ridge`` and ``moment`` the input's second moment, centred (and ``mean`` its mean)
    when the layer has a bias to take the mean, else uncentred (``mean`` None). Float64, on the layer's device."""
    device = layer.weight.device
    keep_mask = torch.ones(layer.in_features, dtype=torch.bool, device=device)
    keep_mask[removed] = False
    kept = keep_mask.nonzero().squeeze(1)
    moment = record.second_moment().to(device).double()
    mean = None
    if layer.bias is not None:
        mean = record.in_mean().to(device).double()
        moment = moment - torch.outer(mean, mean)  # the bias absorbs the mean; fit the fluctuation
    kept_moment = moment[kept][:, kept]
    ridge = damping * kept_moment.diagonal().mean().clamp(min=1e-12)
    system = kept_moment + ridge * torch.eye(len(kept), dtype=torch.float64, device=device)
    return kept, moment, system, mean


def refit(layer: nn.Linear, record, removed: torch.Tensor, damping: float) -> None:
    kept, moment, system, mean = refit_system(layer, record, removed, damping)
    weight = layer.weight.detach().double()
    # W_K^T = (Sigma_KK + ridge)^-1 Sigma_K: W^T, for the full weight (removed columns included)
    new_kept = torch.linalg.solve(system, moment[kept] @ weight.T).T
    new_weight = weight.clone()
    new_weight[:, kept] = new_kept
    new_weight[:, removed] = 0.0  # about to be cut; zero keeps a failed step's replay honest
    if mean is not None:
        shift = weight @ mean - new_kept @ mean[kept]
        _replace(layer.bias, layer.bias.detach().double() + shift)
    _replace(layer.weight, new_weight)
