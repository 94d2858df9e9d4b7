"""Tiny random Hugging Face models, one per family, and the four checks a new user runs on them.

Each ``Family`` builds a model from a small config (hidden 64-128, 2 layers, grouped-query attention where
the family has it, vocab 128) with its example inputs, the head a user leaves alone (LM head, classifier,
projections to a fixed output space) and the Auto class that reloads it. ``run_checks`` prunes at
``pruning_ratio=0.5`` with whole heads (``prune_num_heads=True, head_pruning_ratio=0.5``) and records:

1. forward runs and every output tensor keeps its shape,
2. parameters drop by at least 25%,
3. models that generate do so (``generate(ids, max_new_tokens=5)``),
4. ``save_pretrained`` then ``AutoModel*.from_pretrained`` gives the same outputs (atol 1e-5).

Shared by tests/transformers/test_hf_families.py and benchmarks/hf_families.py (the table in docs/huggingface.md).
"""
from __future__ import annotations

import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

VOCAB = 128
SEQ = 8
#: how the pruner's own warnings begin (tables and tests report them)
STRUCTPRUNE_WARNINGS = ("prune_num_heads", "prune_head_dims", "left unpruned", "uniform_config_widths")


@dataclass
class Family:
    name: str
    config: Callable  # () -> config
    model_class: str  # transformers class name
    auto: str  # transformers Auto class used to reload
    inputs: str = "text"  # "text", "seq2seq", "image", "audio", "dual"
    generates: bool = False
    ignore: tuple = ()  # attribute paths of layers a user leaves alone (heads onto a fixed output space)
    extra: dict = field(default_factory=dict)  # BasePruner keyword overrides
    #: why the family's config cannot describe the pruned model (save_pretrained refuses; tp.save_pruned works)
    config_limit: str | None = None


def _cfg(name: str, **kwargs):
    import transformers

    def make():
        return getattr(transformers, name)(**kwargs)
    return make


def _dual(name: str, text: dict, vision: dict, **kwargs):
    import transformers

    def make():
        return getattr(transformers, name)(text_config=text, vision_config=vision, **kwargs)
    return make


LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64)
VIT_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8, num_labels=10)
CLIP_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=32)
CLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)

FAMILIES = [
    Family("Llama", _cfg("LlamaConfig", **LLAMA_LIKE), "LlamaForCausalLM", "AutoModelForCausalLM",
           generates=True, ignore=("lm_head",)),
    Family("Mistral", _cfg("MistralConfig", **LLAMA_LIKE), "MistralForCausalLM", "AutoModelForCausalLM",
           generates=True, ignore=("lm_head",)),
    Family("Qwen2", _cfg("Qwen2Config", **LLAMA_LIKE), "Qwen2ForCausalLM", "AutoModelForCausalLM",
           generates=True, ignore=("lm_head",)),
    Family("Qwen3", _cfg("Qwen3Config", **LLAMA_LIKE, head_dim=16), "Qwen3ForCausalLM", "AutoModelForCausalLM",
           generates=True, ignore=("lm_head",)),
    Family("Phi", _cfg("PhiConfig", **LLAMA_LIKE), "PhiForCausalLM", "AutoModelForCausalLM",
           generates=True, ignore=("lm_head",)),
    Family("Phi3", _cfg("Phi3Config", **LLAMA_LIKE, pad_token_id=0), "Phi3ForCausalLM", "AutoModelForCausalLM",
           generates=True, ignore=("lm_head",)),
    Family("GPT2", _cfg("GPT2Config", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64),
           "GPT2LMHeadModel", "AutoModelForCausalLM", generates=True, ignore=("lm_head",)),
    Family("GPTNeoX", _cfg("GPTNeoXConfig", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
           "GPTNeoXForCausalLM", "AutoModelForCausalLM", generates=True, ignore=("lm_head",)),
    Family("GPTJ", _cfg("GPTJConfig", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        rotary_dim=8),
           "GPTJForCausalLM", "AutoModelForCausalLM", generates=True, ignore=("lm_head",)),
    Family("OPT", _cfg("OPTConfig", vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64),
           "OPTForCausalLM", "AutoModelForCausalLM", generates=True, ignore=("lm_head",)),
    Family("Falcon", _cfg("FalconConfig", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                          ffn_hidden_size=128, max_position_embeddings=64),
           "FalconForCausalLM", "AutoModelForCausalLM", generates=True, ignore=("lm_head",)),
    Family("StableLM", _cfg("StableLmConfig", **LLAMA_LIKE), "StableLmForCausalLM", "AutoModelForCausalLM",
           generates=True, ignore=("lm_head",)),
    Family("Cohere", _cfg("CohereConfig", **LLAMA_LIKE), "CohereForCausalLM", "AutoModelForCausalLM",
           generates=True, ignore=("lm_head",)),
    Family("Olmo2", _cfg("Olmo2Config", **LLAMA_LIKE), "Olmo2ForCausalLM", "AutoModelForCausalLM",
           generates=True, ignore=("lm_head",)),
    Family("Granite", _cfg("GraniteConfig", **LLAMA_LIKE), "GraniteForCausalLM", "AutoModelForCausalLM",
           generates=True, ignore=("lm_head",)),
    Family("Gemma", _cfg("GemmaConfig", **LLAMA_LIKE, head_dim=16), "GemmaForCausalLM", "AutoModelForCausalLM",
           generates=True, ignore=("lm_head",)),
    Family("Gemma2", _cfg("Gemma2Config", **LLAMA_LIKE, head_dim=16), "Gemma2ForCausalLM",
           "AutoModelForCausalLM", generates=True, ignore=("lm_head",)),
    Family("Gemma3", _cfg("Gemma3TextConfig", **LLAMA_LIKE, head_dim=16), "Gemma3ForCausalLM",
           "AutoModelForCausalLM", generates=True, ignore=("lm_head",)),
    Family("BLOOM", _cfg("BloomConfig", vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
           "BloomForCausalLM", "AutoModelForCausalLM", generates=True, ignore=("lm_head",)),
    Family("DeepseekV3", _cfg("DeepseekV3Config", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
                              qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=2,
                              n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                              max_position_embeddings=64),
           "DeepseekV3ForCausalLM", "AutoModelForCausalLM", generates=True, ignore=("lm_head",)),
    Family("Mamba", _cfg("MambaConfig", vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2,
                         expand=2, conv_kernel=4, time_step_rank=8),
           "MambaForCausalLM", "AutoModelForCausalLM", generates=True, ignore=("lm_head",)),
    Family("T5", _cfg("T5Config", vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      decoder_start_token_id=0),
           "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM", inputs="seq2seq", generates=True,
           ignore=("lm_head",)),
    Family("BART", _cfg("BartConfig", vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_position_embeddings=64),
           "BartForConditionalGeneration", "AutoModelForSeq2SeqLM", inputs="seq2seq", generates=True,
           ignore=("lm_head",)),
    Family("Whisper", _cfg("WhisperConfig", vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16,
                           max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2),
           "WhisperForConditionalGeneration", "AutoModelForSpeechSeq2Seq", inputs="audio", generates=True,
           ignore=("proj_out",)),
    Family("BERT", _cfg("BertConfig", **BERT_LIKE), "BertForSequenceClassification",
           "AutoModelForSequenceClassification", ignore=("classifier",)),
    Family("RoBERTa", _cfg("RobertaConfig", **BERT_LIKE, pad_token_id=1), "RobertaForSequenceClassification",
           "AutoModelForSequenceClassification", ignore=("classifier.out_proj",)),
    Family("DistilBERT", _cfg("DistilBertConfig", vocab_size=VOCAB, dim=64, hidden_dim=128, n_layers=2,
                              n_heads=4, max_position_embeddings=64),
           "DistilBertForSequenceClassification", "AutoModelForSequenceClassification", ignore=("classifier",)),
    Family("ALBERT", _cfg("AlbertConfig", **BERT_LIKE, embedding_size=32), "AlbertForSequenceClassification",
           "AutoModelForSequenceClassification", ignore=("classifier",)),
    Family("DeBERTa-v2", _cfg("DebertaV2Config", **BERT_LIKE, relative_attention=True, position_buckets=16,
                              pos_att_type=["p2c", "c2p"]),
           "DebertaV2ForSequenceClassification", "AutoModelForSequenceClassification", ignore=("classifier",)),
    Family("ELECTRA", _cfg("ElectraConfig", **BERT_LIKE, embedding_size=32), "ElectraForSequenceClassification",
           "AutoModelForSequenceClassification", ignore=("classifier.out_proj",)),
    Family("ViT", _cfg("ViTConfig", **VIT_LIKE), "ViTForImageClassification", "AutoModelForImageClassification",
           inputs="image", ignore=("classifier",)),
    Family("DeiT", _cfg("DeiTConfig", **VIT_LIKE), "DeiTForImageClassification",
           "AutoModelForImageClassification", inputs="image", ignore=("classifier",)),
    Family("ConvNeXt", _cfg("ConvNextConfig", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                            image_size=32, num_labels=10),
           "ConvNextForImageClassification", "AutoModelForImageClassification", inputs="image",
           ignore=("classifier",)),
    Family("Swin", _cfg("SwinConfig", image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                        window_size=4, num_labels=10),
           "SwinForImageClassification", "AutoModelForImageClassification", inputs="image",
           ignore=("classifier",)),
    Family("SigLIP", _dual("SiglipConfig", CLIP_TEXT, CLIP_VISION), "SiglipModel", "AutoModel", inputs="dual"),
    Family("CLIP", _dual("CLIPConfig", CLIP_TEXT, CLIP_VISION, projection_dim=32), "CLIPModel", "AutoModel",
           inputs="dual", ignore=("text_projection", "visual_projection")),
]
BY_NAME = {family.name: family for family in FAMILIES}


def build(family: Family):
    import transformers

    config = family.config()
    torch.manual_seed(0)
    model = getattr(transformers, family.model_class)(config).eval()
    return model, example_inputs(family, config)


def example_inputs(family: Family, config) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, SEQ), generator=generator)
    if family.inputs == "text":
        return {"input_ids": ids}
    if family.inputs == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    if family.inputs == "audio":
        features = torch.randn(1, config.num_mel_bins, 2 * config.max_source_positions, generator=generator)
        return {"input_features": features, "decoder_input_ids": ids[:, :4]}
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    if family.inputs == "image":
        return {"pixel_values": pixels}
    return {"input_ids": ids.repeat(2, 1), "pixel_values": pixels}


def ignored_layers(model, family: Family) -> list:
    layers = []
    for path in family.ignore:
        module = model
        for part in path.split("."):
            module = getattr(module, part)
        layers.append(module)
    return layers


def prune(model, inputs, family: Family, **overrides):
    import structprune as tp

    settings = dict(pruning_ratio=0.5, prune_num_heads=True, head_pruning_ratio=0.5,
                    ignored_layers=ignored_layers(model, family))
    settings.update(family.extra)
    settings.update(overrides)
    pruner = tp.pruner.BasePruner(model, inputs, tp.importance.MagnitudeImportance(), **settings)
    pruner.step()
    return pruner


def outputs(model, inputs) -> dict:
    """The task outputs of a forward (logits, logits_per_image...), or every tensor when it has none.

    Hidden states a task model also returns (BART's encoder_last_hidden_state, CLIP's text_embeds) follow
    the pruned width, as the pruners' default output_transform for transformers models says.
    """
    with torch.no_grad():
        result = model(**inputs)
    tensors = {key: value for key, value in result.items() if isinstance(value, torch.Tensor)}
    logits = {key: value for key, value in tensors.items() if "logits" in key}
    return logits or tensors


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Result:
    name: str
    ratio: float | None = None  # params after / before
    forward: str = "-"
    params: str = "-"
    generate: str = "n/a"
    reload: str = "-"
    reload_pruned: str = "n/a"  # tp.save_pruned / tp.load_pruned, for families whose config has a limit
    warnings: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(value in ("ok", "n/a") for value in (self.forward, self.params, self.generate, self.reload))


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text[:160]


def run_checks(family: Family, directory=None) -> Result:
    """The four checks; failures are recorded as short messages, not raised."""
    import transformers

    result = Result(family.name)
    model, inputs = build(family)
    before_outputs = outputs(model, inputs)
    before = count(model)
    if family.generates:
        generate_kwargs = {key: value for key, value in inputs.items() if key != "decoder_input_ids"}
        generate_kwargs.update(max_new_tokens=5, min_new_tokens=5, do_sample=False)
        generated_shape = model.generate(**generate_kwargs).shape
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prune(model, inputs, family)
        result.warnings = [str(w.message) for w in caught if str(w.message).startswith(STRUCTPRUNE_WARNINGS)]
    except Exception as error:  # noqa: BLE001 - recorded in the table
        result.forward = "step: " + _short(error)
        traceback.print_exc()
        return result
    result.ratio = count(model) / before
    try:
        after = outputs(model, inputs)
        changed = [key for key in before_outputs if key in after and after[key].shape != before_outputs[key].shape]
        result.forward = "ok" if not changed else "shape of " + ", ".join(changed)
    except Exception as error:  # noqa: BLE001
        result.forward = _short(error)
        after = None
    result.params = "ok" if result.ratio <= 0.75 else f"kept {result.ratio:.0%}"
    if family.generates:
        try:
            generated = model.generate(**generate_kwargs)
            result.generate = "ok" if generated.shape == generated_shape else f"shape {tuple(generated.shape)}"
        except Exception as error:  # noqa: BLE001
            result.generate = _short(error)
    if after is None:
        return result
    with tempfile.TemporaryDirectory() if directory is None else _nullcontext(directory) as path:
        try:
            model.save_pretrained(path)
            reloaded = getattr(transformers, family.auto).from_pretrained(path).eval()
            result.reload = _compare(outputs(reloaded, inputs), after)
        except Exception as error:  # noqa: BLE001
            result.reload = _short(error)
        if family.config_limit is not None:
            import structprune as tp

            tp.save_pruned(model, f"{path}/pruned")
            fresh, _ = build(family)
            result.reload_pruned = _compare(outputs(tp.load_pruned(fresh, f"{path}/pruned"), inputs), after)
    return result


def _compare(again: dict, after: dict) -> str:
    worst = max((again[key] - value).abs().max().item() for key, value in after.items() if key in again)
    return "ok" if worst <= 1e-5 else f"max diff {worst:.2g}"


class _nullcontext:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *args):
        return False
