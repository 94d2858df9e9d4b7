"""Graph build + all groups + one 50% step() on a Hugging Face Llama with grouped-query attention.

Config: hidden 256, 8 heads, 2 key/value heads, intermediate 688, random init, for 2, 8 and 32 layers.
Targets: 32 layers in <= 15 s on a 2-core machine, and 32 layers <= 20x the 2-layer time.
Peak memory is the process's peak resident set size after each run (it only grows). Each size is
measured ``--repeat`` times on a fresh model and the fastest run is kept: the 2-layer time is half a
second, so one noisy run would swing the ratio by several x.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

import structprune as tp


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def measure(layers: int):
    model = build(layers)
    ids = {"input_ids": torch.randint(0, 1000, (1, 32))}
    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, ids)
    groups = list(graph.get_all_groups())
    built = time.perf_counter() - start
    start = time.perf_counter()
    pruner = tp.pruner.BasePruner(model, ids, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                                  prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.lm_head])
    pruner.step()
    stepped = time.perf_counter() - start
    assert model(**ids).logits.shape[-1] == 1000
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return len(groups), built, stepped, peak_mb


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,8,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeat}")
    print(f"{'layers':>6s} {'groups':>6s} {'graph+groups s':>14s} {'pruner+step s':>13s} {'total s':>8s} {'peak RSS MB':>11s}")
    first = None
    for layers in (int(v) for v in args.layers.split(",")):
        runs = [measure(layers) for _ in range(args.repeat)]
        groups, built, stepped, peak = min(runs, key=lambda run: run[1] + run[2])
        peak = max(run[3] for run in runs)
        total = built + stepped
        first = first or total
        print(f"{layers:6d} {groups:6d} {built:14.3f} {stepped:13.3f} {total:8.3f} {peak:11.0f}   x{total / first:.1f}")


if __name__ == "__main__":
    main()
