"""Quality against parameters kept, one point per row that benchmarks/quality/gemma.py wrote with --json.

Run:  .venv/bin/python benchmarks/quality/plot.py rows.jsonl docs/img/gemma_quality.png
One panel per scope; hollow markers are the model right after pruning (one-shot, no training), filled ones after
the recovery steps; the dashed line is the unpruned perplexity; points beyond 10x it sit on the top edge. Rows
written twice (a re-run) keep the last.
"""
from __future__ import annotations

import json
import sys


def load(path: str) -> list[dict]:
    rows = {}
    with open(path) as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                rows[(row["scope"], row["ratio"], row["method"])] = row
    return list(rows.values())


def family(method: str) -> str:
    """The method without its step count: one colour per method across ratios."""
    return method.split(" -> ")[0].split(":")[0]


#: perplexities above this many times the unpruned one are drawn at the top edge (L2 reaches 10^7)
CEILING = 10.0


def _clip(values: list[float], top: float) -> list[float]:
    return [min(v, top) for v in values]


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = sorted({row["scope"] for row in rows})
    figure, axes = plt.subplots(1, len(scopes), figsize=(6 * len(scopes), 4.5), squeeze=False)
    names = sorted({family(row["method"]) for row in rows})
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    for axis, scope in zip(axes[0], scopes):
        chosen = sorted((row for row in rows if row["scope"] == scope), key=lambda row: row["params"])
        top = CEILING * chosen[0]["baseline"]
        for name in names:
            mine = [row for row in chosen if family(row["method"]) == name]
            if not mine:
                continue
            kept = [row["params"] / row["unpruned_params"] for row in mine]
            axis.scatter(kept, _clip([row["pruned"]["ppl"] for row in mine], top), facecolors="none",
                         edgecolors=[colours[name]], marker="o")
            finals = [(k, min(row["final"]["ppl"], top)) for k, row in zip(kept, mine) if "final" in row]
            if finals:
                axis.plot(*zip(*finals), marker="o", color=colours[name], label=name)
            else:
                axis.scatter([], [], facecolors="none", edgecolors=[colours[name]], label=f"{name} (one-shot)")
        axis.axhline(chosen[0]["baseline"], color="grey", linestyle="--", linewidth=1, label="unpruned")
        axis.set_yscale("log")
        axis.set_ylim(chosen[0]["baseline"] * 0.9, top * 1.1)
        axis.text(0.01, 0.98, f"points at the top edge: {CEILING:g}x the unpruned perplexity or more",
                  transform=axis.transAxes, fontsize=7, va="top")
        axis.set_xlabel("parameters kept (fraction of the unpruned model)")
        axis.set_ylabel("held-out perplexity (log)")
        axis.set_title(f"Gemma 3 270M, scope {scope}")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} rows.jsonl out.png")
    plot(load(sys.argv[1]), sys.argv[2])
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
