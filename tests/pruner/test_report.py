"""Nothing pruned, nothing said is a bug: pruner.report() and the warning step() gives when it removes less
than its schedule asked (a group reaching a model output, zero prunable groups, the verified fallback)."""
import warnings

import pytest
import torch
import torchvision
from torch import nn

import structprune as tp
from structprune.graph.refusal import RefusalKind


class FeatsOut(nn.Module):
    """A detection-style head: returns its prediction and the features its loss reads (YOLO's ``feats``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        feats = self.b(self.a(x).relu())
        return self.head(feats), feats


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


class Picky(nn.Module):
    """Checks a width in Python, where no trace can see it: pruning ``a`` breaks the forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 8, 3)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if y.shape[1] != 8:
            raise ValueError("a must keep 8 channels")
        return self.c(self.b(y.relu()))


def magnitude():
    return tp.importance.MagnitudeImportance(p=2)


def test_group_reaching_a_model_output_is_reported_and_step_warns_with_a_pointer():
    model = FeatsOut()
    pruner = tp.pruner.BasePruner(model, torch.randn(1, 3, 16, 16), magnitude(), pruning_ratio=0.5,
                                  ignored_layers=[model.head])
    with pytest.warns(UserWarning, match=r"removed 4 of the 8 channels .*b \(0 of 4: reaches a model output\)"
                                         r".*pruner\.report\(\)"):
        pruner.step()
    assert model.a.out_channels == 4 and model.b.out_channels == 8
    report = pruner.report()
    assert report.groups == 1
    [(root, refusal)] = report.refused
    assert root == "b" and refusal.kind is RefusalKind.MODEL_OUTPUT
    [step] = report.steps
    assert (step.removed, step.target) == (4, 8)
    [short] = step.short()
    assert (short.root, short.before, short.after, short.target) == ("b", 8, 8, 4)
    assert short.reason.kind is RefusalKind.MODEL_OUTPUT
    assert "b: reaches a model output" in str(report) and "removed 4 of 8 planned channels" in str(report)


def test_zero_prunable_groups_warn_when_the_pruner_is_built():
    model = OneLayer()
    with pytest.warns(UserWarning, match=r"found no prunable group in OneLayer.*pruner\.report\(\)"):
        pruner = tp.pruner.BasePruner(model, torch.randn(1, 4), magnitude(), pruning_ratio=0.5)
    with pytest.warns(UserWarning, match=r"removed 0 of the 1 channels"):
        pruner.step()
    report = pruner.report()
    assert report.groups == 0 and [root for root, _ in report.refused] == ["fc"]
    assert model.fc.out_features == 2


def test_a_full_step_warns_nothing_and_reports_every_group_at_its_target():
    model = torchvision.models.resnet18()
    pruner = tp.pruner.BasePruner(model, torch.randn(1, 3, 64, 64), magnitude(), pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.step()
    [step] = pruner.report().steps
    assert step.removed == step.target == 1440 and not step.short() and not step.fallback
    assert {record.root: (record.before, record.after) for record in step.groups}["layer4.0.conv1"] == (512, 256)


def test_global_pruning_is_measured_against_its_total():
    model = torchvision.models.resnet18()
    pruner = tp.pruner.BasePruner(model, torch.randn(1, 3, 64, 64), magnitude(), pruning_ratio=0.5,
                                  global_pruning=True, ignored_layers=[model.fc])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.step()
    [step] = pruner.report().steps
    assert step.global_target == 1440 and step.removed >= 1440 - 12  # rounding: at most one channel per group


def test_groups_the_verified_fallback_left_are_reported_with_the_error():
    model = Picky()
    pruner = tp.pruner.BasePruner(model, torch.randn(1, 3, 16, 16), magnitude(), pruning_ratio=0.5,
                                  ignored_layers=[model.c])
    with pytest.warns(UserWarning) as caught:
        pruner.step()
    messages = [str(w.message) for w in caught]
    assert any("a must keep 8 channels" in m for m in messages)
    assert any(m.startswith("step() removed 4 of the 8 channels") and "a (0 of 4" in m for m in messages)
    assert model.a.out_channels == 8 and model.b.out_channels == 4
    [step] = pruner.report().steps
    assert len(step.fallback) == 1 and step.fallback[0].startswith("a (")
    [short] = step.short()
    assert short.root == "a" and "a must keep 8 channels" in short.reason


def test_interactive_steps_are_recorded_without_a_warning():
    model = FeatsOut()
    pruner = tp.pruner.BasePruner(model, torch.randn(1, 3, 16, 16), magnitude(), pruning_ratio=0.5,
                                  ignored_layers=[model.head])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for group in pruner.step(interactive=True):
            group.prune()
    [step] = pruner.report().steps
    assert step.removed == 4 and step.target == 8


def test_prune_num_heads_on_a_model_without_heads_says_so():
    model = torchvision.models.resnet18()
    pruner = tp.pruner.BasePruner(model, torch.randn(1, 3, 32, 32), magnitude(), pruning_ratio=0.25,
                                  prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.fc])
    with pytest.warns(UserWarning, match=r"prune_num_heads=True found no attention heads.*num_heads"):
        pruner.step()
    assert model.conv1.out_channels == 48  # channel pruning still happened


class Halves(nn.Module):
    """A conv whose output is chunked in two halves read by different layers. Its three weakest channels
    are two of the first half and one of the second: the halves would be 3 and 4 wide, which chunk(2) of 7
    does not give (4 and 3), so the graph takes the same positions in both halves, two channels at a time."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 10, 1)
        self.left = nn.Conv2d(5, 4, 1)
        self.right = nn.Conv2d(5, 4, 1)
        with torch.no_grad():
            self.a.weight.copy_(torch.arange(1.0, 11.0).view(10, 1, 1, 1).expand(10, 3, 1, 1))
            self.a.weight[[0, 1, 5]] *= 1e-2

    def forward(self, x):
        first, second = self.a(x).chunk(2, dim=1)
        return self.left(first) + self.right(second)


def test_a_count_the_graph_blocks_cannot_take_is_rounded_down_and_says_why():
    model = Halves()
    pruner = tp.pruner.BasePruner(model, torch.randn(1, 3, 4, 4), magnitude(), pruning_ratio=0.3,
                                  ignored_layers=[model.left, model.right])
    with pytest.warns(UserWarning, match=r"a \(2 of 3: a split, chunk or head reshape takes 2 channels at a time: "
                                         r"2 of 3 went\)"):
        pruner.step()
    assert model.a.out_channels == 8 and model.left.in_channels == model.right.in_channels == 4
    [record] = [r for r in pruner.report().steps[0].groups if r.root == "a"]
    assert (record.removed, record.target) == (2, 3) and "takes 2 channels at a time" in record.reason


class Lopsided(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.Conv2d(3, 8, 1)
        self.large = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)
        with torch.no_grad():
            # a group scores its root's outputs with the next layer's inputs: small + large's columns,
            # against large + head's columns
            self.head.weight.mul_(1e3)

    def forward(self, x):
        return self.head(self.large(self.small(x).relu()).relu())


def test_global_pruning_holds_each_group_to_its_share_not_to_the_local_ratio():
    """The global ranking takes the small-norm conv's channels and none of the large one's: the large conv
    kept channels by design, not for a reason the report lacks, so nothing is short and nothing warns."""
    model = Lopsided()
    pruner = tp.pruner.BasePruner(model, torch.randn(1, 3, 4, 4), tp.importance.MagnitudeImportance(p=2, normalizer=None),
                                  pruning_ratio=0.25, global_pruning=True, max_pruning_ratio=0.5,
                                  ignored_layers=[model.head])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.step()
    [step] = pruner.report().steps
    targets = {record.root: (record.removed, record.target) for record in step.groups}
    assert targets == {"small": (4, 4), "large": (0, 0)} and step.removed == step.global_target == 4
    assert not step.short()


class NaNScores(tp.importance.MagnitudeImportance):
    def __call__(self, group):
        return torch.full((len(group[0].idxs),), float("nan"))


def test_a_group_the_criterion_cannot_score_keeps_its_channels_with_the_reason():
    model = Lopsided()
    pruner = tp.pruner.BasePruner(model, torch.randn(1, 3, 4, 4), NaNScores(p=2), pruning_ratio=0.5,
                                  ignored_layers=[model.head])
    with pytest.warns(UserWarning, match=r"small \(0 of 4: NaNScores gave NaN scores\)"):
        pruner.step()
    assert model.small.out_channels == 8
