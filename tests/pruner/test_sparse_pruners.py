"""BNScalePruner and GroupNormPruner: their penalties, by hand, on the shared regularizer engine."""
import torch

import structprune as tp
from nets import example, magnitude


def prepared():
    model, x = example()
    model(x).sum().backward()
    return model, x, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_bn_scale_adds_reg_times_sign_of_gamma_to_batchnorm_only():
    model, x, before = prepared()
    with torch.no_grad():
        model.bn1.weight[0] = -1.0
    pruner = tp.pruner.BNScalePruner(model, x, magnitude, reg=0.1)
    pruner.regularize(model)
    for name, param in model.named_parameters():
        if name in ("bn1.weight", "bn2.weight", "bn3.weight"):
            torch.testing.assert_close(param.grad, before[name] + 0.1 * torch.sign(param.detach()))
        else:
            torch.testing.assert_close(param.grad, before[name])
    assert model.bn1.weight.grad[0] == before["bn1.weight"][0] - 0.1


def test_group_norm_pruner_applies_group_lasso_over_coupled_weights():
    model, x, before = prepared()
    pruner = tp.pruner.GroupNormPruner(model, x, magnitude, reg=0.5, alpha=0)
    pruner.regularize(model)
    # channel c of conv1's group: conv1.weight[c], bn1.weight[c] and conv2.weight[:, c]
    w1, g1, w2 = model.conv1.weight.detach(), model.bn1.weight.detach(), model.conv2.weight.detach()
    norm = (w1.pow(2).sum((1, 2, 3)) + g1.pow(2) + w2.pow(2).sum((0, 2, 3))).sqrt()
    torch.testing.assert_close(model.bn1.weight.grad, before["bn1.weight"] + 0.5 * g1 / norm)
    torch.testing.assert_close(model.conv1.weight.grad, before["conv1.weight"] + 0.5 * w1 / norm.view(-1, 1, 1, 1))
    assert torch.equal(model.conv1.bias.grad, before["conv1.bias"])  # bias only with bias=True


def _conv1_group_norm(model):
    w1, g1, w2 = model.conv1.weight.detach(), model.bn1.weight.detach(), model.conv2.weight.detach()
    return (w1.pow(2).sum((1, 2, 3)) + g1.pow(2) + w2.pow(2).sum((0, 2, 3))).sqrt()


def test_group_norm_pruner_pushes_weaker_channels_harder_by_alpha():
    model, x, before = prepared()
    pruner = tp.pruner.GroupNormPruner(model, x, magnitude, reg=0.5)  # alpha=4: up to 2**4 = 16x
    pruner.regularize(model)
    norm = _conv1_group_norm(model)
    gamma = 16.0 ** ((norm.max() - norm) / (norm.max() - norm.min()))
    g1 = model.bn1.weight.detach()
    torch.testing.assert_close(model.bn1.weight.grad, before["bn1.weight"] + 0.5 * gamma * g1 / norm)
    assert float(gamma.min()) == 1.0 and abs(float(gamma.max()) - 16.0) < 1e-4


def test_group_norm_pruner_accepts_torch_pruning_call_forms():
    model, x, before = prepared()
    pruner = tp.pruner.GroupNormPruner(model, x, magnitude, reg=0.5)
    pruner.regularize(model, alpha=2.0)  # torch_pruning: the base of the strength
    norm = _conv1_group_norm(model)
    gamma = 2.0 ** ((norm.max() - norm) / (norm.max() - norm.min()))
    g1 = model.bn1.weight.detach()
    torch.testing.assert_close(model.bn1.weight.grad, before["bn1.weight"] + 0.5 * gamma * g1 / norm)
    # BasePruner's form regularize(model, loss): the loss is not an alpha
    model.zero_grad()
    model(x).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    pruner.regularize(model, model(x).sum())
    gamma = 16.0 ** ((norm.max() - norm) / (norm.max() - norm.min()))
    torch.testing.assert_close(model.bn1.weight.grad, grads["bn1.weight"] + 0.5 * gamma * g1 / norm)


def test_regularize_with_a_loss_argument_is_not_taken_for_bias_or_reg():
    model, x, before = prepared()
    pruner = tp.pruner.BNScalePruner(model, x, magnitude, reg=0.1)
    pruner.regularize(model, model(x).sum())
    torch.testing.assert_close(model.bn1.weight.grad, before["bn1.weight"] + 0.1 * torch.sign(model.bn1.weight.detach()))
    model, x, before = prepared()
    greg = tp.pruner.GrowingRegPruner(model, x, magnitude, reg=0.1)
    greg.regularize(model, model(x).sum())  # a truthy loss must not switch bias regularization on
    assert torch.equal(model.conv1.bias.grad, before["conv1.bias"])
    torch.testing.assert_close(model.conv1.weight.grad, before["conv1.weight"] + 0.1 * model.conv1.weight.detach())
    base = tp.pruner.BasePruner(model, x, magnitude)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    base.regularize(model, model(x).sum())  # plain pruning adds nothing
    assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters())


def test_sparse_training_then_step_prunes_and_refreshes():
    model, x, _ = prepared()
    pruner = tp.pruner.GroupNormPruner(model, x, tp.importance.GroupMagnitudeImportance(), reg=1e-3, pruning_ratio=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).sum().backward()
        pruner.regularize(model)
        optimizer.step()
    pruner.step()
    pruner.update_regularizer()
    optimizer.zero_grad()
    model(x).sum().backward()
    pruner.regularize(model)
    assert model.conv1.out_channels == 8 and model.conv2.weight.grad.shape == model.conv2.weight.shape
