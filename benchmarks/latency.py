"""Latency against MACs after pruning: does a 50% step make the model as much faster as it makes it smaller?

Setup per model, random init, nothing downloaded: batch 8 (224 px images; 128 tokens for the Llama),
``BasePruner(model, x, MagnitudeImportance(), pruning_ratio=0.5, ignored_layers=[classifier])`` with

- ``ratio``: ``round_to=None`` (the plain 50%)
- ``round_to=8``
- ``auto``: ``round_to="auto"`` (per group, the finest width step at which the profiled timings drop)
- ``budget``: ``target={"latency_ms": t}``, t the latency of ``ratio`` timed right after it was pruned: as
  fast as the plain 50% step, with the channels chosen by importance per millisecond (auto widths by
  default). A budget of the MACs ratio itself ("as fast as the MACs promise") was tried first: on this
  machine it lies below what the profile predicts with every group at one channel, which the pruner
  refuses

``tp.utils.latency_profile`` is measured once per model (cached on disk) and shared by ``auto`` and
``budget``. Latency: the unpruned model and the four variants timed in interleaved rounds (each round runs
every model once), the median of each; ``lat`` and ``MACs`` are ratios to the unpruned model and ``lat/MACs``
is theirs (1.0: latency fell exactly as much as MACs). ``min lat`` and ``min/MACs`` are the same from the fastest
round of each (this machine is shared: other processes only add time, and the fastest round is what the
profile and the budget measure). Accuracy proxies (random weights, so only comparable between variants):
``w kept`` is the share of the squared weight norm the pruned model keeps (what magnitude pruning tries
to keep), ``cos`` the cosine similarity of its outputs to the unpruned model's on the example inputs. ``budget`` rows show the budget and the
measured latency in ms. ``--compile``: the unpruned and the ``auto`` model under ``torch.compile`` (lat ratio
and lat/MACs); ``--onnx``: whether the pruned models export with ``torch.onnx.export`` (onnxruntime, when
installed, times them too).

Each model runs in its own process: ``python benchmarks/latency.py [--models resnet50,vit_small]
[--device cpu|cuda] [--threads 2] [--rounds 9] [--compile] [--onnx] [--timeout 1800]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

VARIANTS = ("ratio", "round_to=8", "auto", "budget")


def _torchvision(name):
    def build():
        import torchvision

        model = getattr(torchvision.models, name)()
        return model, torch.randn(8, 3, 224, 224), _classifier(model)
    return build


def _classifier(model):
    for attribute in ("fc", "classifier", "head", "lm_head"):
        module = getattr(model, attribute, None)
        if module is not None:
            return module
    raise AttributeError(f"no classifier on {type(model).__name__}")


def _vit_small():
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    return model, torch.randn(8, 3, 224, 224), model.head


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    return model, torch.randint(0, 8000, (8, 128)), model.lm_head


MODELS = {
    "resnet50": _torchvision("resnet50"),
    "convnext_tiny": _torchvision("convnext_tiny"),
    "vit_small": _vit_small,
    "efficientnet_b0": _torchvision("efficientnet_b0"),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large"),
    "llama_4l": _llama,
}


def _logits(output):
    output = getattr(output, "logits", output)
    return output[0] if isinstance(output, (tuple, list)) else output


def _run_one(name: str, args) -> dict:
    import structprune as tp
    from structprune.utils.latency import latency_profile, measure_cost
    from structprune.utils.op_counter import count_ops_and_params

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, x, classifier = MODELS[name]()
    model = model.eval().to(device)
    x = x.to(device)
    started = time.perf_counter()
    profile = latency_profile(model, x)
    profile_s = time.perf_counter() - started
    macs, params = count_ops_and_params(model, x)
    with torch.no_grad():
        reference = _logits(model(x)).float()
    rows, pruned = {}, {}
    for variant in VARIANTS:
        copy_ = copy.deepcopy(model)
        kwargs = {"round_to": {"ratio": None, "round_to=8": 8, "auto": "auto", "budget": None}[variant]}
        if variant == "budget":
            # the plain step's latency, timed as the pruner times (the fastest of 5 forwards)
            kwargs["target"] = {"latency_ms": measure_cost(pruned["ratio"], x)}
        kwargs["latency_profile"] = profile
        head = _classifier(copy_)
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                pruner = tp.pruner.BasePruner(copy_, x, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                                              ignored_layers=[head], **kwargs)
            except ValueError as error:  # a budget the pruner refuses: reported
                rows[variant] = {"error": str(error)[:200]}
                continue
            pruner.step()
        seconds = time.perf_counter() - started
        variant_macs, variant_params = count_ops_and_params(copy_, x)
        with torch.no_grad():
            out = _logits(copy_(x)).float()
        cos = torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1), dim=1).mean().item()
        kept = _weight_norm(copy_) / _weight_norm(model)
        row = {"macs": variant_macs / macs, "params": variant_params / params, "cos": cos, "kept": kept,
               "prune_s": seconds, "warnings": len(caught)}
        budget = pruner.report().steps[-1].budget
        if budget is not None:
            row["budget_ms"] = budget["budget"]
            row["predicted_ms"] = budget["predicted"]
            row["step_measured_ms"] = budget["measured"]
        rows[variant] = row
        pruned[variant] = copy_
    done = [v for v in VARIANTS if v in pruned]
    times, fastest = _interleaved([model] + [pruned[v] for v in done], x, args.rounds, device)
    base = times[0]
    for variant, median, best in zip(done, times[1:], fastest[1:]):
        rows[variant]["lat"] = median / base
        rows[variant]["ms"] = median
        rows[variant]["lat_min"] = best / fastest[0]
        rows[variant]["min_ms"] = best
    result = {"model": name, "base_ms": base, "base_min_ms": fastest[0], "profile_ms": profile.total, "profile_s": profile_s,
              "macs": macs, "rows": rows, "threads": torch.get_num_threads(), "device": str(device)}
    if args.compile:
        result["compile"] = _compiled(model, pruned["auto"], x, args.rounds, device)
    if args.onnx:
        result["onnx"] = {variant: _exports(_Logits(pruned[variant]), x) for variant in ("auto", "budget")
                          if variant in pruned}
    return result


class _Logits(torch.nn.Module):
    """The model's logits alone: the ONNX exporter takes tensors out, not a ModelOutput."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return _logits(self.model(x))


def _weight_norm(model) -> float:
    return sum(float(p.detach().float().pow(2).sum()) for p in model.parameters() if p.dim() > 1)


def _interleaved(models, x, rounds, device) -> tuple[list[float], list[float]]:
    """Median and fastest of ``rounds`` interleaved timings of each model."""
    from structprune.utils.benchmark import _per_call_ms

    times = [[] for _ in models]
    with torch.no_grad():
        for model in models:
            _per_call_ms(model, x, 2, device)  # warm-up
        for _ in range(rounds):
            for index, model in enumerate(models):
                times[index].append(_per_call_ms(model, x, 1, device)[0])
    return [statistics.median(values) for values in times], [min(values) for values in times]


def _compiled(model, pruned, x, rounds, device) -> dict:
    try:
        base = torch.compile(copy.deepcopy(model))
        small = torch.compile(pruned)
        with torch.no_grad():
            base(x), small(x)
        times, fastest = _interleaved([base, small], x, rounds, device)
        return {"lat": times[1] / times[0], "lat_min": fastest[1] / fastest[0], "base_ms": times[0]}
    except Exception as error:  # noqa: BLE001 - reported in the table
        return {"error": f"{type(error).__name__}: {str(error)[:120]}"}


def _exports(model, x) -> str:
    import io

    try:
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False)
    except Exception as error:  # noqa: BLE001 - reported in the table
        return f"fails ({type(error).__name__}: {str(error)[:80]})"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return f"exports ({len(buffer.getvalue()) / 1e6:.1f} MB; onnxruntime not installed)"
    return "exports"


def _child(args) -> None:
    torch.set_num_threads(args.threads)
    result = _run_one(args.child, args)
    print("RESULT " + json.dumps(result), flush=True)


def _table(results: list[dict]) -> None:
    print(f"{'model':<20} {'variant':<11} {'MACs':>6} {'lat':>6} {'lat/MACs':>9} {'min lat':>8} {'min/MACs':>9} "
          f"{'params':>7} {'w kept':>7} {'cos':>6} {'ms':>8} {'min ms':>8} {'budget ms':>10}")
    for result in results:
        if "error" in result:
            print(f"{result['model']:<20} failed: {result['error']}")
            continue
        print(f"{result['model']:<20} {'unpruned':<11} {1:>6.3f} {1:>6.3f} {'':>9} {1:>8.3f} {'':>9} {1:>7.3f} "
              f"{1:>7.3f} {1:>6.3f} {result['base_ms']:>8.1f} {result['base_min_ms']:>8.1f}")
        for variant, row in result["rows"].items():
            if "error" in row:
                print(f"{'':<20} {variant:<11} refused: {row['error']}")
                continue
            budget = ""
            if "budget_ms" in row and variant == "budget":
                # met: the budget's share of the unpruned model against the fastest interleaved rounds' ratio
                share = result["rows"]["ratio"]["lat_min"]
                budget = (f"{row['budget_ms']:>10.1f} (step measured {row['step_measured_ms']:.1f}; ratio's "
                          f"fastest round {share:.3f} of unpruned, budget's {row['lat_min']:.3f})")
            print(f"{'':<20} {variant:<11} {row['macs']:>6.3f} {row['lat']:>6.3f} {row['lat'] / row['macs']:>9.2f} "
                  f"{row['lat_min']:>8.3f} {row['lat_min'] / row['macs']:>9.2f} {row['params']:>7.3f} "
                  f"{row['kept']:>7.3f} {row['cos']:>6.3f} {row['ms']:>8.1f} {row['min_ms']:>8.1f} {budget}")
        if "compile" in result:
            entry = result["compile"]
            text = entry.get("error") or (f"lat {entry['lat']:.3f}, lat/MACs {entry['lat'] / result['rows']['auto']['macs']:.2f} "
                                          f"(unpruned {entry['base_ms']:.1f} ms)")
            print(f"{'':<20} torch.compile auto: {text}")
        if "onnx" in result:
            print(f"{'':<20} onnx: " + "; ".join(f"{k} {v}" for k, v in result["onnx"].items()))
        print(f"{'':<20} (profile {result['profile_s']:.0f} s, or read from cache; unpruned {result['profile_ms']:.1f} ms "
              f"when profiled)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--onnx", action="store_true")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.child:
        return _child(args)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, threads {args.threads}, "
          f"batch 8, {args.rounds} interleaved rounds, pruning_ratio 0.5, MagnitudeImportance", flush=True)
    results = []
    for name in args.models.split(","):
        command = [sys.executable, __file__, "--child", name, "--device", args.device, "--threads", str(args.threads),
                   "--rounds", str(args.rounds)] + (["--compile"] if args.compile else []) + (
                   ["--onnx"] if args.onnx else [])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            result = json.loads(line[7:]) if line else {"model": name, "error": done.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:
            result = {"model": name, "error": f"timed out after {args.timeout} s"}
        results.append(result)
        _table([result])
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
