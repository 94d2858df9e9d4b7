"""The demo pipeline: baseline -> growing regularization -> prune -> fine-tune, plus a one-shot
magnitude-pruning ablation; measures every stage and writes the report folder."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..importance import MagnitudeImportance
from ..pruner import BasePruner, GrowingRegPruner
from ..serialization import save_pruned
from . import plots
from .data import DigitsData, load_digits_split
from .model import build_model, example_inputs, ignored_layers
from .report import StageMetrics, format_table, measure_stage, write_summary
from .train import PhaseLog, TrainConfig, fit, regularize_seed, regularize_until_ready

METHODS = ("growing_reg", "greg1", "magnitude")
ABLATION = "magnitude"

TRAIN = TrainConfig()  # lr 0.05, momentum 0.9, weight decay 5e-4, batch 64 (see train.py)
BIAS = True  # regularize the BatchNorm biases too: a crushed channel then outputs exactly ReLU(0) = 0
# "seed" schedule (update_reg once per epoch): the least important channel of each group gains
# SEED_TOTAL_GROWTH over the whole phase whatever the number of epochs (tuned in benchmarks/greg_digits.py)
SEED_REG = 1e-4
SEED_TOTAL_GROWTH = 0.07
# GReg-1 (update_reg every iteration until ready_to_prune()); see benchmarks/greg_digits.py
GREG1_REG = 1e-4
GREG1_DELTA = 1e-4
GREG1_CEILING = 1.0


@dataclass(frozen=True)
class DemoConfig:
    """What ``structprune demo`` runs.

    ``epochs`` sets the baseline and seed-schedule regularization epochs; fine-tuning gets half of it
    (at least one) and GReg-1 at most three times it (it usually stops earlier, at ``ready_to_prune()``).
    """

    ratio: float = 0.75
    method: str = "growing_reg"
    epochs: int = 10
    seed: int = 0
    out: Path | None = None
    show_progress: bool = True
    latency_repeat: int = 30
    threads: int = 1  # 8x8 convs gain nothing from more threads; one thread is also reproducible

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must lie in [0, 1), got {self.ratio}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @property
    def finetune_epochs(self) -> int:
        return max(1, self.epochs // 2)


@dataclass
class MethodRun:
    """One method's stages, accuracy curve (all epochs plus the point right after pruning) and records."""

    stages: dict[str, StageMetrics] = field(default_factory=dict)
    curve: list[float] = field(default_factory=list)
    prune_point: int = 0
    reg_history: list = field(default_factory=list)
    channel_norms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    regularization_iterations: int = 0


@dataclass
class DemoResult:
    """What the CLI prints and where the report went."""

    summary: dict[str, Any]
    table: str
    out: Path


def run_demo(config: DemoConfig) -> DemoResult:
    """Run the whole demo and write the report folder (``config.out`` or ``runs/demo-<timestamp>``)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run_demo(config)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(config: DemoConfig) -> DemoResult:
    started = time.perf_counter()
    out = Path(config.out) if config.out is not None else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    data = load_digits_split(config.seed)

    model = build_model(config.seed)
    baseline_log = fit(model, data, config.epochs, TRAIN, _generator(config.seed), "baseline",
                       config.show_progress)
    baseline = measure_stage(model, data, config.latency_repeat)
    ablation_model = copy.deepcopy(model) if config.method != ABLATION else None

    main, pruner = _run_method(model, data, config, config.method, baseline, baseline_log)
    save_pruned(model, out / "pruned_model", history=pruner.pruning_history())
    sections = {config.method: main.stages}
    runs = {config.method: main}
    if ablation_model is not None:
        ablation, _ = _run_method(ablation_model, data, config, ABLATION, baseline, baseline_log)
        ablation.stages.pop("after_regularization")  # there is none: the row would repeat the baseline
        sections[ABLATION] = ablation.stages
        runs[ABLATION] = ablation

    files = _write_plots(out, main, runs)
    summary = {
        "config": {**asdict(config), "out": str(out), "train": asdict(TRAIN), "bias": BIAS,
                   "finetune_epochs": config.finetune_epochs, "hyperparameters": _hyperparameters(config)},
        "stages": {stage: metrics.to_dict() for stage, metrics in main.stages.items()},
        "ablation": {"method": ABLATION, "stages": {s: m.to_dict() for s, m in runs[ABLATION].stages.items()}}
        if ablation_model is not None else None,
        "accuracy_curves": {method: run.curve for method, run in runs.items()},
        "prune_points": {method: run.prune_point for method, run in runs.items()},
        "reg_history": main.reg_history,
        "regularization_iterations": main.regularization_iterations,
        "channel_norms": main.channel_norms,
        "files": sorted(files + ["pruned_model", "summary.json"]),
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_summary(out / "summary.json", summary)
    return DemoResult(summary, format_table(sections), out)


def _run_method(model: nn.Module, data: DigitsData, config: DemoConfig, method: str,
                baseline: StageMetrics, baseline_log: PhaseLog) -> tuple[MethodRun, BasePruner]:
    """Regularize (unless one-shot), prune and fine-tune ``model`` in place, measuring each stage."""
    run = MethodRun(stages={"baseline": baseline}, curve=list(baseline_log.accuracy))
    generator = _generator(config.seed + 1 + METHODS.index(method))  # each method its own data order
    pruner = _make_pruner(model, method, config)
    if method == "growing_reg":
        log = regularize_seed(model, pruner, data, config.epochs, TRAIN, generator, bias=BIAS,
                              desc="regularize (seed)", show_progress=config.show_progress)
    elif method == "greg1":
        log = regularize_until_ready(model, pruner, data, TRAIN, generator, update_every=1,
                                     max_epochs=3 * config.epochs, bias=BIAS, desc="regularize (GReg-1)",
                                     show_progress=config.show_progress)
    else:
        log = PhaseLog()
    run.curve += log.accuracy
    run.reg_history = log.reg
    run.regularization_iterations = log.iterations
    run.stages["after_regularization"] = (
        measure_stage(model, data, config.latency_repeat) if log.iterations else baseline
    )

    run.channel_norms = prune_and_record_norms(pruner)
    run.stages["after_pruning"] = measure_stage(model, data, config.latency_repeat)
    run.curve.append(run.stages["after_pruning"].accuracy)
    run.prune_point = len(run.curve)

    finetune = fit(model, data, config.finetune_epochs, TRAIN, generator, f"fine-tune ({method})",
                   config.show_progress)
    run.curve += finetune.accuracy
    run.stages["after_finetuning"] = measure_stage(model, data, config.latency_repeat)
    return run, pruner


def _make_pruner(model: nn.Module, method: str, config: DemoConfig) -> BasePruner:
    common = dict(importance=MagnitudeImportance(p=2), pruning_ratio=config.ratio,
                  ignored_layers=ignored_layers(model))
    if method == "growing_reg":
        return GrowingRegPruner(model, example_inputs(), reg=SEED_REG,
                                delta_reg=SEED_TOTAL_GROWTH / config.epochs, schedule="seed", **common)
    if method == "greg1":
        return GrowingRegPruner(model, example_inputs(), reg=GREG1_REG, delta_reg=GREG1_DELTA,
                                schedule="greg1", reg_ceiling=GREG1_CEILING, **common)
    return BasePruner(model, example_inputs(), **common)


def prune_and_record_norms(pruner: BasePruner) -> dict[str, dict[str, list[float]]]:
    """Run one pruning step and return, per pruned group, the root layer's per-output-channel L2 weight
    norms just before removal, split into kept and removed channels."""
    norms = {}
    for group in pruner.step(interactive=True):
        root = group[0].dep.target
        # every root here is a Conv2d or Linear: output channels on dim 0 of the weight
        channel_norms = root.module.weight.detach().flatten(1).norm(dim=1).tolist()
        removed = set(group[0].idxs)
        norms[root.name] = {
            "kept": [value for index, value in enumerate(channel_norms) if index not in removed],
            "removed": [value for index, value in enumerate(channel_norms) if index in removed],
        }
        group.prune()
    return norms


def _write_plots(out: Path, main: MethodRun, runs: dict[str, MethodRun]) -> list[str]:
    paths = [
        plots.plot_reg_growth(main.reg_history, out / plots.REG_GROWTH),
        plots.plot_channel_norms(main.channel_norms, out / plots.CHANNEL_NORMS),
        plots.plot_accuracy({m: r.curve for m, r in runs.items()}, {m: r.prune_point for m, r in runs.items()},
                            out / plots.ACCURACY),
    ]
    return [path.name for path in paths]


def _hyperparameters(config: DemoConfig) -> dict[str, float]:
    if config.method == "growing_reg":
        return {"reg": SEED_REG, "delta_reg": SEED_TOTAL_GROWTH / config.epochs}
    if config.method == "greg1":
        return {"reg": GREG1_REG, "delta_reg": GREG1_DELTA, "reg_ceiling": GREG1_CEILING, "update_every": 1}
    return {}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


__all__ = ["DemoConfig", "DemoResult", "METHODS", "run_demo", "prune_and_record_norms"]
