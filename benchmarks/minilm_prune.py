"""Pruning a real pretrained transformer: all-MiniLM-L6-v2 on standard-library docstring sentences.

Quality: embeddings of held-out sentences (mean pooling, as sentence-transformers does for this model),
pruned vs original: mean cosine and top-1 nearest-neighbour agreement. Every pruned model is a
``SentenceEmbedder``: the encoder plus a Linear(384, 384) that starts as the identity and is trained with
the rest (it maps a pruned hidden width back to the original embedding space).

Scopes: ``ffn_heads`` prunes MLP neurons and whole attention heads by the ratio (the hidden width stays);
``hidden`` prunes the hidden width by the ratio as well. Methods, each followed by the same distillation:

  l2, taylor     one-shot pruning (L2 magnitude; first-order Taylor of the distillation loss with dropout on,
                 gradients summed over --calibration batches), then distillation. Measured after
                 --distill-steps (same distillation as the rest) and after --reg-steps + --distill-steps
                 ("then distill, equal steps": the same total training as the growing-regularization runs).
  activation, wanda, fluct
                 the same, choosing by the activation-aware criteria (tp.importance.ActivationImportance,
                 WandaImportance, FluctuationImportance), calibrated by forward passes (eval mode) on the same
                 --calibration batches Taylor takes its gradients from.
  <criterion>+refit
                 the same, with compensation="refit": the layers reading the removed channels are refitted by
                 least squares on the calibration inputs at removal (the importance gathers Gram matrices).
  greg1[:<crit>] GReg-1: channels chosen once (by <crit>, default --greg1-importance), their reg grows every
                 iteration while distilling for --reg-steps, then exactly they are removed and --distill-steps
                 follow. greg1:activation chooses by the calibrated activation norm; greg1:activation+refit
                 adds compensation="refit", given during the fade (GrowingRegPruner's compensate_fade).
  greg2          GReg-2: every channel's reg grows uniformly, then the smallest (L2) are removed.
  seed           the seed schedule: update_reg() --seed-updates times, growing by standardized L2 importance.

Distillation runs without dropout (--distill-dropout; calibration keeps it, Taylor needs it), and GReg's
penalty phase trains at --reg-lr, lower than --lr: the student then still sits next to the teacher, and
AdamW's normalised steps at 3e-4 on that small, noisy loss move it away faster than the penalty does (see
docs/growing_regularization.md). Every penalty is applied decoupled (``regularize(model, bias=True, decoupled=True, lr=lr)`` after
AdamW's step) with delta_reg from ``tp.pruner.delta_reg_for`` (--target-shrink). Distillation: AdamW at
--lr, loss ``1 - cosine`` to the unpruned model's embedding plus the squared difference of the in-batch
cosine-similarity matrices (``structprune.demo.minilm.distillation_loss``).

Run (the defaults are docs/growing_regularization.md's settings; every (ratio, scope, method) run costs --reg-steps +
--distill-steps training steps of --batch-size sentences plus building a pruner: 1.5 to 3 minutes on 2 shared,
loaded CPU cores, so the page's GReg-1 table (--methods taylor greg1) takes about 5 minutes a cell; the
criteria table is --reg-steps 0 --distill-steps 0 with the one-shot methods, under 20 minutes for all cells):
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/minilm_prune.py --ratios 0.5 --methods taylor greg1 \
        --cache /tmp/minilm.pt
Every default method at all three ratios takes a few hours on such a machine: run the ratios one at a time.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from torch import nn

import structprune as tp
from structprune.demo.minilm import (SentenceEmbedder, agreement, distillation_loss, embed, load_minilm,
                                     shuffled_batch, tokenize)
from structprune.demo.sentences import split_sentences, stdlib_sentences

CRITERIA = ("l2", "taylor", "activation", "wanda", "fluct")
CALIBRATED = {"activation": tp.importance.ActivationImportance, "wanda": tp.importance.WandaImportance,
              "fluct": tp.importance.FluctuationImportance}
ONE_SHOT = CRITERIA + tuple(f"{name}+refit" for name in CALIBRATED)
GREG = (("greg1",) + tuple(f"greg1:{name}" for name in CRITERIA) + tuple(f"greg1:{name}+refit" for name in CALIBRATED)
        + ("greg2", "seed"))
METHODS = ONE_SHOT + GREG
DEFAULT_METHODS = ONE_SHOT + ("greg1", "greg1:activation", "greg2", "seed")
SCOPES = ("ffn_heads", "hidden")


class Setup:
    """Everything the runs share: data, the teacher's embeddings, the unpruned model."""

    def __init__(self, args):
        self.args = args
        self.tokenizer, encoder = load_minilm()
        train, held_out = split_sentences(stdlib_sentences(), held_out=args.held_out, train=args.train_sentences,
                                          seed=args.seed)
        self.train, self.held_out = train, held_out
        self.teacher_model = SentenceEmbedder(encoder).eval()
        self.eval_batches = tokenize(self.tokenizer, held_out, 64, args.max_length)
        key = (tuple(train), tuple(held_out), args.max_length)
        cached = torch.load(args.cache) if args.cache and os.path.exists(args.cache) else None
        if cached is not None and cached["key"] == key:
            self.teacher_eval, self.teacher_train = cached["eval"], cached["train"]
            return
        self.teacher_eval = embed(self.teacher_model, self.eval_batches)
        # the teacher's embedding of every training sentence, once: distillation then costs no teacher pass
        self.teacher_train = embed(self.teacher_model, tokenize(self.tokenizer, train, 64, args.max_length))
        if args.cache:
            torch.save({"key": key, "eval": self.teacher_eval, "train": self.teacher_train}, args.cache)

    def student(self) -> SentenceEmbedder:
        return copy.deepcopy(self.teacher_model).train()

    def batch(self, generator):
        return shuffled_batch(self.tokenizer, self.train, self.args.batch_size, generator, self.args.max_length)

    def loss(self, model, batch):
        return distillation_loss(model(**batch.inputs()), self.teacher_train[batch.index])

    def measure(self, model) -> dict:
        return agreement(embed(model, self.eval_batches), self.teacher_eval)


def pruner_options(model: SentenceEmbedder, ratio: float, scope: str) -> dict:
    encoder = model.encoder
    num_heads = {layer.attention.self.query: layer.attention.self.num_attention_heads for layer in encoder.encoder.layer}
    ignored = [model.projection]
    if scope == "ffn_heads":
        ignored.append(encoder.embeddings.word_embeddings)  # the hidden width's group holds it: left alone
    return dict(pruning_ratio=ratio, prune_num_heads=True, head_pruning_ratio=ratio, num_heads=num_heads,
                ignored_layers=ignored)


def example(setup: Setup) -> dict:
    """Two short sentences: tracing replays channel labels through every op at the example's size, so a
    64 x 64 batch costs minutes where this costs seconds."""
    return tokenize(setup.tokenizer, ["Return the sum of the values.", "Create a new empty list of names."], 2)[0].inputs()


def adamw(model, lr: float) -> torch.optim.Optimizer:
    # fused: a quarter of the time of the default CPU implementation over 22 M parameters
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)


def calibrate(setup: Setup, model, generator) -> None:
    """Sum gradients of the distillation loss over --calibration batches, dropout on (the unpruned student
    equals the teacher: without dropout every gradient would be zero)."""
    model.train()
    model.zero_grad()
    for _ in range(setup.args.calibration):
        setup.loss(model, setup.batch(generator)).backward()


def importance_for(setup: Setup, model, criterion: str, generator, gram: bool = False):
    """The criterion, calibrated on --calibration batches drawn from ``generator`` (Taylor and the activation
    criteria draw the same batches, so the distillation that follows sees the same ones too)."""
    if criterion == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if criterion == "taylor":
        calibrate(setup, model, generator)
        return tp.importance.TaylorImportance()
    importance = CALIBRATED[criterion](gram=gram)
    model.eval()  # the activations the unpruned model computes, without dropout's noise
    with importance.calibrating(model):
        for _ in range(setup.args.calibration):
            model(**setup.batch(generator).inputs())
    model.train()
    return importance


def set_dropout(model, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def distill(setup: Setup, model, steps: int, generator, optimizer=None, each_step=None) -> torch.optim.Optimizer:
    optimizer = optimizer or adamw(model, setup.args.lr)
    model.train()
    if setup.args.distill_dropout is not None:
        set_dropout(model, setup.args.distill_dropout)  # after calibration, which needs dropout (Taylor)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        setup.loss(model, setup.batch(generator)).backward()
        optimizer.step()
        if each_step is not None:
            each_step()
    return optimizer


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_one_shot(setup: Setup, method: str, ratio: float, scope: str) -> list[dict]:
    args = setup.args
    generator = torch.Generator().manual_seed(args.seed + 1)
    model = setup.student()
    criterion, _, compensation = method.partition("+")
    importance = importance_for(setup, model, criterion, generator, gram=compensation == "refit")
    # GrowingRegPruner without regularization is BasePruner plus rescale_norms (LayerNorms that lose channels
    # keep their output scale), which the GrowingReg runs get too: Taylor at 50% with the hidden width,
    # right after pruning, 0.36 cosine with it, 0.30 without
    pruner = tp.pruner.GrowingRegPruner(model, example(setup), importance, reg=0.0, delta_reg=0.0,
                                        compensation=compensation or None, **pruner_options(model, ratio, scope))
    pruner.step()
    model.zero_grad(set_to_none=True)
    pruned = setup.measure(model)
    optimizer = distill(setup, model, args.distill_steps, generator)
    after = setup.measure(model)
    distill(setup, model, args.reg_steps, generator, optimizer)
    equal = setup.measure(model)
    return [dict(method=method, variant=f"{method} + {args.distill_steps} distill", pruned=pruned, final=after,
                 steps=args.distill_steps, params=params(model)),
            dict(method=method, variant=f"{method} + {args.reg_steps + args.distill_steps} distill (equal steps)",
                 pruned=pruned, final=equal, steps=args.reg_steps + args.distill_steps, params=params(model))]


def run_greg(setup: Setup, method: str, ratio: float, scope: str) -> list[dict]:
    args = setup.args
    generator = torch.Generator().manual_seed(args.seed + 1)
    model = setup.student()
    lr, steps = args.reg_lr or args.lr, args.reg_steps
    schedule, _, criterion = method.partition(":")
    if schedule == "greg1":
        criterion = criterion or args.greg1_importance
    criterion, _, compensation = criterion.partition("+")
    if schedule == "seed":
        updates, every = args.seed_updates, max(1, steps // args.seed_updates)
    else:
        updates, every = max(1, round(steps * args.fade)), 1
    # GReg-1 chooses its channels once, at the first update_reg(), by the criterion calibrated here; GReg-2
    # and the seed schedule grow by L2 magnitude
    importance = importance_for(setup, model, criterion or "l2", generator, gram=compensation == "refit")
    target = args.target_shrink if schedule == "greg1" else args.uniform_target_shrink
    delta = tp.pruner.delta_reg_for(lr, every, updates, target_shrink=target)
    # the reg stops growing after `updates` and holds there for the rest of the phase
    pruner = tp.pruner.GrowingRegPruner(model, example(setup), importance, reg=0.0, delta_reg=delta,
                                        schedule=schedule, reg_ceiling=delta * updates,
                                        compensation=compensation or None, **pruner_options(model, ratio, scope))
    optimizer = adamw(model, lr)
    counter = {"step": 0, "updates": 1}

    def each_step():
        pruner.regularize(model, bias=True, decoupled=True, lr=lr)
        counter["step"] += 1
        if counter["step"] % every == 0 and counter["updates"] < updates:
            pruner.update_reg()
            counter["updates"] += 1

    pruner.update_reg()
    model.zero_grad(set_to_none=True)
    distill(setup, model, steps, generator, optimizer, each_step)
    regularized = setup.measure(model)
    for group in optimizer.param_groups:
        group["lr"] = args.lr
    pruner.step(optimizer=optimizer)
    pruned = setup.measure(model)
    distill(setup, model, args.distill_steps, generator, optimizer)
    final = setup.measure(model)
    fade = f" (grows over {updates})" if schedule != "seed" and updates < steps else ""
    faded = f" + {compensation} during the fade" if compensation else ""
    name = f"greg1 ({criterion}{faded})" if schedule == "greg1" else method
    return [dict(method=method, variant=f"{name}{fade}: {steps} reg + {args.distill_steps} distill", regularized=regularized,
                 pruned=pruned, final=final, steps=steps + args.distill_steps, params=params(model))]


def format_table(rows: list[dict]) -> str:
    lines = ["| ratio | scope | method | params | steps | after reg cos / NN | right after pruning cos / NN "
             "| after distillation cos / NN |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        reg = row.get("regularized")
        reg_text = f"{reg['cosine']:.3f} / {reg['nn']:.3f}" if reg else ""
        lines.append(f"| {row['ratio']:.0%} | {row['scope']} | {row['variant']} | {row['params'] / 1e6:.2f} M | "
                     f"{row['steps']} | {reg_text} | {row['pruned']['cosine']:.3f} / {row['pruned']['nn']:.3f} | "
                     f"{row['final']['cosine']:.3f} / {row['final']['nn']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=SCOPES)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                        help="one-shot <criterion>[+refit] then distillation; greg1[:<criterion>], greg2, seed")
    parser.add_argument("--reg-steps", type=int, default=32, help="growing-regularization steps")
    parser.add_argument("--distill-steps", type=int, default=16, help="distillation steps after pruning")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per sentence (longer ones are cut)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--distill-dropout", type=float, default=0.0,
                        help="dropout probability while distilling (the model's own is 0.1: with it, 32 steps of "
                             "distilling the unpruned model leave 0.943 cosine / 0.605 NN to itself)")
    parser.add_argument("--reg-lr", type=float, default=1e-4,
                        help="AdamW's lr (and the penalty's, through delta_reg_for) in the GReg phase, where the "
                             "student is still close to the teacher; --lr after removal")
    parser.add_argument("--target-shrink", type=float, default=1e-3,
                        help="norm left to the most penalised channels by the end (tp.pruner.delta_reg_for)")
    parser.add_argument("--uniform-target-shrink", type=float, default=0.3,
                        help="the same for GReg-2 and the seed schedule, which penalise every channel")
    parser.add_argument("--fade", type=float, default=1.0,
                        help="fraction of --reg-steps over which GReg-1/GReg-2 grow; then the reg holds")
    parser.add_argument("--greg1-importance", choices=CRITERIA, default="taylor",
                        help="the criterion plain 'greg1' chooses its channels by")
    parser.add_argument("--seed-updates", type=int, default=5, help="update_reg() calls of the seed schedule")
    parser.add_argument("--calibration", type=int, default=4,
                        help="calibration batches: gradients for Taylor, forward passes for the activation criteria")
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--train-sentences", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", help="file keeping the unpruned model's embeddings between runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    setup = Setup(args)
    print(f"{len(setup.train)} training / {len(setup.held_out)} held-out sentences; unpruned "
          f"{params(setup.teacher_model) / 1e6:.2f} M parameters; setup {time.perf_counter() - started:.0f} s",
          flush=True)
    rows = []
    for ratio in args.ratios:
        for scope in args.scopes:
            for method in args.methods:
                begun = time.perf_counter()
                runner = run_one_shot if method in ONE_SHOT else run_greg
                for row in runner(setup, method, ratio, scope):
                    row.update(ratio=ratio, scope=scope)
                    rows.append(row)
                    print(format_table([row]).splitlines()[-1] + f" {time.perf_counter() - begun:.0f} s", flush=True)
    print()
    print(format_table(rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
