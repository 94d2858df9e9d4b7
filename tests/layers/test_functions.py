"""Low-level pruning functions: shapes, attributes, repr, and outputs of the kept channels unchanged."""
import pytest
import torch
from torch import nn

import structprune as tp

KEEP = [0, 2, 3, 5]


def drop(n, keep=KEEP):
    return [i for i in range(n) if i not in keep]


@pytest.mark.parametrize("conv, x", [
    (nn.Conv1d(3, 6, 3), torch.randn(2, 3, 9)),
    (nn.Conv2d(3, 6, 3), torch.randn(2, 3, 9, 9)),
    (nn.Conv3d(3, 6, 3), torch.randn(2, 3, 5, 5, 5)),
])
def test_conv_out_channels_keep_the_rest_exactly(conv, x):
    expected = conv(x)[:, KEEP]
    tp.prune_conv_out_channels(conv, drop(6))
    assert conv.out_channels == 4 and conv.weight.shape[0] == 4 and conv.bias.shape == (4,)
    assert "(3, 4" in repr(conv)
    torch.testing.assert_close(conv(x), expected)


def test_conv_in_channels_match_a_sliced_input():
    conv = nn.Conv2d(6, 4, 3)
    x = torch.randn(1, 6, 7, 7)
    with torch.no_grad():
        conv.weight[:, drop(6)] = 0
    expected = conv(x)
    tp.prune_conv_in_channels(conv, drop(6))
    assert conv.in_channels == 4
    torch.testing.assert_close(conv(x[:, KEEP]), expected)


def test_depthwise_and_grouped_convs():
    depthwise = nn.Conv2d(6, 6, 3, groups=6)
    x = torch.randn(1, 6, 5, 5)
    expected = depthwise(x)[:, KEEP]
    tp.prune_depthwise_conv_out_channels(depthwise, drop(6))
    assert (depthwise.in_channels, depthwise.out_channels, depthwise.groups) == (4, 4, 4)
    torch.testing.assert_close(depthwise(x[:, KEEP]), expected)
    grouped = nn.Conv2d(8, 8, 1, groups=2)  # 4 inputs per group: drop input 1 of each group
    tp.prune_conv_in_channels(grouped, [1, 5])
    assert grouped.in_channels == 6 and grouped.weight.shape == (8, 3, 1, 1) and grouped.groups == 2


def test_transposed_conv_prunes_dim_1_for_outputs():
    conv = nn.ConvTranspose2d(4, 6, 3)
    x = torch.randn(1, 4, 5, 5)
    expected = conv(x)[:, KEEP]
    tp.prune_transposed_conv_out_channels(conv, drop(6))
    assert conv.weight.shape == (4, 4, 3, 3) and conv.out_channels == 4
    torch.testing.assert_close(conv(x), expected)
    tp.prune_transposed_conv_in_channels(conv, [0])
    assert conv.weight.shape == (3, 4, 3, 3) and conv.in_channels == 3


def test_linear_both_sides():
    linear = nn.Linear(6, 6)
    x = torch.randn(3, 6)
    expected = linear(x)[:, KEEP]
    tp.prune_linear_out_channels(linear, drop(6))
    torch.testing.assert_close(linear(x), expected)
    tp.prune_linear_in_channels(linear, [1])
    assert (linear.in_features, linear.out_features) == (5, 4) and "in_features=5, out_features=4" in repr(linear)


@pytest.mark.parametrize("norm, x", [
    (nn.BatchNorm1d(6), torch.randn(4, 6)),
    (nn.BatchNorm2d(6), torch.randn(4, 6, 3, 3)),
    (nn.BatchNorm3d(6), torch.randn(4, 6, 2, 2, 2)),
    (nn.SyncBatchNorm(6), None),
    (nn.InstanceNorm2d(6, affine=True, track_running_stats=True), torch.randn(2, 6, 4, 4)),
    (nn.InstanceNorm2d(6), torch.randn(2, 6, 4, 4)),
])
def test_batch_and_instance_norms(norm, x):
    norm.eval()
    with torch.no_grad():
        if norm.running_mean is not None:
            norm.running_mean.uniform_()
            norm.running_var.uniform_(0.5, 2)
        if norm.weight is not None:
            norm.weight.uniform_()
    expected = norm(x)[:, KEEP] if x is not None else None
    tp.prune_batchnorm_out_channels(norm, drop(6))
    assert norm.num_features == 4
    if norm.running_mean is not None:
        assert norm.running_mean.shape == (4,) and norm.running_var.shape == (4,)
    if x is not None:
        torch.testing.assert_close(norm(x[:, KEEP]), expected)


def test_groupnorm_needs_even_groups_and_keeps_values():
    norm = nn.GroupNorm(2, 8)
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="not divisible by num_groups"):
        tp.prune_groupnorm_out_channels(norm, [0])
    assert norm.num_channels == 8
    tp.prune_groupnorm_out_channels(norm, [0, 4])
    assert norm.num_channels == 6 and norm.weight.shape == (6,) and norm(x[:, [1, 2, 3, 5, 6, 7]]).shape == (2, 6, 3, 3)


@pytest.mark.parametrize("norm", [nn.LayerNorm(6), nn.LayerNorm(6, elementwise_affine=False), nn.RMSNorm(6)])
def test_layernorm_and_rmsnorm(norm):
    tp.prune_layernorm_out_channels(norm, drop(6))
    assert tuple(norm.normalized_shape) == (4,)
    assert norm(torch.randn(2, 4)).shape == (2, 4)


def test_prelu_shared_and_per_channel():
    shared = nn.PReLU()
    assert tp.prune_prelu_out_channels(shared, [0, 1]).weight.shape == (1,)
    per_channel = nn.PReLU(6)
    tp.prune_prelu_out_channels(per_channel, drop(6))
    assert per_channel.num_parameters == 4 and per_channel.weight.shape == (4,)


def test_embedding():
    embedding = nn.Embedding(10, 6)
    ids = torch.tensor([[1, 2, 3]])
    expected = embedding(ids)[..., KEEP]
    tp.prune_embedding_out_channels(embedding, drop(6))
    assert embedding.embedding_dim == 4
    torch.testing.assert_close(embedding(ids), expected)


def test_multihead_attention_embed_dim():
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    tp.prune_multihead_attention_out_channels(attention, [0, 4])
    assert attention.embed_dim == 6 and attention.head_dim == 3
    assert attention.in_proj_weight.shape == (18, 6) and attention.out_proj.weight.shape == (6, 6)
    x = torch.randn(1, 5, 6)
    assert attention(x, x, x)[0].shape == (1, 5, 6)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        tp.prune_multihead_attention_out_channels(nn.MultiheadAttention(8, 2), [0])


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, False), (2, True)])
def test_lstm_hidden_and_input(layers, bidirectional):
    lstm = nn.LSTM(5, 6, num_layers=layers, bidirectional=bidirectional, batch_first=True)
    channels = [1, 7] if bidirectional else [1]
    tp.prune_lstm_out_channels(lstm, channels)
    assert lstm.hidden_size == 5 and lstm.weight_hh_l0.shape == (20, 5)
    tp.prune_lstm_in_channels(lstm, [0])
    assert lstm.input_size == 4
    out, (h, c) = lstm(torch.randn(2, 3, 4))
    assert out.shape == (2, 3, 5 * (2 if bidirectional else 1)) and h.shape[-1] == 5


def test_lstm_single_layer_keeps_kept_units_exactly():
    lstm = nn.LSTM(3, 4, batch_first=True)
    with torch.no_grad():
        lstm.weight_hh_l0[:, 2] = 0  # unit 2 feeds nothing back into the gates
    x = torch.randn(2, 5, 3)
    expected = lstm(x)[0][..., [0, 1, 3]]
    tp.prune_lstm_out_channels(lstm, [2])
    torch.testing.assert_close(lstm(x)[0], expected)


def test_parameter_pruning_along_a_dim():
    param = nn.Parameter(torch.randn(1, 4, 6))
    expected = param.detach()[..., 2:].clone()
    tp.layers.ParameterPruner(2).prune_out_channels(param, [0, 1])
    assert param.shape == (1, 4, 4) and torch.equal(param.detach(), expected)


def test_custom_layer_through_base_pruning_func():
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(n))

        def forward(self, x):
            return x * self.gain.view(1, -1, 1, 1)

    class ScalePruner(tp.BasePruningFunc):
        coupled = True

        def out_axes(self, layer):
            return [tp.layers.Axis("gain", 0)]

        def get_out_channels(self, layer):
            return layer.gain.shape[0]

        get_in_channels = get_out_channels

    model = nn.Sequential(nn.Conv2d(3, 6, 1), Scale(6), nn.Conv2d(6, 2, 1))
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 4, 4), customized_pruners={Scale: ScalePruner()})
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, [1, 2])
    assert {item.dep.target.name for item in group} == {"0", "1", "2"}
    group.prune()
    assert model[1].gain.shape == (4,) and model(torch.randn(1, 3, 4, 4)).shape == (1, 2, 4, 4)


@pytest.mark.parametrize("idxs, error, message", [
    ([6], IndexError, "out of range"),
    ([-1], IndexError, "out of range"),
    ([1, 1], ValueError, "duplicated"),
    ([0.5], TypeError, "must be integers"),
    (list(range(6)), ValueError, "keep at least one"),
])
def test_bad_indices_are_refused_and_nothing_changes(idxs, error, message):
    conv = nn.Conv2d(3, 6, 1)
    before = conv.weight.detach().clone()
    with pytest.raises(error, match=message):
        tp.prune_conv_out_channels(conv, idxs)
    assert torch.equal(conv.weight, before) and conv.out_channels == 6
