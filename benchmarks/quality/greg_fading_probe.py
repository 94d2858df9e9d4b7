"""Probe: GReg-1 on Gemma 3 270M's MLP with compensated fading (not yet a pruner option).

GReg-1 shrinks the chosen MLP neurons over the penalty phase; here, after every penalty step, the change of
their down_proj columns is handed to the kept columns through the least-squares map of the calibration Gram,
``W[:, K] -= (W[:, R] - W_prev[:, R]) @ M.T`` with ``M = (Sigma_KK + 0.01 mean diag)^-1 Sigma_KR``: when the
fade ends the kept columns hold the refit solution, with distillation in between. Same data, steps and
settings as gemma.py's ``greg1:activation`` rows (10 penalty + 6 distillation steps).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality/greg_fading_probe.py --ratios 0.2 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gemma as G  # noqa: E402
import structprune as tp  # noqa: E402


def refit_maps(imp, layers, chosen: dict) -> dict:
    """{layer index: (removed, kept, M)} for each down_proj, from the importance's Gram statistics."""
    maps = {}
    for i, layer in enumerate(layers):
        down = layer.mlp.down_proj
        moment = imp.statistics(down).second_moment().double()
        removed = chosen[i]
        keep = torch.ones(down.in_features, dtype=torch.bool)
        keep[removed] = False
        kept = keep.nonzero().squeeze(1)
        system = moment[kept][:, kept]
        ridge = 0.01 * system.diagonal().mean()
        M = torch.linalg.solve(system + ridge * torch.eye(len(kept), dtype=torch.float64), moment[kept][:, removed])
        maps[i] = (removed, kept, M.float())
    return maps


def faded_greg(bench, ratio: float, recovery: int) -> dict:
    args = bench.args
    model = bench.student()
    imp = G.CALIBRATED["activation"](gram=True)
    with imp.calibrating(model):
        for ids in bench.batches(bench.calibration):
            model(input_ids=ids)
    reg_steps = min(args.reg_steps, recovery)
    delta = tp.pruner.delta_reg_for(args.lr, 1, reg_steps, target_shrink=args.target_shrink)
    pruner = tp.pruner.GrowingRegPruner(model, bench.example(), imp, reg=0.0, delta_reg=delta, schedule="greg1",
                                        reg_ceiling=delta * reg_steps, **bench.pruner_kwargs(model, ratio, "mlp"))
    pruner.update_reg()
    layers = model.model.layers
    chosen = {}
    for i, layer in enumerate(layers):
        key = pruner._group_key(pruner.DG.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels, [0]))
        chosen[i] = pruner._selected[key].clone()
    maps = refit_maps(imp, layers, chosen)
    previous = {i: layer.mlp.down_proj.weight.detach()[:, maps[i][0]].clone() for i, layer in enumerate(layers)}
    model.zero_grad(set_to_none=True)
    optimizer = bench.optimizer(model)

    def each_step():
        pruner.regularize(model, decoupled=True, lr=args.lr)
        pruner.update_reg()
        with torch.no_grad():
            for i, layer in enumerate(layers):
                removed, kept, M = maps[i]
                weight = layer.mlp.down_proj.weight
                weight[:, kept] -= (weight[:, removed] - previous[i]) @ M.T
                previous[i] = weight[:, removed].clone()

    bench.distill(model, optimizer, 0, reg_steps, each_step)
    regularized = bench.measure(model)
    pruner.step(optimizer=optimizer)
    model.zero_grad(set_to_none=True)
    row = dict(method=f"greg1 faded + refit map (activation): {reg_steps} reg + {recovery - reg_steps} distill",
               regularized=regularized, pruned=bench.measure(model), params=G.params(model), widths=G.widths(model))
    bench.distill(model, optimizer, reg_steps, recovery - reg_steps)
    row["final"] = bench.measure(model)
    row["sample"] = G.sample(bench, model)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--recovery-steps", type=int, default=16)
    parser.add_argument("--reg-steps", type=int, default=10)
    parser.add_argument("--json", help="append one JSON line per row here")
    args = parser.parse_args()
    settings = argparse.Namespace(
        target_shrink=1e-3, lr=1e-5, batch_size=2, pool=64, topk=64, length=128, train_length=64, calibration=16,
        held_out=16, seed=0, threads=2, device="cuda" if torch.cuda.is_available() else "cpu",
        cache="~/.cache/structprune/gemma3-270m-float32", reg_steps=args.reg_steps)
    torch.set_num_threads(settings.threads)
    bench = G.Bench(settings)
    print(f"unpruned perplexity {bench.baseline['ppl']:.2f}", flush=True)
    for ratio in args.ratios:
        begun = time.perf_counter()
        torch.manual_seed(settings.seed)
        row = faded_greg(bench, ratio, args.recovery_steps)
        row.update(ratio=ratio, scope="mlp", seconds=time.perf_counter() - begun)
        print(G.table([row], bench.baseline).splitlines()[-1], flush=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(dict(row, baseline=bench.baseline["ppl"], settings=vars(settings))) + "\n")


if __name__ == "__main__":
    main()
