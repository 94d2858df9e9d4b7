"""Pruner construction + one 50% step on attention models, CNNs, a 32-layer Llama and ultralytics detectors.

Setup per model, as a new user would write it (random init, nothing downloaded):
``BasePruner(model, x, MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[classifier]).step()``
(the Llama adds ``prune_num_heads=True, head_pruning_ratio=0.5`` as benchmarks/llm_speed.py does; the
detectors ignore nothing: their outputs are refused by the graph anyway).

Columns: construction seconds (trace + graph), step seconds, their sum, the process's CPU seconds for both
(on a shared machine the CPU time says what the wall time would be on a quiet one when ``--threads 1``),
kept-params ratio, ``fwd s`` (one plain forward of the model rebuilt unpruned, with autograd as the trace runs it, timed
after the step in the same process: the VM's speed drifts by a third run to run, so ``x fwd`` = total / fwd is
the figure to compare between runs and machines), and what the verified
fallback did: ``-`` when the one-shot step ran, else ``n/m left`` (m groups redone one forward at a time,
n of them left unpruned). ``tp s`` is torch_pruning's construction + step time where we know it (measured
once on this machine; written by hand, torch_pruning is not installed).
Goals: the fallback never firing, under 3 s per model (RT-DETR-l and the 32-layer Llama under 10 s), kept
ratio at most 0.55 unless a named structural reason keeps a group.

Each model runs in its own process with ``--timeout`` seconds, so one hang does not stall the table:
``python benchmarks/step_speed.py [--models vit_small_patch16_224,resnet50] [--timeout 300] [--verbose]``.
``--list`` prints the model names.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch

#: torch_pruning construction + step seconds on this machine, where known (from issue 14)
TORCH_PRUNING = {"resnet50": 0.34}


def _timm(name: str, size: int):
    def build():
        import timm

        model = timm.create_model(name, pretrained=False)
        return model, torch.randn(1, 3, size, size), [model.get_classifier()]
    return build


def _torchvision(name: str, classifier: str, shape=(1, 3, 224, 224)):
    def build():
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        return model, torch.randn(*shape), [model.get_submodule(classifier)]
    return build


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=32,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    return model, {"input_ids": torch.randint(0, 1000, (1, 32))}, [model.lm_head]


def _ultralytics(kind: str, yaml: str, size: int = 640):
    def build():
        import ultralytics

        model = getattr(ultralytics, kind)(yaml).model
        return model, torch.randn(1, 3, size, size), []
    return build


MODELS = {
    "vit_small_patch16_224": _timm("vit_small_patch16_224", 224),
    "swin_tiny_patch4_window7_224": _timm("swin_tiny_patch4_window7_224", 224),
    "hiera_tiny_224": _timm("hiera_tiny_224", 224),
    "volo_d1_224": _timm("volo_d1_224", 224),
    "caformer_s18": _timm("caformer_s18", 224),
    "maxvit_pico_rw_256": _timm("maxvit_pico_rw_256", 256),
    "coatnet_nano_rw_224": _timm("coatnet_nano_rw_224", 224),
    "tiny_vit_5m_224": _timm("tiny_vit_5m_224", 224),
    "crossvit_tiny_240": _timm("crossvit_tiny_240", 240),
    "pvt_v2_b0": _timm("pvt_v2_b0", 224),
    "nfnet_l0": _timm("nfnet_l0", 224),
    "beit_base_patch16_224": _timm("beit_base_patch16_224", 224),
    "eva02_tiny_patch14_224": _timm("eva02_tiny_patch14_224", 224),
    "swinv2_cr_tiny_224": _timm("swinv2_cr_tiny_224", 224),
    "swinv2_tiny_window8_256": _timm("swinv2_tiny_window8_256", 256),
    "ghostnet_100": _timm("ghostnet_100", 224),
    "ghostnetv2_100": _timm("ghostnetv2_100", 224),
    "edgenext_xx_small": _timm("edgenext_xx_small", 256),
    "resnet50": _torchvision("resnet50", "fc"),
    "densenet121": _torchvision("densenet121", "classifier"),
    "convnext_tiny": _torchvision("convnext_tiny", "classifier.2"),
    "efficientnet_b0": _torchvision("efficientnet_b0", "classifier.1"),
    "mvit_v2_s": _torchvision("mvit_v2_s", "head.1", (1, 3, 16, 224, 224)),
    "swin3d_t": _torchvision("swin3d_t", "head", (1, 3, 16, 224, 224)),
    "llama_32_layers": _llama,
    "yolo11n": _ultralytics("YOLO", "yolo11n.yaml"),
    "rtdetr_l": _ultralytics("RTDETR", "rtdetr-l.yaml"),
}


def run_one(name: str) -> dict:
    """Build, construct the pruner, step; every figure the table prints."""
    import structprune as tp

    torch.manual_seed(0)
    model, x, ignored = MODELS[name]()
    model.eval()
    before = sum(p.numel() for p in model.parameters())
    extra = {"prune_num_heads": True, "head_pruning_ratio": 0.5} if name.startswith("llama") else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start, cpu = time.perf_counter(), time.process_time()
        pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                      ignored_layers=ignored, **extra)
        built = time.perf_counter() - start
        start = time.perf_counter()
        pruner.step()
        stepped = time.perf_counter() - start
        cpu = time.process_time() - cpu
    after = sum(p.numel() for p in model.parameters())
    records = pruner.fallback_history
    return {
        "model": name, "build": built, "step": stepped, "cpu": cpu, "kept": after / before,
        "forward": _forward_seconds(name),
        "handled": sum(r.handled for r in records), "left": sum(len(r.skipped) for r in records),
        "fallback_error": records[0].error if records else None,
        "skipped": [f"{root}: {error}" for r in records for root, error in r.skipped],
        "warnings": [str(w.message)[:400] for w in caught if issubclass(w.category, UserWarning)],
    }


def _forward_seconds(name: str) -> float:
    """The faster of two plain forwards of the model rebuilt unpruned (the first also warms the allocator,
    as the pruner's trace did). Rebuilt after the step, not copied before it: a deep copy held during
    construction made resnet50's build 0.2 s slower (fresh pages for every allocation of the trace)."""
    from structprune.utils.nested import call_model

    torch.manual_seed(0)
    model, x, _ = MODELS[name]()
    model.eval()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        call_model(model, x)
        times.append(time.perf_counter() - start)
    return min(times)


def _child(name: str, threads: int) -> None:
    torch.set_num_threads(threads)
    print(json.dumps(run_one(name)))


def _run_isolated(name: str, threads: int, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", name, "--threads", str(threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "error": tail[:200]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--verbose", action="store_true", help="print the fallback's errors and the warnings")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.threads)
        return
    if args.list:
        print("\n".join(MODELS))
        return
    names = [name for name in args.models.split(",") if name]
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; --list prints the known ones")
    print(f"torch {torch.__version__}, {args.threads} threads, timeout {args.timeout:.0f} s per model")
    print(f"| {'model':30s} | build s | step s | total s | cpu s | fwd s | x fwd | tp s | kept | fallback |")
    print(f"|{'-' * 32}|---------|--------|---------|-------|-------|-------|------|------|----------|")
    for name in names:
        row = _run_isolated(name, args.threads, args.timeout)
        known = TORCH_PRUNING.get(name)
        reference = f"{known:.2f}" if known is not None else ""
        if "error" in row:
            print(f"| {name:30s} | {'':7s} | {'':6s} | {'':7s} | {'':5s} | {'':5s} | {'':5s} | {reference:4s} | {'':4s} "
                  f"| {row['error']} |")
            continue
        fallback = f"{row['left']}/{row['handled']} left" if row["handled"] else "-"
        total = row["build"] + row["step"]
        print(f"| {name:30s} | {row['build']:7.2f} | {row['step']:6.2f} | {total:7.2f} | {row['cpu']:5.2f} "
              f"| {row['forward']:5.2f} | {total / row['forward']:5.1f} | {reference:4s} | {row['kept']:.2f} | {fallback} |",
              flush=True)
        if args.verbose:
            if row["fallback_error"]:
                print(f"    one-shot error: {row['fallback_error'][:300]}")
            for entry in row["skipped"]:
                print(f"    left: {entry[:300]}")
            for message in row["warnings"]:
                print(f"    warning: {message}")


if __name__ == "__main__":
    main()
