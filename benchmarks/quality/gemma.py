"""Pruning a real pretrained LLM: Gemma 3 270M, one-shot criteria and compensation, then recovery at equal steps.

Quality: perplexity on held-out English text (the last tenth of the Book of Mormon, never trained or calibrated
on) and greedy top-1 agreement with the unpruned model on the same tokens.

Scopes: ``mlp`` prunes the MLP width only (attention, embeddings and hidden width whole); ``mlp_heads`` also
removes whole query heads (Gemma 3 270M has 4 query heads sharing 1 kv head: whole query heads go, the kv head
stays) by the same ratio.

Methods (one-shot, no training): ``l2`` (MagnitudeImportance p=2), ``taylor`` (TaylorImportance, gradients of
the language-model loss summed over the calibration batches), ``activation`` / ``wanda`` / ``fluct``
(ActivationImportance / WandaImportance / FluctuationImportance calibrated on the same batches), each with
``--compensation`` none / bias / refit where the criterion gathers statistics.

Recovery (``--recovery-steps N``): distillation from the unpruned model (KL of the student's distribution to the
teacher's, both restricted to the teacher's top-``--topk`` tokens at each position, precomputed once), AdamW on
every non-embedding parameter, the same N steps for every method:
  oneshot:<method>[+comp]   prune one-shot, then N distillation steps
  greg1:<method>            GReg-1 (Wang et al. 2021): the channels <method> chooses get a growing decoupled L2
                            penalty while distilling for --reg-steps, then exactly they are removed and the
                            remaining N - reg-steps distillation steps follow
  greg1:<method>+refit      GReg-1 with compensation="refit": the layers reading the chosen channels take back
                            their fading columns' change after every step (GrowingRegPruner's compensate_fade)
  greg2:<method>            GReg-2: every channel's penalty grows alike (milder target), then <method> picks
  seed:<method>             the seed document's schedule: penalties grow by delta x standardized importance

Run (the defaults give docs/benchmarks.md's table; a few minutes per recovery run on 2 CPU cores, much faster on a GPU):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality/gemma.py --ratios 0.2 --scopes mlp
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import structprune as tp  # noqa: E402
from gemma_data import TextSplits, evaluate, load_gemma  # noqa: E402
from structprune.utils.distill import TopKTeacher, distillation_loss  # noqa: E402

CRITERIA = ("l2", "taylor", "activation", "wanda", "fluct")
SCHEDULES = ("greg1", "greg2", "seed")
CALIBRATED = {"activation": tp.importance.ActivationImportance, "wanda": tp.importance.WandaImportance,
              "fluct": tp.importance.FluctuationImportance}


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.teacher, self.tokenizer = load_gemma(args.cache)
        self.teacher.to(self.device)
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.data = TextSplits(self.tokenizer, args.length, args.held_out, seed=args.seed)
        self.calibration = self.data.calibration(args.calibration)
        started = time.perf_counter()
        self.baseline = evaluate(self.teacher, self.data.held_out)
        self.eval_seconds = time.perf_counter() - started
        self._targets = None

    # -- pruning ----------------------------------------------------------------------------------------
    def student(self) -> nn.Module:
        model = copy.deepcopy(self.teacher)
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def importance(self, model, criterion: str, compensation: str | None):
        if criterion == "l2":
            return tp.importance.MagnitudeImportance(p=2)
        if criterion == "taylor":
            model.zero_grad()
            for ids in self.batches(self.calibration):
                model(input_ids=ids, labels=ids).loss.backward()
            return tp.importance.TaylorImportance()
        imp = CALIBRATED[criterion](gram=compensation == "refit")
        with imp.calibrating(model):
            for ids in self.batches(self.calibration):
                model(input_ids=ids)
        return imp

    def batches(self, sequences, size: int = 4):
        for start in range(0, len(sequences), size):
            yield sequences[start:start + size].to(self.device)

    def pruner_kwargs(self, model, ratio: float, scope: str) -> dict:
        kwargs = dict(pruning_ratio=ratio, ignored_layers=[model.lm_head, model.model.embed_tokens])
        attention = [m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
        if scope == "mlp":
            kwargs["ignored_layers"] += attention
        else:  # whole query heads: the single kv head stays, head dims stay (rotary)
            kwargs.update(prune_num_heads=True, head_pruning_ratio=ratio, prune_head_dims=False)
        return kwargs

    def example(self):
        return {"input_ids": self.calibration[:1, :16].to(self.device)}

    # -- recovery ---------------------------------------------------------------------------------------
    def targets(self) -> TopKTeacher:
        """Training sequences with the teacher's top-k logits at every position, computed once (kept in
        float32, as the tables were measured)."""
        if self._targets is None:
            args = self.args
            sequences = torch.cat([self.data.training_batch(step, args.batch_size, args.train_length)
                                   for step in range(args.pool // args.batch_size)])
            self._targets = TopKTeacher(self.teacher, sequences, k=args.topk, batch_size=args.batch_size,
                                        dtype=torch.float32)
        return self._targets

    def optimizer(self, model) -> torch.optim.Optimizer:
        model.model.embed_tokens.weight.requires_grad_(False)  # tied to lm_head: 168 M of the 268 M parameters
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.args.lr, weight_decay=0.0)

    def distill(self, model, optimizer, first_step: int, steps: int, each_step=None) -> None:
        model.train()
        for step in range(first_step, first_step + steps):
            optimizer.zero_grad(set_to_none=True)
            distillation_loss(model, self.targets(), step, self.args.batch_size).backward()
            optimizer.step()
            if each_step is not None:
                each_step()
        model.eval()

    def measure(self, model) -> dict:
        result = evaluate(model, self.data.held_out, self.baseline["top1"])
        return {"ppl": result["ppl"], "agreement": result["agreement"]}


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def widths(model) -> str:
    config = model.config
    return f"mlp {config.intermediate_size}, {config.num_attention_heads} q heads"


def one_shot(bench: Bench, criterion: str, compensation: str | None, ratio: float, scope: str,
             recovery: int) -> dict:
    model = bench.student()
    imp = bench.importance(model, criterion, compensation)
    pruner = tp.pruner.BasePruner(model, bench.example(), imp, compensation=compensation,
                                  **bench.pruner_kwargs(model, ratio, scope))
    pruner.step()
    model.zero_grad(set_to_none=True)
    row = dict(method=f"{criterion}" + (f" + {compensation}" if compensation else ""), pruned=bench.measure(model),
               params=params(model), widths=widths(model))
    if recovery:
        bench.distill(model, bench.optimizer(model), 0, recovery)
        row["final"] = bench.measure(model)
    row["model"] = model
    return row


def greg(bench: Bench, schedule: str, criterion: str, ratio: float, scope: str, recovery: int) -> dict:
    """A growing-regularization run over the same ``recovery`` steps: ``--reg-steps`` distillation steps with a
    growing decoupled penalty, step(), then distillation for the rest.

    greg1: only the channels ``criterion`` chooses at the first update_reg() grow, and exactly they go.
    seed:  every channel grows by delta_reg x its standardized importance; step() picks by the same importance.
    greg2: every channel grows alike (to --greg2-target-shrink, milder: a uniform 1e-3 would erase the model);
           step() picks by ``criterion`` at the end.
    """
    args = bench.args
    model = bench.student()
    heads_first = schedule == "greg1" and scope == "mlp_heads" and args.heads_refit
    if heads_first:
        # the heads one-shot with Activation + refit (refit re-solves o_proj for the heads that stay, which a
        # fading penalty cannot), then GReg-1 on the MLP alone over the same steps
        head_imp = bench.importance(model, "activation", "refit")
        mlp = [m for layer in model.model.layers for m in layer.mlp.modules() if isinstance(m, nn.Linear)]
        kwargs = bench.pruner_kwargs(model, ratio, "mlp_heads")
        kwargs["ignored_layers"] = kwargs["ignored_layers"] + mlp
        tp.pruner.BasePruner(model, bench.example(), head_imp, compensation="refit", **kwargs).step()
        scope = "mlp"
    # greg1:activation+refit: the refit's compensation given during the fade (GrowingRegPruner's compensate_fade)
    criterion, _, compensation = criterion.partition("+")
    compensation = compensation or None
    imp = bench.importance(model, criterion, compensation)
    reg_steps = min(args.reg_steps, recovery)
    target = args.greg2_target_shrink if schedule == "greg2" else args.target_shrink
    reg_lr = args.reg_lr or args.lr  # the penalty phase's AdamW lr; the distillation after it runs at --lr
    delta = tp.pruner.delta_reg_for(reg_lr, 1, reg_steps, target_shrink=target)
    pruner = tp.pruner.GrowingRegPruner(model, bench.example(), imp, reg=0.0, delta_reg=delta, schedule=schedule,
                                        reg_ceiling=delta * reg_steps, compensation=compensation,
                                        **bench.pruner_kwargs(model, ratio, scope))
    pruner.update_reg()  # GReg-1 chooses its channels here, once, from the calibrated importance
    model.zero_grad(set_to_none=True)
    optimizer = bench.optimizer(model)

    def each_step():  # every schedule grows once a step, so each reaches its ceiling as the phase ends
        pruner.regularize(model, decoupled=True, lr=reg_lr)
        pruner.update_reg()

    for group in optimizer.param_groups:
        group["lr"] = reg_lr
    bench.distill(model, optimizer, 0, reg_steps, each_step)
    for group in optimizer.param_groups:
        group["lr"] = args.lr
    regularized = bench.measure(model)
    pruner.step(optimizer=optimizer)
    model.zero_grad(set_to_none=True)
    lr_note = (f" at lr {reg_lr:g}" if reg_lr != args.lr else "") + (" (heads one-shot + refit first)" if heads_first else "")
    faded = f" + {compensation} during the fade" if compensation else ""
    row = dict(method=f"{schedule} ({criterion}{faded}): {reg_steps} reg{lr_note} + {recovery - reg_steps} distill",
               regularized=regularized, pruned=bench.measure(model), params=params(model), widths=widths(model))
    bench.distill(model, optimizer, reg_steps, recovery - reg_steps)
    row["final"] = bench.measure(model)
    row["model"] = model
    return row


def fmt(result: dict | None) -> str:
    return "" if result is None else f"{result['ppl']:,.1f} / {result['agreement']:.3f}"


def table(rows: list[dict], baseline: dict) -> str:
    lines = [f"unpruned: perplexity {baseline['ppl']:.2f}",
             "| ratio | scope | method | params | widths | after reg ppl / top-1 | pruned ppl / top-1 "
             "| after recovery ppl / top-1 | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['ratio']:.0%} | {row['scope']} | {row['method']} | {row['params'] / 1e6:.1f} M | "
                     f"{row['widths']} | {fmt(row.get('regularized'))} | {fmt(row['pruned'])} | "
                     f"{fmt(row.get('final'))} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def sample(bench: Bench, model, prompt: str = "And it came to pass that") -> str:
    ids = bench.tokenizer(prompt, return_tensors="pt").input_ids.to(bench.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    return bench.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35])
    parser.add_argument("--scopes", nargs="+", default=["mlp"], choices=("mlp", "mlp_heads"))
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    parser.add_argument("--compensation", nargs="+", default=["none", "bias", "refit"],
                        choices=("none", "bias", "refit"))
    parser.add_argument("--recovery-steps", type=int, default=16, help="distillation steps after one-shot pruning")
    parser.add_argument("--recover", nargs="*", default=[],
                        help="one-shot methods (e.g. 'taylor', 'wanda+refit') that get recovery; greg1:<criterion>, "
                             "greg2:<criterion>, seed:<criterion> add a growing-regularization run over the same steps")
    parser.add_argument("--reg-steps", type=int, default=10, help="GReg-1's penalty phase (part of the budget)")
    parser.add_argument("--target-shrink", type=float, default=1e-3)
    parser.add_argument("--heads-refit", action="store_true",
                        help="greg1 with mlp_heads: remove the heads one-shot with Activation + refit, then GReg-1 the MLP")
    parser.add_argument("--reg-lr", type=float, default=None, help="lr of the growing-regularization phase (default --lr)")
    parser.add_argument("--greg2-target-shrink", type=float, default=0.5,
                        help="GReg-2 shrinks every channel alike, so it gets a mild target")
    parser.add_argument("--json", help="append one JSON line per row here (benchmarks/quality/plot.py reads it)")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW (5e-5: 16 steps raised Taylor's perplexity 38.9 -> 48.8)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--pool", type=int, default=64, help="training sequences (cycled through)")
    parser.add_argument("--topk", type=int, default=64, help="teacher tokens per position the KL runs over")
    parser.add_argument("--length", type=int, default=128, help="tokens per calibration and held-out sequence")
    parser.add_argument("--train-length", type=int, default=64, help="tokens per training sequence")
    parser.add_argument("--calibration", type=int, default=16, help="calibration sequences")
    parser.add_argument("--held-out", type=int, default=16, help="held-out sequences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", default="~/.cache/structprune/gemma3-270m-float32")
    parser.add_argument("--save", help="save_pretrained the last recovered model here and reload it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    bench = Bench(args)
    print(f"settings: {vars(args)}")
    print(f"Gemma 3 270M on {bench.device}: {params(bench.teacher) / 1e6:.1f} M parameters, held-out perplexity "
          f"{bench.baseline['ppl']:.2f} ({args.held_out} x {args.length} tokens, {bench.eval_seconds:.0f} s); "
          f"setup {time.perf_counter() - started:.0f} s", flush=True)
    print(f"unpruned sample: {sample(bench, bench.teacher)}", flush=True)
    rows, last = [], None
    for ratio in args.ratios:
        for scope in args.scopes:
            runs = []
            for criterion in args.criteria:
                for compensation in args.compensation:
                    if compensation != "none" and criterion not in CALIBRATED:
                        continue
                    name = criterion + ("" if compensation == "none" else "+" + compensation)
                    runs.append(("oneshot", criterion, None if compensation == "none" else compensation,
                                 args.recovery_steps if name in args.recover else 0))
            runs += [(spec.split(":", 1)[0], spec.split(":", 1)[1], None, args.recovery_steps)
                     for spec in args.recover if spec.split(":", 1)[0] in SCHEDULES]
            for kind, criterion, compensation, recovery in runs:
                begun = time.perf_counter()
                torch.manual_seed(args.seed)
                if kind == "oneshot":
                    row = one_shot(bench, criterion, compensation, ratio, scope, recovery)
                else:
                    row = greg(bench, kind, criterion, ratio, scope, recovery)
                row.update(ratio=ratio, scope=scope, seconds=time.perf_counter() - begun)
                if recovery:
                    row["method"] += f" -> {recovery} steps" if kind == "oneshot" else ""
                    row["sample"] = sample(bench, row["model"])
                    print(f"  sample ({row['method']}): {row['sample']}", flush=True)
                last = row.pop("model")
                rows.append(row)
                if args.json:
                    with open(args.json, "a") as handle:
                        handle.write(json.dumps(dict(row, baseline=bench.baseline["ppl"],
                                                     unpruned_params=params(bench.teacher),
                                                     settings=vars(args))) + "\n")
                print(table([row], bench.baseline).splitlines()[-1], flush=True)
    print()
    print(table(rows, bench.baseline))
    if args.save and last is not None:
        last.save_pretrained(args.save)
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(args.save, dtype=torch.float32).to(bench.device).eval()
        print(f"saved and reloaded from {args.save}: config intermediate_size {reloaded.config.intermediate_size}, "
              f"{reloaded.config.num_attention_heads} q heads, {bench.measure(reloaded)}; sample: "
              f"{sample(bench, reloaded)}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
