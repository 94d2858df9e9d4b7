"""save_pruned/load_pruned and state_dict/load_state_dict: round trips, ties, and refusing bad input.

Pruned models are built by hand with the low-level prune_* functions so these tests do not depend on
the dependency graph.
"""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch
import torchvision
from torch import nn

import structprune.serialization as serialization
from structprune.layers import (
    prune_batchnorm_out_channels,
    prune_conv_in_channels,
    prune_conv_out_channels,
    prune_embedding_out_channels,
    prune_layernorm_out_channels,
    prune_linear_in_channels,
    prune_linear_out_channels,
    prune_lstm_in_channels,
    prune_lstm_out_channels,
    prune_multihead_attention_out_channels,
)
from structprune.serialization import (
    PLAN_FILE,
    RECORDED_ATTRIBUTES,
    WEIGHTS_FILE,
    load_pruned,
    load_state_dict,
    save_pruned,
    state_dict,
)


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------
def small_cnn(norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    torch.manual_seed(0)
    norm_layer = norm(8) if norm is nn.BatchNorm2d else norm(2, 8)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm_layer, nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
    )


def pruned_cnn() -> nn.Sequential:
    model = small_cnn()
    _randomize_bn(model[1])
    prune_conv_out_channels(model[0], [1, 3, 5])
    prune_batchnorm_out_channels(model[1], [1, 3, 5])
    prune_conv_in_channels(model[3], [1, 3, 5])
    prune_conv_out_channels(model[3], [0, 2])
    # Flatten lays channel c out as features c*16 .. c*16+15.
    prune_linear_in_channels(model[5], [c * 16 + i for c in (0, 2) for i in range(16)])
    return model.eval()


def _randomize_bn(bn: nn.BatchNorm2d) -> None:
    # Non-trivial running stats, so a wrongly loaded buffer changes the output.
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.num_batches_tracked.fill_(7)


def pruned_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    stem = [0, 5, 9, 17, 33, 60]  # the stem channels run through every residual add of layer1
    prune_conv_out_channels(model.conv1, stem)
    prune_batchnorm_out_channels(model.bn1, stem)
    for block in model.layer1:
        inner = [2, 4, 40]
        prune_conv_in_channels(block.conv1, stem)
        prune_conv_out_channels(block.conv1, inner)
        prune_batchnorm_out_channels(block.bn1, inner)
        prune_conv_in_channels(block.conv2, inner)
        prune_conv_out_channels(block.conv2, stem)
        prune_batchnorm_out_channels(block.bn2, stem)
        _randomize_bn(block.bn2)
    prune_conv_in_channels(model.layer2[0].conv1, stem)
    prune_conv_in_channels(model.layer2[0].downsample[0], stem)
    return model.eval()


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 20, dim: int = 16, heads: int = 4, ffn: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn1 = nn.Linear(dim, ffn)
        self.ffn2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        x = self.norm2(x + self.ffn2(torch.relu(self.ffn1(x))))
        return self.head(x.mean(dim=1))


def pruned_transformer() -> TinyTransformer:
    torch.manual_seed(0)
    model = TinyTransformer()
    dims = [0, 5, 10, 15]  # one per head: embed_dim 12 keeps head_dim 3 for all 4 heads
    prune_embedding_out_channels(model.embed, dims)
    prune_multihead_attention_out_channels(model.attn, dims)
    prune_layernorm_out_channels(model.norm1, dims)
    prune_linear_in_channels(model.ffn1, dims)
    prune_linear_out_channels(model.ffn1, list(range(0, 32, 3)))
    prune_linear_in_channels(model.ffn2, list(range(0, 32, 3)))
    prune_linear_out_channels(model.ffn2, dims)
    prune_layernorm_out_channels(model.norm2, dims)
    prune_linear_in_channels(model.head, dims)
    return model.eval()


class TinyLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.lstm = nn.LSTM(8, 10, num_layers=2, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.proj(x))[0][:, -1])


def pruned_lstm() -> TinyLSTM:
    torch.manual_seed(0)
    model = TinyLSTM()
    prune_linear_out_channels(model.proj, [0, 7])
    prune_lstm_in_channels(model.lstm, [0, 7])
    prune_lstm_out_channels(model.lstm, [1, 2, 8])
    prune_linear_in_channels(model.head, [1, 2, 8])
    return model.eval()


class TiedLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        return self.a(h) + self.b(h)


def pruned_tied() -> TiedLinears:
    torch.manual_seed(0)
    model = TiedLinears()
    prune_linear_out_channels(model.pre, [1, 2])
    prune_linear_in_channels(model.a, [1, 2])  # also shrinks b's weight: it is the same tensor
    model.b.in_features = model.b.weight.shape[1]
    return model.eval()


CASES = {
    "cnn": (pruned_cnn, small_cnn, lambda: torch.randn(2, 3, 8, 8)),
    "resnet18": (pruned_resnet18, lambda: torchvision.models.resnet18(weights=None, num_classes=10),
                 lambda: torch.randn(1, 3, 32, 32)),
    "transformer": (pruned_transformer, TinyTransformer, lambda: torch.randint(0, 20, (2, 7))),
    "lstm": (pruned_lstm, TinyLSTM, lambda: torch.randn(2, 5, 4)),
    "tied": (pruned_tied, TiedLinears, lambda: torch.randn(3, 4)),
}


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def recorded_attrs(model: nn.Module) -> dict:
    return {
        (path, name): value
        for path, module in model.named_modules()
        for name, value in vars(module).items()
        if name in RECORDED_ATTRIBUTES
    }


def snapshot(model: nn.Module) -> dict:
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return {"state": state, "attrs": recorded_attrs(model)}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before["state"].keys()
    for name, tensor in before["state"].items():
        assert after[name].shape == tensor.shape and torch.equal(after[name], tensor), name
    assert recorded_attrs(model) == before["attrs"]


def assert_same_model(loaded: nn.Module, pruned: nn.Module, make_input) -> None:
    torch.manual_seed(1)
    x = make_input()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), pruned(x))
    assert recorded_attrs(loaded) == recorded_attrs(pruned)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), pruned.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.fixture
def saved_cnn(tmp_path):
    model = pruned_cnn()
    save_pruned(model, tmp_path / "cnn")
    return model, tmp_path / "cnn"


# ---------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip(tmp_path, case):
    make_pruned, make_fresh, make_input = CASES[case]
    pruned = make_pruned()
    directory = save_pruned(pruned, tmp_path / case)
    assert (directory / WEIGHTS_FILE).is_file() and (directory / PLAN_FILE).is_file()
    fresh = make_fresh()
    params_before = list(fresh.parameters())
    assert load_pruned(fresh, directory) is fresh
    assert_same_model(fresh, pruned, make_input)
    # Resized in place: the very same Parameter objects, so an optimizer built earlier still holds them.
    assert all(a is b for a, b in zip(params_before, fresh.parameters()))


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip_through_torch_save(case):
    make_pruned, make_fresh, make_input = CASES[case]
    pruned = make_pruned()
    buffer = io.BytesIO()
    torch.save(state_dict(pruned), buffer)
    buffer.seek(0)
    loaded_dict = torch.load(buffer, weights_only=True)
    fresh = load_state_dict(make_fresh(), loaded_dict)
    assert_same_model(fresh, pruned, make_input)


def test_state_dict_structure():
    sd = state_dict(pruned_cnn())
    assert sd["format"] == "structprune.pruned" and sd["version"] == 1
    assert set(sd["full_state_dict"]) == set(pruned_cnn().state_dict())
    plan = sd["plan"]
    assert plan["tensors"]["0.weight"] == {"kind": "parameter", "shape": [5, 3, 3, 3], "dtype": "float32"}
    assert plan["tensors"]["1.num_batches_tracked"]["dtype"] == "int64"
    conv = plan["modules"]["0"]
    assert (conv["class"], conv["attrs"]) == ("Conv2d", {"in_channels": 3, "out_channels": 5, "groups": 1})
    # plain attributes travel too (torch_pruning's state dicts carry them); tuples stay tuples
    assert conv["extras"]["padding"] == {"__tuple__": [1, 1]} and conv["extras"]["padding_mode"] == "zeros"
    assert plan["modules"]["5"]["attrs"] == {"in_features": 64, "out_features": 5}
    assert plan["modules"][""]["class"] == "Sequential"


def test_load_state_dict_does_not_share_storage_with_source():
    pruned = pruned_cnn()
    fresh = load_state_dict(small_cnn(), state_dict(pruned))
    with torch.no_grad():
        fresh[0].weight.zero_()
    assert pruned[0].weight.abs().sum() > 0


def test_tied_weights_stay_tied(tmp_path):
    pruned = pruned_tied()
    save_pruned(pruned, tmp_path / "tied")
    plan = json.loads((tmp_path / "tied" / PLAN_FILE).read_text())
    assert plan["tensors"]["b.weight"]["alias_of"] == "a.weight"
    fresh = load_pruned(TiedLinears(), tmp_path / "tied")
    assert fresh.a.weight is fresh.b.weight and fresh.b.weight.shape == (8, 6)
    assert fresh.b.in_features == 6


def test_tied_plan_refuses_untied_model(tmp_path):
    save_pruned(pruned_tied(), tmp_path / "tied")
    untied = TiedLinears()
    untied.b.weight = nn.Parameter(untied.a.weight.detach().clone())
    before = snapshot(untied)
    with pytest.raises(ValueError, match="b.weight.*tied"):
        load_pruned(untied, tmp_path / "tied")
    assert_unchanged(untied, before)


def test_layernorm_shape_restored_as_tuple(tmp_path):
    save_pruned(pruned_transformer(), tmp_path / "t")
    fresh = load_pruned(TinyTransformer(), tmp_path / "t")
    assert fresh.norm1.normalized_shape == (12,)
    assert (fresh.attn.embed_dim, fresh.attn.head_dim, fresh.attn.kdim) == (12, 3, 12)


def test_history_is_stored(tmp_path):
    history = [("0", True, [1, 3, 5]), ("3", True, [0, 2])]
    save_pruned(pruned_cnn(), tmp_path / "h", history=history)
    plan = json.loads((tmp_path / "h" / PLAN_FILE).read_text())
    assert plan["history"] == [["0", True, [1, 3, 5]], ["3", True, [0, 2]]]
    assert state_dict(pruned_cnn(), history=history)["plan"]["history"] == plan["history"]


def test_unserializable_history_fails_at_save(tmp_path):
    with pytest.raises(TypeError, match="history"):
        save_pruned(pruned_cnn(), tmp_path / "h", history=[object()])


def test_resave_overwrites(tmp_path, saved_cnn):
    _, directory = saved_cnn
    tied = pruned_tied()
    save_pruned(tied, directory)
    assert_same_model(load_pruned(TiedLinears(), directory), tied, CASES["tied"][2])


def test_grad_of_old_shape_is_dropped(saved_cnn):
    pruned, directory = saved_cnn
    fresh = small_cnn()
    fresh(torch.randn(1, 3, 8, 8)).sum().backward()
    load_pruned(fresh, directory)
    assert fresh[0].weight.grad is None


# ---------------------------------------------------------------------------------------------------
# mismatches: ValueError naming the module, model untouched
# ---------------------------------------------------------------------------------------------------
def test_different_architecture_names_the_module(saved_cnn):
    _, directory = saved_cnn
    fresh = small_cnn(norm=nn.GroupNorm)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"module '1' is a GroupNorm in the model but a BatchNorm2d"):
        load_pruned(fresh, directory)
    assert_unchanged(fresh, before)


def test_missing_module_names_the_module(saved_cnn):
    _, directory = saved_cnn
    fresh = small_cnn()[:5]  # no final Linear
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"module '5' \(Linear\) does not exist"):
        load_pruned(fresh, directory)
    assert_unchanged(fresh, before)


def test_extra_module_strict_and_non_strict(saved_cnn):
    pruned, directory = saved_cnn
    fresh = small_cnn()
    fresh.append(nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"module '6' \(Linear\) is not in the plan"):
        load_pruned(fresh, directory)
    load_pruned(fresh, directory, strict=False)
    assert fresh[6].weight.shape == (2, 5)  # left alone
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh[:6].eval()(x), pruned(x))


def test_rank_mismatch_names_the_module(tmp_path):
    class Holder(nn.Module):
        def __init__(self, shape: tuple[int, ...]) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(shape))

    save_pruned(nn.Sequential(Holder((4,))), tmp_path / "r")
    with pytest.raises(ValueError, match=r"module '0': '0.scale' has rank 2 in the model but 1"):
        load_pruned(nn.Sequential(Holder((4, 4))), tmp_path / "r")


def test_state_dict_mismatch_leaves_model_unchanged():
    sd = state_dict(pruned_cnn())
    fresh = small_cnn(norm=nn.GroupNorm)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="module '1'"):
        load_state_dict(fresh, sd)
    assert_unchanged(fresh, before)


def test_load_state_dict_rejects_plain_state_dict():
    with pytest.raises(ValueError, match="full_state_dict"):
        load_state_dict(small_cnn(), small_cnn().state_dict())


# ---------------------------------------------------------------------------------------------------
# corrupted files: ValueError, model untouched
# ---------------------------------------------------------------------------------------------------
def _drop_checksum(directory) -> None:
    plan = json.loads((directory / PLAN_FILE).read_text())
    del plan["weights_sha256"]
    (directory / PLAN_FILE).write_text(json.dumps(plan))


@pytest.mark.parametrize("keep_checksum", [True, False])
def test_truncated_weights(saved_cnn, keep_checksum):
    _, directory = saved_cnn
    if not keep_checksum:
        _drop_checksum(directory)  # so the safetensors reader itself must notice
    weights = directory / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    fresh = small_cnn()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="checksum" if keep_checksum else "corrupted or truncated"):
        load_pruned(fresh, directory)
    assert_unchanged(fresh, before)


def test_truncated_header(saved_cnn):
    _, directory = saved_cnn
    _drop_checksum(directory)
    (directory / WEIGHTS_FILE).write_bytes((directory / WEIGHTS_FILE).read_bytes()[:20])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_pruned(small_cnn(), directory)


def test_missing_tensor(saved_cnn):
    from safetensors.torch import load_file, save_file

    _, directory = saved_cnn
    _drop_checksum(directory)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    del tensors["3.bias"]
    save_file({k: v.clone() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE))
    fresh = small_cnn()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="'3.bias' is in the plan but missing"):
        load_pruned(fresh, directory)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("text", ['{"format": "structprune.pruned", "vers', "", "[1, 2]",
                                  '{"format": "structprune.pruned", "version": 99}'])
def test_corrupted_plan(saved_cnn, text):
    _, directory = saved_cnn
    (directory / PLAN_FILE).write_text(text)
    fresh = small_cnn()
    before = snapshot(fresh)
    with pytest.raises(ValueError):
        load_pruned(fresh, directory)
    assert_unchanged(fresh, before)


def test_plan_with_bad_entry(saved_cnn):
    _, directory = saved_cnn
    plan = json.loads((directory / PLAN_FILE).read_text())
    plan["tensors"]["0.weight"]["shape"] = [5, "x"]
    (directory / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="'0.weight' has invalid shape"):
        load_pruned(small_cnn(), directory)


def test_failure_while_applying_rolls_back(saved_cnn, monkeypatch):
    _, directory = saved_cnn

    def explode(model):
        raise RuntimeError("adapter failed")

    fresh = small_cnn()
    before = snapshot(fresh)
    monkeypatch.setattr(serialization, "sync_attributes", explode)
    with pytest.raises(RuntimeError, match="adapter failed"):
        load_pruned(fresh, directory)
    monkeypatch.undo()
    assert_unchanged(fresh, before)


def test_missing_safetensors_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        save_pruned(pruned_cnn(), tmp_path / "x")
