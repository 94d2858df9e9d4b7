"""Taylor and Hessian criteria with hand-set gradients."""
import pytest
import torch

import structprune.importance as imp
from importance_models import linear_linear_group, only_group


def close(actual, expected):
    return torch.allclose(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def with_grads():
    model, group = linear_linear_group()
    model.fc1.weight.grad = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])  # w*g = [[0.5, -2], [-3, 8]]
    model.fc1.bias.grad = torch.tensor([2.0, -3.0])  # b*g = [2, -3]
    model.fc2.weight.grad = torch.tensor([[3.0, 4.0]])  # w*g = [6, -4]
    return model, group


@pytest.mark.parametrize("multivariable, bias, expected", [
    (False, False, [(2.5 + 6) / 2, (11 + 4) / 2]),
    (True, False, [(1.5 + 6) / 2, (5 + 4) / 2]),
    (False, True, [(4.5 + 6) / 2, (14 + 4) / 2]),
    (True, True, [(0.5 + 6) / 2, (2 + 4) / 2]),
])
def test_taylor_by_hand(multivariable, bias, expected):
    _, group = with_grads()
    criterion = imp.TaylorImportance(normalizer=None, multivariable=multivariable, bias=bias)
    scores = criterion(group)
    assert close(scores, expected)
    assert not scores.requires_grad
    assert close(imp.GroupTaylorImportance(normalizer=None, multivariable=multivariable, bias=bias)(group), expected)


def test_taylor_without_grads_names_the_layer():
    model, group = with_grads()
    model.fc2.weight.grad = None
    with pytest.raises(RuntimeError, match=r"fc2\.weight.*backward"):
        imp.TaylorImportance()(group)


def test_taylor_after_a_real_backward_is_finite():
    model, group = linear_linear_group()
    model(torch.randn(4, 2)).pow(2).sum().backward()
    scores = imp.TaylorImportance()(group)
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def accumulate_two_samples(criterion, model):
    for w1, w2 in (([[1.0, 0.0], [2.0, 1.0]], [[1.0, 1.0]]), ([[1.0, 2.0], [0.0, 1.0]], [[3.0, 1.0]])):
        model.zero_grad()
        model.fc1.weight.grad = torch.tensor(w1)
        model.fc2.weight.grad = torch.tensor(w2)
        criterion.accumulate_grad(model)


def test_hessian_two_samples_by_hand():
    model, group = linear_linear_group()
    criterion = imp.HessianImportance(normalizer=None)
    accumulate_two_samples(criterion, model)
    # fc1: H = mean g^2 = [[1, 2], [2, 1]]; 0.5 w^2 H = [[0.5, 4], [9, 8]] -> [4.5, 17]
    # fc2: H = [5, 1]; 0.5 w^2 H = [10, 0.5]
    assert close(criterion(group), [(4.5 + 10) / 2, (17 + 0.5) / 2])
    assert not criterion(group).requires_grad
    grouped = imp.GroupHessianImportance(normalizer=None)
    accumulate_two_samples(grouped, model)
    assert close(grouped(group), [7.25, 8.75])


def test_hessian_needs_accumulated_grads():
    model, group = linear_linear_group()
    criterion = imp.HessianImportance()
    accumulate_two_samples(criterion, model)
    criterion.zero_grad()
    with pytest.raises(RuntimeError, match=r"fc1\.weight.*accumulate_grad"):
        criterion(group)


def test_hessian_stale_after_pruning():
    model, group = linear_linear_group()
    criterion = imp.HessianImportance()
    accumulate_two_samples(criterion, model)
    group.prune(idxs=[0])
    pruned = only_group(model, torch.randn(1, 2), root=model.fc1)
    with pytest.raises(RuntimeError, match=r"fc1\.weight.*zero_grad"):
        criterion(pruned)
