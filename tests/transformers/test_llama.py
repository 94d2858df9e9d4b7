"""Hugging Face Llama / Qwen2 with grouped-query attention: prune hidden, MLP and whole heads."""
import pytest
import torch

import structprune as tp

transformers = pytest.importorskip("transformers")


def llama(layers=2, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("build", [llama, qwen2], ids=["llama", "qwen2"])
def test_prune_hidden_mlp_and_heads_then_generate_and_reload(build, tmp_path):
    model = build()
    ids = torch.randint(0, 128, (1, 8))
    pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                                  prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.lm_head])
    pruner.step()
    attention = model.model.layers[0].self_attn
    assert model.model.embed_tokens.embedding_dim == 32
    assert attention.q_proj.out_features == 32 and attention.k_proj.out_features == 16  # 2 q heads, 1 kv head
    assert attention.o_proj.in_features == 32 and model.model.layers[0].mlp.up_proj.out_features == 64
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 64
    logits = model(ids).logits
    assert logits.shape == (1, 8, 128)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, logits)


def test_tied_embeddings_prune_together():
    model = llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 8))
    graph = tp.DependencyGraph().build_dependency(model, {"input_ids": ids})
    groups = list(graph.get_all_groups())
    hidden = [g for g in groups if any(i.dep.target.module is model.model.embed_tokens for i in g)]
    assert len(hidden) == 1
    # attention keeps its heads here (prune_head_dims=False: no warning about rotary-pinned head dims)
    pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=0.25,
                                  prune_head_dims=False)
    pruner.step()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.shape == (128, 48) and model.lm_head.in_features == 48
    assert model(ids).logits.shape == (1, 8, 128)


def test_graph_of_a_llama_builds_fast_and_linearly():
    import time

    times = {}
    for layers in (2, 8):
        model = llama(layers)
        ids = torch.randint(0, 128, (1, 8))
        start = time.perf_counter()
        graph = tp.DependencyGraph().build_dependency(model, {"input_ids": ids})
        groups = list(graph.get_all_groups())
        times[layers] = time.perf_counter() - start
        assert len(groups) == 1 + layers  # the hidden size, one MLP per layer (heads need prune_num_heads)
    assert times[8] < 60  # older tools never finish a one-layer Llama; speed itself is in benchmarks/


def test_head_dims_pinned_by_rotary_code_are_refused_by_name_while_the_rest_prunes():
    model = llama(layers=1)
    ids = torch.randint(0, 128, (1, 8))
    # q's channels reach the rotary cos/sin tables; v's reshape spells out head_dim
    with pytest.warns(UserWarning, match=r"prune_head_dims: .*self_attn\.q_proj \(channels reach a constant.*"
                                         r"self_attn\.v_proj \('view'.*spells out.*prune_num_heads=True"):
        tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=0.4,
                             ignored_layers=[model.lm_head]).step()
    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (64, 32, 64)
    # 38 hidden channels planned; LlamaConfig wants a multiple of the 4 heads, so the step keeps 40
    assert model.config.hidden_size == 40 and model.model.layers[0].mlp.up_proj.out_features == 76
    assert model(ids).logits.shape == (1, 8, 128)
    # whole heads remain available on the same model
    tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=0.0,
                         prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.lm_head]).step()
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (32, 16)
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 10)


def test_lossless_removal_oracle_on_a_llama_block():
    """Removing what already carries nothing must leave the logits unchanged: a key/value head (with the
    two q heads that share it) whose o_proj columns are zero, and MLP channels whose down_proj columns are."""
    from oracle import assert_lossless

    model = llama(layers=1)
    ids = torch.randint(0, 128, (2, 8))
    layer = model.model.layers[0]
    # MLP: channels 3, 50 and 100 of the 128 intermediate channels (gate, up and down together)
    group = assert_lossless(model, {"input_ids": ids}, layer.mlp.gate_proj, [3, 50, 100])
    assert layer.mlp.up_proj.out_features == layer.mlp.down_proj.in_features == 125
    assert {item.dep.target.name for item in group} >= {"model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"}
    # attention: key/value head 1 of 2 serves q heads 2 and 3 (head_dim 16)
    attention = layer.self_attn
    with torch.no_grad():
        attention.o_proj.weight[:, 32:64] = 0
        expected = model(ids).logits
    graph = tp.DependencyGraph().build_dependency(model, {"input_ids": ids})
    group = graph.get_pruning_group(attention.q_proj, tp.prune_linear_out_channels, list(range(32, 64)))
    assert not group.blocked, group.blocked
    removed = {item.dep.target.name: item.idxs for item in group}
    assert removed["model.layers.0.self_attn.k_proj"] == list(range(16, 32))
    assert removed["model.layers.0.self_attn.v_proj"] == list(range(16, 32))
    assert removed["model.layers.0.self_attn.o_proj"] == list(range(32, 64))
    group.prune()
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (32, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_grouped_query_heads_go_as_whole_key_value_groups_in_every_layer():
    """Key/value heads are planned before the query heads they serve: every layer ends with the same head
    counts (8 q / 2 kv -> 4 / 1), so the config's single fields describe the model."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer is named as having kept its heads
        tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=0.0,
                             prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.lm_head]).step()
    widths = {(layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features,
               layer.self_attn.v_proj.out_features) for layer in model.model.layers}
    assert widths == {(64, 16, 16)}
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 1)
