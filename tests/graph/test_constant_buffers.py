"""Constant buffers coupled to channels (timm's all-zero ``k_bias``) are sliced with them, exactly."""
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import structprune as tp
from structprune.serialization import load_pruned, save_pruned


class KBiasAttention(nn.Module):
    """BEiT's layout: qkv bias = cat(q_bias, k_bias, v_bias) with k_bias a non-persistent zero buffer."""

    def __init__(self, dim=16, heads=2, persistent=False, k_value=0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.full((dim,), k_value), persistent=persistent)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = KBiasAttention(**kw)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(x)).mean(1)


def _prune(model, ratio=0.5):
    pruner = tp.pruner.BasePruner(model, torch.randn(2, 5, 16), tp.importance.MagnitudeImportance(),
                                  pruning_ratio=ratio, ignored_layers=[model.head])
    pruner.step()
    return pruner


def test_a_zero_key_bias_buffer_narrows_with_the_key_channels():
    torch.manual_seed(0)
    model = Net()
    before = model.attn.qkv.out_features
    _prune(model)
    attn = model.attn
    assert attn.qkv.out_features < before
    assert attn.k_bias.shape == attn.q_bias.shape == attn.v_bias.shape
    assert 3 * attn.k_bias.shape[0] == attn.qkv.out_features
    assert bool((attn.k_bias == 0).all()) and "k_bias" in attn._non_persistent_buffers_set
    assert model(torch.randn(2, 5, 16)).shape == (2, 3)


class Offset(nn.Module):
    """A constant offset added to a layer's output channels, kept as a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 4)
        self.register_buffer("offset", torch.full((10,), 0.5), persistent=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x) + self.offset))


def test_slicing_the_buffer_is_lossless():
    """Channels whose reader ignores them go, with their buffer positions: the output stays the same."""
    torch.manual_seed(1)
    model = Offset()
    x = torch.randn(3, 6)
    graph = tp.DependencyGraph().build_dependency(model, x)
    group = graph.get_pruning_group(model.fc1, tp.prune_linear_out_channels, [1, 4, 7])
    assert "offset" in str(group)
    with torch.no_grad():
        model.fc2.weight[:, [1, 4, 7]] = 0
        expected = model(x)
    group.prune()
    assert model.offset.shape == (7,) and bool((model.offset == 0.5).all())
    assert torch.allclose(model(x), expected, atol=1e-6)


@pytest.mark.parametrize("kw, why", [({"k_value": None}, "varying values"), ({"persistent": True}, "persistent")])
def test_other_buffers_still_refuse_the_channels(kw, why):
    torch.manual_seed(0)
    model = Net(**{k: v for k, v in kw.items() if v is not None})
    if kw.get("k_value", 0) is None:
        model.attn.k_bias.copy_(torch.arange(16.0))  # a table with information per position
    with pytest.warns(UserWarning, match="pruner.report"):
        _prune(model)
    assert model.attn.k_bias.shape == (16,) and model.attn.qkv.out_features == 48, why


def test_a_pruned_beit_reloads_with_its_sliced_buffer(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.models.beit import Beit

    torch.manual_seed(0)

    def build():
        return Beit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)

    model = build().eval()
    before = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                                  ignored_layers=[model.head])
    pruner.step()
    assert sum(p.numel() for p in model.parameters()) / before < 0.55
    attn = model.blocks[0].attn
    assert attn.k_bias.shape == attn.q_bias.shape and attn.qkv.out_features == 3 * attn.q_bias.shape[0] < 192
    expected = model(x)
    save_pruned(model, tmp_path / "beit")
    fresh = load_pruned(build().eval(), tmp_path / "beit")
    assert fresh.blocks[0].attn.k_bias.shape == attn.k_bias.shape
    assert torch.allclose(fresh(x), expected, atol=1e-5)
