"""torchvision attention: ViT (nn.MultiheadAttention), Swin and MaxViT attention declarations, and
nn.MultiheadAttention / nn.TransformerEncoder(Layer) in both batch layouts.

Each prunes 40% by magnitude, the output keeps its shape and no group is left unpruned.
"""
import pytest
import torch
import torchvision
from torch import nn

import structprune as tp
from hf_helpers import count, magnitude, no_group_left_unpruned


def prune(model, x, ignored, **options):
    with no_group_left_unpruned():
        pruner = tp.pruner.BasePruner(model, x, magnitude(), pruning_ratio=0.4, ignored_layers=ignored, **options)
        pruner.step()
    return pruner


def test_vit_b_16_hidden_dim_and_attention_follow_the_pruned_width():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    before = count(model)
    prune(model, x, [model.heads.head])
    assert model.hidden_dim == model.conv_proj.out_channels == model.class_token.shape[-1] == 468  # 460.8, whole multiples of 12 heads
    for layer in model.encoder.layers:
        attention = layer.self_attention
        assert attention.embed_dim == attention.out_proj.out_features == model.hidden_dim
        assert attention.in_proj_weight.shape == (3 * model.hidden_dim, model.hidden_dim)
        assert attention.head_dim * attention.num_heads == attention.embed_dim and attention.num_heads == 12
    assert count(model) < 0.4 * before
    with torch.no_grad():
        assert model(x).shape == (2, 1000)


def swin_pruners():
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    from structprune.layers import TorchvisionMaxVitAttentionPruner, TorchvisionSwinAttentionPruner

    return {ShiftedWindowAttention: TorchvisionSwinAttentionPruner(),
            RelativePositionalMultiHeadAttention: TorchvisionMaxVitAttentionPruner()}


def check_swin(model, before):
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    windows = [m for m in model.modules() if isinstance(m, ShiftedWindowAttention)]
    assert windows
    for attention in windows:
        width = attention.proj.out_features
        assert attention.qkv.weight.shape == (3 * width, width) and attention.proj.in_features == width
        assert width % attention.num_heads == 0  # every head kept the same size
    assert windows[0].proj.out_features == 57  # 96 * 0.6 = 57.6, a multiple of 3 heads
    assert count(model) < 0.42 * before


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_attention_width_follows_the_hidden_size(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(2, 3, 96, 96)
    before = count(model)
    # ShiftedWindowAttention calls F.linear on its own qkv / proj weights, so it is declared whole
    prune(model, x, [model.head], customized_pruners=swin_pruners())
    check_swin(model, before)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)


def test_swin_attention_is_declared_by_default():
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None).eval()
    x = torch.randn(1, 3, 96, 96)
    before = count(model)
    prune(model, x, [model.head])
    check_swin(model, before)


def test_maxvit_heads_narrow_with_the_hidden_size():
    from torchvision.models.maxvit import MaxVit, RelativePositionalMultiHeadAttention

    torch.manual_seed(0)
    # maxvit_t's code paths at a size that runs in a second (maxvit_t itself is in the zoo test)
    model = MaxVit(input_size=(64, 64), stem_channels=16, partition_size=4, block_channels=[32, 64],
                   block_layers=[1, 2], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    before = count(model)
    prune(model, x, [model.classifier[-1]], customized_pruners=swin_pruners())
    layers = [m for m in model.modules() if isinstance(m, RelativePositionalMultiHeadAttention)]
    for attention in layers:
        width = attention.merge.out_features
        assert attention.to_qkv.out_features == 3 * width == 3 * attention.n_heads * attention.head_dim
        assert attention.relative_position_bias_table.shape[-1] == attention.n_heads
    assert layers[0].n_heads == 4 and layers[0].head_dim == 5  # 32 * 0.6 = 19.2 -> 20, 4 heads
    assert count(model) < 0.42 * before
    with torch.no_grad():
        assert model(x).shape == (2, 10)


# -- nn.MultiheadAttention and nn.TransformerEncoder ----------------------------------------------------
class AttentionNet(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.attention = nn.MultiheadAttention(64, 4, batch_first=batch_first)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.embed(x)
        attended, _ = self.attention(h, h, h)
        return self.head(attended + h)


class EncoderNet(nn.Module):
    def __init__(self, batch_first, stacked, norm_first=False):
        super().__init__()
        self.embed = nn.Linear(16, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False) if stacked else layer
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)))


NETS = {
    "multihead_attention": lambda bf: AttentionNet(bf),
    "encoder_layer": lambda bf: EncoderNet(bf, stacked=False),
    "encoder": lambda bf: EncoderNet(bf, stacked=True),
    "encoder_norm_first": lambda bf: EncoderNet(bf, stacked=True, norm_first=True),
}


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", list(NETS))
def test_multihead_attention_and_transformer_encoder(kind, batch_first):
    torch.manual_seed(0)
    model = NETS[kind](batch_first).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    expected = model(x).shape
    before = count(model)
    prune(model, x, [model.head], prune_num_heads=True)
    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    for attention in attentions:
        # the embedding is the residual width: heads stay, each narrows (64 * 0.6 = 38.4 -> 40, 4 heads)
        assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (40, 4, 10)
        assert attention.in_proj_weight.shape == (120, 40) and attention.out_proj.weight.shape == (40, 40)
    assert count(model) < 0.45 * before
    assert model(x).shape == expected  # autograd path
    with torch.no_grad():
        assert model(x).shape == expected  # inference fast path (torch._transformer_encoder_layer_fwd)
    model.train()
    model(x).sum().backward()
