"""Misuse must fail loudly, name the problem (and the layer), and leave the model exactly as it was."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structprune as tp
from structprune.layers.axes import Axis


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.ReLU()
        )
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def make():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.features[1].running_mean.uniform_(-1, 1)
        model.features[1].running_var.uniform_(0.5, 2)
    return model, torch.randn(2, 3, 6, 6)


def snapshot(model):
    """Everything a failed call must not touch: tensors (values, shapes, devices, dtypes), layout, mode."""
    state = {k: (v.detach().clone(), v.dtype, v.device) for k, v in model.state_dict().items()}
    return state, repr(model), [m.training for m in model.modules()]


def assert_untouched(model, before):
    state, text, modes = snapshot(model)
    old_state, old_text, old_modes = before
    assert text == old_text, "layer attributes changed"
    assert modes == old_modes, "train/eval mode changed"
    assert state.keys() == old_state.keys()
    for key, (value, dtype, device) in state.items():
        old, old_dtype, old_device = old_state[key]
        assert (dtype, device, value.shape) == (old_dtype, old_device, old.shape), key
        if value.device.type != "meta":
            assert torch.equal(value, old), key


def pruner(model, x, **kwargs):
    return tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(), **kwargs)


def graph(model, x, **kwargs):
    return tp.DependencyGraph().build_dependency(model, x, **kwargs)


def conv_group(model, x, idxs):
    return graph(model, x).get_pruning_group(model.features[0], tp.prune_conv_out_channels, idxs)


def other_model_group(model, x):
    other, _ = make()
    return graph(other, x).get_pruning_group(model.features[0], tp.prune_conv_out_channels, [0])


def no_grad_pruner(model, x):
    with torch.no_grad():
        pruner(model, x, pruning_ratio=0.5).step()


def no_grad_graph(model, x):
    with torch.no_grad():
        graph(model, x)


def inference_mode_graph(model, x):
    with torch.inference_mode():
        graph(model, x)


@dataclass
class Case:
    id: str
    action: Callable
    error: type | tuple
    match: str


CASES = [
    Case("ratio-negative", lambda m, x: pruner(m, x, pruning_ratio=-0.1), ValueError, r"pruning_ratio.*-0\.1"),
    Case("ratio-one", lambda m, x: pruner(m, x, pruning_ratio=1.0), ValueError, r"pruning_ratio.*\[0, 1\)"),
    Case("ratio-above-one", lambda m, x: pruner(m, x, pruning_ratio=1.5), ValueError, r"pruning_ratio.*1\.5"),
    Case("ratio-dict-negative", lambda m, x: pruner(m, x, pruning_ratio_dict={m.features[0]: -0.5}), ValueError,
         r"pruning_ratio_dict.*-0\.5"),
    Case("round-to-zero", lambda m, x: pruner(m, x, round_to=0), ValueError, r"round_to.*0"),
    Case("round-to-negative", lambda m, x: pruner(m, x, round_to=-4), ValueError, r"round_to.*-4"),
    Case("steps-zero", lambda m, x: pruner(m, x, iterative_steps=0), ValueError, r"iterative_steps.*0"),
    Case("steps-negative", lambda m, x: pruner(m, x, iterative_steps=-2), ValueError, r"iterative_steps.*-2"),
    Case("idx-out-of-range", lambda m, x: conv_group(m, x, [2, 8]), IndexError,
         r"features\.0.*out of range.*\[0, 8\)"),
    Case("idx-negative", lambda m, x: conv_group(m, x, [-1]), IndexError, r"features\.0.*out of range"),
    Case("idx-duplicated", lambda m, x: conv_group(m, x, [1, 3, 1]), ValueError, r"features\.0.*duplicated"),
    Case("idx-floats", lambda m, x: conv_group(m, x, [0.0, 1.0]), TypeError, r"integers.*float"),
    Case("idx-float-tensor", lambda m, x: conv_group(m, x, torch.tensor([0.0, 1.0])), TypeError, r"integers"),
    Case("idx-bools", lambda m, x: conv_group(m, x, [True, False]), TypeError, r"integers"),
    Case("prune-every-channel", lambda m, x: conv_group(m, x, list(range(8))).prune(), ValueError,
         r"features\.0.*all 8.*empty"),
    Case("prune-every-channel-consumer-side", lambda m, x: graph(m, x).get_pruning_group(
        m.fc, tp.prune_linear_in_channels, list(range(6))).prune(), ValueError, r"all 6"),
    Case("prune-fn-out-of-range", lambda m, x: tp.prune_conv_out_channels(m.features[0], [8]), IndexError,
         r"out of range"),
    Case("prune-fn-every-channel", lambda m, x: tp.prune_linear_in_channels(m.fc, list(range(6))), ValueError,
         r"all 6.*empty"),
    Case("manual-ratio-one", lambda m, x: pruner(m, x).manual_prune_width(
        m.features[0], tp.prune_conv_out_channels, 1.0), ValueError, r"ratio"),
    Case("inputs-wrong-channels", lambda m, x: graph(m, torch.randn(2, 4, 6, 6)), (RuntimeError, ValueError),
         r"example_inputs"),
    Case("inputs-wrong-rank", lambda m, x: graph(m, torch.randn(2, 3, 6)), (RuntimeError, ValueError),
         r"example_inputs"),
    Case("inputs-wrong-dtype-double", lambda m, x: graph(m, x.double()), (RuntimeError, TypeError, ValueError),
         r"example_inputs"),
    Case("inputs-wrong-dtype-long", lambda m, x: graph(m, x.long()), (RuntimeError, TypeError, ValueError),
         r"example_inputs"),
    Case("inputs-wrong-shape-pruner", lambda m, x: pruner(m, torch.randn(2, 5, 6, 6)), (RuntimeError, ValueError),
         r"example_inputs"),
    Case("graph-under-no-grad", no_grad_graph, RuntimeError, r"no_grad"),
    Case("graph-under-inference-mode", inference_mode_graph, RuntimeError, r"inference_mode"),
    Case("pruner-under-no-grad", no_grad_pruner, RuntimeError, r"no_grad"),
    Case("ignored-layer-name", lambda m, x: pruner(m, x, ignored_layers=["features.0"]), TypeError,
         r"ignored_layers.*str.*features\.0"),
    Case("ignored-layer-int", lambda m, x: pruner(m, x, ignored_layers=[3]), TypeError, r"ignored_layers.*int"),
    Case("ignored-layer-tensor", lambda m, x: pruner(m, x, ignored_layers=[torch.zeros(3)]), TypeError,
         r"ignored_layers.*Tensor"),
    Case("graph-ignored-layer-name", lambda m, x: graph(m, x, ignored_layers=["fc"]), TypeError,
         r"ignored_layers.*str"),
    Case("group-of-other-model", other_model_group, KeyError,
         r"(different|another|other) model|not part of the (traced )?model|does not belong to"),
    Case("meta-model-cpu-inputs", lambda m, x: graph(m.to("meta"), x), (RuntimeError, ValueError),
         r"example_inputs.*(meta|device)|(meta|device).*example_inputs"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_misuse_is_refused_and_changes_nothing(case):
    model, x = make()
    model.train()
    before = snapshot(model) if case.id != "meta-model-cpu-inputs" else None
    with pytest.raises(case.error, match=case.match):
        case.action(model, x)
    if before is not None:
        assert_untouched(model, before)
    if next(model.parameters()).device.type != "meta":
        model(x)  # still runs


def test_meta_device_model():
    """A meta model has shapes but no values: the graph and explicit groups work on shapes alone, while an
    importance-driven step must say it needs real weights instead of failing deep inside torch."""
    model, x = make()
    model.to("meta")
    x = x.to("meta")
    g = graph(model, x)
    g.get_pruning_group(model.features[0], tp.prune_conv_out_channels, [0, 3]).prune()
    assert model.features[0].weight.shape == (6, 3, 3, 3) and model.features[3].weight.shape == (6, 6, 1, 1)
    assert model(x).shape == (2, 4)
    model, _ = make()
    model.to("meta")
    before = snapshot(model)
    try:
        pruner(model, x, pruning_ratio=0.5).step()
    except Exception as error:  # noqa: BLE001 - the message is what is checked
        assert re.search(r"(model|parameters|weights).*meta|meta.*(model|parameters|weights)", str(error)), (
            f"unclear error for a meta-device model: {type(error).__name__}: {error}")
        assert_untouched(model, before)
    else:
        assert model(x).shape == (2, 4)


def test_a_pruned_layer_keeps_its_numbering_after_a_refusal():
    """A refused prune leaves the graph's bookkeeping alone: the next valid group is still right."""
    model, x = make()
    g = graph(model, x)
    with pytest.raises(ValueError):
        g.get_pruning_group(model.features[0], tp.prune_conv_out_channels, list(range(8))).prune()
    group = g.get_pruning_group(model.features[0], tp.prune_conv_out_channels, [7])
    assert {(i.dep.target.name, tuple(i.idxs)) for i in group} >= {("features.3", (7,))}
    group.prune()
    assert model.features[3].in_channels == 7 and model(x).shape == (2, 4)
    assert g.pruning_history() == [("features.0", True, [7])]


# -- layers nobody declared ----------------------------------------------------------------------------
class MyConv(nn.Module):
    """A conv written by hand: its parameters sit on the channel path but no pruner knows the layer."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias)


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.custom = MyConv(8, 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.custom(self.conv(x)))


def test_undeclared_layer_on_the_channel_path_says_how_to_register_it():
    torch.manual_seed(0)
    model, x = WithCustom(), torch.randn(2, 3, 4, 4)
    g = graph(model, x)
    group = g.get_pruning_group(model.conv, tp.prune_conv_out_channels, [0])
    # pruning conv must either be refused with a reason pointing at the undeclared layer and at the fix...
    if group.blocked:
        reasons = " ".join(group.blocked)
        assert "custom" in reasons, reasons
        assert re.search(r"customized[_ ]pruner|register_customized_layer", reasons), reasons
        before = snapshot(model)
        with pytest.raises(RuntimeError, match="custom"):
            group.prune()
        assert_untouched(model, before)
    else:  # ...or handled correctly (the weight's input dim follows conv)
        group.prune()
        assert model.custom.weight.shape[1] == 7 and model(x).shape == (2, 2, 4, 4)
    # asking for the undeclared layer itself names it and the fix
    with pytest.raises(KeyError, match=r"custom.*customized pruner"):
        g.get_pruning_group(model.custom, tp.prune_conv_out_channels, [0])


def test_undeclared_layer_registered_as_customized_pruner_prunes():
    class MyConvPruner(tp.BasePruningFunc):
        out_tensor_dim = 1
        in_tensor_dim = 1
        channel_inputs = (0,)

        def out_axes(self, layer):
            return [Axis("weight", 0), Axis("bias", 0)]

        def in_axes(self, layer):
            return [Axis("weight", 1)]

        def get_out_channels(self, layer):
            return layer.weight.shape[0]

        def get_in_channels(self, layer):
            return layer.weight.shape[1]

    torch.manual_seed(0)
    model, x = WithCustom(), torch.randn(2, 3, 4, 4)
    g = graph(model, x, customized_pruners={MyConv: MyConvPruner()})
    group = g.get_pruning_group(model.conv, tp.prune_conv_out_channels, [0, 5])
    assert not group.blocked
    group.prune()
    g.get_pruning_group(model.custom, MyConvPruner().prune_out_channels, [1]).prune()
    assert model.custom.weight.shape == (3, 6, 1, 1) and model.head.in_channels == 3
    assert model(x).shape == (2, 2, 4, 4)


# -- GrowingRegPruner before any backward ----------------------------------------------------------------
def test_growing_reg_regularize_before_backward_changes_nothing():
    model, x = make()
    reg = tp.pruner.GrowingRegPruner(model, x, tp.importance.MagnitudeImportance(), reg=1e-3, delta_reg=1e-3,
                                     pruning_ratio=0.5)
    before = snapshot(model)
    reg.regularize(model)
    reg.update_reg()
    reg.regularize(model, bias=True)
    assert_untouched(model, before)
    assert all(p.grad is None for p in model.parameters())


# -- transactional pruning -------------------------------------------------------------------------------
class Scale(nn.Module):
    """A custom per-channel layer with a parameter, a buffer and a size attribute."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.register_buffer("shift", torch.randn(channels))

    def forward(self, x):
        return x * self.weight[None, :, None, None] + self.shift[None, :, None, None]


class ScalePruner(tp.BasePruningFunc):
    coupled = True
    out_tensor_dim = 1
    in_tensor_dim = 1
    channel_inputs = (0,)

    def out_axes(self, layer):
        return [Axis("weight", 0), Axis("shift", 0)]

    def get_out_channels(self, layer):
        return layer.channels

    get_in_channels = get_out_channels

    def update_attrs(self, layer):
        layer.channels = layer.weight.shape[0]


class FailingScalePruner(ScalePruner):
    """Slices the weight, the buffer and the attribute, then fails before finishing."""

    calls = 0
    leave_attribute = False

    def prune_out_channels(self, layer, idxs):
        FailingScalePruner.calls += 1
        super().prune_out_channels(layer, idxs)
        if self.leave_attribute:
            layer.pruned_idxs = list(idxs)  # a new attribute, set before the failure
        raise RuntimeError("disk full halfway through ScalePruner")

    prune_in_channels = prune_out_channels


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.scale = Scale(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.scale(torch.relu(self.bn(self.conv(x)))))


def full_state(model):
    """Parameters (values and grads), buffers and every public attribute of every submodule."""
    out = {}
    for name, module in model.named_modules():
        for key, param in module._parameters.items():
            if param is not None:
                out[f"{name}.{key}"] = (param.detach().clone(), None if param.grad is None else param.grad.clone(),
                                        id(param))
        for key, buf in module._buffers.items():
            if buf is not None:
                out[f"{name}.{key}[buffer]"] = (buf.clone(), None, None)
        out[f"{name}[attrs]"] = {k: v for k, v in vars(module).items() if not k.startswith("_")}
    return out


def assert_same_full_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("[attrs]"):
            assert a[key] == b[key], key
            continue
        (va, ga, ia), (vb, gb, ib) = a[key], b[key]
        assert va.shape == vb.shape and torch.equal(va, vb), key
        assert (ga is None) == (gb is None) and (ga is None or torch.equal(ga, gb)), key
        assert ia == ib, f"{key}: the Parameter object was replaced (optimizers would lose it)"


def test_pruner_failing_midway_leaves_every_layer_of_the_group_as_before():
    torch.manual_seed(0)
    model, x = Chain(), torch.randn(2, 3, 5, 5)
    model(x).sum().backward()  # grads exist and must be restored as well
    model.eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    g = graph(model, x, customized_pruners={Scale: FailingScalePruner()})
    group = g.get_pruning_group(model.conv, tp.prune_conv_out_channels, [1, 4])
    names = [item.dep.target.name for item in group]
    assert names.index("scale") > names.index("bn") > names.index("conv"), names  # fails after others pruned
    before = full_state(model)
    expected = model(x).detach().clone()
    with pytest.raises(RuntimeError, match="halfway"):
        group.prune()
    assert FailingScalePruner.calls >= 1
    assert_same_full_state(full_state(model), before)
    torch.testing.assert_close(model(x), expected)
    assert g.pruning_history() == []
    # the graph still works: the same channels prune once the layer's pruner behaves
    g.register_customized_layer(Scale, ScalePruner())
    g.get_pruning_group(model.conv, tp.prune_conv_out_channels, [1, 4])
    fresh = graph(model, x, customized_pruners={Scale: ScalePruner()})
    fresh.get_pruning_group(model.conv, tp.prune_conv_out_channels, [1, 4]).prune()
    assert model.scale.channels == 4 and model.scale.shift.shape == (4,) and model(x).shape == (2, 2, 5, 5)



def test_attribute_added_by_a_failing_pruner_does_not_linger():
    torch.manual_seed(0)
    model, x = Chain(), torch.randn(2, 3, 5, 5)
    failing = FailingScalePruner()
    failing.leave_attribute = True
    g = graph(model, x, customized_pruners={Scale: failing})
    before = full_state(model)
    with pytest.raises(RuntimeError, match="halfway"):
        g.get_pruning_group(model.conv, tp.prune_conv_out_channels, [0]).prune()
    assert not hasattr(model.scale, "pruned_idxs")
    assert_same_full_state(full_state(model), before)
