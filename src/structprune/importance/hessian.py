"""Second-order (OBD) criterion from a diagonal Hessian estimated by squared per-sample gradients."""
from __future__ import annotations

import torch
from torch import nn

from .elementwise import DEFAULT_TARGET_TYPES, ElementwiseImportance


class HessianImportance(ElementwiseImportance):
    """Per item and channel: ``sum 0.5 * w**2 * H`` over the channel's slice (Optimal Brain Damage).

    ``H`` is the empirical-Fisher diagonal: the mean of squared per-sample gradients gathered by
    :meth:`accumulate_grad`. Usage::

        imp.zero_grad()
        for x, y in samples:
            model.zero_grad()
            loss_fn(model(x), y).backward()
            imp.accumulate_grad(model)
        scores = imp(group)

    The accumulated statistics are tied to the parameter shapes: after pruning, call
    :meth:`zero_grad` and accumulate again.
    """

    def __init__(
        self,
        group_reduction: str | None = "mean",
        normalizer: str | None = "mean",
        bias: bool = False,
        target_types: tuple = DEFAULT_TARGET_TYPES,
    ):
        super().__init__(group_reduction, normalizer, bias, target_types)
        self._squared: dict = {}  # parameter -> sum of squared gradients
        self._counts: dict = {}  # parameter -> number of accumulated samples

    def zero_grad(self) -> None:
        """Forget every accumulated gradient."""
        self._squared = {}
        self._counts = {}

    def accumulate_grad(self, model: nn.Module) -> None:
        """Add the current ``.grad`` of every parameter of ``model``, squared (call once per sample)."""
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is None:
                    continue
                squared = param.grad.detach().float().pow(2)
                if param in self._squared:
                    self._squared[param] += squared
                    self._counts[param] += 1
                else:
                    self._squared[param] = squared.clone()
                    self._counts[param] = 1

    def hessian_diag(self, param: nn.Parameter, name: str = "parameter") -> torch.Tensor:
        """The estimated Hessian diagonal of ``param`` (mean squared gradient)."""
        if param not in self._squared:
            raise RuntimeError(
                f"{type(self).__name__}: no accumulated gradients for {name}; call accumulate_grad(model) "
                f"after each per-sample backward pass before estimating importance"
            )
        squared = self._squared[param]
        if squared.shape != param.shape:
            raise RuntimeError(
                f"{type(self).__name__}: accumulated gradients for {name} have shape {tuple(squared.shape)} "
                f"but the parameter now has shape {tuple(param.shape)} (pruned since?); call zero_grad() "
                f"and accumulate again"
            )
        return squared / self._counts[param]

    def element_scores(self, param: nn.Parameter, name: str) -> torch.Tensor:
        return 0.5 * param.detach().float().pow(2) * self.hessian_diag(param, name)


class GroupHessianImportance(HessianImportance):
    """torch_pruning's name for the group-reduced Hessian criterion; same as :class:`HessianImportance`."""
