"""Parameters kept by mixture-of-experts families at pruning_ratio=0.5, and whether they still round-trip.

Tiny configs (hidden 64, 2 layers, GQA 4/2 heads, top-2 routing, random init), magnitude importance, LM
head ignored (and DeepSeek-V3's low-rank q_a_proj / kv_a_proj_with_mqa, whose MLA ranks belong to the
general config sync). Three settings per family:

* ``widths``: hidden and expert intermediate widths (and shared experts, dense MLPs) at 0.5;
* ``+experts``: also ``prune_num_experts=True, expert_pruning_ratio=0.5``;
* ``+heads``: also ``prune_num_heads=True, head_pruning_ratio=0.5`` (the issue-12 setting).

Columns: kept parameter fraction, then forward (original output shape), generate, and
save_pretrained -> from_pretrained giving the same logits.
"""
from __future__ import annotations

import copy
import tempfile
import warnings

import torch

import structprune as tp

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, num_experts_per_tok=2)


def families():
    import transformers as hf

    yield "Mixtral", hf.MixtralForCausalLM, hf.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4)
    yield "Qwen2-MoE", hf.Qwen2MoeForCausalLM, hf.Qwen2MoeConfig(
        **COMMON, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8)
    yield "Qwen3-MoE", hf.Qwen3MoeForCausalLM, hf.Qwen3MoeConfig(
        **COMMON, intermediate_size=64, moe_intermediate_size=32, num_experts=8, head_dim=16)
    yield "DeepSeek-V3", hf.DeepseekV3ForCausalLM, hf.DeepseekV3Config(
        **COMMON, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
        n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16)


SETTINGS = {
    "widths": {},
    "+experts": dict(prune_num_experts=True, expert_pruning_ratio=0.5),
    "+heads": dict(prune_num_experts=True, expert_pruning_ratio=0.5, prune_num_heads=True, head_pruning_ratio=0.5),
}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(model_type, config, options) -> str:
    torch.manual_seed(0)
    model = model_type(copy.deepcopy(config)).eval()  # pruning rewrites the model's config in place
    ids = torch.randint(0, 128, (1, 8))
    before = count(model)
    ignored = [model.lm_head] + [m for n, m in model.named_modules() if n.endswith(("q_a_proj", "kv_a_proj_with_mqa"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                             ignored_layers=ignored, **options).step()
    with torch.no_grad():
        out = model(ids).logits
    forward = out.shape == (1, 8, 128)
    generate = model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
    with tempfile.TemporaryDirectory() as directory:
        try:
            model.save_pretrained(directory)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reloaded = model_type.from_pretrained(directory).eval()
            with torch.no_grad():
                reload = bool(torch.allclose(reloaded(ids).logits, out, atol=1e-5))
        except Exception:  # noqa: BLE001 - a failed reload is a table entry, not a crash
            reload = False
    marks = " ".join("ok" if passed else "FAIL" for passed in (forward, generate, reload))
    return f"{count(model) / before:6.3f} {marks:<12}"


def main() -> None:
    print(f"{'family':<12} {'params':>8} " + " ".join(f"{name + ' (fwd gen reload)':<30}" for name in SETTINGS))
    for name, model_type, config in families():
        torch.manual_seed(0)
        total = count(model_type(config))
        cells = [run(model_type, config, options) for options in SETTINGS.values()]
        print(f"{name:<12} {total:>8} " + " ".join(f"{cell:<30}" for cell in cells))


if __name__ == "__main__":
    main()
