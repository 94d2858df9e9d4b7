"""What the graph knows, held as data: item sides, structured refusals, one snapshot."""
import pickle

import pytest
import torch
from torch import nn

import structprune as tp
from structprune.graph import Refusal, RefusalKind, Side
from structprune.graph.snapshot import Snapshot
from structprune.pruner.heads import subset_may_pass


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.dw(torch.relu(self.bn(self.conv(x)))) * self.scale)


def sides(group):
    return {item.dep.target.name: item.side for item in group}


def test_every_item_carries_the_side_discovery_gave_it():
    model = Block()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 6, 6))
    group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [1, 2])
    # norms, depthwise convs and bare parameters have one set of channels: their outputs
    assert sides(group) == {"conv": Side.OUT, "bn": Side.OUT, "dw": Side.OUT, "scale": Side.OUT, "head": Side.IN}
    assert all(item.side is item.dep.side for item in group)
    group = graph.get_pruning_group(model.head, tp.prune_conv_in_channels, [3])
    assert group[0].side is Side.IN and sides(group)["conv"] is Side.OUT
    # a coupled layer asked for its inputs is rooted on its outputs, the one side it has
    group = graph.get_pruning_group(model.bn, tp.prune_batchnorm_in_channels, [0])
    assert group[0].side is Side.OUT and sides(group)["head"] is Side.IN


def test_side_does_not_come_from_the_handler_name():
    """A customized pruner may name its functions anything: the graph keeps the side discovery found."""

    class OddlyNamed(tp.layers.LinearPruner):
        def remove_rows(self, layer, idxs):
            return super().prune_out_channels(layer, idxs)

        prune_out_channels = remove_rows

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(3, 4),
                                                  customized_pruners={model[0]: OddlyNamed()})
    group = graph.get_group_by_side(model[0], Side.OUT, [0, 5])
    assert sides(group) == {"0": Side.OUT, "2": Side.IN}
    group.prune()
    assert model[0].weight.shape == (4, 4) and model[2].weight.shape == (2, 4)
    assert graph.pruning_history() == [("0", True, [0, 5])]


def test_a_dependency_built_by_hand_takes_its_side_from_the_function_once():
    model = Block()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 6, 6))
    conv, bn, head = (graph.module2node[m] for m in (model.conv, model.bn, model.head))
    assert tp.Dependency(tp.prune_conv_out_channels, tp.prune_conv_in_channels, conv, head).side is Side.IN
    assert tp.Dependency(tp.prune_conv_out_channels, tp.prune_conv_out_channels, conv, conv).side is Side.OUT
    assert tp.Dependency(tp.prune_conv_out_channels, tp.prune_batchnorm_in_channels, conv, bn).side is Side.OUT
    assert tp.graph.is_out_channel_pruning_fn(tp.prune_linear_out_channels)
    assert tp.graph.is_in_channel_pruning_fn(tp.prune_linear_in_channels)


class Reaches(nn.Module):
    """conv's channels reach a buffer; fc's are the model output; proj's meet a head-count reshape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("mask", torch.ones(4, 1, 1))
        self.proj = nn.Linear(4, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = (self.conv(x) * self.mask).mean((2, 3))
        heads = self.proj(y).view(y.shape[0], 2, -1)  # a spelled-out head count; the head width follows
        return self.fc(heads.flatten(1))


def test_refusals_carry_kind_layer_and_the_message():
    model = Reaches()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(2, 3, 4, 4))
    buffer = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [0]).blocked
    assert [r.kind for r in buffer] == [RefusalKind.BUFFER]
    assert str(buffer[0]) == "channels reach a buffer of the model, shape (4, 1, 1); it cannot lose channels"
    assert buffer[0].detail == str(buffer[0]) and type(str(buffer[0])) is str
    output = graph.get_pruning_group(model.fc, tp.prune_linear_out_channels, [0]).blocked
    assert [r.kind for r in output] == [RefusalKind.MODEL_OUTPUT] and output[0].layer is None
    uneven = graph.get_pruning_group(model.proj, tp.prune_linear_out_channels, [0]).blocked
    assert [(r.kind, r.layer) for r in uneven] == [(RefusalKind.REGROUP, "view")]
    heads = graph.get_pruning_group(model.proj, tp.prune_linear_out_channels, [0, 1, 2, 3]).blocked
    assert [(r.kind, r.layer) for r in heads] == [(RefusalKind.SPELLED_OUT_SIZE, "view")]
    assert heads[0].as_row() == ("SPELLED_OUT_SIZE", "view", str(heads[0]))
    assert "spells out the size of dim 1 (2: a number" in heads[0] and "that dim holds 1" in heads[0]
    # the same index of every head passes: the reshape's head count is left alone
    assert not graph.get_pruning_group(model.proj, tp.prune_linear_out_channels, [0, 4]).blocked


def test_subset_decisions_read_the_kind_not_the_words():
    worded_like_a_regroup = Refusal(RefusalKind.MODEL_OUTPUT, "regroup.fc", "channels reach regroup.fc, which spells out the size")
    assert not subset_may_pass(worded_like_a_regroup)
    assert subset_may_pass(Refusal(RefusalKind.REGROUP, None, "anything"))
    assert {k for k in RefusalKind if k.may_pass_for_subset} == {
        RefusalKind.SPELLED_OUT_PIECES, RefusalKind.SPELLED_OUT_SIZE, RefusalKind.REGROUP, RefusalKind.DIM_MISMATCH}


def test_a_refusal_survives_pickling_and_blocked_with_a_bare_message():
    refusal = Refusal(RefusalKind.BUFFER, "mask", "channels reach a buffer")
    again = pickle.loads(pickle.dumps(refusal))
    assert (again.kind, again.layer, again.detail) == (RefusalKind.BUFFER, "mask", "channels reach a buffer")
    blocked = tp.graph.Blocked("older code passes only words")
    assert blocked.refusal.kind is RefusalKind.UNCLASSIFIED and str(blocked) == "older code passes only words"


def test_snapshot_records_each_module_once_and_restores():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2))
    modules = list(model.modules())
    snapshot = Snapshot(modules)  # the pruner's checkpoint passes every module of the model
    params = list(model.parameters())
    # per module: its parameter table, its buffers and its attributes; per parameter: its data
    assert len(snapshot.entries) == 3 * len(modules) + len(params)
    assert len(Snapshot([model]).entries) == len(snapshot.entries)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model[0][0].weight.data = torch.zeros(2, 3)
    model[0][1].running_mean = torch.zeros(5)
    model[1].extra = 7
    model[1].in_features = 99
    snapshot.restore()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model[1], "extra") and model[1].in_features == 4


def test_graph_checkpoint_undoes_pruned_groups_and_their_numbering():
    model = Block()
    x = torch.randn(1, 3, 6, 6)
    graph = tp.DependencyGraph().build_dependency(model, x)
    checkpoint = graph.checkpoint()
    graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [0, 3]).prune()
    assert model.conv.out_channels == 6 and len(graph.pruning_history()) == 1
    checkpoint.restore()
    assert model.conv.out_channels == 8 and model.head.weight.shape == (4, 8, 1, 1)
    assert graph.pruning_history() == []
    group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [7])
    assert sorted(item.idxs[0] for item in group) == [7] * len(group)
    group.prune()
    assert model(x).shape == (1, 4, 6, 6)


def test_torch_pruning_names_kept_simple_and_loud():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3))
    assert dict(graph.CUSTOMIZED_PRUNERS) == {}
    custom = tp.layers.LinearPruner()
    graph.register_customized_layer(model[0], custom)
    assert dict(graph.CUSTOMIZED_PRUNERS) == {model[0]: custom}
    with pytest.raises(TypeError):
        graph.CUSTOMIZED_PRUNERS[nn.Linear] = custom  # register_customized_layer is the way in
    node = graph.module2node[model[1]]
    assert node.enable_index_mapping is True
    with pytest.warns(UserWarning, match="enable_index_mapping=False is ignored"):
        node.enable_index_mapping = False
    group = graph.get_pruning_group(model[0], tp.prune_linear_out_channels, [1])
    assert group.has_dep(group[1].dep) and group.has_pruning_op(group[1].dep, [1])
    assert sorted(tp.layers.functions.__all__) == sorted(n for n in dir(tp) if n.startswith("prune_"))
