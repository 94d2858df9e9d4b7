"""Attention adapters and optional-layer declarations, checked against exact references.

Removing a whole head must equal the unpruned model with that head's share of the output projection
zeroed; a layout the adapter cannot explain must make the forward fail, never regroup channels silently.
"""
import subprocess
import sys

import pytest
import timm
import torch
import transformers
from torch import nn

import structprune as tp
from structprune.adapters import ADAPTERS, MODEL, head_layout, matching_modules, sync_attributes
from structprune.graph.hooks import removed_outputs


# -- head_layout -------------------------------------------------------------------------------------------
def heads_removed(heads, head_dim, which, blocks=1):
    return torch.tensor([b * heads * head_dim + h * head_dim + d
                         for b in range(blocks) for h in which for d in range(head_dim)])


def dims_removed(heads, head_dim, which, blocks=1):
    return torch.tensor(sorted(b * heads * head_dim + h * head_dim + d
                               for b in range(blocks) for h in range(heads) for d in which))


def test_head_layout_reads_removed_channels_exactly():
    # 4 heads x 16 -> 32 channels is 2 heads x 16 or 4 heads x 8: only the removed channels can tell
    assert head_layout(32, 4, 16, heads_removed(4, 16, [1, 2])) == (2, 16)
    assert head_layout(32, 4, 16, dims_removed(4, 16, range(8))) == (4, 8)
    assert head_layout(96, 4, 16, heads_removed(4, 16, [0, 3], blocks=3), blocks=3) == (2, 16)
    assert head_layout(144, 4, 16, dims_removed(4, 16, [1, 5, 9, 13], blocks=3), blocks=3) == (4, 12)
    # a head removed and two dims from every remaining head: the kept (head, dim) grid is 3 x 14
    removed = torch.cat([heads_removed(4, 16, [2]), dims_removed(4, 16, [0, 1])]).unique()
    assert head_layout(42, 4, 16, removed) == (3, 14)


def test_head_layout_without_removed_keeps_what_the_forward_spells_out():
    assert head_layout(64, 4, 16) == (4, 16)
    assert head_layout(32, 4, 16, fixed="head_dim") == (2, 16)  # view(..., -1, head_dim)
    assert head_layout(32, 4, 16, fixed="num_heads") == (4, 8)  # reshape(..., num_heads, head_dim)
    assert head_layout(120, 4, 16, blocks=3, fixed="num_heads") == (4, 10)
    # nothing fits: both stay, so the model's own reshape fails loudly
    assert head_layout(40, 4, 16, fixed="head_dim") == (4, 16)
    assert head_layout(30, 4, 16, fixed="num_heads") == (4, 16)


def test_adapters_run_by_order_and_the_config_adapter_waits_for_the_end_of_a_step():
    config = transformers.BertConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, max_position_embeddings=16)
    model = transformers.BertModel(config)
    pairs = matching_modules(model)
    orders = [adapter.order for _, adapter in pairs]
    assert orders == sorted(orders)
    assert [adapter.deferred for _, adapter in pairs] == [order >= MODEL for order in orders]
    assert pairs[-1] == (model, next(a for a in ADAPTERS if a.name.startswith("Hugging Face model config")))
    assert not pairs[0][1].deferred


# -- GPT-2: a whole head out of the fused c_attn -------------------------------------------------------------
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16, bos_token_id=0,
                        eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def test_gpt2_whole_head_removal_equals_zeroing_that_head():
    from transformers.pytorch_utils import Conv1D

    from structprune.layers import Conv1DPruner

    model = gpt2()
    ids = torch.randint(0, 64, (2, 6))
    attention = model.transformer.h[0].attn
    reference = gpt2()
    with torch.no_grad():
        reference.transformer.h[0].attn.c_proj.weight[8:16] = 0  # head 1's rows of the [in, out] weight
        expected = reference(ids).logits
    graph = tp.DependencyGraph().build_dependency(model, {"input_ids": ids},
                                                  customized_pruners={Conv1D: Conv1DPruner()})
    head = [b * 32 + 8 + d for b in range(3) for d in range(8)]  # head 1 of q, k and v
    group = graph.get_pruning_group(attention.c_attn, tp.prune_conv1d_out_channels, head)
    assert not group.blocked
    group.prune()
    assert (attention.num_heads, attention.head_dim, attention.split_size) == (3, 8, 24)
    assert attention.c_attn.weight.shape == (32, 72) and attention.c_proj.weight.shape == (24, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)


# -- timm: narrowed heads, and a layout only `removed` can explain ------------------------------------------
def small_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1).eval()


def test_timm_whole_head_through_the_graph_equals_zeroing_that_head():
    """timm spells ``self.num_heads`` in its qkv reshape; the adapter follows that attribute, so the graph
    lets a whole head go from q, k and v, and the group's removed channels give the adapter the layout."""
    model, reference = small_vit(), small_vit()
    x = torch.randn(2, 3, 32, 32)
    attention = model.blocks[0].attn
    with torch.no_grad():
        reference.blocks[0].attn.proj.weight[:, 64:128] = 0
        expected = reference(x)
    graph = tp.DependencyGraph().build_dependency(model, x)
    assert type(attention.num_heads) is int  # the trace-time marker is gone
    group = graph.get_pruning_group(attention.qkv, tp.prune_linear_out_channels,
                                    heads_removed(3, 64, [1], blocks=3).tolist())
    assert not group.blocked, group.blocked
    assert {item.dep.target.name: item.idxs for item in group}["blocks.0.attn.proj"] == list(range(64, 128))
    group.prune()
    assert (attention.num_heads, attention.head_dim, attention.attn_dim) == (2, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_timm_head_of_one_block_only_is_still_refused():
    model = small_vit()
    attention = model.blocks[0].attn
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 32, 32))
    q_head = graph.get_pruning_group(attention.qkv, tp.prune_linear_out_channels, list(range(64, 128)))
    assert q_head.blocked and not graph.check_pruning_group(q_head)


def test_timm_whole_head_through_removed_channels_equals_zeroing_that_head():
    """Pruned by hand with the low-level functions, the adapter still gets the layout right when it is
    told which channels went."""
    model, reference = small_vit(), small_vit()
    x = torch.randn(2, 3, 32, 32)
    attention = model.blocks[0].attn
    head = heads_removed(3, 64, [1], blocks=3)
    with torch.no_grad():
        reference.blocks[0].attn.proj.weight[:, 64:128] = 0
        expected = reference(x)
    tp.prune_linear_out_channels(attention.qkv, head.tolist())
    tp.prune_linear_in_channels(attention.proj, list(range(64, 128)))
    sync_attributes(model, removed={attention.qkv: head})
    assert (attention.num_heads, attention.head_dim, attention.attn_dim) == (2, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_timm_layout_nothing_explains_fails_loudly():
    model = small_vit()
    attention = model.blocks[0].attn
    tp.prune_linear_out_channels(attention.qkv, heads_removed(3, 64, [1], blocks=3).tolist())
    tp.prune_linear_in_channels(attention.proj, list(range(64, 128)))
    sync_attributes(model)  # 2 x 64 per block does not split into the 3 heads the reshape spells out
    assert (attention.num_heads, attention.head_dim) == (3, 64)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 32, 32))


def test_removed_outputs_lists_output_side_layers_only():
    model = small_vit()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 32, 32))
    fc1 = model.blocks[0].mlp.fc1
    group = graph.get_pruning_group(fc1, tp.prune_linear_out_channels, [0, 5])
    removed = removed_outputs(group)
    assert set(removed) == {fc1} and removed[fc1].tolist() == [0, 5]  # fc2 loses inputs, not outputs


# -- Conv1D declaration --------------------------------------------------------------------------------------
def test_conv1d_pruner_matches_the_equivalent_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 5)  # nf=6 outputs, nx=5 inputs, weight [5, 6]
    linear = nn.Linear(5, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    tp.prune_conv1d_out_channels(conv, [1, 4])
    tp.prune_conv1d_in_channels(conv, [0])
    tp.prune_linear_out_channels(linear, [1, 4])
    tp.prune_linear_in_channels(linear, [0])
    assert conv.weight.shape == (4, 4) and (conv.nx, conv.nf) == (4, 4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(conv(x), linear(x))


def test_optional_layers_are_declared_without_importing_their_library():
    code = (
        "import sys, structprune\n"
        "from structprune.layers import register_optional_layers, default_root_types\n"
        "assert register_optional_layers() == ()\n"
        "assert not {'transformers', 'torchvision', 'timm'} & set(sys.modules), sorted(sys.modules)[:5]\n"
        "import transformers.pytorch_utils as hf\n"
        "from structprune.layers import DEFAULT_PRUNERS, Conv1DPruner\n"
        "assert hf.Conv1D in register_optional_layers() and isinstance(DEFAULT_PRUNERS[hf.Conv1D], Conv1DPruner)\n"
        "assert hf.Conv1D in default_root_types()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
