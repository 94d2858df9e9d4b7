"""Whole query heads removed while the key/value heads stay (Gemma 3 270M: 4 query heads share 1 kv head).

Eager attention (Gemma's default) repeats the kv heads ``num_key_value_groups`` times with a reshape that spells
out ``kv_heads * n_rep``; the attention adapter rewrites that attribute, so the reshape follows. Each test checks
the removal is exact: the pruned model equals the unpruned one with the removed heads' o_proj columns zeroed.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import structprune as tp
from hf_helpers import tiny_gemma

transformers = pytest.importorskip("transformers")


def _llama(attn: str, heads: int, kv_heads: int):
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=64)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _tag_heads(model, head_dim: int) -> None:
    """Write each query head's index into input column 0 of q_proj, so the kept heads can be read back."""
    for layer in model.model.layers:
        q = layer.self_attn.q_proj
        with torch.no_grad():
            q.weight[:, 0] = torch.arange(q.out_features, dtype=q.weight.dtype).div(head_dim).floor() * 1e-3


def _kept_heads(q, head_dim: int) -> list[int]:
    return [round(float(v) / 1e-3) for v in q.weight.detach()[::head_dim, 0]]


def _prune_query_heads(model, ratio: float, ignore_kv: bool):
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    ignored = [model.lm_head, model.model.embed_tokens]
    ignored += [layer.mlp.gate_proj for layer in model.model.layers]
    if ignore_kv:
        ignored += [p for layer in model.model.layers for p in (layer.self_attn.k_proj, layer.self_attn.v_proj)]
    pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=ratio,
                                  ignored_layers=ignored, prune_num_heads=True, head_pruning_ratio=ratio,
                                  prune_head_dims=False)
    return pruner, ids


def _check_exact(build, ratio: float, ignore_kv: bool, expect_heads: int | None):
    head_dim = 16
    model = build()
    heads = model.config.num_attention_heads
    _tag_heads(model, head_dim)
    unpruned = {k: v.clone() for k, v in model.state_dict().items()}
    pruner, ids = _prune_query_heads(model, ratio, ignore_kv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()
    kept = [_kept_heads(layer.self_attn.q_proj, head_dim) for layer in model.model.layers]
    if expect_heads is not None:
        assert [len(k) for k in kept] == [expect_heads] * len(kept)
        assert model.config.num_attention_heads == expect_heads
    # the reference: the unpruned weights with every removed query head's output columns zeroed
    reference = build()
    reference.load_state_dict(unpruned)
    with torch.no_grad():
        for layer, keep in zip(reference.model.layers, kept):
            for head in range(heads):
                if head not in keep:
                    layer.self_attn.o_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    return model, kept


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gemma_single_kv_head_loses_whole_query_heads_exactly(attn):
    model, kept = _check_exact(lambda: tiny_gemma(attn), 0.5, ignore_kv=False, expect_heads=2)
    for layer in model.model.layers:
        attention = layer.self_attn
        assert attention.q_proj.out_features == 2 * 16 and attention.k_proj.out_features == 16
        assert attention.num_key_value_groups == 2
        assert tuple(attention.q_norm.weight.shape) == (16,)  # the per-head norm keeps its head_dim


def test_gemma_query_heads_round_trip(tmp_path):
    model, _ = _check_exact(lambda: tiny_gemma("eager"), 0.5, ignore_kv=False, expect_heads=2)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_attention_heads == 2 and reloaded.config.num_key_value_heads == 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_grouped_kv_heads_stay_consistent_with_their_query_heads(attn, ratio):
    """8 query heads over 2 kv heads: whatever the step removes, query head i must still read kv head
    i // n_rep (the exactness check fails when heads of one kv group were removed unevenly)."""
    model, kept = _check_exact(lambda: _llama(attn, 8, 2), ratio, ignore_kv=False, expect_heads=None)
    for layer, keep in zip(model.model.layers, kept):
        attention = layer.self_attn
        kv_heads = attention.k_proj.out_features // 16
        assert len(keep) < 8
        assert len(keep) == kv_heads * attention.num_key_value_groups


def test_the_report_names_the_heads_removed_and_the_single_kv_head_is_not_planned_as_channels():
    model = tiny_gemma("eager")
    pruner, _ = _prune_query_heads(model, 0.5, ignore_kv=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.step()
    messages = [str(w.message) for w in caught]
    # the one kv head is a head group: with prune_head_dims=False nothing asks v_proj for channels
    assert not [m for m in messages if "v_proj" in m], messages
    text = str(pruner.report())
    assert "whole heads 4 -> 2 (head_dim 16) in 2 head group(s): model.layers.0.self_attn.q_proj" in text, text
