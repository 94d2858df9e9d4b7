"""target= budgets (latency, MACs, parameters), the knapsack behind them, round_to="auto" and their validation."""
import math
import warnings

import pytest
import torch
from torch import nn

import structprune as tp
from macs_clock import use_macs_clock
from structprune.pruner.budget import pick_step
from structprune.pruner.knapsack import Candidate, allocate
from structprune.utils.cost_profile import CostProfile, LayerCost, SideCost
from structprune.utils.latency import latency_profile
from structprune.utils.op_counter import count_ops_and_params

from nets import SmallCNN, magnitude


def small():
    torch.manual_seed(0)
    return SmallCNN(), torch.randn(2, 3, 16, 16)


def linear_side(width, per_channel, grid=(0.25, 0.5, 0.75, 1.0)):
    widths = [int(width * share) for share in grid]
    return SideCost(width, widths, [per_channel * w for w in widths])


def synthetic():
    """Three layers whose cost is linear in their output width; 'cheap' costs 10 per channel, 'dear' 1."""
    layers = {"cheap": LayerCost("cheap", 80.0, out=linear_side(8, 10.0)),
              "dear": LayerCost("dear", 8.0, out=linear_side(8, 1.0)),
              "other": LayerCost("other", 12.0)}
    return CostProfile("macs", "cpu", "torch.float32", 1, "synthetic", 100.0, layers)


def test_knapsack_takes_least_importance_per_cost_first_and_meets_the_budget():
    profile = synthetic()
    scores = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]
    candidates = [Candidate("cheap", 8, 2, 2, scores, [("cheap", "out", 1.0)]),
                  Candidate("dear", 8, 2, 2, [s / 20 for s in scores], [("dear", "out", 1.0)])]
    widths = {"cheap": [None, 8], "dear": [None, 8], "other": [None, None]}
    counts, predicted = allocate(profile, candidates, widths, budget=60.0)
    # importance per unit saved: dear's pairs 0.05, 0.1, 0.15 (then its floor), cheap's 0.1, 0.2, 0.3; taken
    # in that order until the cost is 60 or less: dear, cheap, dear, dear, cheap (100 - 2 - 20 - 2 - 2 - 20)
    assert predicted <= 60.0 and predicted == profile.predict({name: tuple(w) for name, w in widths.items()})
    assert counts == {"cheap": 4, "dear": 6}
    assert predicted == 54.0


def test_knapsack_stops_at_the_floors_when_the_budget_cannot_be_met():
    profile = synthetic()
    candidates = [Candidate("cheap", 8, 6, 2, [1.0] * 8, [("cheap", "out", 1.0)])]
    counts, predicted = allocate(profile, candidates, {"cheap": [None, 8]}, budget=1.0)
    assert counts == {"cheap": 2} and predicted == 80.0


def test_knapsack_passes_over_a_width_that_saves_nothing_to_the_next_that_does():
    # a staircase: 6 channels cost what 8 do, 4 cost half
    side = SideCost(8, [2, 4, 6, 8], [20.0, 40.0, 80.0, 80.0])
    profile = CostProfile("latency_ms", "cpu", "torch.float32", 1, "k", 80.0,
                          {"conv": LayerCost("conv", 80.0, out=side)})
    candidates = [Candidate("conv", 8, 2, 2, [1.0] * 8, [("conv", "out", 1.0)])]
    counts, predicted = allocate(profile, candidates, {"conv": [None, 8]}, budget=50.0)
    assert counts == {"conv": 4} and predicted == 40.0


def test_a_noisy_grid_never_prices_a_narrower_width_above_a_wider_one():
    side = SideCost(64, [16, 32, 48, 64], [30.0, 20.0, 50.0, 40.0])
    assert side.at(16) == side.at(32) == 20.0 and side.at(48) == side.at(64) == 40.0
    assert side.at(40) == 30.0


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_mac_and_parameter_budgets_are_met_exactly_on_a_small_cnn(metric):
    model, x = small()
    macs, params = count_ops_and_params(model, x)
    budget = 0.45 * (macs if metric == "macs" else params)
    pruner = tp.pruner.BasePruner(model, x, magnitude, target={metric: budget}, iterative_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fc reaches the output: its group is refused, as always
        for _ in range(3):
            pruner.step()
    measured = count_ops_and_params(model, x)[0 if metric == "macs" else 1]
    records = [step.budget for step in pruner.report().steps]
    assert [record["metric"] for record in records] == [metric] * 3
    assert all(record["predicted"] == record["measured"] <= record["budget"] for record in records)
    assert records[-1]["budget"] == pytest.approx(budget) and measured == records[-1]["measured"]
    # each step reaches its share along the linear schedule, and none overshoots by much
    full = macs if metric == "macs" else params
    for step, record in enumerate(records, start=1):
        assert record["budget"] == pytest.approx(full * (1 - 0.55 * step / 3))
        assert record["measured"] >= 0.85 * record["budget"]
    assert model(x).shape == (2, 10)
    assert f"{metric} budget" in str(pruner.report())


def test_growing_reg_pruner_reaches_a_mac_budget():
    model, x = small()
    macs = count_ops_and_params(model, x)[0]
    pruner = tp.pruner.GrowingRegPruner(model, x, magnitude, target={"macs": macs // 3})
    pruner.update_reg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()
    assert count_ops_and_params(model, x)[0] <= macs // 3 and model(x).shape == (2, 10)


def test_latency_budget_step_times_the_model_as_its_profile_did_and_reports_it(tmp_path, monkeypatch):
    use_macs_clock(monkeypatch)  # real timings with repeat=1 put the floor above the budget on a busy machine
    torch.manual_seed(0)
    # 32 px so that the convs, not call overheads, dominate: half the latency lies well above the floors
    model, x = SmallCNN(), torch.randn(4, 3, 32, 32)
    profile = latency_profile(model, x, repeat=1, warmup=0, cache_dir=tmp_path)
    budget = tp.utils.measure_cost(model, x) * 0.5
    pruner = tp.pruner.BasePruner(model, x, magnitude, target={"latency_ms": budget}, latency_profile=profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timings on a shared machine: no claim on how close they land here
        pruner.step()
    record = pruner.report().steps[0].budget
    assert record["metric"] == "latency_ms" and record["budget"] == pytest.approx(budget)
    assert record["predicted"] > 0 and record["calibrated"] > 0 and record["measured"] > 0
    assert record["passes"] and all(entry["measured"] > 0 for entry in record["passes"])
    assert sum(m.out_channels for m in (model.conv1, model.conv2, model.conv3)) < 112
    assert model(x).shape == (4, 10)


def test_pick_step_takes_the_finest_step_at_which_timings_drop():
    # an anchor of 32 channels costs 32; 31, 30 and 28 channels take a slower kernel; 24 and 16 scale
    side = SideCost(64, [16, 32, 48, 64], [16.0, 32.0, 48.0, 64.0], 32,
                    {1: 40.0, 2: 40.0, 4: 36.0, 8: 24.0, 16: 16.0})
    profile = CostProfile("latency_ms", "cpu", "torch.float32", 1, "k", 64.0,
                          {"conv": LayerCost("conv", 64.0, out=side)})
    assert pick_step(profile, [("conv", "out", 1.0)], 1) == 8
    assert pick_step(profile, [("conv", "out", 1.0)], 4) == 8  # 4 channel groups: steps of 4 and up only
    assert pick_step(profile, [("conv", "out", 1.0)], 16) == 16
    assert pick_step(profile, [("missing", "out", 1.0)], 1) is None


class Heads(nn.Module):
    """6 heads of 8 channels: every head must keep the same width."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 48)
        self.out = nn.Linear(48, 10)

    def forward(self, x):
        heads = self.proj(x).view(x.shape[0], x.shape[1], 6, -1).softmax(-1)
        return self.out(heads.flatten(2))


def test_auto_rounding_keeps_channel_groups_and_heads_whole(tmp_path):
    torch.manual_seed(0)
    model, x = Heads(), torch.randn(2, 5, 16)
    profile = latency_profile(model, x, repeat=1, warmup=0, cache_dir=tmp_path,
                              units={("proj", "out"): 6, ("out", "in"): 6})
    # whatever the timings say, the steps tried are multiples of 6: make the coarsest of them the one that drops
    side = profile.layers["proj"].out
    for step in side.steps:
        side.steps[step] = side.anchor_cost() * (1.5 if step < 12 else 0.5)
    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.4, round_to="auto", latency_profile=profile,
                                  num_heads={model.proj: 6}, ignored_layers=[model.out])
    assert pruner._budget.auto_steps[model.proj] == 12
    pruner.step()
    assert model.proj.out_features == 36 and model(x).shape == (2, 5, 10)  # 48 * 0.6 = 28.8, up to 3 * 12

    model, x = small()
    model.conv2 = nn.Conv2d(16, 32, 3, padding=1, groups=4)
    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, round_to="auto")
    steps = pruner._budget.auto_steps
    assert steps[model.conv2] % 4 == 0 and steps[model.conv1] % 4 == 0  # conv1 feeds conv2's 4 input groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()
    assert model.conv2.out_channels % steps[model.conv2] == 0 and model.conv1.out_channels % 4 == 0
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("kwargs, message", [
    ({"target": {"flops": 1e6}}, r"unknown budget 'flops'; use one of latency_ms, macs, params"),
    ({"target": {"macs": 0}}, r"target macs must be a positive number, got 0"),
    ({"target": {"macs": True}}, r"target macs must be a positive number, got True"),
    ({"target": {"macs": math.inf}}, r"target macs must be a positive number"),
    ({"target": {"macs": 1, "params": 1}}, r"target must be a dict holding one budget"),
    ({"target": 1e6}, r"target must be a dict holding one budget"),
    ({"target": {"macs": 1e5}, "pruning_ratio_dict": {"conv": 0.5}}, r"target and pruning_ratio_dict do not combine"),
    ({"target": {"macs": 1e5}, "isomorphic": True}, r"target and isomorphic do not combine"),
    ({"round_to": "fast"}, r"round_to must be a positive integer, 'auto' or None, got 'fast'"),
    ({"latency_profile": {"conv1": 1.0}}, r"latency_profile must be what tp.utils.latency_profile"),
])
def test_budget_options_are_validated_before_anything_is_traced(kwargs, message):
    model, x = small()
    if "pruning_ratio_dict" in kwargs:
        kwargs = {**kwargs, "pruning_ratio_dict": {model.conv1: 0.5}}
    with pytest.raises(ValueError, match=message):
        tp.pruner.BasePruner(model, x, magnitude, **kwargs)


def test_a_budget_above_the_current_cost_is_refused_and_the_model_untouched():
    model, x = small()
    macs = count_ops_and_params(model, x)[0]
    with pytest.raises(ValueError, match=r"target macs=2.4\d+e\+07 is not below SmallCNN's current macs \(1.21\d+e\+07"):
        tp.pruner.BasePruner(model, x, magnitude, target={"macs": macs * 2})
    assert count_ops_and_params(model, x)[0] == macs


def test_growing_reg_greg1_plans_ahead_to_the_budget_and_removes_what_it_planned():
    model, x = small()
    macs = count_ops_and_params(model, x)[0]
    pruner = tp.pruner.GrowingRegPruner(model, x, magnitude, target={"macs": macs // 2}, schedule="greg1",
                                        global_pruning=True)
    pruner.update_reg()
    planned = {key: len(idxs) for key, idxs in pruner._selected.items()}
    assert sum(planned.values()) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()
    assert count_ops_and_params(model, x)[0] <= macs // 2
    assert pruner.report().steps[0].removed == sum(planned.values())


def test_a_budget_below_what_the_floors_reach_is_refused():
    model, x = small()
    macs = count_ops_and_params(model, x)[0]
    # every conv down to one channel still leaves conv1's input side, fc and the pooling
    with pytest.raises(ValueError, match=r"target macs=1000 is below the \S+ the profile predicts for SmallCNN with "
                                         r"every group at its floor \(max_pruning_ratio=1\)"):
        tp.pruner.BasePruner(model, x, magnitude, target={"macs": 1000})
    with pytest.raises(ValueError, match=r"max_pruning_ratio=0.5"):
        tp.pruner.BasePruner(model, x, magnitude, target={"macs": macs * 0.2}, max_pruning_ratio=0.5)
    assert count_ops_and_params(model, x)[0] == macs


class ThreeLinear(nn.Module):
    """fc1's channels save more MACs each than fc2's (16 + 32 against 32 + 4), but hold 100x the weight."""

    def __init__(self, pinned=False):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        self.pinned = pinned
        with torch.no_grad():
            self.fc1.weight.mul_(10.0)

    def forward(self, x):
        hidden = self.fc1(x).relu()
        if self.pinned:
            hidden = hidden.view(-1, 4, 8).flatten(1)  # spells out fc1's width: the graph refuses to narrow it
        return self.fc3(self.fc2(hidden).relu())


def test_the_knapsack_compares_groups_by_the_weight_they_hold_not_by_their_normalized_scores():
    # MagnitudeImportance divides each group by its own mean: every channel scores about 1, and the greedy
    # would take fc1, which saves most per channel. Summed and unnormalized, fc1's channels hold 100x the
    # weight: the budget is met from fc2 alone.
    model, x = ThreeLinear(), torch.randn(1, 16)
    macs = count_ops_and_params(model, x)[0]
    budget = macs - 16 * 36
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(), target={"macs": budget},
                                  ignored_layers=[model.fc3])
    pruner.step()
    assert (model.fc1.out_features, model.fc2.out_features) == (32, 16)
    assert count_ops_and_params(model, x)[0] <= budget


def test_the_knapsack_orders_channels_within_a_group_by_the_criterion_given():
    # LAMP's normalizer is not linear; it must still choose which of fc2's channels go
    model, x = ThreeLinear(), torch.randn(1, 16)
    with torch.no_grad():
        model.fc2.weight[:16].mul_(0.01)  # the first 16 rows are the weakest
    reference = model.fc2.weight[16:].clone()
    macs = count_ops_and_params(model, x)[0]
    pruner = tp.pruner.BasePruner(model, x, tp.importance.LAMPImportance(), target={"macs": macs - 16 * 36},
                                  ignored_layers=[model.fc3])
    pruner.step()
    assert model.fc2.out_features == 16 and torch.equal(model.fc2.weight, reference)


def test_a_group_the_graph_refuses_does_not_take_the_budget_from_the_others():
    # fc1's width is spelled out by a view: the knapsack, which prefers it here (all fc1 channels weigh little),
    # plans it, the graph refuses, and the pass is planned again over the groups that can go
    model, x = ThreeLinear(pinned=True), torch.randn(1, 16)
    with torch.no_grad():
        model.fc1.weight.div_(1000.0)
    macs = count_ops_and_params(model, x)[0]
    budget = macs - 12 * 36
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(), target={"macs": budget},
                                  ignored_layers=[model.fc3])
    with pytest.warns(UserWarning, match="fc1"):
        pruner.step()
    assert model.fc1.out_features == 32 and model.fc2.out_features == 20
    assert count_ops_and_params(model, x)[0] <= budget
    assert model(x).shape == (1, 4)


def test_an_anchor_timed_slow_does_not_let_one_channel_steps_pass_on_noise():
    # 256 channels cost 256; the anchor was timed 3% slow, the finest steps read the true level (a kernel
    # that only gets faster at multiples of 8): compared with the anchor alone, every step would pass
    side = SideCost(512, [128, 256, 384, 512], [128.0, 256.0, 384.0, 512.0], 256,
                    {1: 256.0, 2: 256.0, 4: 256.0, 8: 248.0, 16: 240.0})
    side.grid_cost[1] = 264.0
    profile = CostProfile("latency_ms", "cpu", "torch.float32", 1, "k", 512.0,
                          {"fc": LayerCost("fc", 512.0, out=side)})
    assert side.anchor_cost() == 264.0
    assert pick_step(profile, [("fc", "out", 1.0)], 1) == 8
    # a finest step that is a real share of the anchor keeps the anchor as its reference
    assert pick_step(profile, [("fc", "out", 1.0)], 8) == 8
