"""delta_reg_for: delta_reg from the learning rate, the iterations and a target shrink, so a first try works."""
import copy

import pytest
import torch

import structprune as tp
from structprune.pruner.delta_reg import shrink_after
from test_reg_coverage import HiddenOnly, Tiny, randomise


def test_derived_values_match_the_ones_hand_tuned_on_digits():
    # benchmarks/greg_digits.py: seed schedule 7e-3 per epoch (22 iterations, 10 epochs), GReg-1 1e-4 per
    # iteration (about 400 iterations), SGD lr 0.05 momentum 0.9, reg 1e-4; both sit at a shrink of ~1e-2
    seed = tp.pruner.delta_reg_for(0.05, 22, 10, reg=1e-4, momentum=0.9)
    greg1 = tp.pruner.delta_reg_for(0.05, 1, 400, reg=1e-4, momentum=0.9)
    assert 6e-3 < seed < 9e-3 and 0.8e-4 < greg1 < 1.5e-4
    assert shrink_after(seed, 0.05, 22, 10, reg=1e-4, momentum=0.9) == pytest.approx(1e-2, rel=1e-6)
    # per-epoch penalties scale inversely with the iterations of an epoch and the learning rate
    assert tp.pruner.delta_reg_for(0.05, 88, 10, reg=0.0, momentum=0.9) == pytest.approx(
        tp.pruner.delta_reg_for(0.05, 22, 10, reg=0.0, momentum=0.9) / 4, rel=2e-2)


def _penalty_only(model, pruner, updates, iterations, step):
    """Run the seed loop with zero loss gradients: only the penalty moves the weights."""
    for _ in range(updates):
        pruner.update_reg()
        for _ in range(iterations):
            for param in model.parameters():
                param.grad = torch.zeros_like(param)
            step()


def test_decoupled_decay_reaches_the_target_shrink_exactly():
    model = Tiny()
    lr, updates, iterations, target = 0.01, 4, 5, 0.05
    delta = tp.pruner.delta_reg_for(lr, iterations, updates, target_shrink=target)
    pruner = tp.pruner.GrowingRegPruner(model, torch.randint(0, 10, (1, 5)), HiddenOnly(), reg=0.0, delta_reg=delta)
    randomise(model)
    start = model.embed.weight.detach().clone()
    _penalty_only(model, pruner, updates, iterations, lambda: pruner.regularize(model, decoupled=True, lr=lr))
    ratio = model.embed.weight.detach().norm(dim=0) / start.norm(dim=0)
    assert float(ratio[0]) == pytest.approx(target, rel=1e-4)  # the least important channel
    assert float(ratio[-1]) == pytest.approx(1.0)  # the most important one takes no penalty


def test_gradient_form_under_sgd_momentum_lands_at_or_below_the_target():
    model = Tiny()
    lr, momentum, updates, iterations, target = 0.01, 0.9, 5, 20, 0.05
    delta = tp.pruner.delta_reg_for(lr, iterations, updates, target_shrink=target, momentum=momentum)
    pruner = tp.pruner.GrowingRegPruner(model, torch.randint(0, 10, (1, 5)), HiddenOnly(), reg=0.0, delta_reg=delta)
    randomise(model)
    start = model.embed.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def step():
        pruner.regularize(model)
        optimizer.step()

    _penalty_only(model, pruner, updates, iterations, step)
    ratio = float(model.embed.weight.detach()[:, 0].norm() / start[:, 0].norm())
    # the rule takes momentum's steady state, lr * gamma / (1 - momentum); a heavy ball pushed this hard
    # oscillates and shrinks faster (here 0.013 for 0.05): the rule errs on the strong side
    assert target / 8 < ratio < target, ratio


def test_bad_requests_say_what_to_change():
    with pytest.raises(ValueError, match="target_shrink must lie in"):
        tp.pruner.delta_reg_for(0.1, 10, 5, target_shrink=1.5)
    with pytest.raises(ValueError, match="reg=2.0 alone already shrinks.*lower reg"):
        tp.pruner.delta_reg_for(0.1, 10, 5, reg=2.0)
    with pytest.raises(ValueError, match="raise reg_ceiling or regularize for more iterations"):
        tp.pruner.delta_reg_for(0.01, 1, 10, reg_ceiling=1.0)
    with pytest.raises(ValueError, match=r"momentum 0.9 shrinks a channel by at most 0.0309 in 66 iterations"):
        tp.pruner.delta_reg_for(0.05, 22, 3, momentum=0.9)  # digits, 3 epochs: the derived value collapsed it
    with pytest.raises(ValueError, match="updates must be a positive integer"):
        tp.pruner.delta_reg_for(0.01, 1, 0)


def test_first_try_on_digits_with_a_shorter_schedule():
    """The seed schedule for 4 epochs of batch 32: docs/growing_regularization.md's 7e-3 (tuned for 10 epochs of 22
    iterations) leaves the channels large and pruning 75% wrecks the network; the derived value works.

    Averaged over three shuffling seeds: after such a cut one run's accuracy swings by 0.2-0.4 with the
    seed or the CPU's float rounding (7e-3 alone gave 0.45-0.83 on one machine), the mean does not."""
    from structprune.demo.data import load_digits_split, num_batches
    from structprune.demo.model import build_model, example_inputs, ignored_layers
    from structprune.demo.train import TrainConfig, evaluate, fit, regularize_seed

    data = load_digits_split(0)
    baseline = build_model(0)
    fit(baseline, data, 6, TrainConfig(), torch.Generator().manual_seed(0), show_progress=False)
    config = TrainConfig(batch_size=32)
    derived = tp.pruner.delta_reg_for(config.lr, num_batches(len(data.y_train), 32), 4, reg=1e-4,
                                      momentum=config.momentum)
    accuracy = {7e-3: [], derived: []}
    for seed in (100, 101, 102):
        for delta in accuracy:
            model = copy.deepcopy(baseline)
            pruner = tp.pruner.GrowingRegPruner(model, example_inputs(), tp.importance.MagnitudeImportance(p=2),
                                                reg=1e-4, delta_reg=delta, pruning_ratio=0.75,
                                                ignored_layers=ignored_layers(model))
            regularize_seed(model, pruner, data, 4, config, torch.Generator().manual_seed(seed), bias=True,
                            show_progress=False)
            pruner.step()
            accuracy[delta].append(evaluate(model, data.x_test, data.y_test))
    mean = {delta: sum(values) / len(values) for delta, values in accuracy.items()}
    assert mean[derived] >= 0.6 and mean[derived] >= mean[7e-3] + 0.2, accuracy
