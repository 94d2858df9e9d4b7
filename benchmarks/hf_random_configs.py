"""Print how many random Hugging Face configs x pruning options save_pretrained can write, per family.

    PYTHONPATH=src python benchmarks/hf_random_configs.py [cases per family] [Family,Family...]

A new user's configs, not the fixed tiny ones of hf_families.py: other head counts, key/value groups, head
sizes (with and without head_dim), hidden 32-96 and 1-2 layers, pruned with a random ratio (0.2-0.7), whole
heads or not, global pruning or not, round_to None/2/4, the LM head or classifier ignored. Each case is one
step, then save_pretrained and from_pretrained; "refused" counts ConfigMismatchError, "diff" reloads whose
logits differ. Cases whose unpruned config the class (or its model) refuses are counted apart, not run.
Seeded per family and case (PYTHONHASHSEED plays no part), so two runs print the same table.
"""
import os
import random
import sys
import tempfile
import time
import warnings

import torch

VOCAB = 64


def _heads(rng, step=4, even=True):
    heads = rng.choice([2, 3, 4, 6, 8])
    hidden = rng.choice([h for h in range(32, 97, step) if h % heads == 0 and (not even or (h // heads) % 2 == 0)]
                        or [heads * 8])
    return heads, hidden


def decoder(config, model, rng, head_dim=False, **extra):
    heads, hidden = _heads(rng)
    fields = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=rng.choice([48, 64, 96]),
                  num_hidden_layers=rng.choice([1, 2]), num_attention_heads=heads, max_position_embeddings=64,
                  num_key_value_heads=rng.choice([d for d in range(1, heads + 1) if heads % d == 0]), **extra)
    if head_dim:
        fields["head_dim"] = rng.choice([8, 12, 16])
    return config, model, fields, "text"


def encoder(config, model, rng, **extra):
    heads = rng.choice([2, 4, 8])
    hidden = rng.choice([h for h in range(32, 97, 8) if h % heads == 0])
    return config, model, dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=rng.choice([48, 64, 96]),
                               num_hidden_layers=rng.choice([1, 2]), num_attention_heads=heads,
                               max_position_embeddings=64, **extra), "text"


def falcon(rng):
    heads = rng.choice([2, 4, 8])
    hidden = rng.choice([h for h in range(32, 97, 8) if h % heads == 0 and (h // heads) % 2 == 0])
    fields = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=rng.choice([1, 2]),
                  num_attention_heads=heads, max_position_embeddings=64, ffn_hidden_size=rng.choice([48, 64, 128]))
    if rng.random() < 0.5:
        fields.update(multi_query=True, new_decoder_architecture=False)
    else:
        fields.update(new_decoder_architecture=True,
                      num_kv_heads=rng.choice([d for d in range(1, heads + 1) if heads % d == 0]))
    return "FalconConfig", "FalconForCausalLM", fields, "text"


def vit(rng):
    return "ViTConfig", "ViTForImageClassification", dict(
        hidden_size=rng.choice([32, 48, 64]), intermediate_size=rng.choice([48, 64]),
        num_hidden_layers=rng.choice([1, 2]), num_attention_heads=rng.choice([2, 4]), image_size=16, patch_size=8,
        num_labels=5), "image"


def siglip(rng):
    hidden = rng.choice([32, 48, 64])

    def tower(**extra):
        return dict(hidden_size=hidden, intermediate_size=rng.choice([48, 64]), num_hidden_layers=rng.choice([1, 2]),
                    num_attention_heads=rng.choice([2, 4]), **extra)
    return "SiglipConfig", "SiglipModel", dict(text_config=tower(vocab_size=VOCAB, max_position_embeddings=16),
                                               vision_config=tower(image_size=16, patch_size=8)), "dual"


FAMILIES = {
    "Llama": lambda rng: decoder("LlamaConfig", "LlamaForCausalLM", rng, head_dim=rng.random() < 0.5),
    "Qwen2": lambda rng: decoder("Qwen2Config", "Qwen2ForCausalLM", rng),
    "Qwen3": lambda rng: decoder("Qwen3Config", "Qwen3ForCausalLM", rng, head_dim=True),
    "Olmo2": lambda rng: decoder("Olmo2Config", "Olmo2ForCausalLM", rng, head_dim=rng.random() < 0.5),
    "StableLM": lambda rng: decoder("StableLmConfig", "StableLmForCausalLM", rng),
    "Mistral": lambda rng: decoder("MistralConfig", "MistralForCausalLM", rng, head_dim=rng.random() < 0.5),
    "Gemma": lambda rng: decoder("GemmaConfig", "GemmaForCausalLM", rng, head_dim=True),
    "Phi3": lambda rng: decoder("Phi3Config", "Phi3ForCausalLM", rng, pad_token_id=0),
    "Falcon": falcon,
    "Qwen3-MoE": lambda rng: decoder("Qwen3MoeConfig", "Qwen3MoeForCausalLM", rng, head_dim=True,
                                     moe_intermediate_size=rng.choice([16, 32]), num_experts=4, num_experts_per_tok=2,
                                     norm_topk_prob=True),
    "RoBERTa": lambda rng: encoder("RobertaConfig", "RobertaForSequenceClassification", rng, pad_token_id=1),
    "ELECTRA": lambda rng: encoder("ElectraConfig", "ElectraForSequenceClassification", rng,
                                   embedding_size=rng.choice([16, 32])),
    "BERT": lambda rng: encoder("BertConfig", "BertForSequenceClassification", rng),
    "ALBERT": lambda rng: encoder("AlbertConfig", "AlbertForSequenceClassification", rng,
                                  embedding_size=rng.choice([16, 32])),
    "ViT": vit,
    "SigLIP": siglip,
}
IGNORED = ("lm_head", "classifier")


def run_case(family: str, seed: int) -> str:
    import transformers

    import structprune as tp
    from structprune.hf import ConfigMismatchError

    rng = random.Random(seed)
    config_name, model_name, fields, kind = FAMILIES[family](rng)
    options = dict(pruning_ratio=round(rng.uniform(0.2, 0.7), 2), prune_num_heads=rng.random() < 0.5,
                   global_pruning=rng.random() < 0.3, round_to=rng.choice([None, 2, 4]))
    if options["prune_num_heads"]:
        options["head_pruning_ratio"] = round(rng.uniform(0.2, 0.7), 2)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 8), generator=generator)
    pixels = torch.randn(2, 3, 16, 16, generator=generator)
    inputs = {"text": {"input_ids": ids}, "image": {"pixel_values": pixels},
              "dual": {"input_ids": ids, "pixel_values": pixels}}[kind]
    try:
        torch.manual_seed(0)
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**fields)).eval()
        with torch.no_grad():
            model(**inputs)
    except Exception:  # noqa: BLE001 - the class (or its model) refuses the unpruned config: not a case
        return "invalid"
    ignored = [getattr(model, name) for name in IGNORED if hasattr(model, name)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.BasePruner(model, inputs, tp.importance.MagnitudeImportance(), ignored_layers=ignored,
                             **options).step()
    with torch.no_grad():
        output = model(**inputs)
    key = "logits" if getattr(output, "logits", None) is not None else "logits_per_image"
    with tempfile.TemporaryDirectory() as path:
        try:
            model.save_pretrained(path)
        except ConfigMismatchError:
            return "refused"
        with torch.no_grad():
            again = type(model).from_pretrained(path).eval()(**inputs)[key]
    return "ok" if (again - output[key]).abs().max().item() <= 1e-4 else "diff"


def main(cases: int, names) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import transformers

    transformers.logging.set_verbosity_error()
    print("| family | cases | ok | refused | logits differ | invalid configs | s |")
    print("|---|---|---|---|---|---|---|")
    totals = {"ok": 0, "refused": 0, "diff": 0, "invalid": 0}
    for index, family in enumerate(name for name in FAMILIES if not names or name in names):
        start, counts = time.perf_counter(), {"ok": 0, "refused": 0, "diff": 0, "invalid": 0}
        for case in range(cases):
            counts[run_case(family, 1000 * (index + 1) + case)] += 1
        for key, value in counts.items():
            totals[key] += value
        valid = cases - counts["invalid"]
        print(f"| {family} | {valid} | {counts['ok']} | {counts['refused']} | {counts['diff']} | {counts['invalid']} | "
              f"{time.perf_counter() - start:.1f} |", flush=True)
    valid = sum(totals.values()) - totals["invalid"]
    print(f"\n{totals['refused']} of {valid} cases refused by save_pretrained, {totals['diff']} reloaded with other logits")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5, sys.argv[2].split(",") if len(sys.argv) > 2 else [])
