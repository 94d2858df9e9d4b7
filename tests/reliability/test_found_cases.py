"""Failures found by the fuzz campaign (tests/reliability/campaign.py), each shrunk to a plain module.

Every test asserts the behaviour the library should have. See the docstring of each test for the
failure it reproduces and the campaign signature it came from.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune as tp
from oracle import run, silence_consumers


def targets(group):
    return {(item.dep.target.name, item.dep.handler.__name__): item.idxs for item in group}


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, repr(model)


def assert_untouched(model, before):
    now = state(model)
    assert now[1] == before[1], "layer attributes changed"
    assert now[0].keys() == before[0].keys()
    for key in now[0]:
        assert now[0][key].shape == before[0][key].shape and torch.equal(now[0][key], before[0][key]), key


def assert_refused(graph, group, model, x):
    """A request that cannot be honoured: blocked, or refused with a ValueError; the model is untouched."""
    before = state(model)
    assert not graph.check_pruning_group(group), "check_pruning_group accepts a group that breaks the model"
    with pytest.raises((ValueError, RuntimeError)) as info:
        group.prune()
    if not group.blocked:
        assert isinstance(info.value, ValueError), info.value
    assert_untouched(model, before)
    run(model, x)


# -- A: a grouped conv pruned into a depthwise shape -----------------------------------------------------
class GroupedChain(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 1)
        self.g = nn.Conv2d(width, 4, 1, groups=2)  # width // 2 inputs and 2 outputs per group
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(self.g(self.conv(x)))


# (conv width, pruning steps as (layer, idxs)); every sequence ends with g depthwise-shaped: 2 -> 2, groups 2
CASES_A = {
    "g-then-conv": (4, [("g", [0, 2]), ("conv", [0, 2])]),
    "conv-then-g": (4, [("conv", [0, 2]), ("g", [0, 2])]),
    "one-input-per-group": (2, [("g", [0, 2])]),
}


@pytest.mark.parametrize("case", list(CASES_A), ids=list(CASES_A))
def test_grouped_conv_that_becomes_depthwise_keeps_pruning(case):
    """Campaign: ``IndexError: index N is out of bounds for dimension N with size N`` in
    DependencyGraph._apply_group, and later ``model no longer runs (Given groups=N ...)``.

    Removing outputs/inputs evenly from every group can leave ``g`` with groups == in == out, so
    ``ConvPruner.is_coupled`` flips to True. ``_apply_group`` then updates the alive indices of the wrong
    side (g-then-conv: IndexError raised *after* the layers were sliced, so the model stays pruned while
    the graph does not), and groups discovered afterwards read g's *input* numbering through its *output*
    alive map (one-input-per-group: after g's outputs {0, 2} go, channel 1 of ``conv`` maps to g/head
    channel 0 instead of 1 -- the wrong channel, silently -- and channel 0 of ``conv`` maps to nothing).
    """
    width, steps = CASES_A[case]
    torch.manual_seed(0)
    model, x = GroupedChain(width), torch.randn(2, 3, 4, 4)
    graph = tp.DependencyGraph().build_dependency(model, x)
    for name, idxs in steps:
        graph.get_pruning_group(getattr(model, name), tp.prune_conv_out_channels, idxs).prune()
        assert model(x).shape == (2, 3, 4, 4)
    assert (model.g.in_channels, model.g.out_channels, model.g.groups) == (2, 2, 2)
    # the graph keeps the layer's traced meaning (a grouped conv): one input of one group alone is refused
    # cleanly, with the model untouched
    stale = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [1])
    assert not graph.check_pruning_group(stale)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="unevenly"):
        stale.prune()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # traced again, g is depthwise: one more channel of conv takes g's matching channel and head's input
    graph = tp.DependencyGraph().build_dependency(model, x)
    group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [1])
    t = targets(group)
    assert any(name == "g" for name, _ in t), group
    assert t.get(("head", "prune_in_channels")) == [1], group
    group.prune()
    assert model(x).shape == (2, 3, 4, 4)
    assert (model.conv.out_channels, model.g.out_channels, model.head.in_channels) == (1, 1, 1)


# -- B: a channel slice one channel wide -----------------------------------------------------------------
class NarrowPieces(nn.Module):
    """Split sizes follow the consumers, as real code does; the second piece is one channel wide."""

    def __init__(self, how, raw=False):
        super().__init__()
        self.how, self.raw = how, raw
        self.conv = nn.Conv2d(3, 4, 1)
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.BatchNorm2d(1) if raw else nn.Conv2d(1, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        n = self.a.in_channels
        m = self.b.num_features if self.raw else self.b.in_channels
        if self.how == "slice":
            p, q = y[:, :n], y[:, n:n + m]
        elif self.how == "narrow":
            p, q = y.narrow(1, 0, n), y.narrow(1, n, m)
        else:
            p, q = torch.split(y, [n, m], 1)
        if self.raw:
            return self.a(p), self.b(q)
        return self.a(p) + self.b(q)


@pytest.mark.parametrize("how", ["slice", "narrow", "split"])
def test_one_channel_wide_slice_keeps_its_consumer(how):
    """Campaign: ``model no longer runs (Given groups=1, weight of size [N, 1, 1, 1], expected input[N, 0, N, N]
    to have 1 channels, but got 0 channels instead)``.

    ``y[:, 3:4]`` has a channel dim of size 1. Replaying the slice on labels, ``varying_dims`` skips dims of
    size < 2, so the state loses its channel dim and the consumer ``b`` is missing from the group: removing
    channel 3 of ``conv`` is accepted and ``b`` then gets an empty input. (``narrow`` and ``split`` take the
    offset fast path and are right; they are here as the reference.)
    """
    torch.manual_seed(0)
    model, x = NarrowPieces(how), torch.randn(2, 3, 4, 4)
    graph = tp.DependencyGraph().build_dependency(model, x)
    group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [3])
    assert targets(group).get(("b", "prune_in_channels")) == [0], group
    assert_refused(graph, group, model, x)  # b would lose its only input channel


@pytest.mark.parametrize("how", ["slice", "narrow", "split"])
def test_one_channel_wide_slice_reaching_an_output_is_blocked(how):
    """Campaign: output shapes changed after pruning (``AssertionError`` on the shape comparison): the
    one-channel piece reaches a model output through a BatchNorm, yet the group is neither blocked nor
    holding the BatchNorm."""
    torch.manual_seed(0)
    model, x = NarrowPieces(how, raw=True).eval(), torch.randn(2, 3, 4, 4)
    graph = tp.DependencyGraph().build_dependency(model, x)
    group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [3])
    assert any("model output" in reason for reason in group.blocked), (group.blocked, group)


# -- C: whole heads removed under a reshape with a fixed head count --------------------------------------
class Attention(nn.Module):
    def __init__(self, heads, head_dim, fused=False):
        super().__init__()
        self.heads, self.fused = heads, fused
        width = heads * head_dim
        if fused:
            self.qkv = nn.Linear(5, 3 * width)
        else:
            self.q, self.k, self.v = nn.Linear(5, width), nn.Linear(5, width), nn.Linear(5, width)
        self.o = nn.Linear(width, 4)

    def forward(self, x):
        b, t, _ = x.shape
        if self.fused:  # timm style: the head count is fixed, the head dim follows (-1)
            q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        else:
            q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
            k = self.k(x).view(b, t, self.heads, -1).transpose(1, 2)
            v = self.v(x).view(b, t, self.heads, -1).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1)
        return self.o((attn @ v).transpose(1, 2).reshape(b, t, -1))


CASES_C = {
    # two heads of 2 dims, remove head 1: still divisible, the -1 absorbs it -> 2 heads of 1 dim (silent)
    "separate-silent": (dict(heads=2, head_dim=2), "q", [2, 3]),
    # three heads of 2 dims, remove head 0: 4 channels cannot form 3 heads (crash)
    "separate-crash": (dict(heads=3, head_dim=2), "q", [0, 1]),
    # fused qkv, 2 heads of 4 dims, remove head 1 of q, k and v (silent)
    "fused-silent": (dict(heads=2, head_dim=4, fused=True), "qkv", [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]),
}


@pytest.mark.parametrize("case", list(CASES_C), ids=list(CASES_C))
def test_removing_whole_heads_under_a_fixed_head_count(case):
    """Campaign: ``model no longer runs (shape '[N, N, N, -N]' is invalid for input of size N)`` and
    ``Tensor-likes are not close`` from the lossless oracle on attention blocks.

    ``view(b, t, self.heads, -1)`` fixes the head count and lets the head dim follow. The graph accepts
    removing whole heads (keeps_product allows "whole groups"), but the head count in the code cannot
    change: the pruned model either crashes or silently regroups the remaining channels into different
    heads. Removing whole heads must be refused unless the reshape lets that dim follow; removing the same
    dims of every head (the -1 dim) is fine and is checked as the reference.
    Note: tests/graph/test_semantics.py::test_matmul_couples_q_k_and_v_with_output_projection asserts that
    the fused whole-head group is *not* blocked; that expectation describes this bug.
    """
    kwargs, root, idxs = CASES_C[case]
    torch.manual_seed(0)
    model, x = Attention(**kwargs).eval(), torch.randn(2, 3, 5)
    graph = tp.DependencyGraph().build_dependency(model, x)
    group = graph.get_pruning_group(getattr(model, root), tp.prune_linear_out_channels, idxs)
    if group.blocked:
        return
    silence_consumers(group, producers=True)
    with torch.no_grad():
        before = model(x).clone()
    snapshot = state(model)
    try:
        group.prune()
    except ValueError:
        assert_untouched(model, snapshot)
        return
    with torch.no_grad():
        after = model(x)  # must run...
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # ...and compute the same function


def test_removing_the_same_dim_of_every_head_is_lossless():
    torch.manual_seed(0)
    model, x = Attention(heads=2, head_dim=3).eval(), torch.randn(2, 3, 5)
    graph = tp.DependencyGraph().build_dependency(model, x)
    group = graph.get_pruning_group(model.q, tp.prune_linear_out_channels, [1, 4])
    assert not group.blocked
    silence_consumers(group, producers=True)
    with torch.no_grad():
        before = model(x).clone()
    group.prune()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


# -- E: grouped convs asked for uneven removal -----------------------------------------------------------
class GroupedProducer(nn.Module):
    def __init__(self, transposed):
        super().__init__()
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.pre = nn.Conv2d(3, 4, 1)
        self.g = conv(4, 6, 3, padding=1, groups=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.g(self.pre(x)))


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv-transpose"])
@pytest.mark.parametrize("side", ["out", "in"])
def test_grouped_conv_uneven_removal_is_refused(transposed, side):
    """Campaign (arbitrary indices): ``pruning layers.gconvN idxs=[N] was accepted but broke the model:
    Given groups=N, expected weight to be divisible by N at dimension N`` / ``... expected input[...] to have
    N channels`` / for ConvTranspose2d ``expected bias to be 1-dimensional with N elements``.

    Removing one channel from a conv with 2 groups cannot leave equal groups. The group is neither
    blocked nor refused and check_pruning_group returns True; the layer is sliced (for the input side of a
    grouped conv and the output side of a grouped ConvTranspose2d, ``idxs % unit`` removes a position from
    *every* group) and the model no longer runs. It should be refused, naming the layer and the groups, as
    GroupNorm already does.
    """
    torch.manual_seed(0)
    model, x = GroupedProducer(transposed), torch.randn(2, 3, 4, 4)
    graph = tp.DependencyGraph().build_dependency(model, x)
    module = model.g if side == "out" else model.pre
    group = graph.get_pruning_group(module, tp.prune_conv_out_channels, [0])
    assert_refused(graph, group, model, x)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv-transpose"])
@pytest.mark.parametrize("side", ["out", "in"])
def test_grouped_conv_even_removal_is_lossless(transposed, side):
    """The reference for the test above: the same local channel of every group prunes losslessly."""
    from oracle import assert_lossless

    torch.manual_seed(0)
    model, x = GroupedProducer(transposed).eval(), torch.randn(2, 3, 4, 4)
    module, idxs = (model.g, [1, 4]) if side == "out" else (model.pre, [1, 3])
    assert_lossless(model, x, module, idxs)
    assert model(x).shape == (2, 2, 4, 4)


# -- D: a model input called a buffer --------------------------------------------------------------------
class InputResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("mask", torch.ones(3, 1, 1))
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(self.dw(x) + self.conv(x) * self.mask)


def test_blocked_reason_tells_a_model_input_from_a_buffer():
    """Campaign: ``blocked for an undocumented reason: ['channels reach a buffer of shape (2, C, H, W)']`` for
    every group that reaches the model input (depthwise conv on the input, residual with the input, SE on
    the input). ``_visit_leaf`` calls every non-parameter leaf tensor "a buffer"; the input is not one."""
    torch.manual_seed(0)
    model, x = InputResidual(), torch.randn(2, 3, 4, 4)
    graph = tp.DependencyGraph().build_dependency(model, x)
    reasons = graph.get_pruning_group(model.dw, tp.prune_conv_out_channels, [0]).blocked
    assert any("model input" in r for r in reasons), reasons
    # dw's output is added to conv(x) * mask, so its group does reach the mask buffer too: that reason is
    # right; what must not happen is calling the input itself a buffer
    assert all("buffer" not in r or "(3, 1, 1)" in r for r in reasons), reasons
    reasons = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [0]).blocked
    assert any("buffer" in r for r in reasons), reasons  # the real buffer is still called one
