"""OBDC (K-FAC Optimal Brain Damage): factors and scores recomputed by hand from per-sample x and g."""
import pytest
import torch
from torch import nn

import structprune as tp
import structprune.importance as imp
from importance_models import linear_linear_group, only_group, set_


def second_moment(rows, count):
    """sum over rows of r r^T, divided by count, one outer product at a time."""
    total = torch.zeros(rows.shape[1], rows.shape[1])
    for r in rows:
        total += torch.outer(r, r)
    return total / count


def with_one(x):
    return torch.cat([x, torch.ones(x.shape[0], 1)], 1)


def out_scores(weight, a, g):
    """0.5 * G[i, i] * w_i^T A w_i, row by row."""
    return torch.stack([0.5 * g[i, i] * (w @ a @ w) for i, w in enumerate(weight)])


def in_scores(weight, a, g, columns_of):
    """0.5 * sum over c, c' in cols(j) of A[c, c'] W[:, c]^T G W[:, c'], channel by channel."""
    return torch.stack([
        0.5 * sum(a[c, d] * (weight[:, c] @ g @ weight[:, d]) for c in cols for d in cols)
        for cols in columns_of
    ])


def output_group(model, example):
    """All output channels of a one-layer model (a model output: blocked for pruning, fine to score)."""
    layer = model[0]
    prune = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
    graph = tp.DependencyGraph().build_dependency(model, example)
    return graph.get_pruning_group(layer, prune, idxs=list(range(layer.weight.shape[0])))


def criterion(**kwargs):
    kwargs.setdefault("normalizer", None)
    kwargs.setdefault("num_classes", 3)
    return imp.OBDCImportance(**kwargs)


# -- Linear layers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("has_bias, use_bias", [(False, False), (True, False), (True, True)])
def test_single_linear_by_hand(has_bias, use_bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=has_bias))
    x, gy = torch.randn(5, 3), torch.randn(5, 2)
    obdc = criterion(bias=use_bias)
    obdc.register(model)
    model(x).backward(gy)  # the layer's output gradient is exactly gy
    xs = with_one(x) if has_bias else x
    a, g = second_moment(xs, 5), second_moment(gy, 5)
    a_seen, g_seen = obdc.kfac_factors(model[0])
    torch.testing.assert_close(a_seen, a)
    torch.testing.assert_close(g_seen, g)
    weight = model[0].weight.detach()
    if use_bias:
        weight = torch.cat([weight, model[0].bias.detach()[:, None]], 1)
    elif has_bias:
        a = a[:3, :3]  # the bias column does not count without bias=True
    group = output_group(model, x[:1])
    torch.testing.assert_close(obdc(group), out_scores(weight, a, g))


@pytest.mark.parametrize("use_bias", [False, True])
def test_layer_wider_than_max_factor_size_keeps_diagonal_factors(use_bias):
    """A (3 inputs + bias) is wider than max_factor_size=2: only diag(A) and diag(G) are kept, and each
    weight scores 0.5 * w**2 * A[c, c] * G[i, i]."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2))
    x, gy = torch.randn(6, 3), torch.randn(6, 2)
    obdc = criterion(bias=use_bias, max_factor_size=2)
    obdc.register(model)
    model(x).backward(gy)
    a_seen, g_seen = obdc.kfac_factors(model[0])
    a_diag, g_diag = (with_one(x) ** 2).mean(0), (gy ** 2).mean(0)
    torch.testing.assert_close(a_seen, a_diag)
    torch.testing.assert_close(g_seen, g_diag)
    weight, bias = model[0].weight.detach(), model[0].bias.detach()
    expected = 0.5 * (weight ** 2 * a_diag[:3]).sum(1) * g_diag
    if use_bias:
        expected = expected + 0.5 * bias ** 2 * a_diag[3] * g_diag
    torch.testing.assert_close(obdc(output_group(model, x[:1])), expected)
    with pytest.raises(ValueError, match="max_factor_size"):
        criterion(max_factor_size=0)


def test_linear_linear_group_two_batches_by_hand():
    model, group = linear_linear_group()  # fc1 out channels + fc2 in channels
    torch.manual_seed(1)
    reductions = ("first", "gate", "mean")  # first: fc1's item alone, gate: fc2's
    scorers = {name: criterion(group_reduction=name) for name in reductions}
    scorers["normalized"] = criterion(normalizer="mean")
    for scorer in scorers.values():
        scorer.register(model)
    xs, hs, g1s, g2s = [], [], [], []
    for batch in (3, 4):
        x, gy = torch.randn(batch, 2), torch.randn(batch, 1)
        hidden = model.fc1(x)
        hidden.retain_grad()
        model.fc2(hidden).backward(gy)
        xs.append(x), hs.append(hidden.detach()), g1s.append(hidden.grad), g2s.append(gy)
    a1, g1 = second_moment(with_one(torch.cat(xs)), 7), second_moment(torch.cat(g1s), 7)
    a2, g2 = second_moment(with_one(torch.cat(hs)), 7), second_moment(torch.cat(g2s), 7)
    fc1_out = out_scores(model.fc1.weight.detach(), a1[:2, :2], g1)
    fc2_in = in_scores(model.fc2.weight.detach(), a2, g2, [[0], [1]])
    mean = (fc1_out + fc2_in) / 2
    for name, expected in (("first", fc1_out), ("gate", fc2_in), ("mean", mean), ("normalized", mean / mean.mean())):
        torch.testing.assert_close(scorers[name](group), expected)


def test_flatten_into_linear_counts_cross_terms_of_a_channel():
    class ConvFlattenLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 1), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    torch.manual_seed(2)
    model = ConvFlattenLinear()
    group = only_group(model, torch.randn(1, 1, 2, 2), root=model.conv)
    obdc = criterion(group_reduction="gate")  # the last item: fc's input columns
    obdc.register(model)
    x, gy = torch.randn(6, 1, 2, 2), torch.randn(6, 3)
    features = model.conv(x).flatten(1)
    model.fc(features).backward(gy)
    a, g = second_moment(with_one(features.detach()), 6), second_moment(gy, 6)
    # channel r of the conv is fc columns 4r..4r+3, and every pair of them interacts
    expected = in_scores(model.fc.weight.detach(), a, g, [range(0, 4), range(4, 8)])
    torch.testing.assert_close(obdc(group), expected)


# -- convolutions ----------------------------------------------------------------------------------------
def patches(x, kernel, stride, padding):
    """Every k x k patch of a zero-padded batch, channel-major, as rows (slicing, no unfold)."""
    x = nn.functional.pad(x, [padding] * 4)
    rows = []
    for sample in x:
        for top in range(0, x.shape[2] - kernel + 1, stride):
            for left in range(0, x.shape[3] - kernel + 1, stride):
                rows.append(sample[:, top:top + kernel, left:left + kernel].reshape(-1))
    return torch.stack(rows)


def locations(grad):
    return grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])


class ConvConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(self.conv1(x))


def test_conv_conv_group_by_hand():
    torch.manual_seed(3)
    model = ConvConv()
    group = only_group(model, torch.randn(1, 2, 5, 5), root=model.conv1)
    obdc = criterion(bias=True)
    obdc.register(model)
    x = torch.randn(2, 2, 5, 5)
    hidden = model.conv1(x)  # [2, 3, 3, 3]
    hidden.retain_grad()
    gy = torch.randn(2, 2, 3, 3)
    model.conv2(hidden).backward(gy)
    # A averages over samples and output positions; G sums over positions and averages over samples
    a1 = second_moment(with_one(patches(x, 3, 2, 1)), 2 * 9)
    g1 = second_moment(locations(hidden.grad), 2)
    a2 = second_moment(patches(hidden.detach(), 3, 1, 1), 2 * 9)
    g2 = second_moment(locations(gy), 2)
    torch.testing.assert_close(obdc.kfac_factors(model.conv1)[0], a1)
    torch.testing.assert_close(obdc.kfac_factors(model.conv2)[1], g2)
    w1 = torch.cat([model.conv1.weight.detach().flatten(1), model.conv1.bias.detach()[:, None]], 1)
    conv1_out = out_scores(w1, a1, g1)
    conv2_in = in_scores(model.conv2.weight.detach().flatten(1), a2, g2, [range(9 * j, 9 * j + 9) for j in range(3)])
    torch.testing.assert_close(obdc(group), (conv1_out + conv2_in) / 2)


def test_inplace_relu_after_the_layer_still_gives_its_output_gradient():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.ReLU(inplace=True))
    obdc = criterion()
    obdc.register(model)
    x, gy = torch.randn(3, 1, 2, 2), torch.randn(3, 2, 2, 2)
    model(x).backward(gy)
    pre_activation = nn.functional.conv2d(x, model[0].weight.detach())
    torch.testing.assert_close(obdc.kfac_factors(model[0])[1], second_moment(locations(gy * (pre_activation > 0)), 3))


def test_conv1d_scores_like_the_equivalent_conv2d():
    torch.manual_seed(4)
    conv1d = nn.Conv1d(2, 3, 3, padding=1)
    conv2d = nn.Conv2d(2, 3, (1, 3), padding=(0, 1))
    with torch.no_grad():
        conv2d.weight.copy_(conv1d.weight[:, :, None])
        conv2d.bias.copy_(conv1d.bias)
    x, gy = torch.randn(4, 2, 7), torch.randn(4, 3, 7)
    scores = []
    for model, inputs, grads in ((nn.Sequential(conv1d), x, gy), (nn.Sequential(conv2d), x[:, :, None], gy[:, :, None])):
        obdc = criterion(bias=True)
        obdc.register(model)
        model(inputs).backward(grads)
        scores.append(obdc(output_group(model, inputs[:1])))
    torch.testing.assert_close(scores[0], scores[1])


def test_grouped_conv_uses_the_diagonal():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2, bias=False))
    obdc = criterion()
    obdc.register(model)
    x, gy = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    model(x).backward(gy)
    a_diag = x.pow(2).mean((0, 2, 3))  # E[x_c^2] over samples and positions
    g_diag = gy.pow(2).sum((2, 3)).mean(0)  # summed over positions, averaged over samples
    weight = model[0].weight.detach()[:, :, 0, 0]  # [4 out, 2 in per group]
    expected = torch.stack([
        0.5 * g_diag[i] * sum(weight[i, c] ** 2 * a_diag[(i // 2) * 2 + c] for c in range(2)) for i in range(4)
    ])
    torch.testing.assert_close(obdc(output_group(model, x[:1])), expected)


# -- sampling the true Fisher ----------------------------------------------------------------------------
def test_sample_loss_draws_labels_from_the_model():
    obdc = criterion()
    torch.manual_seed(6)
    logits = torch.tensor([[0.0, 30.0, 0.0]]).repeat(50, 1).requires_grad_()
    loss = obdc.sample_loss(logits)
    loss.backward()
    # d(sum CE)/d logits = softmax - onehot(label): reading the labels back from the gradient
    labels = (torch.softmax(logits.detach(), 1) - logits.grad).argmax(1)
    assert labels.tolist() == [1] * 50 and loss.item() < 1e-6
    # and an even-ish distribution is sampled in proportion (p = 0.25, 0.75)
    logits = torch.log(torch.tensor([[1.0, 3.0, 0.0]])).repeat(4000, 1).requires_grad_()
    obdc.sample_loss(logits).backward()
    labels = (torch.softmax(logits.detach(), 1) - logits.grad).argmax(1)
    assert abs((labels == 1).float().mean().item() - 0.75) < 0.03 and not (labels == 2).any()


def test_sample_loss_checks_num_classes():
    with pytest.raises(ValueError, match="num_classes=3"):
        criterion().sample_loss(torch.zeros(2, 4))
    for bad in (None, 0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_classes"):
            imp.OBDCImportance(num_classes=bad)
    with pytest.raises(ValueError, match="target_types"):
        imp.OBDCImportance(num_classes=3, target_types=(nn.BatchNorm2d,))


# -- errors and hook lifecycle ---------------------------------------------------------------------------
def test_missing_statistics_name_the_layer():
    model, group = linear_linear_group()
    obdc = criterion()
    obdc.register(model)
    with torch.no_grad():
        model(torch.randn(2, 2))  # no backward: nothing is gathered
    model(torch.randn(2, 2)).sum()  # a graph that is never backpropagated: nothing either
    with pytest.raises(RuntimeError, match=r"fc1 \(Linear\).*register\(model\).*backward"):
        obdc(group)


def test_reset_and_remove_hooks():
    model, group = linear_linear_group()
    obdc = criterion()
    obdc.register(model)
    model(torch.randn(2, 2)).sum().backward()
    before = obdc(group)
    obdc.remove_hooks()
    model(torch.randn(2, 2)).sum().backward()
    torch.testing.assert_close(obdc(group), before)  # unchanged: no hooks left
    obdc.reset()
    with pytest.raises(RuntimeError, match="no K-FAC statistics"):
        obdc(group)


def test_stale_statistics_after_pruning():
    model, _ = linear_linear_group()
    obdc = criterion()
    obdc.register(model)
    model(torch.randn(3, 2)).sum().backward()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 2))
    graph.get_pruning_group(model.fc1, tp.prune_linear_out_channels, idxs=[0]).prune()
    group = only_group(model, torch.randn(1, 2), root=model.fc1)
    with pytest.raises(RuntimeError, match=r"fc1 \(Linear\).*\(1, 2\).*zero_grad\(\)"):
        obdc(group)
    with pytest.raises(RuntimeError, match=r"zero_grad\(\)"):
        model(torch.randn(3, 2)).sum().backward()  # accumulating onto stale statistics fails too
    obdc.zero_grad()
    model(torch.randn(3, 2)).sum().backward()
    assert obdc(group).shape == (1,)


# -- the criterion means something -----------------------------------------------------------------------
def test_curvature_outranks_magnitude():
    """Channel 0 sees high-variance inputs, channel 1 almost none, channel 2 has big weights but feeds
    nothing (zero output gradient): OBDC ranks them 0 > 1 > 2, magnitude ranks 2 first."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2))
    set_(model[0].weight, [[1, 0, 0, 0], [0, 1, 0, 0], [10, 10, 10, 10]])
    set_(model[1].weight, [[1, -1, 0], [-1, 1, 0]])
    group = only_group(model, torch.randn(1, 4), root=model[0])
    obdc = imp.OBDCImportance(num_classes=2)
    obdc.register(model)
    for _ in range(4):
        model.zero_grad()
        obdc.sample_loss(model(torch.randn(64, 4) * torch.tensor([5.0, 0.1, 1.0, 1.0]))).backward()
    scores = obdc(group)
    assert scores[0] > 100 * scores[1] > 0 and scores[2] == 0
    assert imp.MagnitudeImportance()(group).argmax() == 2


# -- pruning a network -----------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.depthwise, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.conv2, self.bn3 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.depthwise(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn3(self.conv2(x))), 4)
        return self.fc(x.flatten(1))


def test_pruning_a_cnn_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images = torch.tensor(digits.images[:96], dtype=torch.float32).unsqueeze(1) / 16
    torch.manual_seed(8)
    model = DigitsCNN()
    obdc = imp.OBDCImportance(num_classes=10)
    obdc.register(model)
    for batch in images.split(32):
        model.zero_grad()
        obdc.sample_loss(model(batch)).backward()
    obdc.remove_hooks()
    pruner = tp.pruner.BasePruner(model, images[:1], importance=obdc, pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    assert (model.conv1.out_channels, model.depthwise.out_channels, model.conv2.out_channels) == (8, 8, 16)
    assert model.depthwise.groups == 8 and model.fc.in_features == 16 * 4 and model.fc.out_features == 10
    assert model(images[:5]).shape == (5, 10)
    with pytest.raises(RuntimeError, match=r"conv1 \(Conv2d\).*zero_grad"):  # statistics of the unpruned model
        obdc(only_group(model, images[:1], root=model.conv1))
