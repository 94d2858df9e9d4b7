"""``tp.function``: torch_pruning's low-level pruning layer under its names, each the object structprune uses.

A custom layer is pruned the way torch_pruning's recipes do it: subclass ``tp.function.LinearPruner``,
override ``prune_out_channels``/``prune_in_channels``/``get_*_channels``, pass an instance in
``customized_pruners``.
"""
import importlib

import torch
import torch.nn.functional as F
from torch import nn

import structprune as tp
from structprune.layers import declarations

#: torch_pruning 1.6's ``torch_pruning.pruner.function`` names (its ``__all__`` and per-type classes)
TORCH_PRUNING_NAMES = [
    "BasePruningFunc", "PrunerBox",
    "ConvPruner", "DepthwiseConvPruner", "LinearPruner", "BatchnormPruner", "LayernormPruner",
    "GroupNormPruner", "InstanceNormPruner", "PReLUPruner", "EmbeddingPruner", "MultiheadAttentionPruner",
    "LSTMPruner", "ParameterPruner",
    "prune_conv_out_channels", "prune_conv_in_channels",
    "prune_depthwise_conv_out_channels", "prune_depthwise_conv_in_channels",
    "prune_batchnorm_out_channels", "prune_batchnorm_in_channels",
    "prune_linear_out_channels", "prune_linear_in_channels",
    "prune_prelu_out_channels", "prune_prelu_in_channels",
    "prune_layernorm_out_channels", "prune_layernorm_in_channels",
    "prune_embedding_out_channels", "prune_embedding_in_channels",
    "prune_parameter_out_channels", "prune_parameter_in_channels",
    "prune_multihead_attention_out_channels", "prune_multihead_attention_in_channels",
    "prune_groupnorm_out_channels", "prune_groupnorm_in_channels",
    "prune_instancenorm_out_channels", "prune_instancenorm_in_channels",
    "prune_lstm_out_channels", "prune_lstm_in_channels",
]


def test_one_module_under_every_spelling_with_every_torch_pruning_name():
    module = importlib.import_module("structprune.function")
    assert tp.function is tp.pruner.function is module
    missing = [name for name in TORCH_PRUNING_NAMES if not hasattr(module, name)]
    assert not missing
    assert set(TORCH_PRUNING_NAMES) <= set(module.__all__)
    assert all(hasattr(module, name) for name in module.__all__)


def test_every_name_is_the_object_structprune_uses():
    f = tp.function
    assert f.BasePruningFunc is tp.BasePruningFunc is tp.pruner.BasePruningFunc
    for name in ("ConvPruner", "DepthwiseConvPruner", "ConvTransposePruner", "LinearPruner", "BatchnormPruner",
                 "InstanceNormPruner", "GroupNormPruner", "LayernormPruner", "PReLUPruner", "EmbeddingPruner",
                 "MultiheadAttentionPruner", "LSTMPruner", "ParameterPruner"):
        assert getattr(f, name) is getattr(declarations, name), name
    assert f.prune_conv_out_channels is tp.prune_conv_out_channels is tp.layers.functions.prune_conv_out_channels
    assert f.PrunerBox is declarations.DEFAULT_PRUNERS
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 6, 6))
    # the table's instances are the ones the graph prunes with
    assert graph.module2node[model[0]].pruner is f.PrunerBox[nn.Conv2d]
    assert graph.module2node[model[3]].pruner is f.PrunerBox[nn.Linear]
    assert isinstance(f.PrunerBox[nn.Conv2d], f.ConvPruner) and isinstance(f.PrunerBox[nn.Linear], f.LinearPruner)


def test_functions_and_call_form_prune_one_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3)
    weight = conv.weight.detach().clone()
    tp.function.prune_conv_out_channels(conv, [1, 4])
    assert conv.out_channels == 4 and torch.equal(conv.weight.detach(), weight[[0, 2, 3, 5]])
    linear = nn.Linear(6, 5)
    weight = linear.weight.detach().clone()
    tp.function.LinearPruner()(linear, [0, 5], to_output=False)
    assert linear.in_features == 4 and torch.equal(linear.weight.detach(), weight[:, 1:5])


def test_conv_functions_prune_a_transposed_conv_along_its_own_layout():
    """torch_pruning's ConvPruner takes transposed convs too; a ConvTranspose keeps its weight as [in, out, ...],
    so its outputs are dim 1 (slicing dim 0 broke the layer, without an error)."""
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, 2, stride=2)
    x = torch.randn(1, 4, 3, 3)
    expected = layer(x).detach()
    tp.function.prune_conv_out_channels(layer, [0, 4])
    assert (layer.in_channels, layer.out_channels) == (4, 4) and layer.weight.shape == (4, 4, 2, 2)
    assert torch.allclose(layer(x), expected[:, [1, 2, 3, 5]], atol=1e-6)
    weight = layer.weight.detach().clone()
    tp.function.ConvPruner()(layer, [2], to_output=False)
    assert layer.in_channels == 3 and torch.equal(layer.weight.detach(), weight[[0, 1, 3]])
    conv = nn.Conv2d(4, 6, 3)
    tp.function.prune_transposed_conv_out_channels(conv, [5])
    assert conv.out_channels == 5 and conv.weight.shape == (5, 4, 3, 3)


class ScaledLinear(nn.Module):
    """A linear layer written its own way: ``in_dim``/``out_dim`` attributes and a scale per output."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(torch.randn(out_dim))
        self.scale = nn.Parameter(torch.rand(out_dim) + 0.5)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.scale


class ScaledLinearPruner(tp.function.LinearPruner):
    """The torch_pruning recipe: keep the complement, slice every parameter, update the size attributes."""

    def prune_out_channels(self, layer, idxs):
        keep = sorted(set(range(layer.out_dim)) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.scale = self._prune_parameter_and_grad(layer.scale, keep, 0)
        layer.out_dim = len(keep)
        return layer

    def prune_in_channels(self, layer, idxs):
        keep = sorted(set(range(layer.in_dim)) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        layer.in_dim = len(keep)
        return layer

    def get_out_channels(self, layer):
        return layer.out_dim

    def get_in_channels(self, layer):
        return layer.in_dim


class WithScaledLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.custom = ScaledLinear(8, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.custom(F.relu(self.fc1(x)))))


def test_a_linear_pruner_subclass_prunes_a_custom_layer_through_the_graph():
    torch.manual_seed(0)
    model = WithScaledLinear()
    x = torch.randn(4, 6)
    pruner = ScaledLinearPruner()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x,
                                                  customized_pruners={ScaledLinear: pruner})
    assert graph.module2node[model.custom].pruner is pruner
    hidden = F.relu(model.fc1(x)).detach()
    custom_out = model.custom(hidden).detach()
    weight, scale = model.custom.weight.detach().clone(), model.custom.scale.detach().clone()
    with torch.no_grad():
        model.custom.scale[[1, 7]] = 0.0  # these outputs are zero after the ReLU: removing them is lossless
    expected = model(x).detach()
    group = graph.get_pruning_group(model.custom, pruner.prune_out_channels, idxs=[1, 7])
    assert {item.dep.target.module for item in group} == {model.custom, model.fc2}
    group.prune()
    kept = [0, 2, 3, 4, 5, 6, 8, 9]
    assert model.custom.out_dim == model.fc2.in_features == 8
    assert model.custom.weight.shape == (8, 8) and model.custom.scale.shape == (8,)
    assert torch.equal(model.custom.weight.detach(), weight[kept]) and torch.equal(model.custom.scale.detach(), scale[kept])
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert torch.allclose(model.custom(hidden), custom_out[:, kept], atol=1e-6)

    # the input side: fc1's output group reaches the custom layer's inputs through the same pruner
    group = graph.get_pruning_group(model.fc1, tp.function.prune_linear_out_channels, idxs=[0, 3, 5])
    assert any(item.dep.target.module is model.custom and item.dep.handler == pruner.prune_in_channels
               for item in group)
    group.prune()
    assert model.fc1.out_features == model.custom.in_dim == 5
    assert torch.equal(model.custom.weight.detach(), weight[kept][:, [1, 2, 4, 6, 7]])
    assert model(x).shape == (4, 3)


def test_a_pruner_step_prunes_the_custom_layer_with_its_subclassed_pruner():
    torch.manual_seed(0)
    model = WithScaledLinear()
    x = torch.randn(4, 6)
    pruner = tp.pruner.MagnitudePruner(model, x, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                                       ignored_layers=[model.fc2], root_module_types=[nn.Linear, ScaledLinear],
                                       customized_pruners={ScaledLinear: ScaledLinearPruner()})
    pruner.step()
    assert model.fc1.out_features == model.custom.in_dim == 4
    assert model.custom.out_dim == model.fc2.in_features == 5
    assert model.custom.weight.shape == (5, 4) and model.custom.scale.shape == (5,)
    assert model(x).shape == (4, 3)
