"""latency_profile / cost_profile: the per-layer width tables, their cache, and exact MAC/parameter predictions."""
import json
import statistics

import pytest
import torch
from torch import nn

import structprune as tp
from structprune.utils import latency as latency_module
from structprune.utils.cost_profile import CostProfile, grid_widths
from structprune.utils.latency import cost_profile, latency_profile
from structprune.utils.op_counter import count_ops_and_params


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def net():
    torch.manual_seed(0)
    return Net(), torch.randn(2, 3, 8, 8)


def test_profile_has_a_table_per_side_on_the_grid_and_the_steps_below_its_anchor(tmp_path):
    model, x = net()
    profile = latency_profile(model, x, repeat=1, warmup=0, cache_dir=tmp_path)
    assert set(profile.layers) == {"conv1", "bn1", "conv2", "bn2", "fc"} and not profile.skipped
    conv2 = profile.layers["conv2"]
    grid, anchor, steps = grid_widths(32, 4)  # the grouped conv's outputs go 4 at a time
    assert conv2.out.grid == grid and conv2.out.anchor == anchor and sorted(conv2.out.steps) == steps
    assert all(width % 4 == 0 for width in grid + [anchor - step for step in steps])
    assert conv2.inputs is not None and conv2.inputs.width == 16
    bn = profile.layers["bn1"]
    assert bn.coupled and bn.inputs is None and bn.out.width == 16
    assert profile.layers["fc"].out is None or profile.layers["fc"].out.width == 10
    assert profile.total > 0 and all(layer.full > 0 for layer in profile.layers.values())
    assert all(cost > 0 for layer in profile.layers.values() for side in (layer.out, layer.inputs) if side
               for cost in side.grid_cost + list(side.steps.values()))
    assert profile.metric == "latency_ms" and profile.threads == torch.get_num_threads()


def test_profile_is_read_back_from_disk_and_keyed_by_input_shape(tmp_path, monkeypatch):
    model, x = net()
    first = latency_profile(model, x, repeat=1, warmup=0, cache_dir=tmp_path)
    assert [path.stem for path in tmp_path.glob("*.json")] == [first.key]

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(latency_module, "_measure", no_measuring)
    again = latency_profile(model, x, repeat=1, warmup=0, cache_dir=tmp_path)
    assert json.loads(again.to_json()) == json.loads(first.to_json())
    with pytest.raises(AssertionError, match="measured again"):
        latency_profile(model, torch.randn(4, 3, 8, 8), repeat=1, warmup=0, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="measured again"):
        latency_profile(model, x, repeat=1, warmup=0, cache_dir=tmp_path, refresh=True)
    assert CostProfile.from_json(first.to_json()).layers["conv2"].out.steps == first.layers["conv2"].out.steps


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_mac_and_parameter_profiles_predict_a_pruned_model_exactly(metric):
    model, x = net()
    profile = cost_profile(model, x, metric)
    assert profile.predict() == float(count_ops_and_params(model, x)[0 if metric == "macs" else 1])
    graph = tp.DependencyGraph().build_dependency(model, x)
    # the same count from each of the grouped conv's 4 groups, on both of its sides
    graph.get_pruning_group(model.conv2, tp.prune_conv_out_channels, [6, 7, 14, 15, 22, 23, 30, 31]).prune()
    graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, [3, 7, 11, 15]).prune()
    widths = {"conv1": (3, 12), "bn1": (None, 12), "conv2": (12, 24), "bn2": (None, 24), "fc": (24, 10)}
    assert profile.predict(widths) == float(count_ops_and_params(model, x)[0 if metric == "macs" else 1])


def test_grid_widths_stay_multiples_of_the_unit():
    grid, anchor, steps = grid_widths(384, 6)
    assert steps == [6, 12, 24, 48, 96] and anchor == 192 and grid[-1] == 384
    assert all(width % 6 == 0 for width in grid + [anchor - step for step in steps])
    assert grid_widths(3, 1) == ([1, 2, 3], None, [])


def test_unknown_metric_and_counts_are_refused():
    model, x = net()
    with pytest.raises(ValueError, match="metric must be one of"):
        cost_profile(model, x, "flops")
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        latency_profile(model, x, repeat=0)


def test_profile_timer_times_the_model_as_the_profile_timed_it(tmp_path, monkeypatch):
    model, x = net()
    profile = latency_profile(model, x, repeat=2, warmup=0, statistic="median", cache_dir=tmp_path)
    assert (profile.statistic, profile.repeat, profile.warmup) == ("median", 2, 0)
    seen = []
    monkeypatch.setattr(latency_module, "_model_cost", lambda model, inputs, metric, device, repeat, warmup, reduce:
                        seen.append((metric, str(device), repeat, warmup, reduce, torch.get_num_threads())) or 1.5)
    profile.threads = torch.get_num_threads() + 1  # profiled with another thread count: timed with that one
    threads = torch.get_num_threads()
    assert latency_module.profile_timer(profile)(model, x) == 1.5
    assert seen == [("latency_ms", "cpu", 2, 0, statistics.median, threads + 1)]
    assert torch.get_num_threads() == threads
    # profiles cached before the timing settings were kept read as the settings they were timed with
    data = json.loads(profile.to_json())
    for name in ("statistic", "repeat", "warmup"):
        del data[name]
    old = CostProfile.from_json(json.dumps(data))
    assert (old.statistic, old.repeat, old.warmup) == ("min", 5, 1)
    with pytest.raises(ValueError, match="profile_timer needs a latency profile, got a 'macs' one"):
        latency_module.profile_timer(cost_profile(model, x, "macs"))
