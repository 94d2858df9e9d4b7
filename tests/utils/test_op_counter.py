"""MAC and parameter counting: reference models and hand-computed layers."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from structprune.utils import count_ops_and_params, count_params
from structprune.utils.op_counter import MODULE_COUNTERS


def _all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------- #
# Published figures for torchvision models (1x3x224x224), within 1%
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("name", "gmacs", "mparams"),
    [("resnet18", 1.82, 11.69), ("resnet50", 4.11, 25.56), ("vit_b_16", 17.6, 86.6)],
)
def test_torchvision_reference_figures(name, gmacs, mparams):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    macs, params = count_ops_and_params(model, torch.randn(1, 3, 224, 224))
    assert macs / 1e9 == pytest.approx(gmacs, rel=0.01)
    assert params / 1e6 == pytest.approx(mparams, rel=0.01)
    assert _all_hooks(model) == 0


def test_vit_attention_counted_per_block():
    model = torchvision.models.vit_b_16()
    macs, _, layer_macs, _ = count_ops_and_params(model, torch.randn(1, 3, 224, 224), layer_wise=True)
    tokens, width = 197, 768
    # q, k, v and output projections + QK^T + attn @ V
    expected = 4 * tokens * width * width + 2 * tokens * tokens * width
    attention = model.encoder.layers.encoder_layer_0.self_attention
    assert layer_macs[attention] == expected
    patch_embed = 14 * 14 * width * 3 * 16 * 16
    assert layer_macs[model.conv_proj] == patch_embed
    # out_proj lives inside the counted attention module and isn't counted twice.
    assert layer_macs[attention.out_proj] == 0
    assert layer_macs[model] == macs


# --------------------------------------------------------------------------- #
# Hand-computed single layers
# --------------------------------------------------------------------------- #


HAND_COUNTED = {
    # out elements (1*16*8*8) * C_in (3) * k (3*3)
    "conv2d": (lambda: nn.Conv2d(3, 16, 3, padding=1), (1, 3, 8, 8), 1024 * 27),
    # out (2*16*5*5) * C_in/groups (2) * 9
    "grouped_conv2d": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4), (2, 8, 5, 5), 800 * 18),
    # depthwise: out (1*8*4*4) * 1 * 9
    "depthwise_conv2d": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (1, 8, 4, 4), 128 * 9),
    # out (1*4*8) * 2 * 3
    "conv1d": (lambda: nn.Conv1d(2, 4, 3, padding=1), (1, 2, 8), 32 * 6),
    # out (1*2*4*4*4) * 3 * 8
    "conv3d": (lambda: nn.Conv3d(3, 2, 2, padding=0), (1, 3, 5, 5, 5), 128 * 24),
    # every input element (1*4*3*3) scatters into C_out (8) * k (2*2)
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 8, 2, stride=2), (1, 4, 3, 3), 36 * 32),
    # out (2*5*20) * in (10), leading dims flattened
    "linear_3d_input": (lambda: nn.Linear(10, 20), (2, 5, 10), 200 * 10),
    # norms: 2 MACs/element with affine, 1 without
    "batchnorm2d": (lambda: nn.BatchNorm2d(4), (1, 4, 2, 2), 16 * 2),
    "layernorm_no_affine": (lambda: nn.LayerNorm(6, elementwise_affine=False), (3, 6), 18),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (1, 4, 3, 3), 36 * 2),
    "instancenorm": (lambda: nn.InstanceNorm2d(4), (1, 4, 3, 3), 36),
    # pooling: elements read
    "maxpool2d": (lambda: nn.MaxPool2d(2), (1, 1, 4, 4), 4 * 4),
    "avgpool2d": (lambda: nn.AvgPool2d(3, stride=1), (1, 2, 5, 5), 18 * 9),
    "adaptive_avgpool": (lambda: nn.AdaptiveAvgPool2d(1), (1, 4, 8, 8), 256),
    # upsample: output elements * source elements blended
    "upsample_nearest": (lambda: nn.Upsample(scale_factor=2), (1, 1, 2, 2), 16),
    "upsample_bilinear": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (1, 1, 2, 2), 64),
    "relu": (lambda: nn.ReLU(), (2, 3), 0),
}


@pytest.mark.parametrize("case", sorted(HAND_COUNTED))
def test_hand_counted_layers(case):
    factory, shape, expected = HAND_COUNTED[case]
    layer = factory()
    macs, params = count_ops_and_params(layer, torch.randn(*shape))
    assert macs == expected
    assert params == sum(p.numel() for p in layer.parameters())


def test_rmsnorm():
    layer = nn.RMSNorm(8)
    assert count_ops_and_params(layer, torch.randn(2, 8))[0] == 16 * 2


def test_pruned_conv_counts_from_weight_shape():
    conv = nn.Conv2d(3, 16, 3, padding=1)
    conv.weight = nn.Parameter(conv.weight.detach()[:8].clone())
    conv.bias = nn.Parameter(conv.bias.detach()[:8].clone())
    macs, params = count_ops_and_params(conv, torch.randn(1, 3, 4, 4))
    assert macs == 8 * 16 * 27
    assert params == 8 * 27 + 8


def test_self_attention_mha():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    macs, params = count_ops_and_params(mha, (x, x, x))
    # per sample: q, k, v, out projections 4 * L * E * E, QK^T and attn@V 2 * L * L * E
    assert macs == 2 * (4 * 5 * 16 * 16 + 2 * 5 * 5 * 16)
    assert params == 4 * 16 * 16 + 4 * 16


def test_cross_attention_mha_sequence_first_with_kdim():
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=4)
    query, key, value = torch.randn(3, 2, 8), torch.randn(7, 2, 6), torch.randn(7, 2, 4)
    macs, _ = count_ops_and_params(mha, {"query": query, "key": key, "value": value})
    per_sample = 3 * 8 * 8 + 7 * 6 * 8 + 7 * 4 * 8 + 3 * 8 * 8 + 2 * 3 * 7 * 8
    assert macs == 2 * per_sample


def test_lstm():
    lstm = nn.LSTM(10, 20)
    # 5 steps x 3 sequences; per step 4 gates * 20 * (10 + 20) + 3 * 20 element-wise products
    macs, _ = count_ops_and_params(lstm, torch.randn(5, 3, 10))
    assert macs == 15 * (4 * 20 * 30 + 3 * 20)


def test_bidirectional_two_layer_gru():
    gru = nn.GRU(4, 6, num_layers=2, bidirectional=True, batch_first=True)
    macs, _ = count_ops_and_params(gru, torch.randn(2, 3, 4))
    per_direction_l0 = 3 * 6 * (4 + 6) + 3 * 6
    per_direction_l1 = 3 * 6 * (12 + 6) + 3 * 6
    assert macs == 6 * 2 * (per_direction_l0 + per_direction_l1)


def test_lstm_cell():
    cell = nn.LSTMCell(5, 7)
    macs, _ = count_ops_and_params(cell, torch.randn(3, 5))
    assert macs == 3 * (4 * 7 * (5 + 7) + 3 * 7)


# --------------------------------------------------------------------------- #
# Functional ops outside counted modules
# --------------------------------------------------------------------------- #


class ManualAttention(nn.Module):
    """Attention written with raw matmuls, the way many ViT implementations do."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return torch.matmul(scores, v)


def test_functional_matmuls_are_counted_and_attributed():
    model = nn.Sequential(ManualAttention(8))
    macs, _, layer_macs, _ = count_ops_and_params(model, torch.randn(2, 4, 8), layer_wise=True)
    qkv = 2 * 4 * 24 * 8
    attention = 2 * (2 * 4 * 4 * 8)  # QK^T and scores @ V
    # per module, submodules included: the matmuls belong to the attention block, not to its qkv
    assert layer_macs == {model: qkv + attention, model[0]: qkv + attention, model[0].qkv: qkv}
    assert macs == qkv + attention


class FunctionalOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4))

    def forward(self, a, b):
        out = torch.einsum("bij,bjk->bik", a, b)  # 2*3*4*5 = 120
        out = out + torch.einsum("...ij,...jk->...ik", a, b)  # 120
        out = out + torch.bmm(a, b)  # 120
        attn = F.scaled_dot_product_attention(a, a, a)  # 2 * 3 * 3 * (4 + 4) = 144
        lin = F.linear(a, self.weight)  # 2*3*6 outputs * 4 = 144
        return out, attn, lin


def test_einsum_bmm_sdpa_linear():
    macs, params = count_ops_and_params(FunctionalOps(), (torch.randn(2, 3, 4), torch.randn(2, 4, 5)))
    assert macs == 120 * 3 + 144 + 144
    assert params == 24


def test_matmul_inside_counted_module_not_double_counted():
    # nn.Linear calls F.linear internally; only the module counter may count it.
    assert count_ops_and_params(nn.Linear(4, 3), torch.randn(2, 4))[0] == 2 * 3 * 4


# --------------------------------------------------------------------------- #
# Bookkeeping: layer-wise dict, shared modules, modes, hooks
# --------------------------------------------------------------------------- #


def test_layer_wise_resnet18_sums_to_total():
    model = torchvision.models.resnet18()
    macs, params, layer_macs, layer_params = count_ops_and_params(model, torch.randn(1, 3, 64, 64), layer_wise=True)
    assert set(layer_macs) == set(layer_params) == set(model.modules())
    assert layer_macs[model] == macs
    assert sum(layer_macs[child] for child in model.children()) == macs
    assert layer_macs[model.conv1] == 64 * 32 * 32 * 3 * 49
    assert layer_macs[model.fc] == 512 * 1000
    assert layer_macs[model.layer1] == sum(layer_macs[block] for block in model.layer1)
    assert layer_params[model.fc] == 512 * 1000 + 1000
    assert layer_params[model] == params == count_params(model) == 11_689_512


class SharedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.alias = self.fc  # the same module under two names

    def forward(self, x):
        return self.alias(self.fc(x))


def test_shared_module_counted_per_call_params_once():
    macs, params = count_ops_and_params(SharedLayer(), torch.randn(1, 4))
    assert macs == 2 * 16
    assert params == 20


def test_training_mode_restored_per_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout())
    model.train()
    model[1].eval()  # a deliberately frozen submodule must stay frozen
    count_ops_and_params(model, torch.randn(3, 4))
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert _all_hooks(model) == 0


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        self.fc(x)
        raise RuntimeError("boom")


def test_hooks_removed_and_mode_restored_when_forward_raises():
    model = Exploding().train()
    with pytest.raises(RuntimeError, match="boom"):
        count_ops_and_params(model, torch.randn(1, 4))
    assert model.training and model.fc.training
    assert _all_hooks(model) == 0
    assert model._forward_hooks == {}
    # The counting TorchFunctionMode has been popped off the mode stack.
    assert torch._C._len_torch_function_stack() == 0


def test_custom_module_counter_via_mro():
    class MyConv(nn.Conv2d):
        pass

    conv = MyConv(2, 4, 1)
    assert count_ops_and_params(conv, torch.randn(1, 2, 3, 3))[0] == 36 * 2


def test_module_counters_extensible():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 2

    MODULE_COUNTERS[Scale] = lambda module, args, kwargs, output: output.numel()
    try:
        model = nn.Sequential(Scale(), nn.Linear(3, 3))
        assert count_ops_and_params(model, torch.randn(2, 3))[0] == 6 + 18
    finally:
        del MODULE_COUNTERS[Scale]


def test_lstm_packed_sequence_counts_real_steps():
    from torch.nn.utils.rnn import pack_padded_sequence

    lstm = nn.LSTM(4, 5, batch_first=True)
    packed = pack_padded_sequence(torch.randn(2, 3, 4), lengths=[3, 2], batch_first=True)
    macs, _ = count_ops_and_params(lstm, packed)
    # 3 + 2 real steps; padding is not computed.
    assert macs == 5 * (4 * 5 * (4 + 5) + 3 * 5)
