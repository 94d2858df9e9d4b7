"""timm models (pretrained=False, small inputs): prune 40% by magnitude, the output keeps its shape.

Transformers prune hidden width, MLPs and heads: timm reshapes fused qkv to (3, num_heads, head_dim) or
(3, num_heads, -1) with ``self.num_heads``, which the adapters follow (they rewrite num_heads, head_dim,
attn_dim and scale), so with prune_num_heads whole heads go from q, k and v together; without it every
head narrows alike. Every group must prune (no "left unpruned" warning) except where a test names the
group and says why.
"""
import pytest
import timm
import torch

import structprune as tp
from hf_helpers import count, magnitude, no_group_left_unpruned


def attention_agrees(model, check_scale=True):
    """Every timm Attention's recorded layout matches its (pruned) qkv / proj widths."""
    from timm.layers import Attention

    found = 0
    for module in model.modules():
        if isinstance(module, Attention):
            found += 1
            assert module.qkv.out_features == 3 * module.num_heads * module.head_dim
            assert module.attn_dim == module.num_heads * module.head_dim == module.proj.in_features
            assert module.scale == pytest.approx(module.head_dim ** -0.5)
    return found


def check_vit(model, heads, head_dim):
    assert attention_agrees(model)
    for block in model.blocks:
        assert (block.attn.num_heads, block.attn.head_dim) == (heads, head_dim)  # whole heads went


def check_swin(model):
    from timm.models.swin_transformer import WindowAttention

    windows = [m for m in model.modules() if isinstance(m, WindowAttention)]
    assert windows
    for module in windows:
        assert module.num_heads == module.relative_position_bias_table.shape[-1]  # heads stay
        head_dim = module.qkv.out_features // (3 * module.num_heads)
        assert module.qkv.out_features == 3 * module.num_heads * head_dim
        assert module.scale == pytest.approx(head_dim ** -0.5)
    assert windows[0].qkv.out_features < 3 * 96  # the first stage's attention narrowed


def check_levit(model):
    from timm.models.levit import Attention, AttentionDownsample

    layers = [m for m in model.modules() if isinstance(m, (Attention, AttentionDownsample))]
    assert layers
    narrowed = 0
    for module in layers:
        assert module.num_heads == module.attention_biases.shape[0]
        assert module.val_attn_dim == module.num_heads * module.val_dim == module.proj.ln.linear.in_features
        assert module.key_attn_dim == module.num_heads * module.key_dim
        assert module.scale == pytest.approx(module.key_dim ** -0.5)
        if hasattr(module, "qkv"):
            assert module.qkv.linear.out_features == module.num_heads * (2 * module.key_dim + module.val_dim)
            narrowed += module.key_dim < 16 or module.val_dim < 32  # levit_128s: key_dim 16, attn_ratio 2
    assert narrowed  # per-head q/k or v dims were pruned


def check_poolformer(model):
    from timm.models.metaformer import Scale

    scales = [m for m in model.modules() if isinstance(m, Scale)]
    assert scales and all(m.shape[0] == m.scale.shape[0] for m in scales)
    assert model.stem.conv.out_channels < 64


def check_mixer(model):
    # the token MLP's output is the number of patches, set by the stem conv's stride: it stays
    assert all(block.mlp_tokens.fc2.out_features == 16 for block in model.blocks)
    assert all(block.mlp_tokens.fc1.out_features < 384 for block in model.blocks)  # its hidden width goes


def test_mixer_token_mlp_output_is_blocked_up_front():
    from timm.models.mlp_mixer import MlpMixer

    model = MlpMixer(img_size=64, patch_size=16, num_blocks=1, embed_dim=32).eval()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 64, 64))
    fc2 = model.blocks[0].mlp_tokens.fc2
    group = graph.get_pruning_group(fc2, tp.prune_linear_out_channels, [0, 1])
    assert not graph.check_pruning_group(group)
    assert any("stem.proj" in reason and "changes to" in reason for reason in group.blocked), group.blocked


CASES = {
    # name: (create_model kwargs, input size, max remaining parameter fraction, extra check, groups allowed
    #        to stay unpruned)
    "vit_small_patch16_224": (dict(img_size=64, depth=4), 64, 0.4, lambda m: check_vit(m, 3, 64), ()),
    "deit_tiny_patch16_224": (dict(img_size=64), 64, 0.4, lambda m: check_vit(m, 1, 64), ()),
    "swin_tiny_patch4_window7_224": (dict(img_size=64), 64, 0.4, check_swin, ()),
    "levit_128s": (dict(img_size=128), 128, 0.4, check_levit, ()),
    "convnext_tiny": ({}, 64, 0.4, None, ()),
    "efficientnet_b0": ({}, 64, 0.45, None, ()),
    "mobilenetv3_large_100": ({}, 64, 0.45, None, ()),
    "resnet50": ({}, 64, 0.4, None, ()),
    "regnetx_002": ({}, 64, 0.45, None, ()),
    "poolformer_s12": ({}, 64, 0.4, check_poolformer, ()),
    "mixer_b16_224": (dict(img_size=64), 64, 0.4, check_mixer, ()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_timm_model_prunes_by_forty_percent(name):
    kwargs, size, max_fraction, check, allowed = CASES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x).shape
    before = count(model)
    head = model.get_classifier()
    ignored = list(head) if isinstance(head, tuple) else [head]  # LeViT: (head, head_dist)
    with no_group_left_unpruned(allowed):
        pruner = tp.pruner.BasePruner(model, x, magnitude(), pruning_ratio=0.4, prune_num_heads=True,
                                      head_pruning_ratio=0.5, ignored_layers=ignored)
        pruner.step()
    with torch.no_grad():
        assert model(x).shape == expected
    assert count(model) < max_fraction * before, count(model) / before
    if check is not None:
        check(model)


@pytest.mark.parametrize("prune_head_dims", [True, False])
def test_timm_vit_head_dims_follow_prune_head_dims(prune_head_dims):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    x = torch.randn(1, 3, 32, 32)
    tp.pruner.BasePruner(model, x, magnitude(), pruning_ratio=0.5, prune_head_dims=prune_head_dims,
                         ignored_layers=[model.head]).step()
    assert model.patch_embed.proj.out_channels == 192  # the hidden width halves either way
    for block in model.blocks:
        assert block.attn.num_heads == 6  # heads stay without prune_num_heads
        assert block.attn.head_dim == (32 if prune_head_dims else 64)  # every head narrows equally, or none
        assert attention_agrees(model)
    assert model(x).shape == (1, 1000)


def test_global_pruning_removes_whole_heads_too():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    x = torch.randn(1, 3, 32, 32)
    fc1 = [block.mlp.fc1.out_features for block in model.blocks]
    tp.pruner.BasePruner(model, x, magnitude(), pruning_ratio=0.4, global_pruning=True, prune_num_heads=True,
                         head_pruning_ratio=0.5, ignored_layers=[model.head]).step()
    assert [(block.attn.num_heads, block.attn.head_dim) for block in model.blocks] == [(3, 64), (3, 64)]
    assert attention_agrees(model)
    # the heads count towards the global budget; the rest of it comes out of the other groups
    assert sum(block.mlp.fc1.out_features for block in model.blocks) < sum(fc1)
    assert model(x).shape == (1, 1000)
