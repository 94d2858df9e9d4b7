"""Quality against parameters kept, one point per row that benchmarks/quality/gemma.py wrote with --json.

Run:  .venv/bin/python benchmarks/quality/plot.py rows.jsonl docs/img/gemma_quality.png
One panel per scope; hollow markers are the model right after pruning (one-shot, no training), filled ones after
the recovery steps; the dashed line is the unpruned perplexity. Rows written twice (a re-run) keep the last.
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
        for name in names:
            mine = [row for row in chosen if family(row["method"]) == name]
            if not mine:
                continue
            kept = [row["params"] / row["unpruned_params"] for row in mine]
            axis.scatter(kept, [row["pruned"]["ppl"] for row in mine], facecolors="none",
                         edgecolors=[colours[name]], marker="o")
            finals = [(k, row["final"]["ppl"]) for k, row in zip(kept, mine) if "final" in row]
            if finals:
                axis.plot(*zip(*finals), marker="o", color=colours[name], label=name)
            else:
                axis.scatter([], [], facecolors="none", edgecolors=[colours[name]], label=f"{name} (one-shot)")
        axis.axhline(chosen[0]["baseline"], color="grey", linestyle="--", linewidth=1, label="unpruned")
        axis.set_yscale("log")
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
