"""regularize(model, decoupled=True, lr=...): the growing penalty as AdamW-style decoupled decay per channel."""
import pytest
import torch

import structprune as tp
from test_reg_coverage import HiddenOnly, Tiny, hidden_gamma, randomise


def _pruner(model, delta_reg=0.3):
    pruner = tp.pruner.GrowingRegPruner(model, torch.randint(0, 10, (1, 5)), HiddenOnly(), reg=0.0,
                                        delta_reg=delta_reg)
    pruner.update_reg()  # hidden gamma 0.3, 0.2, 0.1, 0 (see test_reg_coverage)
    return pruner


@pytest.mark.parametrize("bias", [False, True])
def test_decoupled_step_scales_each_channel_by_one_minus_lr_gamma(bias):
    model = Tiny()
    pruner = _pruner(model)
    randomise(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pruner.regularize(model, bias=bias, decoupled=True, lr=2.0)
    factor = torch.tensor([0.4, 0.6, 0.8, 1.0])  # 1 - 2 * gamma
    torch.testing.assert_close(model.embed.weight.detach(), before["embed.weight"] * factor[None, :])
    torch.testing.assert_close(model.down.weight.detach(), before["down.weight"] * factor[:, None])
    torch.testing.assert_close(model.scale.detach(), before["scale"] * factor)
    torch.testing.assert_close(model.norm.weight.detach(), before["norm.weight"] * factor)
    expected_bias = before["down.bias"] * factor if bias else before["down.bias"]
    torch.testing.assert_close(model.down.bias.detach(), expected_bias)
    assert all(torch.all(p.grad == 0) for p in model.parameters())  # the gradients are left alone
    torch.testing.assert_close(model.up.bias.detach(), before["up.bias"])  # the MLP group's reg is 0


def test_decoupled_step_zeroes_instead_of_flipping_when_lr_gamma_exceeds_one():
    model = Tiny()
    pruner = _pruner(model)
    randomise(model)
    before = model.embed.weight.detach().clone()
    pruner.regularize(model, decoupled=True, lr=5.0)  # 1 - 5 * gamma = -0.5, 0, 0.5, 1
    torch.testing.assert_close(model.embed.weight.detach(), before * torch.tensor([0.0, 0.0, 0.5, 1.0]))


def test_decoupled_step_skips_parameters_without_grad_like_the_gradient_form():
    model = Tiny()
    pruner = _pruner(model)
    randomise(model)
    model.embed.weight.grad = None
    before = model.embed.weight.detach().clone()
    pruner.regularize(model, decoupled=True, lr=1.0)
    assert torch.equal(model.embed.weight.detach(), before)
    assert not torch.equal(model.scale.detach(), torch.ones(4))


def test_decoupled_needs_a_learning_rate_and_lr_needs_decoupled():
    model = Tiny()
    pruner = _pruner(model)
    with pytest.raises(ValueError, match=r"decoupled=True\) needs lr >= 0.*param_groups"):
        pruner.regularize(model, decoupled=True)
    with pytest.raises(ValueError, match=r"regularize\(lr=0.1\) without decoupled=True"):
        pruner.regularize(model, lr=0.1)


def _train_against_noise(decoupled: bool, steps: int = 100, lr: float = 1e-3):
    """AdamW fitting random targets (large, noisy gradients) while hidden channel 0 takes gamma 50."""
    torch.manual_seed(0)
    model = Tiny()
    pruner = _pruner(model, delta_reg=50.0)
    assert float(hidden_gamma(pruner)[0]) == pytest.approx(50.0)
    ids = torch.randint(0, 10, (8, 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = model.embed.weight.detach().clone()
    noise = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        (model(ids) - torch.randn(8, 3, generator=noise)).pow(2).mean().backward()
        if decoupled:
            optimizer.step()
            pruner.regularize(model, bias=True, decoupled=True, lr=lr)
        else:
            pruner.regularize(model, bias=True)
            optimizer.step()
    weight = model.embed.weight.detach()
    return float(weight[:, 0].norm() / start[:, 0].norm()), float(weight[:, 3].norm() / start[:, 3].norm())


def test_with_adamw_decoupled_decay_shrinks_the_channel_while_the_gradient_form_barely_moves_it():
    # Adam divides each gradient by its running RMS, so a penalty gamma * w moves an element by at most about
    # lr per step however large gamma is: 100 steps of 1e-3 against weights of about 1
    penalised, free = _train_against_noise(decoupled=False)
    assert penalised > 0.8 and free > 0.95
    penalised, free = _train_against_noise(decoupled=True)
    # (1 - lr * gamma) ** steps = 0.0059; AdamW's noisy steps barely add to it
    assert penalised < 0.02 and free > 0.95
