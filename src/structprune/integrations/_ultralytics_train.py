"""Ultralytics training that keeps pruned widths, and growing regularization inside it.

``yolo.train(trainer=X)`` takes a trainer class, so both entry points return a subclass of the model's
own task trainer (detect, segment, pose, OBB, classify, RT-DETR):

- ``trainer(yolo)``: Ultralytics rebuilds a model from its yaml before training and copies over only the
  weights whose shapes match, which silently undoes pruning. This trainer trains the pruned model itself
  (and behaves exactly like the stock trainer for models whose shapes match their yaml).
- ``growing_reg_trainer(yolo, ratio, reg_epochs, ...)``: the first ``reg_epochs`` epochs grow a
  per-channel penalty (``update_reg`` at each epoch start, ``regularize`` in an optimizer pre-step hook,
  i.e. after backward, gradient unscaling and clipping, right before the update), then the model is pruned
  (optimizer state sliced, EMA restarted, best checkpoint reset) and the remaining epochs fine-tune it.
  The checkpoints Ultralytics writes after that are pruned models; ``yolo`` holds the best one afterwards.
"""
from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from ._ultralytics_prune import build_pruner, head_name, head_of, is_pruned, make_example_inputs, require_ultralytics

UPDATE_EVERY = ("epoch", "batch")


def _task_trainer(yolo) -> type:
    from ultralytics.engine.model import Model

    if not isinstance(yolo, Model):
        raise TypeError(f"pass the YOLO/RTDETR object whose train() will use this trainer, got {type(yolo).__name__}")
    return yolo.task_map[yolo.task]["trainer"]


def _class_count(model: nn.Module) -> int | None:
    head = head_of(model)
    linear = getattr(head, "linear", None)  # Classify
    if isinstance(linear, nn.Linear):
        return linear.out_features
    return getattr(head, "nc", None)


class _KeepsPrunedWidths:
    """Mixin for a task trainer: ``get_model`` returns the pruned model instead of a yaml rebuild."""

    _structprune_yolo = None  # the YOLO object whose model is trained when Ultralytics passes none

    def get_model(self, cfg=None, weights=None, verbose=True):
        source = weights if isinstance(weights, nn.Module) else getattr(self._structprune_yolo, "model", None)
        if not isinstance(source, nn.Module):
            return super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        if not is_pruned(source):
            # not pruned: exactly the stock behaviour (a yaml model trains from its yaml, weights load)
            return super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        wanted, has = self.data.get("nc"), _class_count(source)
        if wanted is not None and has is not None and wanted != has:
            raise ValueError(
                f"{head_name(source)} ({type(head_of(source)).__name__}) of the pruned model predicts {has} classes but "
                f"the dataset {self.args.data} has {wanted}; train on data with {has} classes (or prune a model "
                f"built for {wanted} classes)"
            )
        model = copy.deepcopy(source)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model


class _GrowingReg(_KeepsPrunedWidths):
    """Mixin: growing regularization for ``reg_epochs`` epochs, then one pruning step, then fine-tuning."""

    _structprune_options: dict = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        options = self._structprune_options
        if getattr(self, "ddp", False) or getattr(self, "world_size", 0) > 1:
            raise RuntimeError("growing_reg_trainer trains on one device; multi-GPU (DDP) training re-launches "
                               "the trainer in subprocesses that cannot rebuild this class: pass device=0")
        if self.args.resume:
            raise RuntimeError("growing_reg_trainer cannot resume: the penalties are not in Ultralytics' checkpoints; "
                               "start a new run (or fine-tune the pruned checkpoint with trainer(yolo))")
        if options["reg_epochs"] >= self.args.epochs:
            raise ValueError(f"reg_epochs={options['reg_epochs']} leaves no epoch to prune and fine-tune in "
                             f"epochs={self.args.epochs}; use epochs > reg_epochs")
        self.pruner = None
        self.pruned_epoch = None
        self.summary = None
        self._regularize_hook = None
        self.add_callback("on_pretrain_routine_end", _GrowingReg._start)
        self.add_callback("on_train_epoch_start", _GrowingReg._epoch_start)
        if options["update_every"] == "batch":
            self.add_callback("on_train_batch_end", _GrowingReg._batch_end)

    def _model(self) -> nn.Module:
        from ultralytics.utils.torch_utils import unwrap_model

        return unwrap_model(self.model)

    def _start(self) -> None:
        from ..pruner import GrowingRegPruner

        options = dict(self._structprune_options)
        if self.args.compile:
            raise RuntimeError("growing_reg_trainer needs an uncompiled model (pruning changes its shapes): "
                               "pass compile=False")
        model = self._model()
        inputs = make_example_inputs(model, options.pop("imgsz") or min(int(self.args.imgsz), 640))
        for key in ("reg_epochs", "update_every", "prune_when_ready"):
            options.pop(key)
        self.pruner = build_pruner(model, GrowingRegPruner, options.pop("importance"), example_inputs=inputs,
                                   pruning_ratio=options.pop("ratio"), **options)
        # after backward, AMP unscaling and clipping, right before the update: the seed's place for it
        self._regularize_hook = self.optimizer.register_step_pre_hook(self._regularize)

    def _regularize(self, optimizer, args, kwargs) -> None:
        self.pruner.regularize(self._model())

    def _epoch_start(self) -> None:
        if self.pruned_epoch is not None:
            return
        options = self._structprune_options
        if self.epoch >= options["reg_epochs"] or (options["prune_when_ready"] and self.pruner.ready_to_prune()):
            self._prune()
        elif options["update_every"] == "epoch":
            self.pruner.update_reg()

    def _batch_end(self) -> None:
        if self.pruned_epoch is None:
            self.pruner.update_reg()

    def _prune(self) -> None:
        from ultralytics.utils import LOGGER
        from ultralytics.utils.torch_utils import EarlyStopping, ModelEMA

        from ..utils import count_params

        model = self._model()
        before = count_params(model)
        self._regularize_hook.remove()
        self.pruner.step(optimizer=self.optimizer)
        self.pruned_epoch = self.epoch
        model.zero_grad(set_to_none=True)
        # the EMA copy, its pairing with the model's tensors and the best fitness describe the unpruned model
        self.ema = ModelEMA(self.model)
        self.best_fitness = None
        self.stopper = EarlyStopping(patience=self.args.patience)
        best = Path(self.best)
        if best.exists():
            best.replace(best.with_name("best_unpruned.pt"))
        self.summary = {"params_before": before, "params_after": count_params(model), "epoch": self.epoch}
        LOGGER.info(f"structprune: pruned at epoch {self.epoch + 1}: params {before:,} -> {self.summary['params_after']:,}"
                    f"; fine-tuning for {self.epochs - self.epoch} epochs")


def trainer(yolo) -> type:
    """A trainer class for ``yolo.train(data=..., trainer=trainer(yolo))`` that trains a pruned model as it is.

    ``yolo`` is the ``YOLO``/``RTDETR`` object (pruned in memory or loaded from a pruned checkpoint).
    """
    require_ultralytics()
    base = _task_trainer(yolo)
    return type(f"Pruned{base.__name__}", (_KeepsPrunedWidths, base), {"_structprune_yolo": yolo})


def growing_reg_trainer(yolo, ratio: float = 0.5, reg_epochs: int = 1, importance=None, *, reg: float = 1e-4,
                        delta_reg: float = 1e-4, schedule: str = "seed", update_every: str = "epoch",
                        prune_when_ready: bool = False, imgsz: int | None = None, **pruner_kwargs) -> type:
    """A trainer class: growing regularization for ``reg_epochs`` epochs, pruning ``ratio`` of the channels,
    fine-tuning for the remaining ``epochs - reg_epochs`` epochs of ``yolo.train(epochs=...)``.

    ``update_reg`` runs at each epoch start (``update_every="batch"``: after every batch, for GReg-1's
    per-iteration growth); with ``prune_when_ready`` pruning comes at the first epoch start where
    ``pruner.ready_to_prune()``, at the latest after ``reg_epochs``. ``reg``, ``delta_reg``, ``schedule`` and
    ``pruner_kwargs`` go to ``GrowingRegPruner``. After training, ``yolo.trainer.pruner`` is the pruner,
    ``yolo.trainer.summary`` the parameter counts, and ``yolo`` holds the best pruned checkpoint.
    """
    require_ultralytics()
    if update_every not in UPDATE_EVERY:
        raise ValueError(f"update_every must be one of {UPDATE_EVERY}, got {update_every!r}")
    if not isinstance(reg_epochs, int) or reg_epochs < 0:
        raise ValueError(f"reg_epochs must be a non-negative integer, got {reg_epochs!r}")
    base = _task_trainer(yolo)
    options = dict(ratio=ratio, reg_epochs=reg_epochs, importance=importance, reg=reg, delta_reg=delta_reg,
                   schedule=schedule, update_every=update_every, prune_when_ready=prune_when_ready, imgsz=imgsz,
                   **pruner_kwargs)
    return type(f"GrowingReg{base.__name__}", (_GrowingReg, base),
                {"_structprune_yolo": yolo, "_structprune_options": options})
