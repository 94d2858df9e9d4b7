"""Run by torchrun: growing-regularization training under DistributedDataParallel (gloo, CPU).

Each rank trains on its own shard, regularizes every step, updates reg every epoch, prunes, re-wraps the
pruned model and trains on; it then writes its parameters to OUT/rank<k>.pt for the test to compare.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import structprune as tp


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def train(ddp, pruner, optimizer, batches):
    for images, labels in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(images), labels).backward()
        pruner.regularize(ddp.module, bias=True)
        optimizer.step()


def main(out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = make_model()
    example = torch.randn(1, 1, 8, 8)
    pruner = tp.pruner.GrowingRegPruner(model, example, tp.importance.MagnitudeImportance(), reg=1e-4,
                                        delta_reg=1e-2, pruning_ratio=0.5, ignored_layers=[model[-1]])
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data shard
    batches = [(torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator))
               for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ddp = DistributedDataParallel(model)
    for _ in range(2):
        pruner.update_reg()
        train(ddp, pruner, optimizer, batches)
    del ddp  # the old reducer's buckets describe the unpruned shapes
    pruner.step(optimizer=optimizer)
    pruner.update_regularizer()
    ddp = DistributedDataParallel(model)
    pruner.update_reg()
    train(ddp, pruner, optimizer, batches)
    # parameters, not buffers: DDP re-broadcasts BatchNorm statistics at the start of each forward only
    torch.save({name: p.detach().clone() for name, p in model.named_parameters()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
