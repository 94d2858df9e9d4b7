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
    pruner = tp.pruner.GroupNormPruner(model, x, magnitude, reg=0.5)
    pruner.regularize(model)
    # channel c of conv1's group: conv1.weight[c], bn1.weight[c] and conv2.weight[:, c]
    w1, g1, w2 = model.conv1.weight.detach(), model.bn1.weight.detach(), model.conv2.weight.detach()
    norm = (w1.pow(2).sum((1, 2, 3)) + g1.pow(2) + w2.pow(2).sum((0, 2, 3))).sqrt()
    torch.testing.assert_close(model.bn1.weight.grad, before["bn1.weight"] + 0.5 * g1 / norm)
    torch.testing.assert_close(model.conv1.weight.grad, before["conv1.weight"] + 0.5 * w1 / norm.view(-1, 1, 1, 1))
    assert torch.equal(model.conv1.bias.grad, before["conv1.bias"])  # bias only with bias=True


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
