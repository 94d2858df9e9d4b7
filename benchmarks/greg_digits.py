"""Growing regularization vs one-shot magnitude pruning on the digits CNN, 75% of channels removed.

Variants, all from the same trained baseline (10 epochs, SGD lr 0.05 momentum 0.9, cosine decay):

  (a) one-shot magnitude pruning (L2, per layer) of the baseline;
  (b) GrowingRegPruner, documented "seed" schedule: update_reg() once per epoch for N=10 epochs,
      regularize(bias=True) every step, reg=1e-4, delta_reg=1e-2 (so the least important channel of each
      group ends at 0.1);
  (c) GReg-1 (schedule="greg1"): update_reg() every iteration (k=1), delta_reg=1e-4, reg_ceiling=1.0,
      regularize(bias=True), until ready_to_prune() (at most 30 epochs).

Each is measured after regularization, right after pruning (no fine-tuning) and after 5 fine-tuning epochs
(cosine decay). The classifier's last Linear is never pruned. Run:  .venv/bin/python benchmarks/greg_digits.py

Tuning notes (seed 0; "right after pruning" accuracy):
  seed schedule, N=10: delta_reg 1e-3 -> 0.49, 3e-3 -> 0.53..0.69, 1e-2 -> 0.83..0.91, 3e-2 -> 0.66,
  1e-1 -> 0.30 (everything, kept channels included, gets crushed: the seed rule grows every channel by
  delta_reg * standardized importance, so with a large delta_reg even the median channel is penalised hard).
  GReg-1, k=1: delta_reg 1e-4 -> 0.992, 2e-4 -> 0.987, 3e-4 -> 0.972, 1e-3 -> 0.975, 1e-2 -> 0.95 (growing
  too fast leaves the network no time to move the function onto the kept channels). GReg-1 stops well before
  reg reaches the ceiling: ready_to_prune() turns True once the kept channels' mean magnitude is 1e4 times
  that of the removed ones (~400 iterations at delta_reg 1e-4).

Measured 2025-11-24, 2-core CPU container (torch 2.14.1, shared machine), seeds 0, 1, 2:

RESULTS_PLACEHOLDER

Targets: unpruned ~0.99; GReg-1 right after pruning >= 0.98; seed schedule >= 0.6 right after pruning;
one-shot magnitude ~0.25 right after pruning; every variant within 1 point of the unpruned model after
fine-tuning.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

import structprune as tp
from structprune.demo.data import DigitsData, load_digits_split
from structprune.demo.model import build_model, example_inputs, ignored_layers
from structprune.demo.train import TrainConfig, evaluate, fit, regularize_seed, regularize_until_ready

RATIO = 0.75
BASELINE_EPOCHS = 10
FINETUNE_EPOCHS = 5
TRAIN = TrainConfig()
SEED_SCHEDULE = {"reg": 1e-4, "delta_reg": 1e-2, "epochs": 10}
GREG1 = {"reg": 1e-4, "delta_reg": 1e-4, "reg_ceiling": 1.0, "update_every": 1, "max_epochs": 30}


@dataclass
class Row:
    """One variant's measurements."""

    variant: str
    after_reg: float
    after_prune: float
    after_finetune: float
    params: int
    macs: int
    reg_iterations: int
    seconds: float


def train_baseline(data: DigitsData, seed: int) -> nn.Module:
    """The unpruned CNN every variant starts from."""
    model = build_model(seed)
    fit(model, data, BASELINE_EPOCHS, TRAIN, torch.Generator().manual_seed(seed), "baseline", show_progress=False)
    return model


def run_variant(variant: str, baseline: nn.Module, data: DigitsData, seed: int, bias: bool = True,
                seed_schedule: dict | None = None, greg1: dict | None = None) -> Row:
    """Regularize (unless one-shot), prune to RATIO, fine-tune; measure each stage."""
    seed_schedule = {**SEED_SCHEDULE, **(seed_schedule or {})}
    greg1 = {**GREG1, **(greg1 or {})}
    model = copy.deepcopy(baseline)
    generator = torch.Generator().manual_seed(seed + 100)
    started = time.perf_counter()
    common = dict(importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=RATIO,
                  ignored_layers=ignored_layers(model))
    iterations = 0
    if variant == "magnitude":
        pruner = tp.pruner.BasePruner(model, example_inputs(), **common)
    elif variant == "seed":
        pruner = tp.pruner.GrowingRegPruner(model, example_inputs(), reg=seed_schedule["reg"],
                                            delta_reg=seed_schedule["delta_reg"], schedule="seed", **common)
        iterations = regularize_seed(model, pruner, data, seed_schedule["epochs"], TRAIN, generator, bias=bias,
                                     show_progress=False).iterations
    elif variant == "greg1":
        pruner = tp.pruner.GrowingRegPruner(model, example_inputs(), reg=greg1["reg"], delta_reg=greg1["delta_reg"],
                                            schedule="greg1", reg_ceiling=greg1["reg_ceiling"], **common)
        iterations = regularize_until_ready(model, pruner, data, TRAIN, generator,
                                            update_every=greg1["update_every"], max_epochs=greg1["max_epochs"],
                                            bias=bias, show_progress=False).iterations
    else:
        raise ValueError(f"unknown variant {variant!r}")
    after_reg = evaluate(model, data.x_test, data.y_test)
    pruner.step()
    after_prune = evaluate(model, data.x_test, data.y_test)
    fit(model, data, FINETUNE_EPOCHS, TRAIN, generator, "fine-tune", show_progress=False)
    macs, params = tp.utils.count_ops_and_params(model, example_inputs())
    return Row(variant, after_reg, after_prune, evaluate(model, data.x_test, data.y_test), int(params), int(macs),
               iterations, time.perf_counter() - started)


def format_rows(rows: list[Row]) -> str:
    header = (f"{'seed':>4} {'variant':<10} {'after reg':>9} {'pruned':>7} {'+5 ft':>6} {'params':>8} "
              f"{'MACs':>10} {'reg iters':>9} {'s':>5}")
    lines = [header, "-" * len(header)]
    for seed, row in rows:
        lines.append(f"{seed:>4} {row.variant:<10} {row.after_reg:>9.3f} {row.after_prune:>7.3f} "
                     f"{row.after_finetune:>6.3f} {row.params:>8,} {row.macs:>10,} {row.reg_iterations:>9} "
                     f"{row.seconds:>5.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["magnitude", "seed", "greg1"])
    parser.add_argument("--seed-delta", type=float, default=SEED_SCHEDULE["delta_reg"])
    parser.add_argument("--seed-epochs", type=int, default=SEED_SCHEDULE["epochs"])
    parser.add_argument("--greg1-delta", type=float, default=GREG1["delta_reg"])
    parser.add_argument("--no-bias", action="store_true", help="regularize(bias=False)")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        data = load_digits_split(seed)
        baseline = train_baseline(data, seed)
        macs, params = tp.utils.count_ops_and_params(baseline, example_inputs())
        accuracy = evaluate(baseline, data.x_test, data.y_test)
        rows.append((seed, Row("unpruned", accuracy, accuracy, accuracy, int(params), int(macs), 0, 0.0)))
        for variant in args.variants:
            row = run_variant(variant, baseline, data, seed, bias=not args.no_bias,
                              seed_schedule={"delta_reg": args.seed_delta, "epochs": args.seed_epochs},
                              greg1={"delta_reg": args.greg1_delta})
            rows.append((seed, row))
            print(format_rows([(seed, row)]).splitlines()[-1], flush=True)
    print()
    print(format_rows(rows))
    if len(args.seeds) > 1:
        print("\nmean over seeds (right after pruning / after fine-tuning):")
        for variant in ["unpruned", *args.variants]:
            picked = [row for _, row in rows if row.variant == variant]
            print(f"  {variant:<10} {statistics.fmean(r.after_prune for r in picked):.3f} / "
                  f"{statistics.fmean(r.after_finetune for r in picked):.3f}")


if __name__ == "__main__":
    main()
