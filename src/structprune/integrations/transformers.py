"""Growing regularization inside the Hugging Face ``Trainer``: one callback.

::

    pruner = tp.pruner.GrowingRegPruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(),
                                        reg=1e-4, delta_reg=1e-2, pruning_ratio=0.5, ignored_layers=[model.lm_head])
    callback = tp.integrations.transformers.GrowingRegCallback(pruner, prune_at_step=200, save_dir="pruned")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    model = AutoModelForCausalLM.from_pretrained("pruned")

Events used: ``on_epoch_begin`` / ``on_step_begin`` grow the penalty (``update_reg``), ``on_pre_optimizer_step``
adds it to the gradients (after backward and gradient clipping, right before ``optimizer.step()``),
``on_step_end`` prunes at ``prune_at_step`` or, with ``prune_when_ready``, once ``pruner.ready_to_prune()``;
the optimizer's state is sliced to the pruned shapes (the Trainer's optimizer, usually wrapped by
accelerate, keeps working because structprune keeps parameter identity), and ``on_train_end`` writes a
``save_pretrained`` checkpoint whose config follows the pruned shapes. Single-process training only
(``on_train_begin`` refuses more): under DDP/FSDP/DeepSpeed the wrappers describe the unpruned shapes.

Importing this module imports transformers (``pip install transformers accelerate``).
"""
from __future__ import annotations

import warnings
from torch import nn


UPDATE_EVERY = ("epoch", "step")


try:
    from transformers import TrainerCallback
except ImportError as _error:
    raise ImportError(f"structprune.integrations.transformers needs the 'transformers' package ({_error}): "
                      f"pip install transformers accelerate") from None


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (which keeps it as ``.optimizer``)."""
    seen = set()
    while optimizer is not None and hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


class GrowingRegCallback(TrainerCallback):
    """Growing regularization, pruning and a ``save_pretrained`` checkpoint inside ``Trainer.train()``.

    ``pruner``: a ``GrowingRegPruner`` built on the Trainer's model. ``update_reg`` runs every
    ``update_interval`` epochs (``update_every="epoch"``) or optimizer steps (``"step"``); pruning comes at
    optimizer step ``prune_at_step`` and/or, with ``prune_when_ready``, once ``pruner.ready_to_prune()``.
    ``save_dir``: where ``on_train_end`` writes ``model.save_pretrained``. After pruning ``pruned_step``,
    ``params_before`` and ``params_after`` say what happened.
    """

    def __init__(self, pruner, update_every: str = "epoch", update_interval: int = 1,
                 prune_at_step: int | None = None, prune_when_ready: bool = False, save_dir: str | None = None,
                 regularize_bias: bool = False):
        if not hasattr(pruner, "update_reg") or not hasattr(pruner, "regularize"):
            raise TypeError(f"GrowingRegCallback needs a pruner with update_reg() and regularize() "
                            f"(tp.pruner.GrowingRegPruner), got {type(pruner).__name__}")
        if update_every not in UPDATE_EVERY:
            raise ValueError(f"update_every must be one of {UPDATE_EVERY}, got {update_every!r}")
        if not isinstance(update_interval, int) or update_interval <= 0:
            raise ValueError(f"update_interval must be a positive integer, got {update_interval!r}")
        if prune_at_step is None and not prune_when_ready:
            raise ValueError("say when to prune: prune_at_step=N (an optimizer step) and/or prune_when_ready=True")
        self.pruner = pruner
        self.update_every = update_every
        self.update_interval = update_interval
        self.prune_at_step = prune_at_step
        self.prune_when_ready = prune_when_ready
        self.save_dir = save_dir
        self.regularize_bias = regularize_bias
        self.pruned_step: int | None = None
        self.params_before: int | None = None
        self.params_after: int | None = None

    # -- the penalty -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        processes = getattr(args, "world_size", 1)
        if processes > 1:
            raise ValueError(f"GrowingRegCallback runs in one process; this Trainer runs {processes} (DDP, FSDP or "
                             f"DeepSpeed), whose wrappers keep the unpruned shapes: regularize and prune in a "
                             f"single-process run, then fine-tune the pruned model from its save_pretrained checkpoint")
        if model is not None and model is not self.pruner.model:
            raise ValueError(f"the pruner was built on a {type(self.pruner.model).__name__} that is not the "
                             f"Trainer's model ({type(model).__name__}); build it on trainer.model")

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = int(round(state.epoch or 0))
        if self.pruned_step is None and self.update_every == "epoch" and epoch % self.update_interval == 0:
            self.pruner.update_reg()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.pruned_step is None and self.update_every == "step" and state.global_step % self.update_interval == 0:
            self.pruner.update_reg()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.pruned_step is None:
            self.pruner.regularize(model if model is not None else self.pruner.model, bias=self.regularize_bias)

    # -- pruning -----------------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.pruned_step is not None:
            return
        due = self.prune_at_step is not None and state.global_step >= self.prune_at_step
        if due or (self.prune_when_ready and self.pruner.ready_to_prune()):
            self.prune(model if model is not None else self.pruner.model, optimizer, state.global_step)

    def prune(self, model: nn.Module, optimizer=None, step: int = 0) -> None:
        """Prune now; the optimizer's moments are sliced to the new shapes."""
        self.params_before = sum(p.numel() for p in model.parameters())
        self.pruner.step(optimizer=unwrap_optimizer(optimizer))
        model.zero_grad(set_to_none=True)
        self.pruned_step = step
        self.params_after = sum(p.numel() for p in model.parameters())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.pruned_step is None:
            warnings.warn(f"GrowingRegCallback: training ended at step {state.global_step} before pruning "
                          f"(prune_at_step={self.prune_at_step}, prune_when_ready={self.prune_when_ready}); "
                          f"the model was only regularized", stacklevel=2)
        if self.save_dir is not None:
            target = model if model is not None else self.pruner.model
            target.save_pretrained(self.save_dir)
