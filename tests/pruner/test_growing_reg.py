"""GrowingRegPruner: every documented rule pinned with values computed by hand."""
import copy
import warnings

import pytest
import torch
from torch import nn

import structprune as tp
from nets import SmallCNN, example, magnitude


class Fixed:
    """Importance with known values: 1, 2, 3, ... over the root channels."""

    def __call__(self, group):
        return torch.arange(1, len(group[0].idxs) + 1, dtype=torch.float32)


class Chain(nn.Module):
    def __init__(self, transposed=False):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(2, 3, 1) if transposed else nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x)))).mean((2, 3))


def randomise(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
            param.grad = torch.zeros_like(param)


def test_group_reg_starts_at_reg_with_one_value_per_root_channel():
    model, x = example()
    pruner = tp.pruner.GrowingRegPruner(model, x, magnitude, reg=3e-4)
    assert {len(v) for v in pruner.group_reg.values()} == {16, 32, 64}
    assert all(torch.all(v == 3e-4) for v in pruner.group_reg.values())


def test_update_reg_adds_delta_times_standardized_importance_and_grows_twice():
    model = Chain()
    pruner = tp.pruner.GrowingRegPruner(model, torch.randn(1, 2, 2, 2), Fixed(), reg=1e-3, delta_reg=0.1)
    (reg,) = pruner.group_reg.values()
    pruner.update_reg()
    (after_one,) = pruner.group_reg.values()
    expected = torch.tensor([1e-3 + 0.1, 1e-3 + 0.05, 1e-3])  # (3 - imp) / (3 - 1): least important grows most
    torch.testing.assert_close(after_one, expected)
    pruner.update_reg()
    (after_two,) = pruner.group_reg.values()
    torch.testing.assert_close(after_two, expected + torch.tensor([0.1, 0.05, 0.0]))


def test_update_reg_skips_groups_without_or_with_nan_importance():
    model = Chain()
    pruner = tp.pruner.GrowingRegPruner(model, torch.randn(1, 2, 2, 2), lambda g: None, reg=1e-3)
    pruner.update_reg()
    assert torch.all(next(iter(pruner.group_reg.values())) == 1e-3)
    nan = lambda g: torch.full((len(g[0].idxs),), float("nan"))  # noqa: E731
    pruner = tp.pruner.GrowingRegPruner(Chain(), torch.randn(1, 2, 2, 2), nan, reg=1e-3)
    pruner.update_reg()
    assert torch.all(next(iter(pruner.group_reg.values())) == 1e-3)


@pytest.mark.parametrize("bias", [False, True])
def test_regularize_adds_gamma_times_weight_on_every_coupled_parameter(bias):
    model = Chain()
    pruner = tp.pruner.GrowingRegPruner(model, torch.randn(1, 2, 2, 2), Fixed(), reg=1e-3, delta_reg=0.1)
    pruner.update_reg()
    gamma = next(iter(pruner.group_reg.values()))
    randomise(model)
    pruner.regularize(model, bias=bias)
    w1, b1, bw, bb, w2, b2 = (model.conv1.weight, model.conv1.bias, model.bn.weight, model.bn.bias,
                              model.conv2.weight, model.conv2.bias)
    torch.testing.assert_close(w1.grad, gamma.view(3, 1, 1, 1) * w1.detach())  # conv out channels: dim 0
    torch.testing.assert_close(w2.grad, gamma.view(1, 3, 1, 1) * w2.detach())  # conv in channels: dim 1
    torch.testing.assert_close(bw.grad, gamma * bw.detach())  # BatchNorm weight really changes
    if bias:
        torch.testing.assert_close(b1.grad, gamma * b1.detach())
        torch.testing.assert_close(bb.grad, gamma * bb.detach())
    else:
        assert torch.all(b1.grad == 0) and torch.all(bb.grad == 0)
    assert torch.all(b2.grad == 0)  # conv2's outputs are the model output: not in any group


def test_conv_transpose_is_regularized_along_dim_1():
    model = Chain(transposed=True)
    pruner = tp.pruner.GrowingRegPruner(model, torch.randn(1, 2, 2, 2), Fixed(), reg=0.0, delta_reg=1.0)
    pruner.update_reg()
    gamma = next(iter(pruner.group_reg.values()))
    randomise(model)
    pruner.regularize(model)
    weight = model.conv1.weight  # [in=2, out=3, 1, 1]
    torch.testing.assert_close(weight.grad, gamma.view(1, 3, 1, 1) * weight.detach())


def test_concat_group_takes_gamma_through_root_idxs():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 2, 1)
            self.b = nn.Conv2d(2, 3, 1)
            self.bn = nn.BatchNorm2d(5)
            self.out = nn.Conv2d(5, 1, 1)

        def forward(self, x):
            return self.out(self.bn(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3))

    model = Cat()
    pruner = tp.pruner.GrowingRegPruner(model, torch.randn(1, 2, 2, 2), Fixed(), reg=0.0, delta_reg=1.0)
    pruner.update_reg()
    regs = {pruner._group_key(g): v for g, v in pruner.group_reg.items()}
    gamma_a, gamma_b = regs["a:prune_out_channels"], regs["b:prune_out_channels"]
    torch.testing.assert_close(gamma_b, torch.tensor([1.0, 0.5, 0.0]))
    randomise(model)
    pruner.regularize(model)
    expected = torch.cat([gamma_a, gamma_b]) * model.bn.weight.detach()
    torch.testing.assert_close(model.bn.weight.grad, expected)
    torch.testing.assert_close(model.out.weight.grad, torch.cat([gamma_a, gamma_b]).view(1, 5, 1, 1) * model.out.weight.detach())


def test_regularize_leaves_parameters_without_grad_alone_and_is_safe_before_backward():
    model = Chain()
    pruner = tp.pruner.GrowingRegPruner(model, torch.randn(1, 2, 2, 2), Fixed(), reg=1e-3, delta_reg=0.1)
    pruner.update_reg()
    before = copy.deepcopy(model.state_dict())
    pruner.regularize(model)  # no backward yet: nothing to change
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    randomise(model)
    model.conv1.weight.grad = None
    pruner.regularize(model)
    assert model.conv1.weight.grad is None and torch.any(model.bn.weight.grad != 0)


def test_update_regularizer_after_step_resets_and_matches_new_counts():
    model, x = example()
    pruner = tp.pruner.GrowingRegPruner(model, x, magnitude, reg=1e-4, delta_reg=1e-2, pruning_ratio=0.5,
                                        iterative_steps=2)
    pruner.update_reg()
    pruner.step()
    pruner.update_regularizer()
    assert sorted(len(v) for v in pruner.group_reg.values()) == [12, 24, 48]
    assert all(torch.all(v == 1e-4) for v in pruner.group_reg.values())
    model(x).sum().backward()
    pruner.regularize(model)  # coefficients were recompiled for the new shapes
    assert model.conv2.weight.grad.shape == model.conv2.weight.shape


def test_seed_training_loop_runs_unchanged():
    torch.manual_seed(0)
    model = SmallCNN()
    example_inputs = torch.randn(1, 3, 8, 8)
    train_loader = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(3)]
    num_reg_epochs = 2
    imp = tp.importance.MagnitudeImportance(p=2)
    pruner = tp.pruner.GrowingRegPruner(model=model, example_inputs=example_inputs, importance=imp, reg=1e-5,
                                        delta_reg=1e-5, pruning_ratio=0.5, iterative_steps=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = nn.CrossEntropyLoss()
    for epoch in range(num_reg_epochs):
        pruner.update_reg()
        for images, labels in train_loader:
            optimizer.zero_grad()
            output = model(images)
            loss = criterion(output, labels)
            loss.backward()
            pruner.regularize(model)
            optimizer.step()
    pruner.step()
    pruner.update_regularizer()
    assert model.conv3.out_channels == 53  # step 1 of 3 towards 0.5: floor(64 * (1 - 0.5 / 3))
    assert model(example_inputs).shape == (1, 10)


def _train(model, pruner, optimizer, batches, epochs):
    for _ in range(epochs):
        pruner.update_reg()
        for images, labels in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            pruner.regularize(model, bias=True)
            optimizer.step()


def test_state_dict_resume_equals_running_straight_through():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    x = torch.randn(1, 3, 8, 8)

    def fresh():
        torch.manual_seed(3)
        model = SmallCNN()
        pruner = tp.pruner.GrowingRegPruner(model, x, magnitude, reg=1e-3, delta_reg=1e-1)
        return model, pruner, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, pruner, optimizer = fresh()
    _train(model, pruner, optimizer, batches, 4)

    model_a, pruner_a, optimizer_a = fresh()
    _train(model_a, pruner_a, optimizer_a, batches, 2)
    checkpoint = copy.deepcopy({"model": model_a.state_dict(), "opt": optimizer_a.state_dict(),
                                "pruner": pruner_a.state_dict()})
    model_b, pruner_b, optimizer_b = fresh()
    model_b.load_state_dict(checkpoint["model"])
    optimizer_b.load_state_dict(checkpoint["opt"])
    pruner_b.load_state_dict(checkpoint["pruner"])
    _train(model_b, pruner_b, optimizer_b, batches, 2)
    for (name, a), b in zip(model.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_greg1_grows_only_the_chosen_channels_up_to_the_ceiling_and_prunes_them():
    model, x = example()
    pruner = tp.pruner.GrowingRegPruner(model, x, magnitude, reg=0.0, delta_reg=0.4, schedule="greg1",
                                        reg_ceiling=1.0, pruning_ratio=0.5)
    pruner.update_reg()
    chosen = {k: v.clone() for k, v in pruner._selected.items()}
    regs = {pruner._group_key(g): v for g, v in pruner.group_reg.items()}
    for key, reg in regs.items():
        mask = torch.zeros(len(reg), dtype=torch.bool)
        mask[chosen[key]] = True
        assert torch.allclose(reg[mask], torch.tensor(0.4)) and torch.all(reg[~mask] == 0)
    assert not pruner.ready_to_prune()
    pruner.update_reg()
    pruner.update_reg()
    regs = {pruner._group_key(g): v for g, v in pruner.group_reg.items()}
    assert max(float(v.max()) for v in regs.values()) == 1.0 and pruner.ready_to_prune()
    kept = [i for i in range(16) if i not in chosen["conv1:prune_out_channels"].tolist()]
    expected = model.conv1.weight.detach()[kept].clone()
    pruner.step()
    torch.testing.assert_close(model.conv1.weight.detach(), expected)


def test_greg2_grows_uniformly_and_schedule_is_validated():
    model, x = example()
    pruner = tp.pruner.GrowingRegPruner(model, x, magnitude, reg=0.0, delta_reg=0.5, schedule="greg2")
    pruner.update_reg()
    assert all(torch.all(v == 0.5) for v in pruner.group_reg.values())
    pruner.update_reg()
    pruner.update_reg()
    assert all(torch.all(v == 1.0) for v in pruner.group_reg.values()) and pruner.ready_to_prune()
    with pytest.raises(ValueError, match="schedule must be one of"):
        tp.pruner.GrowingRegPruner(model, x, magnitude, schedule="fast")


class _Scores:
    """Scores each group's root channels by a fixed table (cycled to the width)."""

    def __init__(self, table):
        self.table = torch.tensor(table, dtype=torch.float32)

    def __call__(self, group):
        width = len(group[0].idxs)
        return self.table.repeat(width // len(self.table) + 1)[:width].clone()


def test_the_seed_schedule_warns_when_outlying_scores_give_nearly_every_channel_the_whole_delta():
    model, x = example()
    heavy = _Scores([1000.0] + [1.0 + 0.01 * i for i in range(15)])  # one outlier: the rest all near 1.0
    pruner = tp.pruner.GrowingRegPruner(model, x, heavy, reg=0.0, delta_reg=0.1, pruning_ratio=0.25)
    with pytest.warns(UserWarning, match=r"schedule='seed'\): \d+ of \d+ channels get at least 90% of delta_reg"):
        pruner.update_reg()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.update_reg()  # said once


def test_the_seed_schedule_stays_quiet_with_spread_scores():
    model, x = example()
    spread = _Scores([float(i) for i in range(16)])
    pruner = tp.pruner.GrowingRegPruner(model, x, spread, reg=0.0, delta_reg=0.1, pruning_ratio=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.update_reg()
