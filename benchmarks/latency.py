"""Latency against MACs after pruning: does a 50% step make the model as much faster as it makes it smaller?

Setup per model, random init, nothing downloaded: batch 8 (224 px images; 128 tokens for the Llama) by default,
``BasePruner(model, x, MagnitudeImportance(), pruning_ratio=0.5, ignored_layers=[classifier])`` with

- ``ratio``: ``round_to=None`` (the plain 50%)
- ``round_to=8``
- ``auto``: ``round_to="auto"`` (per group, the finest width step at which the profiled timings drop)
- ``budget``: ``target={"latency_ms": t}``, t the latency of ``ratio`` timed right after it was pruned: as
  fast as the plain 50% step (its share of the unpruned latency in interleaved rounds, times the unpruned
  latency timed as the pruner times it), with the channels chosen by importance per millisecond (auto widths by
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
to keep), ``cos`` the cosine similarity of its outputs to the unpruned model's on the example inputs.
The ``budget`` row shows the budget in ms, the pruner's own last timing of the model against it (the
closed loop of pruner/latency_loop.py: passes, and why they stopped short if they did), and the share of
the unpruned model the budget asked against what the interleaved rounds measured.

``--compile``: the unpruned, ``auto`` and ``budget`` models under ``torch.compile``, timed in interleaved
rounds (lat ratio and lat/MACs). ``--onnx``: every one of them exported with ``torch.onnx.export`` (the
TorchScript exporter) and checked with ``onnx.checker``; timed with onnxruntime when it is installed.
``--batch``, ``--size`` and ``--variants`` make a quick run (``--models resnet18 --batch 1 --size 64
--variants ratio,auto,budget --compile --onnx`` checks both paths in a few minutes).

Each model runs in its own process: ``python benchmarks/latency.py [--models resnet18,resnet50,vit_small]
[--device cpu|cuda] [--threads 2] [--rounds 9] [--batch 8] [--size 224] [--variants ...] [--compile] [--onnx]
[--timeout 1800]``.
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
    def build(batch, size):
        import torchvision

        model = getattr(torchvision.models, name)()
        return model, torch.randn(batch, 3, size, size), _classifier(model)
    return build


def _classifier(model):
    for attribute in ("fc", "classifier", "head", "lm_head"):
        module = getattr(model, attribute, None)
        if module is not None:
            return module
    raise AttributeError(f"no classifier on {type(model).__name__}")


def _vit_small(batch, size):
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=size)
    return model, torch.randn(batch, 3, size, size), model.head


def _llama(batch, size):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    # 128 tokens at the default 224 px, fewer with --size
    return model, torch.randint(0, 8000, (batch, max(8, size * 128 // 224))), model.lm_head


MODELS = {
    "resnet18": _torchvision("resnet18"),
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
    from structprune.utils.latency import latency_profile, profile_timer
    from structprune.utils.op_counter import count_ops_and_params

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, x, classifier = MODELS[name](args.batch, args.size)
    model = model.eval().to(device)
    x = x.to(device)
    started = time.perf_counter()
    profile = latency_profile(model, x)
    profile_s = time.perf_counter() - started
    macs, params = count_ops_and_params(model, x)
    with torch.no_grad():
        reference = _logits(model(x)).float()
    rows, pruned = {}, {}
    for variant in args.variants.split(","):
        copy_ = copy.deepcopy(model)
        kwargs = {"round_to": {"ratio": None, "round_to=8": 8, "auto": "auto", "budget": None}[variant]}
        if variant == "budget":
            # as fast as the plain step: its share of the unpruned latency (fastest of interleaved rounds, so a
            # busy moment slows both), times the unpruned model timed as the pruner times it
            _, fastest = _interleaved([model, pruned["ratio"]], x, args.rounds, device)
            share = fastest[1] / fastest[0]
            kwargs["target"] = {"latency_ms": share * profile_timer(profile)(model, x)}
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
            row["calibrated_ms"] = budget["calibrated"]
            row["step_measured_ms"] = budget["measured"]
            row["start_ms"] = budget["start"]
            row["passes"] = len(budget["passes"])
            row["stopped"] = budget["stopped"]
        rows[variant] = row
        pruned[variant] = copy_
    done = [v for v in args.variants.split(",") if v in pruned]
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
        result["compile"] = _compiled(model, {v: pruned[v] for v in ("auto", "budget") if v in pruned}, x,
                                      args.rounds, device, {v: rows[v]["macs"] for v in pruned})
    if args.onnx:
        result["onnx"] = _onnx(model, {v: pruned[v] for v in ("auto", "budget") if v in pruned}, x, args.rounds)
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


def _compiled(model, variants: dict, x, rounds, device, macs: dict) -> dict:
    """The unpruned model and each variant under ``torch.compile``, timed in interleaved rounds: latency
    ratios to the compiled unpruned model, and their ratio to the MACs ratio."""
    try:
        started = time.perf_counter()
        compiled = [torch.compile(copy.deepcopy(model))] + [torch.compile(copy.deepcopy(v)) for v in variants.values()]
        with torch.no_grad():
            for module in compiled:
                module(x)  # compiles
        compile_s = time.perf_counter() - started
        times, fastest = _interleaved(compiled, x, rounds, device)
    except Exception as error:  # noqa: BLE001 - reported in the table
        return {"error": f"{type(error).__name__}: {str(error)[:160]}"}
    return {"base_ms": times[0], "compile_s": compile_s,
            "variants": {name: {"lat": times[i + 1] / times[0], "lat_min": fastest[i + 1] / fastest[0],
                                "macs": macs[name]} for i, name in enumerate(variants)}}


def _onnx(model, variants: dict, x, rounds) -> dict:
    """Each variant exported with ``torch.onnx.export`` (the TorchScript exporter) and checked with
    ``onnx.checker``; with onnxruntime installed, timed against the unpruned model's export."""
    import onnx

    exported, result = {}, {}
    for name, module in {"unpruned": model, **variants}.items():
        try:
            exported[name] = _export(_Logits(module), x)
            graph = onnx.load_from_string(exported[name])
            onnx.checker.check_model(graph)
            result[name] = {"mb": len(exported[name]) / 1e6, "nodes": len(graph.graph.node)}
        except Exception as error:  # noqa: BLE001 - reported in the table
            result[name] = {"error": f"{type(error).__name__}: {str(error)[:120]}"}
    try:
        import onnxruntime
    except ImportError:
        result["runtime"] = "onnxruntime not installed: exported and checked, not timed"
        return result
    if "error" in result["unpruned"]:
        return result
    sessions = {name: onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
                for name, blob in exported.items() if "error" not in result[name]}
    feed = {sessions["unpruned"].get_inputs()[0].name: x.cpu().numpy()}
    times = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, feed)  # warm-up
    for _ in range(rounds):
        for name, session in sessions.items():
            begin = time.perf_counter()
            session.run(None, feed)
            times[name].append((time.perf_counter() - begin) * 1e3)
    base = statistics.median(times["unpruned"])
    for name in sessions:
        result[name]["lat"] = statistics.median(times[name]) / base
    result["runtime"] = f"onnxruntime {onnxruntime.__version__}, unpruned {base:.1f} ms"
    return result


def _export(model, x) -> bytes:
    import io

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (x,), buffer, dynamo=False)
    return buffer.getvalue()


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
                # met: the pruner's own last timing against the budget; then the share of the unpruned model
                # the budget asked (budget / the latency the pruner started from) against the interleaved rounds'
                budget = (f"{row['budget_ms']:>10.1f} (pruner timed {row['step_measured_ms']:.1f} = "
                          f"{row['step_measured_ms'] / row['budget_ms']:.2f}x budget after {row['passes']} passes"
                          f"{', stopped: ' + row['stopped'] if row['stopped'] else ''}; asked "
                          f"{row['budget_ms'] / row['start_ms']:.3f} of unpruned, interleaved min "
                          f"{row['lat_min']:.3f}, median {row['lat']:.3f})")
            print(f"{'':<20} {variant:<11} {row['macs']:>6.3f} {row['lat']:>6.3f} {row['lat'] / row['macs']:>9.2f} "
                  f"{row['lat_min']:>8.3f} {row['lat_min'] / row['macs']:>9.2f} {row['params']:>7.3f} "
                  f"{row['kept']:>7.3f} {row['cos']:>6.3f} {row['ms']:>8.1f} {row['min_ms']:>8.1f} {budget}")
        if "compile" in result:
            entry = result["compile"]
            if "error" in entry:
                print(f"{'':<20} torch.compile: {entry['error']}")
            else:
                print(f"{'':<20} torch.compile (compiled in {entry['compile_s']:.0f} s; unpruned {entry['base_ms']:.1f} ms): "
                      + "; ".join(f"{name} lat {v['lat']:.3f} (min {v['lat_min']:.3f}), lat/MACs {v['lat'] / v['macs']:.2f} "
                                  f"(min {v['lat_min'] / v['macs']:.2f})" for name, v in entry["variants"].items()))
        if "onnx" in result:
            entry = dict(result["onnx"])
            runtime = entry.pop("runtime", "")
            print(f"{'':<20} onnx: " + "; ".join(
                f"{name} " + (value["error"] if "error" in value else
                              f"checked ({value['mb']:.1f} MB, {value['nodes']} nodes"
                              + (f", lat {value['lat']:.3f}" if "lat" in value else "") + ")")
                for name, value in entry.items()) + f" [{runtime}]")
        print(f"{'':<20} (profile {result['profile_s']:.0f} s, or read from cache; unpruned {result['profile_ms']:.1f} ms "
              f"when profiled)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="image side (the Llama: 128 tokens at 224)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="a subset of " + ",".join(VARIANTS) + " (budget needs ratio)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--onnx", action="store_true")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown or ("budget" in args.variants.split(",") and "ratio" not in args.variants.split(",")):
        parser.error(f"--variants takes names of {', '.join(VARIANTS)}, budget with ratio (its budget is ratio's "
                     f"latency); got {args.variants}")
    if args.child:
        return _child(args)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, threads {args.threads}, "
          f"batch {args.batch}, {args.size} px, {args.rounds} interleaved rounds, pruning_ratio 0.5, MagnitudeImportance",
          flush=True)
    results = []
    for name in args.models.split(","):
        command = [sys.executable, __file__, "--child", name, "--device", args.device, "--threads", str(args.threads),
                   "--rounds", str(args.rounds), "--batch", str(args.batch), "--size", str(args.size),
                   "--variants", args.variants] + (["--compile"] if args.compile else []) + (
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
