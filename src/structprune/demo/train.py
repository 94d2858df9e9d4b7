"""Training loops shared by ``structprune demo`` and ``benchmarks/greg_digits.py``.

Plain SGD with momentum on the digits tensors; the growing-regularization phases call
``pruner.regularize`` between ``backward()`` and ``optimizer.step()`` as the pruner asks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import DigitsData, iterate_batches, num_batches

if TYPE_CHECKING:
    from ..pruner import GrowingRegPruner


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and batching settings of one training phase."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64


@dataclass
class PhaseLog:
    """What a phase recorded: test accuracy after each epoch and, for regularization phases, the
    mean and max reg coefficient of each group after each epoch (``{group: {"mean": .., "max": ..}}``)."""

    accuracy: list[float] = field(default_factory=list)
    reg: list[dict[str, dict[str, float]]] = field(default_factory=list)
    iterations: int = 0


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD over the model's current parameters (build a new one after pruning)."""
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode (the mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = 0
    for xb, yb in iterate_batches(x, y, batch_size):
        correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was_training)
    return correct / len(y)


def train_epoch(
    model: nn.Module,
    data: DigitsData,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    batch_size: int,
    regularize: Callable[[], None] | None = None,
    after_iteration: Callable[[], bool] | None = None,
    progress: tqdm | None = None,
) -> bool:
    """One pass over the training set; returns False when ``after_iteration`` asked to stop early.

    ``regularize`` runs after ``backward()`` and before ``optimizer.step()`` (the pruner's contract);
    ``after_iteration`` runs after each step and returns True to stop the phase.
    """
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    for xb, yb in iterate_batches(data.x_train, data.y_train, batch_size, generator):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        if regularize is not None:
            regularize()
        optimizer.step()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if after_iteration is not None and after_iteration():
            return False
    return True


def fit(
    model: nn.Module,
    data: DigitsData,
    epochs: int,
    config: TrainConfig,
    generator: torch.Generator,
    desc: str = "train",
    show_progress: bool = True,
) -> PhaseLog:
    """Plain training for ``epochs`` epochs (baseline and fine-tuning); logs test accuracy per epoch.

    The learning rate follows a cosine decay to zero over the phase, so the last epoch, the one reported,
    does not land on a noisy high-lr point.
    """
    log = PhaseLog()
    optimizer = make_optimizer(model, config)
    steps = num_batches(len(data.y_train), config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps))
    with tqdm(total=epochs * steps, desc=desc, disable=not show_progress, leave=False) as bar:
        for _ in range(epochs):
            train_epoch(model, data, optimizer, generator, config.batch_size, after_iteration=schedule_stepper(schedule),
                        progress=bar)
            log.iterations += steps
            log.accuracy.append(evaluate(model, data.x_test, data.y_test))
            bar.set_description(f"{desc} acc={log.accuracy[-1]:.3f}")
    return log


def regularize_seed(
    model: nn.Module,
    pruner: "GrowingRegPruner",
    data: DigitsData,
    epochs: int,
    config: TrainConfig,
    generator: torch.Generator,
    bias: bool = False,
    desc: str = "regularize",
    show_progress: bool = True,
) -> PhaseLog:
    """The documented schedule: ``update_reg()`` at the start of each epoch, ``regularize()`` every step."""
    log = PhaseLog()
    optimizer = make_optimizer(model, config)
    steps = num_batches(len(data.y_train), config.batch_size)
    with tqdm(total=epochs * steps, desc=desc, disable=not show_progress, leave=False) as bar:
        for _ in range(epochs):
            pruner.update_reg()
            train_epoch(model, data, optimizer, generator, config.batch_size,
                        regularize=lambda: pruner.regularize(model, bias=bias), progress=bar)
            log.iterations += steps
            log.accuracy.append(evaluate(model, data.x_test, data.y_test))
            log.reg.append(reg_per_group(pruner))
            bar.set_description(f"{desc} acc={log.accuracy[-1]:.3f}")
    return log


def regularize_until_ready(
    model: nn.Module,
    pruner: "GrowingRegPruner",
    data: DigitsData,
    config: TrainConfig,
    generator: torch.Generator,
    update_every: int = 1,
    max_epochs: int = 20,
    stabilize_iterations: int = 0,
    bias: bool = False,
    desc: str = "greg",
    show_progress: bool = True,
) -> PhaseLog:
    """The paper's schedules (GReg-1/GReg-2): ``update_reg()`` every ``update_every`` iterations until
    ``ready_to_prune()``, then ``stabilize_iterations`` more with the reg held, at most ``max_epochs``.

    A phase cut short mid-epoch still logs the accuracy and reg it ended with.
    """
    log = PhaseLog()
    optimizer = make_optimizer(model, config)
    steps = num_batches(len(data.y_train), config.batch_size)
    state = {"iteration": 0, "ready_at": None}

    def after_iteration() -> bool:
        state["iteration"] += 1
        if state["ready_at"] is None:
            if state["iteration"] % update_every == 0:
                pruner.update_reg()
                # ready_to_prune() scores every group: only worth asking when the reg just changed
                if pruner.ready_to_prune():
                    state["ready_at"] = state["iteration"]
            return state["ready_at"] is not None and stabilize_iterations == 0
        return state["iteration"] - state["ready_at"] >= stabilize_iterations

    pruner.update_reg()
    with tqdm(total=max_epochs * steps, desc=desc, disable=not show_progress, leave=False) as bar:
        for _ in range(max_epochs):
            finished_epoch = train_epoch(model, data, optimizer, generator, config.batch_size,
                                         regularize=lambda: pruner.regularize(model, bias=bias),
                                         after_iteration=after_iteration, progress=bar)
            log.accuracy.append(evaluate(model, data.x_test, data.y_test))
            log.reg.append(reg_per_group(pruner))
            bar.set_description(f"{desc} acc={log.accuracy[-1]:.3f}")
            if not finished_epoch:
                break
    log.iterations = state["iteration"]
    return log


def schedule_stepper(schedule: torch.optim.lr_scheduler.LRScheduler) -> Callable[[], bool]:
    """An ``after_iteration`` callback that advances the learning-rate schedule."""

    def step() -> bool:
        schedule.step()
        return False  # never stops the phase

    return step


def reg_per_group(pruner: "GrowingRegPruner") -> dict[str, dict[str, float]]:
    """Mean and max regularization coefficient of each group, keyed by the group's readable name."""
    stats = {}
    for group in pruner._reg_groups:
        values = pruner.group_reg[group]
        stats[pruner._group_key(group)] = {"mean": float(values.mean()), "max": float(values.max())}
    return stats
