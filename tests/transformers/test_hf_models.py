"""Hugging Face Mistral, BERT, GPT-2 and ViT (random init, tiny configs): prune, run, generate, reload.

Every model is pruned at 40% by magnitude with its classifier / LM head ignored. The config adapter must
make save_pretrained / from_pretrained rebuild the pruned shapes exactly, which BERT and GPT-2 allow only
when the attention width equals hidden_size (their configs derive one from the other): those tests use
``round_to=4`` so that the hidden size (64 -> 38.4, rounded to 40) and the attention (4 heads of 16 ->
4 heads of 10) land on the same width.
"""
import pytest
import torch
from torch import nn

import structprune as tp
from hf_helpers import count, logits, magnitude, no_group_left_unpruned

transformers = pytest.importorskip("transformers")


def reload(model, tmp_path):
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path).eval()


# -- Mistral: grouped-query attention with rotary embeddings --------------------------------------------
def test_mistral_hidden_mlp_and_whole_heads_then_generate_and_reload(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 8))
    before = count(model)
    # rotary embeddings pin the head dims, so attention loses whole key/value groups (prune_num_heads)
    with no_group_left_unpruned():
        pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.4,
                                      prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.lm_head])
        pruner.step()
    attention = model.model.layers[0].self_attn
    assert model.model.embed_tokens.embedding_dim == 38  # floor(64 * 0.6)
    assert attention.q_proj.out_features == 32 and attention.k_proj.out_features == 16  # 2 q heads, 1 kv head
    assert model.model.layers[0].mlp.up_proj.out_features == 76
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.num_key_value_heads,
            model.config.intermediate_size, model.config.head_dim) == (38, 2, 1, 76, 16)
    assert count(model) < 0.45 * before
    out = logits(model, input_ids=ids)
    assert out.shape == (1, 8, 128)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
    torch.testing.assert_close(logits(reload(model, tmp_path), input_ids=ids), out)


# -- BERT ------------------------------------------------------------------------------------------------
def bert_config(**overrides):
    from transformers import BertConfig

    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64)
    settings.update(overrides)
    return BertConfig(**settings)


def test_bert_model_keeps_its_hidden_output_and_prunes_attention_and_mlp():
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel(bert_config()).eval()
    ids = torch.randint(0, 128, (1, 8))
    before = count(model)
    with no_group_left_unpruned():
        # the hidden size is the model's output (last_hidden_state, pooler_output): its groups are blocked,
        # by design, and every other group (per-head dims of query/key and of value, the MLP) is pruned
        pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.4,
                                      prune_num_heads=True)
        pruner.step()
    attention = model.encoder.layer[0].attention.self
    assert attention.query.out_features == attention.key.out_features == attention.value.out_features == 40
    assert (attention.num_attention_heads, attention.attention_head_size, attention.all_head_size) == (4, 10, 40)
    assert attention.scaling == pytest.approx(10 ** -0.5)
    assert model.encoder.layer[0].intermediate.dense.out_features == 76
    assert model.embeddings.word_embeddings.embedding_dim == 64
    assert count(model) < 0.75 * before  # embeddings and the 64-wide hidden path stay
    output = model(ids)
    assert output.last_hidden_state.shape == (1, 8, 64) and output.pooler_output.shape == (1, 64)
    # attention (40) no longer equals hidden_size (64): a BertConfig cannot describe this model, so it
    # round-trips with structprune.serialization (save_pruned / load_pruned), not save_pretrained


def test_bert_classifier_prunes_everything_and_round_trips_through_save_pretrained(tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config()).eval()
    ids = torch.randint(0, 128, (2, 8))
    before = count(model)
    with no_group_left_unpruned():
        pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.4, round_to=4,
                                      prune_num_heads=True, ignored_layers=[model.classifier])
        pruner.step()
    attention = model.bert.encoder.layer[1].attention.self
    assert model.bert.embeddings.word_embeddings.embedding_dim == 40
    assert (attention.num_attention_heads, attention.attention_head_size, attention.all_head_size) == (4, 10, 40)
    assert model.bert.pooler.dense.out_features == 40 and model.classifier.in_features == 40
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.intermediate_size) == (40, 4, 76)
    assert count(model) < 0.45 * before
    out = logits(model, input_ids=ids)
    assert out.shape == (2, 2)
    torch.testing.assert_close(logits(reload(model, tmp_path), input_ids=ids), out)


# -- GPT-2: transformers Conv1D (weight stored [in, out]) and a fused c_attn -------------------------------
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def check_pruned_gpt2(model, ids, before, tmp_path):
    attention = model.transformer.h[0].attn
    assert model.transformer.wte.embedding_dim == 40 and model.lm_head.in_features == 40
    assert attention.c_attn.weight.shape == (40, 120) and attention.c_attn.nf == 120  # q, k, v: 4 heads of 10
    assert (attention.num_heads, attention.head_dim, attention.split_size, attention.embed_dim) == (4, 10, 40, 40)
    assert attention.scaling == pytest.approx(10 ** -0.5)
    assert model.transformer.h[0].mlp.c_fc.nf == 156  # 256 * 0.6 = 153.6, rounded up to 4
    assert (model.config.n_embd, model.config.n_head, model.config.n_inner) == (40, 4, 156)
    assert count(model) < 0.5 * before
    out = logits(model, input_ids=ids)
    assert out.shape == (1, 8, 128)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
    torch.testing.assert_close(logits(reload(model, tmp_path), input_ids=ids), out)


def test_gpt2_with_conv1d_declared_explicitly(tmp_path):
    from transformers.pytorch_utils import Conv1D

    from structprune.importance.elementwise import DEFAULT_TARGET_TYPES
    from structprune.layers import Conv1DPruner

    model = gpt2()
    ids = torch.randint(0, 128, (1, 8))
    before = count(model)
    with no_group_left_unpruned():
        pruner = tp.pruner.BasePruner(
            model, {"input_ids": ids}, tp.importance.MagnitudeImportance(target_types=DEFAULT_TARGET_TYPES + (Conv1D,)),
            pruning_ratio=0.4, round_to=4, prune_num_heads=True, ignored_layers=[model.lm_head],
            customized_pruners={Conv1D: Conv1DPruner()}, root_module_types=(nn.Linear, Conv1D),
        )
        pruner.step()
    check_pruned_gpt2(model, ids, before, tmp_path)


def test_gpt2_with_default_settings(tmp_path):
    """Conv1D is declared, roots groups and is scored without any option once transformers is imported."""
    model = gpt2()
    ids = torch.randint(0, 128, (1, 8))
    before = count(model)
    with no_group_left_unpruned():
        pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.4, round_to=4,
                                      prune_num_heads=True, ignored_layers=[model.lm_head])
        pruner.step()
    check_pruned_gpt2(model, ids, before, tmp_path)


# -- ViT ---------------------------------------------------------------------------------------------------
def test_vit_classifier_prunes_hidden_heads_and_mlp_and_round_trips(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8, num_labels=10)
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    before = count(model)
    with no_group_left_unpruned():
        pruner = tp.pruner.BasePruner(model, {"pixel_values": pixels}, magnitude(), pruning_ratio=0.4,
                                      prune_num_heads=True, ignored_layers=[model.classifier])
        pruner.step()
    attention = model.vit.layers[0].attention
    assert model.vit.embeddings.cls_token.shape[-1] == 38 and model.classifier.in_features == 38
    assert attention.q_proj.out_features == attention.v_proj.out_features == 40
    assert (attention.num_attention_heads, attention.head_dim) == (4, 10)
    assert attention.scaling == pytest.approx(10 ** -0.5)
    # ViT reads config.head_dim, so heads narrower than hidden_size / num_heads still round-trip
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.head_dim,
            model.config.intermediate_size) == (38, 4, 10, 76)
    assert count(model) < 0.45 * before
    out = logits(model, pixel_values=pixels)
    assert out.shape == (2, 10)
    torch.testing.assert_close(logits(reload(model, tmp_path), pixel_values=pixels), out)
