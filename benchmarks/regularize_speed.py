"""Cost of GrowingRegPruner.regularize() against the physical floor, a fused weight-decay pass.

For each model: the time of ``regularize()`` divided by the time of
``torch._foreach_add_(grads, params, alpha=wd)`` over the same parameters (target <= 2.0), the same time as
a percentage of one batch-8 forward+backward step, and the per-epoch ``update_reg()`` and per-step
``update_regularizer()`` times (target: update_regularizer <= 0.05 s on densenet121).
Medians of ``--repeat`` runs; on CUDA (``--device cuda``) each measurement synchronises once.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import structprune as tp


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    return model, {"input_ids": torch.randint(0, 1000, (1, 16))}, {"input_ids": torch.randint(0, 1000, (8, 16))}


def vision(name):
    def build():
        model = torchvision.models.get_model(name, weights=None)
        return model, torch.randn(1, 3, 224, 224), torch.randn(8, 3, 224, 224)
    return build


MODELS = {
    "resnet18": vision("resnet18"),
    "resnet50": vision("resnet50"),
    "densenet121": vision("densenet121"),
    "vit_b_16": vision("vit_b_16"),
    "llama-4L-256": llama,
}


def _once(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fn, device, repeat):
    return statistics.median(_once(fn, device) for _ in range(repeat))


def timed_pair(first, second, device, repeat):
    """Medians of two functions timed alternately, so both see the same machine load and cache state."""
    a, b = [], []
    for _ in range(repeat):
        a.append(_once(first, device))
        b.append(_once(second, device))
    return statistics.median(a), statistics.median(b)


def run(model, example, batch):
    if isinstance(batch, dict):
        out = model(**batch)
        return out.logits if hasattr(out, "logits") else out
    return model(batch)


def measure(name, device, repeat):
    model, example, batch = MODELS[name]()
    model.to(device)
    move = (lambda v: {k: t.to(device) for k, t in v.items()}) if isinstance(example, dict) else (lambda v: v.to(device))
    example, batch = move(example), move(batch)
    pruner = tp.pruner.GrowingRegPruner(model, example, tp.importance.MagnitudeImportance(), reg=1e-4,
                                        delta_reg=1e-4, pruning_ratio=0.5, verify=False)
    run(model, example, batch).float().sum().backward()
    engine = pruner._engine
    params = [p for p in engine.weights + engine.biases if p.grad is not None]
    grads = [p.grad for p in params]

    def weight_decay():
        torch._foreach_add_(grads, params, alpha=1e-4)

    def step():
        model.zero_grad(set_to_none=False)
        run(model, example, batch).float().sum().backward()

    pruner.update_reg()  # per-channel coefficients differ from here on, as in training
    t_reg, t_wd = timed_pair(lambda: pruner.regularize(model, bias=True), weight_decay, device, repeat)
    t_step = timed(step, device, max(3, repeat // 10))
    t_update = timed(pruner.update_reg, device, 3)
    t_refresh = timed(pruner.update_regularizer, device, 3)
    return len(params), t_reg, t_wd, t_step, t_update, t_refresh


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {args.threads} threads, medians of {args.repeat}")
    print(f"{'model':14s} {'params':>6s} {'regularize ms':>13s} {'wd pass ms':>10s} {'ratio':>6s} "
          f"{'% of b8 step':>12s} {'update_reg s':>12s} {'update_regularizer s':>20s}")
    for name in args.models.split(","):
        n, t_reg, t_wd, t_step, t_update, t_refresh = measure(name, device, args.repeat)
        print(f"{name:14s} {n:6d} {t_reg * 1e3:13.2f} {t_wd * 1e3:10.2f} {t_reg / t_wd:6.2f} "
              f"{100 * t_reg / t_step:11.2f}% {t_update:12.3f} {t_refresh:20.3f}")


if __name__ == "__main__":
    main()
