"""Graph build (trace + every group) and prune-everything time for common models at 224x224.

Prints a table; run with `.venv/bin/python benchmarks/graph_speed.py [--repeat 3] [--models a,b]`.
Each figure is the best of ``--repeat`` runs on a fresh model (shared machines are noisy).
Targets: densenet121 build <= 0.4 s and prune <= 0.5 s; densenet201 both together <= 3 s.
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

import structprune as tp

DEFAULT = ["resnet50", "densenet121", "densenet201", "vit_b_16", "efficientnet_b0"]


def measure(name: str, size: int = 224) -> tuple[float, float, int, float]:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    forward = time.perf_counter() - start
    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, x)
    groups = list(graph.get_all_groups())
    built = time.perf_counter() - start
    start = time.perf_counter()
    for group in groups:
        total = len(group[0].idxs)
        root = group[0].dep
        half = graph.get_pruning_group(root.target.module, root.handler, list(range(0, total, 2)))
        if graph.check_pruning_group(half):
            half.prune()
    pruned = time.perf_counter() - start
    return built, pruned, len(groups), forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", default=",".join(DEFAULT))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeat}")
    print(f"{'model':18s} {'groups':>6s} {'forward s':>10s} {'build s':>8s} {'prune s':>8s} {'total s':>8s}")
    for name in args.models.split(","):
        runs = [measure(name) for _ in range(args.repeat)]
        built = min(r[0] for r in runs)
        pruned = min(r[1] for r in runs)
        forward = min(r[3] for r in runs)
        print(f"{name:18s} {runs[0][2]:6d} {forward:10.3f} {built:8.3f} {pruned:8.3f} {built + pruned:8.3f}")


if __name__ == "__main__":
    main()
