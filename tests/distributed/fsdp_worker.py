"""Run by torchrun: growing regularization under FSDP2 (``fully_shard``, gloo, CPU), then the pruning recipe.

1. The penalty reaches the sharded gradients and equals, to 1e-6, what one process computes on the
   unsharded model (same batch on every rank, so FSDP's averaged gradients equal the single-process ones).
2. A pruner cannot be built on the sharded model (clear error); it is built on the unsharded one before
   ``fully_shard``, and the training runs on a sharded copy.
3. Pruning: gather the full state into the unsharded model, update_reg/step there (identically on every
   rank), shard a copy again, train on. Each rank writes its gathered parameters to OUT/rank<k>.pt.
"""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import structprune as tp

FULL = StateDictOptions(full_state_dict=True)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def make_pruner(model):
    return tp.pruner.GrowingRegPruner(model, torch.randn(1, 1, 8, 8), tp.importance.MagnitudeImportance(),
                                      reg=1e-2, delta_reg=5e-2, pruning_ratio=0.5, ignored_layers=[model[-1]])


def shard(model, mesh):
    sharded = copy.deepcopy(model)
    fully_shard(sharded, mesh=mesh)
    return sharded


def loss_of(model, images, labels):
    return nn.functional.cross_entropy(model(images), labels)


def check_penalty_matches_one_process(model, pruner, sharded, mesh):
    reference = copy.deepcopy(model)  # one process, unsharded, same weights and coefficients
    reference_pruner = make_pruner(reference)
    pruner.update_reg()
    reference_pruner.update_reg()
    generator = torch.Generator().manual_seed(7)  # the same batch on every rank
    images, labels = torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    loss_of(sharded, images, labels).backward()
    before = {name: p.grad.full_tensor().clone() for name, p in sharded.named_parameters()}
    pruner.regularize(sharded, bias=True)
    loss_of(reference, images, labels).backward()
    reference_pruner.regularize(reference, bias=True)
    worst, changed = 0.0, 0
    for name, param in sharded.named_parameters():
        full = param.grad.full_tensor()
        worst = max(worst, float((full - reference.get_parameter(name).grad).abs().max()))
        changed += int(not torch.equal(full, before[name]))
    assert worst < 1e-6, f"sharded penalty differs from the single-process one by {worst}"
    assert changed >= 6, f"the penalty reached only {changed} sharded gradients"
    sharded.zero_grad()


def train(sharded, pruner, optimizer, batches):
    for images, labels in batches:
        optimizer.zero_grad()
        loss_of(sharded, images, labels).backward()
        pruner.regularize(sharded)
        optimizer.step()


def main(out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = make_model()
    pruner = make_pruner(model)
    sharded = shard(model, mesh)
    try:
        make_pruner(sharded)
    except RuntimeError as error:
        assert "fully_shard" in str(error) and "0.weight" in str(error), error
    else:
        raise AssertionError("a pruner was built on a sharded model")
    check_penalty_matches_one_process(model, pruner, sharded, mesh)

    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data shard
    batches = [(torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator))
               for _ in range(3)]
    optimizer = torch.optim.SGD(sharded.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        model.load_state_dict(get_model_state_dict(sharded, options=FULL))  # update_reg reads whole channels
        pruner.update_reg()
        train(sharded, pruner, optimizer, batches)

    # prune: gather, prune the unsharded model identically on every rank, shard a copy again
    model.load_state_dict(get_model_state_dict(sharded, options=FULL))
    pruner.step()
    pruner.update_regularizer()
    sharded = shard(model, mesh)
    optimizer = torch.optim.SGD(sharded.parameters(), lr=0.05, momentum=0.9)
    pruner.update_reg()
    train(sharded, pruner, optimizer, batches)
    state = get_model_state_dict(sharded, options=FULL)
    names = {name for name, _ in model.named_parameters()}
    torch.save({name: value.detach().clone() for name, value in state.items() if name in names},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
