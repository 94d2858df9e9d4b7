"""Penalties and steps never skip parameters that were replaced after the pruner was built."""
import pytest
import torch
from torch import nn

import structprune as tp


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                          nn.LazyLinear(4))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    pruner = tp.pruner.GrowingRegPruner(model, x, tp.importance.MagnitudeImportance(), reg=0.5,
                                        ignored_layers=[model[5]])
    return model, x, pruner


def test_a_recreated_layer_gets_the_penalty_by_name():
    reference, x, reference_pruner = make()
    reference(x).sum().backward()
    reference_pruner.regularize(reference)
    model, x, pruner = make()
    fresh = nn.Conv2d(8, 8, 3)  # same shape, new parameters: the compiled ones get no gradient any more
    fresh.load_state_dict(model[3].state_dict())
    model[3] = fresh
    model(x).sum().backward()
    grad = fresh.weight.grad.clone()
    pruner.regularize(model)
    assert not torch.equal(fresh.weight.grad, grad)
    torch.testing.assert_close(fresh.weight.grad, reference[3].weight.grad)


class Wrapper(nn.Module):
    """Like DistributedDataParallel: the model under ``module``, every parameter name prefixed."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_parameters_found_through_a_wrapper_prefix():
    model, x, pruner = make()
    model[0] = nn.Conv2d(3, 8, 3)
    wrapped = Wrapper(model)
    wrapped(x).sum().backward()
    grad = model[0].weight.grad.clone()
    pruner.regularize(wrapped)
    # conv0 is only in its own output group: reg on dim 0
    torch.testing.assert_close(model[0].weight.grad, grad + 0.5 * model[0].weight.detach())


def test_a_recreated_layer_of_another_shape_raises_naming_it():
    model, x, pruner = make()
    model[3] = nn.Conv2d(8, 8, 1)
    model[5] = nn.LazyLinear(4)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match=r"3\.weight is now \(8, 8, 1, 1\).*update_regularizer"):
        pruner.regularize(model)


def test_a_removed_parameter_raises_instead_of_being_skipped():
    model, x, pruner = make()
    with pytest.raises(RuntimeError, match=r"parameter 0\.weight that the pruner compiled is not in the model passed in"):
        pruner.regularize(nn.Sequential(nn.Identity()))


def test_unused_parameters_are_checked_once_and_left_alone():
    model, x, pruner = make()
    (model[0](x)).sum().backward()  # only the first conv takes part this step
    grad = model[0].weight.grad.clone()
    pruner.regularize(model)
    pruner.regularize(model)  # the same idle set: no second lookup, no error
    torch.testing.assert_close(model[0].weight.grad, grad + 2 * 0.5 * model[0].weight.detach())
    assert model[3].weight.grad is None


def test_step_after_a_layer_was_replaced_raises_naming_it():
    model, x, pruner = make()
    model[3] = nn.Conv2d(8, 8, 3)
    with pytest.raises(RuntimeError, match=r"^3 is no longer the layer this pruner traced"):
        pruner.step()
