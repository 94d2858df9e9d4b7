"""Writes into part of a tensor: ``x[index] = value`` and in-place ops on a view (``x[:, 1:] += y``,
torchvision MViT's residual past its class token).

The written tensor reads the value inside the region and its old self outside it, element by element;
the graph couples the value's channels with the tensor's, and refuses a region that cuts a channel dim
(its literal bounds would hold other channels once some are removed). Before, an in-place op on a view
left the tensor's new value to an opaque op (nothing prunable), and ``x[..., :4] = v`` let the step prune
``x`` so that the write landed on other channels (the model still ran, computing something else).
A constant pad along the channel dim (EfficientViT's extra channel of ones) is the same kind of map: the
padded positions read nothing, the channels keep their places.
"""
import pytest
import torch
from torch import nn

import structprune as tp
from structprune.graph.refusal import RefusalKind

from oracle import assert_lossless


class AfterClassToken(nn.Module):
    """MViT's ``_add_shortcut``: ``x[:, 1:, :] += shortcut[:, 1:, :]``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, t):
        x, shortcut = self.a(t), self.b(t)
        x[:, 1:, :] += shortcut[:, 1:, :]
        return self.out(x)


class ViewOfAView(nn.Module):
    """An in-place op two views deep: each tensor the view was taken from changes."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, t):
        x, y = self.a(t), self.b(t)
        x.narrow(1, 1, 4)[:, :2].mul_(y[:, :2])
        return self.out(x)


class ScalarIntoTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, t):
        x = self.a(t)
        x[:, 0] = 0.0
        return self.out(x)


class IntoChannels(nn.Module):
    """``x[..., :4] = v``: after pruning ``a`` the first four positions would be other channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 16), nn.Linear(8, 4), nn.Linear(16, 4)

    def forward(self, t):
        x = self.a(t)
        x[..., :4] = self.b(t)
        return self.out(x)


class IntoChannelsOfAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, t):
        x = self.a(t)
        x[..., 2:6].mul_(0.5)
        return self.out(x)


def _inputs():
    torch.manual_seed(0)
    return torch.randn(2, 5, 8)


@pytest.mark.parametrize("model_cls", [AfterClassToken, ViewOfAView])
def test_a_value_written_into_tokens_joins_the_written_tensors_group(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    group = assert_lossless(model, _inputs(), model.a, [1, 4, 9, 15])
    assert {item.dep.target.name for item in group} >= {"a", "b", "out"}
    assert model.a.out_features == model.b.out_features == model.out.in_features == 12


def test_a_scalar_written_into_a_token_leaves_the_channels_prunable():
    torch.manual_seed(0)
    model = ScalarIntoTokens().eval()
    assert_lossless(model, _inputs(), model.a, [0, 7, 8])
    assert model.a.out_features == 13


@pytest.mark.parametrize("model_cls", [IntoChannels, IntoChannelsOfAView])
def test_a_write_into_part_of_the_channel_dim_is_refused_with_the_reason(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    x = _inputs()
    with torch.no_grad():
        before = model(x)
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                  ignored_layers=[model.out])
    [refusal] = [reason for root, reason in pruner.report().refused if root == "a"]
    assert refusal.kind is RefusalKind.UNPRUNABLE_ARGUMENT
    assert "writes into part of dim 2 of a (2, 5, 16) tensor, which carries channels" in str(refusal)
    with pytest.warns(UserWarning, match=r"a \(0 of 8: reaches an argument that cannot be pruned\)"):
        pruner.step()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    assert model.a.out_features == 16


def test_the_write_is_replayed_from_the_views_place_in_its_base():
    from structprune.graph.trace import write_into_view

    base = torch.arange(20.0).view(4, 5)
    view = base[1:3, ::2]
    written = write_into_view(base, torch.full((2, 3), -1.0), tuple(view.shape), view.stride(),
                              view.storage_offset())
    expected = base.clone()
    expected[1:3, ::2] = -1.0
    assert torch.equal(written, expected) and torch.equal(base, torch.arange(20.0).view(4, 5))


class PadChannel(nn.Module):
    """EfficientViT's linear attention: v gains a constant channel, sliced off again after the product."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, t):
        v = torch.nn.functional.pad(self.a(t), (0, 1), mode="constant", value=1.0)
        return self.out(v[..., :-1] / (v[..., -1:] + 1.0))


class PadSpace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.out(torch.nn.functional.pad(self.a(x), (1, 1, 1, 1)))


def test_a_constant_channel_padded_on_keeps_the_others_in_place():
    torch.manual_seed(0)
    model = PadChannel().eval()
    assert_lossless(model, _inputs(), model.a, [0, 3, 15])
    assert model.a.out_features == model.out.in_features == 13


def test_a_spatial_pad_passes_the_channels_through():
    torch.manual_seed(0)
    model = PadSpace().eval()
    assert_lossless(model, torch.randn(1, 3, 8, 8), model.a, [1, 6])
    assert model.out.in_channels == 6


class BroadcastValue(nn.Module):
    """One channel written across all of x's: ``b`` has nothing to lose alongside x's channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 16), nn.Linear(8, 1), nn.Linear(16, 4)

    def forward(self, t):
        x = self.a(t)
        x[...] = self.b(t)
        return self.out(x)


def test_a_value_broadcast_across_the_channel_dim_is_refused_with_the_reason():
    model = BroadcastValue()
    graph = tp.DependencyGraph().build_dependency(model, _inputs())
    group = graph.get_pruning_group(model.b, tp.prune_linear_out_channels, [0])
    assert [reason.kind for reason in group.blocked] == [RefusalKind.UNPRUNABLE_ARGUMENT]
    assert "value dim 2 (1 wide) is broadcast along dim 2 of a (2, 5, 16) tensor" in str(group.blocked[0])
