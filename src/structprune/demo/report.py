"""Measurements of one model state (a table row), the printed table and ``summary.json``."""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..serialization import save_pruned
from ..utils import count_ops_and_params, measure_latency
from .data import DigitsData
from .model import example_inputs
from .train import evaluate

#: Row names, in pipeline order, and how the table labels them.
STAGES = {
    "baseline": "baseline",
    "after_regularization": "after regularization",
    "after_pruning": "right after pruning",
    "after_finetuning": "after fine-tuning",
}
#: Keys whose values depend on the machine's load, not on the seed.
TIMING_KEYS = ("latency_b1_ms", "latency_b64_ms", "seconds")


@dataclass(frozen=True)
class StageMetrics:
    """One row of the report: accuracy, size and speed of a model state."""

    accuracy: float
    params: int
    macs: int
    latency_b1_ms: float
    latency_b64_ms: float
    file_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_stage(model: nn.Module, data: DigitsData, latency_repeat: int = 30) -> StageMetrics:
    """Accuracy on the test split, params, MACs (batch 1), CPU latency at batch 1 and 64, saved size."""
    macs, params = count_ops_and_params(model, example_inputs(1))
    with torch.no_grad():
        latency_1, _ = measure_latency(model, example_inputs(1), repeat=latency_repeat, warmup=3)
        latency_64, _ = measure_latency(model, example_inputs(64), repeat=max(1, latency_repeat // 3), warmup=2)
    return StageMetrics(
        accuracy=evaluate(model, data.x_test, data.y_test),
        params=int(params),
        macs=int(macs),
        latency_b1_ms=latency_1,
        latency_b64_ms=latency_64,
        file_bytes=saved_size(model),
    )


def saved_size(model: nn.Module) -> int:
    """Bytes on disk of ``tp.save_pruned(model, ...)`` (weights and plan), the form a user ships."""
    with tempfile.TemporaryDirectory() as folder:
        path = save_pruned(model, Path(folder) / "model")
        return sum(file.stat().st_size for file in path.iterdir())


def format_table(sections: dict[str, dict[str, StageMetrics]]) -> str:
    """A fixed-width table: one block of rows per method (``{method: {stage: metrics}}``)."""
    header = (f"{'method':<14} {'stage':<22} {'acc':>6} {'params':>9} {'MACs':>10} "
              f"{'ms@b1':>7} {'ms@b64':>7} {'file KB':>8}")
    lines = [header, "-" * len(header)]
    for method, stages in sections.items():
        for stage, metrics in stages.items():
            lines.append(
                f"{method:<14} {STAGES.get(stage, stage):<22} {metrics.accuracy:>6.3f} {metrics.params:>9,} "
                f"{metrics.macs:>10,} {metrics.latency_b1_ms:>7.3f} {metrics.latency_b64_ms:>7.3f} "
                f"{metrics.file_bytes / 1024:>8.1f}"
            )
    return "\n".join(lines)


def write_summary(path: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary`` as indented JSON (StageMetrics become dicts)."""
    path.write_text(json.dumps(summary, indent=1, default=_to_json))
    return path


def without_timings(value: Any) -> Any:
    """``value`` with every machine-dependent timing field dropped (for same-seed comparisons)."""
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items() if key not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def _to_json(value: Any) -> Any:
    if isinstance(value, StageMetrics):
        return value.to_dict()
    raise TypeError(f"cannot write {type(value).__name__} to summary.json")
