"""Per-module pruning report and nested flattening."""

from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn

from structprune.utils import flatten_as_list
from structprune.utils.print_tool import after_pruning, before_pruning, take_snapshot


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3)
        self.fc = nn.Linear(8, 10)


def _shrink_conv1_to_8(net: Net) -> None:
    """Prune conv1's output channels by hand, as a pruner would."""
    keep = slice(0, 8)
    net.conv1.weight = nn.Parameter(net.conv1.weight.detach()[keep].clone())
    net.conv1.bias = nn.Parameter(net.conv1.bias.detach()[keep].clone())
    net.bn1.weight = nn.Parameter(net.bn1.weight.detach()[keep].clone())
    net.bn1.bias = nn.Parameter(net.bn1.bias.detach()[keep].clone())
    net.conv2.weight = nn.Parameter(net.conv2.weight.detach()[:, keep].clone())


def test_diff_lists_only_changed_modules(capsys):
    net = Net()
    before_pruning(net)
    _shrink_conv1_to_8(net)
    report = after_pruning(net)
    lines = report.splitlines()
    assert lines[0] == "conv1: (16, 3, 3, 3) -> (8, 3, 3, 3), bias: (16,) -> (8,)"
    assert lines[1] == "bn1: (16,) -> (8,), bias: (16,) -> (8,)"
    assert lines[2] == "conv2: (8, 16, 3, 3) -> (8, 8, 3, 3)"  # bias unchanged: not listed
    assert not any(line.startswith("fc") for line in lines)
    old = 16 * 27 + 16 + 32 + 8 * 16 * 9 + 8 + 90
    new = 8 * 27 + 8 + 16 + 8 * 8 * 9 + 8 + 90
    assert lines[3] == f"Params: {old:,} -> {new:,} ({(new - old) / old * 100:+.2f}%)"
    assert len(lines) == 4
    assert capsys.readouterr().out.strip() == report


def test_snapshot_object_can_be_passed_explicitly_and_quiet(capsys):
    net = Net()
    snapshot = before_pruning(net)
    assert snapshot.shapes["conv1"] == {"weight": (16, 3, 3, 3), "bias": (16,)}
    net.fc = nn.Linear(8, 5)
    report = after_pruning(net, do_print=False, snapshot=snapshot)
    assert report.splitlines()[0] == "fc: (10, 8) -> (5, 8), bias: (10,) -> (5,)"
    assert capsys.readouterr().out == ""


def test_added_and_removed_modules():
    net = Net()
    snapshot = take_snapshot(net)
    del net.fc
    net.head = nn.Linear(8, 2, bias=False)
    lines = after_pruning(net, do_print=False, snapshot=snapshot).splitlines()
    assert "head: - -> (2, 8)" in lines
    assert "fc: (10, 8) -> -, bias: (10,) -> -" in lines


def test_no_change_and_missing_snapshot():
    net = Net()
    before_pruning(net)
    assert after_pruning(net, do_print=False).startswith("No parameter shape changed.")
    with pytest.raises(RuntimeError):
        after_pruning(Net(), do_print=False)


def test_snapshot_does_not_leak_into_state_dict():
    net = Net()
    keys = set(net.state_dict())
    before_pruning(net)
    assert set(net.state_dict()) == keys


# --------------------------------------------------------------------------- #
# flatten_as_list
# --------------------------------------------------------------------------- #


class FakeModelOutput(OrderedDict):
    """Mimics transformers.ModelOutput: a mapping with to_tuple() dropping None."""

    def to_tuple(self):
        return tuple(v for v in self.values() if v is not None)


def test_flatten_nested_structures():
    a, b, c, d = (torch.full((1,), float(i)) for i in range(4))
    Pair = namedtuple("Pair", "left right")
    nested = (a, [b, {"x": c, "skip": None, "n": 3}], Pair(d, "text"))
    flat = flatten_as_list(nested)
    assert [t.item() for t in flat] == [0.0, 1.0, 2.0, 3.0]
    assert flat[0] is a


def test_flatten_model_output_and_tensor():
    t = torch.zeros(2)
    output = FakeModelOutput(last_hidden_state=t, attentions=None, pooler=(t + 1,))
    assert [x.sum().item() for x in flatten_as_list(output)] == [0.0, 2.0]
    assert flatten_as_list(t)[0] is t
    assert flatten_as_list(None) == []


def test_flatten_real_hf_model_output():
    from transformers.modeling_outputs import BaseModelOutput

    hidden = torch.ones(1, 2, 3)
    output = BaseModelOutput(last_hidden_state=hidden, hidden_states=(hidden, hidden))
    assert len(flatten_as_list(output)) == 3
