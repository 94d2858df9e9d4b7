"""Magnitude-family criteria against scores computed by hand on tiny layers."""
import math

import pytest
import torch
from torch import nn

import structprune as tp
import structprune.importance as imp
from importance_models import conv_bn_linear_group, only_group, set_


def close(actual, expected):
    assert actual is not None
    return torch.allclose(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-5)


# conv rows [2], [3] -> [4, 9]; bn gamma [0.5, -4] -> [0.25, 16]; fc columns -> [35, 56]
@pytest.mark.parametrize("reduction, expected", [
    ("mean", [(4 + 0.25 + 35) / 3, (9 + 16 + 56) / 3]),
    ("sum", [39.25, 81]),
    ("max", [35, 56]),
    ("prod", [35, 8064]),
    ("first", [4, 9]),
    ("gate", [35, 56]),
    (None, [[4, 9], [0.25, 16], [35, 56]]),
])
def test_conv_bn_linear_each_reduction(reduction, expected):
    _, group = conv_bn_linear_group()
    scores = imp.MagnitudeImportance(group_reduction=reduction, normalizer=None)(group)
    assert close(scores, expected)


def test_default_mean_normalizer():
    _, group = conv_bn_linear_group()
    raw = torch.tensor([(4 + 0.25 + 35) / 3, (9 + 16 + 56) / 3])
    assert close(imp.MagnitudeImportance()(group), (raw / raw.mean()).tolist())


def test_rescored_copies_the_criterion_with_another_reduction_and_normalizer():
    _, group = conv_bn_linear_group()
    default = imp.MagnitudeImportance()
    summed = default.rescored("sum", None)
    assert close(summed(group), [39.25, 81])
    assert (summed.group_reduction, summed.normalizer) == ("sum", None)
    raw = torch.tensor([(4 + 0.25 + 35) / 3, (9 + 16 + 56) / 3])
    assert close(default(group), (raw / raw.mean()).tolist())  # the original is unchanged


def test_p1():
    _, group = conv_bn_linear_group()
    scores = imp.MagnitudeImportance(p=1, normalizer=None)(group)
    assert close(scores, [(2 + 0.5 + 9) / 3, (3 + 4 + 12) / 3])


def test_bias_adds_output_side_biases_only():
    # conv bias [10, 20] -> [100, 400]; bn beta [1, 2] -> [1, 4]; the fc bias is not on the input side
    _, group = conv_bn_linear_group()
    scores = imp.MagnitudeImportance(bias=True, normalizer=None)(group)
    assert close(scores, [(4 + 100 + 0.25 + 1 + 35) / 3, (9 + 400 + 16 + 4 + 56) / 3])


def test_target_types_filter_layers():
    _, group = conv_bn_linear_group()
    assert close(imp.MagnitudeImportance(normalizer=None, target_types=(nn.Linear,))(group), [35, 56])
    assert imp.MagnitudeImportance(target_types=(nn.LSTM,))(group) is None


def test_group_norm_importance():
    _, group = conv_bn_linear_group()
    assert close(imp.GroupNormImportance()(group), [math.sqrt(39.25) / 9, 1.0])
    assert imp.GroupNormImportance is imp.GroupMagnitudeImportance


def test_bn_scale_importance():
    _, group = conv_bn_linear_group()
    assert close(imp.BNScaleImportance(normalizer=None)(group), [0.5, 4.0])
    assert close(imp.BNScaleImportance()(group), [0.5 / 2.25, 4 / 2.25])


def test_lamp_importance():
    _, group = conv_bn_linear_group()
    low, high = (4 + 0.25 + 35) / 3, (9 + 16 + 56) / 3
    assert close(imp.LAMPImportance()(group), [low / (low + high), 1.0])


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 1)
        self.b = nn.Conv2d(1, 3, 1)
        self.c = nn.Conv2d(5, 1, 1)
        set_(self.a.weight, [2.0, 2.0])
        set_(self.b.weight, [1.0, 1.0, 1.0])
        set_(self.c.weight, [1.0, 2.0, 3.0, 4.0, 5.0])

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_concat_uses_root_idxs():
    model = Concat()
    group = only_group(model, torch.randn(1, 1, 2, 2), root=model.b)
    assert group[1].idxs == [2, 3, 4] and group[1].root_idxs == [0, 1, 2]
    # b rows -> [1, 1, 1]; c input columns 2, 3, 4 -> [9, 16, 25]
    assert close(imp.MagnitudeImportance(normalizer=None)(group), [5.0, 8.5, 13.0])
    group = only_group(model, torch.randn(1, 1, 2, 2), root=model.a)
    assert close(imp.MagnitudeImportance(normalizer=None)(group), [2.5, 4.0])


def test_partial_group_scores_its_own_channels():
    model = Concat()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 1, 2, 2))
    group = graph.get_pruning_group(model.b, tp.prune_conv_out_channels, [1, 2])
    assert close(imp.MagnitudeImportance(normalizer=None)(group), [8.5, 13.0])


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 1)
        self.c1 = nn.Conv2d(2, 1, 1)
        self.c2 = nn.Conv2d(2, 1, 1)
        set_(self.a.weight, [1.0, 1.0, 1.0, 1.0])
        set_(self.c1.weight, [3.0, 3.0])
        set_(self.c2.weight, [5.0, 5.0])

    def forward(self, x):
        u, v = torch.chunk(self.a(x), 2, 1)
        return self.c1(u) + self.c2(v)


def test_mean_counts_only_items_covering_a_channel():
    model = Split()
    group = only_group(model, torch.randn(1, 1, 2, 2))
    # each root channel is covered by a and one of c1/c2
    assert close(imp.MagnitudeImportance(normalizer=None)(group), [5.0, 5.0, 13.0, 13.0])


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 1)
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.g = nn.Conv2d(4, 4, 1, groups=2)
        set_(self.a.weight, torch.ones(4))
        set_(self.dw.weight, torch.arange(1.0, 5.0)[:, None].expand(4, 9))
        set_(self.g.weight, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])

    def forward(self, x):
        return self.g(self.dw(self.a(x)))


def test_depthwise_and_grouped_convs():
    model = Grouped()
    group = only_group(model, torch.randn(1, 1, 4, 4))
    scores = imp.MagnitudeImportance(group_reduction=None, normalizer=None)(group)
    # depthwise: 9 taps of value k+1; grouped input: channel c reads weight[:, c % 2] in every group
    assert close(scores, [[1, 1, 1, 1], [9, 36, 81, 144], [84, 120, 84, 120]])


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(2, 3)
        self.fc = nn.Linear(3, 1)
        with torch.no_grad():
            self.lstm.weight_ih_l0.copy_(torch.arange(12.0)[:, None].expand(12, 2))
            self.lstm.weight_hh_l0.zero_()
            self.lstm.weight_hh_l0[:, 1] = 1.0
            self.lstm.bias_ih_l0.fill_(1.0)
            self.lstm.bias_hh_l0.zero_()

    def forward(self, x):
        return self.fc(self.lstm(x)[0])


def test_lstm_gate_blocks_sum():
    model = Recurrent()
    group = only_group(model, torch.randn(4, 1, 2))
    # weight_ih rows c, c+3, c+6, c+9 hold value r twice: 2 * sum r^2 = [252, 332, 428];
    # weight_hh: one 1 per gate row (+4) and column 1 all ones (+12 for channel 1)
    kw = dict(group_reduction="first", normalizer=None, target_types=(nn.LSTM,))
    assert close(imp.MagnitudeImportance(**kw)(group), [256, 348, 432])
    assert close(imp.MagnitudeImportance(bias=True, **kw)(group), [260, 352, 436])
    # the LSTM is not a default target type: only the fc remains
    assert close(imp.MagnitudeImportance(group_reduction="first", normalizer=None)(group),
                 (model.fc.weight[0] ** 2).tolist())


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 3)
        self.scale = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        self.ln = nn.LayerNorm(3)
        self.b = nn.Linear(3, 1)
        set_(self.ln.weight, [1.0, -1.0, 0.5])

    def forward(self, x):
        return self.b(self.ln(self.a(x) * self.scale))


def test_unwrapped_parameter_and_layernorm():
    model = Scaled()
    group = only_group(model, torch.randn(1, 2))
    by_param = imp.MagnitudeImportance(group_reduction=None, normalizer=None, target_types=(nn.Parameter,))
    assert close(by_param(group), [[1, 4, 9]])
    by_norm = imp.MagnitudeImportance(group_reduction=None, normalizer=None, target_types=(nn.LayerNorm,))
    assert close(by_norm(group), [[1, 1, 0.25]])


def test_scores_are_detached_float32_on_the_parameter_device():
    model, group = conv_bn_linear_group()
    model.double()
    for criterion in (imp.MagnitudeImportance(), imp.GroupNormImportance(), imp.LAMPImportance()):
        scores = criterion(group)
        assert scores.dtype == torch.float32 and not scores.requires_grad and scores.grad_fn is None
        assert scores.device == model.conv.weight.device


def test_random_importance():
    _, group = conv_bn_linear_group()
    scores = imp.RandomImportance()(group)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert ((scores >= 0) & (scores < 1)).all()


def test_names_and_bad_options():
    for name in ("MagnitudeImportance", "GroupNormImportance", "BNScaleImportance", "LAMPImportance",
                 "RandomImportance", "TaylorImportance", "GroupTaylorImportance", "HessianImportance",
                 "GroupHessianImportance", "Importance"):
        assert hasattr(imp, name)
    assert issubclass(imp.MagnitudeImportance, imp.Importance)
    with pytest.raises(ValueError, match="group_reduction"):
        imp.MagnitudeImportance(group_reduction="median")
    with pytest.raises(ValueError, match="normalizer"):
        imp.MagnitudeImportance(normalizer="softmax")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_follow_the_model_to_cuda():
    model, group = conv_bn_linear_group()
    expected = imp.MagnitudeImportance()(group)
    model.cuda()
    for criterion in (imp.MagnitudeImportance(), imp.GroupNormImportance(), imp.BNScaleImportance(),
                      imp.LAMPImportance(), imp.RandomImportance()):
        scores = criterion(group)
        assert scores.device.type == "cuda" and scores.dtype == torch.float32
    assert torch.allclose(imp.MagnitudeImportance()(group).cpu(), expected)
