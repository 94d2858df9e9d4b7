"""Pruning is independent of dtype, memory format, device, frozen parameters and earlier pruning."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import structprune as tp
from oracle import leaves, run, silence_consumers


class Net(nn.Module):
    """Plain, grouped and depthwise convs, a residual, a concat, channels-last LayerNorm + Linear, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.side = nn.Conv2d(3, 4, 1)
        self.mix = nn.Conv2d(12, 6, 1)
        self.norm = nn.LayerNorm(6)
        self.fc_cl = nn.Linear(6, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = y + self.dw(self.grouped(y))
        y = self.mix(torch.cat([y, self.side(x)], dim=1))
        y = self.fc_cl(self.norm(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.head(y.mean((2, 3)))


def make(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    return model, x


TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def lossless(model, x, module, idxs, tol):
    """The oracle of tests/oracle.py, with a dtype-aware tolerance and a report of the group."""
    graph = tp.DependencyGraph().build_dependency(model, x)
    group = graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, idxs)
    assert not group.blocked, group.blocked
    silence_consumers(group)
    with torch.no_grad():
        before = [t.clone() for t in leaves(run(model, x))]
    group.prune()
    with torch.no_grad():
        after = leaves(run(model, x))
    for b, a in zip(before, after):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    return group


def check_prunes(model, x, tol):
    """Oracle on the stem group (grouped conv: the same local channel in both groups), then a pruner step
    on a fresh graph of the already pruned model."""
    dtype, device = x.dtype, x.device
    macs, params = tp.utils.count_ops_and_params(model, x)
    lossless(model, x, model.stem, [1, 5], tol)
    assert model.stem.out_channels == 6 and model.grouped.in_channels == 6 and model.mix.in_channels == 10
    # mix feeds a LayerNorm over channels, whose statistics change: prune without the oracle
    graph = tp.DependencyGraph().build_dependency(model, x)
    graph.get_pruning_group(model.mix, tp.prune_conv_out_channels, [0, 4]).prune()
    assert model.norm.normalized_shape == (4,) and model.fc_cl.in_features == 4
    lossless(model, x, model.fc_cl, [1, 5], tol)
    assert model.head.in_features == 4
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                                  ignored_layers=[model.head])
    pruner.step()
    out = model(x)
    assert out.shape == (2, 5) and out.dtype == dtype and out.device.type == torch.device(device).type
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point():
            assert tensor.dtype == dtype, name
        assert tensor.device.type == torch.device(device).type, name
    new_macs, new_params = tp.utils.count_ops_and_params(model, x)
    assert new_macs < macs and new_params < params
    assert model.stem.out_channels < 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
def test_prune_in_every_floating_dtype(dtype):
    # the pinned torch build runs conv, batch norm and layer norm in float16 on the CPU
    model, x = make(dtype)
    check_prunes(model, x, TOLERANCE[dtype])


def test_float16_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.LayerNorm(12), nn.Linear(12, 8), nn.ReLU(),
                          nn.Linear(8, 3)).half().eval()
    x = torch.randn(4, 6).half()
    lossless(model, x, model[3], [1, 2, 6], TOLERANCE[torch.float16])
    tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                         ignored_layers=[model[5]]).step()
    assert model[0].out_features == 6 and model[2].normalized_shape == (6,) and model[3].out_features == 2
    out = model(x)
    assert out.dtype == torch.float16 and out.shape == (4, 3)
    assert all(p.dtype == torch.float16 for p in model.parameters())


def test_channels_last_prunes_losslessly():
    model, x = make()
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    check_prunes(model, x, TOLERANCE[torch.float32])


def test_channels_last_weights_stay_channels_last():
    """A model converted to channels_last for speed should not silently go back to NCHW weights."""
    model, x = make()
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    graph = tp.DependencyGraph().build_dependency(model, x)
    graph.get_pruning_group(model.stem, tp.prune_conv_out_channels, [1, 5]).prune()
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            assert module.weight.is_contiguous(memory_format=torch.channels_last), (
                f"{name}.weight {tuple(module.weight.shape)} lost channels_last (strides {module.weight.stride()})")


def freeze(*modules):
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)


@pytest.mark.parametrize("frozen", ["middle", "stem"])
def test_frozen_parameters_prune_too(frozen):
    model, x = make()
    layers = [model.grouped, model.dw] if frozen == "middle" else [model.stem, model.bn]
    freeze(*layers)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    ids = {name: id(p) for name, p in model.named_parameters()}
    graph = tp.DependencyGraph().build_dependency(model, x)
    for layer in layers:
        assert layer in graph.module2node, f"frozen {type(layer).__name__} is missing from the graph"
    group = lossless(model, x, model.stem, [1, 5], TOLERANCE[torch.float32])
    assert {item.dep.target.name for item in group} >= {"stem", "bn", "grouped", "dw", "mix"}
    tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                         ignored_layers=[model.head]).step()
    assert model.stem.out_channels == 4 and model.grouped.out_channels == 4, "frozen layers were left unpruned"
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert {name: id(p) for name, p in model.named_parameters()} == ids
    model(x).sum().backward()
    assert all((p.grad is None) != p.requires_grad for p in model.parameters())


def test_frozen_whole_model_prunes_and_stays_frozen():
    # a fully frozen (e.g. pretrained, inference-only) model is traced with its parameters briefly
    # requiring grad, so its groups are found; afterwards every parameter is frozen again
    model, x = make()
    freeze(model)
    graph = tp.DependencyGraph().build_dependency(model, x)
    assert all(not p.requires_grad for p in model.parameters())
    group = graph.get_pruning_group(model.stem, tp.prune_conv_out_channels, [0, 4])  # even in both groups
    assert not group.blocked and len(group) > 1
    with torch.no_grad():
        expected_shape = model(x).shape
    group.prune()
    with torch.no_grad():
        assert model(x).shape == expected_shape
    assert all(not p.requires_grad for p in model.parameters())


def test_pruned_model_traces_and_prunes_again():
    model, x = make()
    first = tp.DependencyGraph().build_dependency(model, x)
    first.get_pruning_group(model.stem, tp.prune_conv_out_channels, [0, 4]).prune()
    first.get_pruning_group(model.side, tp.prune_conv_out_channels, [3]).prune()
    assert model.mix.in_channels == 9
    copy_before = copy.deepcopy(model)
    second = tp.DependencyGraph().build_dependency(model, x)
    roots = {group[0].dep.target.name for group in second.get_all_groups()}
    assert {"stem", "side", "mix", "fc_cl"} <= roots
    # numbering on the new graph is the current one: channel 5 of 6 is the last channel
    group = lossless(model, x, model.stem, [2, 5], TOLERANCE[torch.float32])
    assert model.stem.out_channels == 4 and model.mix.in_channels == 7
    assert [i for item in group if item.dep.target.name == "mix" for i in item.idxs] == [2, 5]
    third = tp.DependencyGraph().build_dependency(model, x)
    lossless(model, x, model.side, [0], TOLERANCE[torch.float32])
    assert model.side.out_channels == 2 and model.mix.in_channels == 6
    assert copy_before(x).shape == model(x).shape
    assert third is not second


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"])
def test_prune_on_cuda(dtype):
    model, x = make(dtype, "cuda")
    check_prunes(model, x, TOLERANCE[dtype])
    assert all(p.is_cuda for p in model.parameters()) and all(b.is_cuda for b in model.buffers())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_channels_last_on_cuda():
    model, x = make(torch.float32, "cuda")
    model = model.to(memory_format=torch.channels_last)
    check_prunes(model, x.contiguous(memory_format=torch.channels_last), TOLERANCE[torch.float32])
