"""Hugging Face Mistral, BERT, GPT-2 and ViT (random init, tiny configs): prune, run, generate, reload.

Models are pruned at 40-50% by magnitude with the classifier / LM head ignored. Attention code views q/k/v
as (-1, head_dim), so the graph lets whole heads go (prune_num_heads) but pins head dims. The config
adapter makes save_pretrained / from_pretrained rebuild the pruned shapes exactly; BERT and GPT-2 configs
derive the attention width from hidden_size, so their round-trip tests prune hidden and heads by the same
50% to stay describable.
"""
import pytest
import torch
from torch import nn

import structprune as tp
from hf_helpers import count, logits, magnitude, no_group_left_unpruned


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


def bert_heads(encoder):
    """BERT views q/k/v as (-1, attention_head_size): the graph lets only whole heads go, and the pruner
    learns the head layout from ``num_heads`` (BertSelfAttention has no ``head_dim`` attribute)."""
    return {layer.attention.self.query: layer.attention.self.num_attention_heads for layer in encoder.layer}


def test_bert_model_keeps_its_hidden_output_and_prunes_heads_and_mlp():
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel(bert_config()).eval()
    ids = torch.randint(0, 128, (1, 8))
    before = count(model)
    with no_group_left_unpruned():
        # the hidden size is the model's output (last_hidden_state, pooler_output): those groups are blocked,
        # by design; whole heads (query, key, value, output.dense) and the MLP go
        pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.4, prune_num_heads=True,
                                      head_pruning_ratio=0.5, num_heads=bert_heads(model.encoder))
        pruner.step()
    attention = model.encoder.layer[0].attention.self
    assert attention.query.out_features == attention.key.out_features == attention.value.out_features == 32
    assert (attention.num_attention_heads, attention.attention_head_size, attention.all_head_size) == (2, 16, 32)
    assert attention.scaling == pytest.approx(16 ** -0.5)
    assert model.encoder.layer[0].attention.output.dense.in_features == 32
    assert model.encoder.layer[0].intermediate.dense.out_features == 76
    assert model.embeddings.word_embeddings.embedding_dim == 64
    assert count(model) < 0.72 * before  # embeddings and the 64-wide hidden path stay
    output = model(ids)
    assert output.last_hidden_state.shape == (1, 8, 64) and output.pooler_output.shape == (1, 64)
    # 2 heads x 16 no longer equal hidden_size (64): a BertConfig cannot describe this model, so it
    # round-trips with structprune.serialization (save_pruned / load_pruned), not save_pretrained


def test_bert_classifier_prunes_everything_and_round_trips_through_save_pretrained(tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config()).eval()
    ids = torch.randint(0, 128, (2, 8))
    before = count(model)
    with no_group_left_unpruned():
        # hidden 64 -> 32 and 4 -> 2 heads of 16: the attention width stays equal to hidden_size, the only
        # layout a BertConfig can describe
        pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.5, prune_num_heads=True,
                                      head_pruning_ratio=0.5, num_heads=bert_heads(model.bert.encoder),
                                      ignored_layers=[model.classifier])
        pruner.step()
    attention = model.bert.encoder.layer[1].attention.self
    assert model.bert.embeddings.word_embeddings.embedding_dim == 32
    assert (attention.num_attention_heads, attention.attention_head_size, attention.all_head_size) == (2, 16, 32)
    assert model.bert.pooler.dense.out_features == 32 and model.classifier.in_features == 32
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.intermediate_size) == (32, 2, 64)
    assert "head_dim" not in model.config.to_dict()  # hidden_size / num_attention_heads says it
    assert count(model) < 0.32 * before
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


def test_gpt2_with_conv1d_declared_explicitly_prunes_hidden_and_mlp():
    from transformers.pytorch_utils import Conv1D

    from structprune.importance.elementwise import DEFAULT_TARGET_TYPES
    from structprune.layers import Conv1DPruner

    model = gpt2()
    ids = torch.randint(0, 128, (1, 8))
    before = count(model)
    with no_group_left_unpruned():
        # without prune_num_heads attention stays whole: c_attn is viewed as (-1, head_dim), so its head
        # dims are pinned (group blocked, not a failure)
        pruner = tp.pruner.BasePruner(
            model, {"input_ids": ids}, tp.importance.MagnitudeImportance(target_types=DEFAULT_TARGET_TYPES + (Conv1D,)),
            pruning_ratio=0.4, ignored_layers=[model.lm_head], customized_pruners={Conv1D: Conv1DPruner()},
            root_module_types=(nn.Linear, Conv1D),
            uniform_config_widths=False,  # GPT2Config derives head_dim = n_embd / n_head: 38 is not describable
        )
        pruner.step()
    block = model.transformer.h[0]
    assert model.transformer.wte.embedding_dim == model.transformer.wpe.embedding_dim == 38
    assert block.attn.c_attn.weight.shape == (38, 192) and (block.attn.c_attn.nx, block.attn.c_attn.nf) == (38, 192)
    assert block.attn.c_proj.weight.shape == (64, 38) and block.mlp.c_fc.weight.shape == (38, 153)
    assert block.mlp.c_proj.nx == 153 and model.lm_head.in_features == 38
    assert count(model) < 0.5 * before
    assert logits(model, input_ids=ids).shape == (1, 8, 128)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)


def test_gpt2_with_default_settings_loses_whole_heads_from_its_fused_c_attn(tmp_path):
    """c_attn holds q, k and v one after another: a head goes from all three blocks at once."""
    model = gpt2()
    ids = torch.randint(0, 128, (1, 8))
    block = model.transformer.h[0].attn
    scores = torch.tensor([3.0, 0.1, 2.0, 1.0])  # per head; head 1 is the weakest, then head 3
    for index, scale in enumerate(scores):
        for part in range(3):
            cols = slice(part * 64 + index * 16, part * 64 + (index + 1) * 16)
            block.c_attn.weight.data[:, cols] *= scale
    before = count(model)
    with no_group_left_unpruned():
        pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.5,
                                      prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.lm_head])
        pruner.step()
    for layer in model.transformer.h:
        attention = layer.attn
        assert (attention.num_heads, attention.head_dim, attention.split_size, attention.embed_dim) == (2, 16, 32, 32)
        assert attention.c_attn.weight.shape == (32, 96) and attention.c_proj.weight.shape == (32, 32)
    assert model.config.n_embd == 32 and model.config.n_head == 2
    assert count(model) < 0.4 * before
    out = logits(model, input_ids=ids)
    assert out.shape == (1, 8, 128)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
    torch.testing.assert_close(logits(reload(model, tmp_path), input_ids=ids), out)


def test_gpt2_kept_heads_are_the_strong_ones_in_q_k_and_v():
    model = gpt2()
    ids = torch.randint(0, 128, (1, 8))
    weight = model.transformer.h[0].attn.c_attn.weight.data
    for index, scale in enumerate([3.0, 0.1, 2.0, 0.2]):
        for part in range(3):
            weight[:, part * 64 + index * 16: part * 64 + (index + 1) * 16] *= scale
    kept = torch.cat([weight[:, part * 64 + index * 16: part * 64 + (index + 1) * 16]
                      for part in range(3) for index in (0, 2)], dim=1).clone()
    # which heads go, not whether GPT2Config (head size = n_embd / n_head) can state 2 heads of a 64 hidden size
    pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.0,
                                  prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.lm_head],
                                  uniform_config_widths=False)
    pruner.step()
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight.data, kept)


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
                                      prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.classifier])
        pruner.step()
    attention = model.vit.layers[0].attention
    assert model.vit.embeddings.cls_token.shape[-1] == 38 and model.classifier.in_features == 38
    assert attention.q_proj.out_features == attention.v_proj.out_features == attention.o_proj.in_features == 32
    assert (attention.num_attention_heads, attention.head_dim) == (2, 16)
    assert attention.scaling == pytest.approx(16 ** -0.5)
    assert model.vit.layers[0].mlp.fc1.out_features == 76
    # ViT reads config.head_dim, so heads that no longer split hidden_size still round-trip
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.head_dim,
            model.config.intermediate_size) == (38, 2, 16, 76)
    assert count(model) < 0.4 * before
    out = logits(model, pixel_values=pixels)
    assert out.shape == (2, 10)
    torch.testing.assert_close(logits(reload(model, tmp_path), pixel_values=pixels), out)
