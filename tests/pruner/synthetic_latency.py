"""A deterministic stand-in for a device: an MLP whose "true" latency is a nonlinear function of its widths,
and the latency profile a per-layer timing of it would give, off by a constant factor or a per-call overhead."""
import math

import torch
from torch import nn

from structprune.utils.cost_profile import CostProfile, LayerCost, SideCost
from structprune.utils.latency import cost_profile

#: ms per multiply-accumulate of the synthetic device
MS_PER_MAC = 1e-3


class MLP(nn.Module):
    """Three hidden widths (128, 128, 96) that budgets may narrow; the head reaches the output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 128), nn.Linear(128, 128), nn.Linear(128, 96)
        self.head = nn.Linear(96, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


def mlp():
    torch.manual_seed(0)
    return MLP(), torch.randn(4, 32)


class Device:
    """``latency_fn``: a Linear costs its MACs with both widths rounded up to ``block`` channels (a SIMD
    width: 121 channels cost what 128 do), plus ``overhead`` ms per forward. Every call logs the widths."""

    def __init__(self, block: int = 8, overhead: float = 0.0):
        self.block, self.overhead = block, overhead
        self.calls: list[dict] = []

    def layer(self, in_width: int, out_width: int, batch: int) -> float:
        return math.ceil(in_width / self.block) * self.block * math.ceil(out_width / self.block) * self.block \
            * batch * MS_PER_MAC

    def __call__(self, model, x) -> float:
        layers = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
                  if isinstance(m, nn.Linear)}
        self.calls.append(layers)
        return self.overhead + sum(self.layer(i, o, x.shape[0]) for i, o in layers.values())


def profile_of(model, x, device: Device, factor: float = 1.0, per_call: float = 0.0,
               layer_factors: dict | None = None) -> CostProfile:
    """What timing each layer alone on ``device`` gives, at the widths ``latency_profile`` would time: the
    layer's cost divided by ``factor`` (and by ``layer_factors[name]``: a profile that mis-ranks layers), plus
    ``per_call`` ms (a layer called alone pays its call overhead, which the model running layers back to back
    pays less of). The total is the layers' sum."""
    shapes = cost_profile(model, x, "macs")  # the grid and step widths latency_profile times
    modules = dict(model.named_modules())
    layers = {}
    for name, shape in shapes.layers.items():
        module = modules[name]
        scale = factor * (layer_factors or {}).get(name, 1.0)

        def cost(in_width, out_width, scale=scale):
            return device.layer(in_width, out_width, x.shape[0]) / scale + per_call

        def table(side, at):
            return SideCost(side.width, list(side.grid), [at(w) for w in side.grid], side.anchor,
                            {step: at(side.anchor - step) for step in side.steps})

        out = table(shape.out, lambda w: cost(module.in_features, w))
        inputs = table(shape.inputs, lambda w: cost(w, module.out_features))
        layers[name] = LayerCost(name, cost(module.in_features, module.out_features), False, out, inputs)
    total = sum(layer.full for layer in layers.values())
    return CostProfile("latency_ms", "cpu", "torch.float32", 1, "synthetic", total, layers)


def hidden_widths(model) -> tuple:
    return model.fc1.out_features, model.fc2.out_features, model.fc3.out_features
