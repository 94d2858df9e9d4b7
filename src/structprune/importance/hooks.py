"""Calibration by forward hooks, shared by the criteria that gather statistics (OBDC, the activation criteria)."""
from __future__ import annotations

from torch import nn


class HookedStatistics:
    """Mixin: hooks on every ``target_types`` layer, statistics in ``self._stats``, torch_pruning's call forms.

    The host defines ``target_types`` and ``_on_forward(layer, inputs, output)`` and calls
    :meth:`_init_hooks` from its constructor.
    """

    def _init_hooks(self) -> None:
        self._stats: dict = {}
        self._names: dict = {}  # layer -> module path, for errors raised inside hooks
        self._hooks: list = []

    def register(self, model: nn.Module) -> None:
        """Hook every ``target_types`` layer of ``model`` (replacing hooks of an earlier call)."""
        self.remove_hooks()
        self._names = {}
        for name, module in model.named_modules():
            if isinstance(module, self.target_types):
                self._names[module] = name
                self._hooks.append(module.register_forward_hook(self._on_forward))
        if not self._hooks:
            raise ValueError(f"{type(self).__name__}.register: no layer of {self.target_types} in the model")

    def remove_hooks(self) -> None:
        """Detach the hooks; the statistics gathered so far stay."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def zero_grad(self) -> None:
        """Forget every accumulated statistic."""
        self._stats = {}

    reset = zero_grad

    # -- torch_pruning's spelling of the same steps -----------------------------------------------------
    def _prepare_model(self, model: nn.Module, pruner=None) -> None:
        """``register(model)``; ``pruner`` is accepted for torch_pruning's call form."""
        self.register(model)

    def step(self) -> None:
        """torch_pruning calls this after each calibration pass; the hooks already folded it in, so this only
        checks that hooks are attached (statistics would silently be missing)."""
        if not self._hooks:
            raise RuntimeError(f"{type(self).__name__}.step(): no hooks are attached; call register(model) "
                               f"(torch_pruning: _prepare_model(model, pruner)) before the calibration passes")

    def _rm_hooks(self, model: nn.Module | None = None) -> None:
        self.remove_hooks()

    def _clear_buffer(self) -> None:
        self.zero_grad()

    def _name(self, layer: nn.Module) -> str:
        return self._names.get(layer, type(layer).__name__)
