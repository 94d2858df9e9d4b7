"""The demo's PNG figures, drawn with matplotlib's Agg canvas (no display, no global pyplot state)."""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REG_GROWTH = "reg_growth.png"
CHANNEL_NORMS = "channel_norms.png"
ACCURACY = "accuracy.png"


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)  # attaches the Agg canvas: savefig then never touches a GUI backend
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_reg_growth(reg_history: list[dict[str, dict[str, float]]], path: Path) -> Path:
    """Mean (solid) and max (dashed) reg coefficient of each group after each regularization epoch."""
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    if not reg_history:
        axes.text(0.5, 0.5, "no regularization phase for this method", ha="center", va="center")
    else:
        epochs = list(range(1, len(reg_history) + 1))
        for group in reg_history[0]:
            mean = [entry[group]["mean"] for entry in reg_history]
            peak = [entry[group]["max"] for entry in reg_history]
            (line,) = axes.plot(epochs, mean, marker="o", markersize=3, label=group.split(":")[0])
            axes.plot(epochs, peak, linestyle="--", color=line.get_color())
        axes.set_yscale("log")
        axes.legend(fontsize=8, title="group root (solid mean, dashed max)", title_fontsize=8)
    axes.set_xlabel("regularization epoch")
    axes.set_ylabel("reg coefficient")
    axes.set_title("Growing regularization per group")
    return _save(figure, path)


def plot_channel_norms(norms: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Per group, histograms of the root layer's per-channel L2 norms at prune time, kept vs removed."""
    count = max(1, len(norms))
    columns = min(2, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows))
    if not norms:
        figure.add_subplot().text(0.5, 0.5, "nothing pruned", ha="center", va="center")
    for index, (group, values) in enumerate(norms.items(), start=1):
        axes = figure.add_subplot(rows, columns, index)
        every = values["kept"] + values["removed"]
        # log-spaced bins: regularized channels sit orders of magnitude below the kept ones
        low = max(min(every), 1e-12)
        high = max(max(every), low * 10)
        bins = [low * (high / low) ** (step / 30) for step in range(31)]
        axes.hist([max(v, low) for v in values["kept"]], bins=bins, alpha=0.7, label=f"kept ({len(values['kept'])})")
        axes.hist([max(v, low) for v in values["removed"]], bins=bins, alpha=0.7,
                  label=f"removed ({len(values['removed'])})")
        axes.set_xscale("log")
        axes.set_title(group, fontsize=9)
        axes.set_xlabel("channel weight L2 norm", fontsize=8)
        axes.legend(fontsize=7)
    return _save(figure, path)


def plot_accuracy(curves: dict[str, list[float]], prune_epochs: dict[str, int], path: Path) -> Path:
    """Test accuracy after every epoch of every method; ``prune_epochs[method]`` is the (1-based) point of
    the curve measured right after pruning, marked by a dotted line."""
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    for method, accuracy in curves.items():
        (line,) = axes.plot(range(1, len(accuracy) + 1), accuracy, marker="o", markersize=3, label=method)
        if method in prune_epochs:
            axes.axvline(prune_epochs[method], linestyle=":", color=line.get_color())
    axes.set_xlabel("epoch: baseline, regularization, pruning (dotted), fine-tuning")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1.02)
    axes.set_title("Accuracy per epoch (dotted: pruning)")
    axes.legend(fontsize=8)
    return _save(figure, path)
