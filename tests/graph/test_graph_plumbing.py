"""Nested arguments through torch's pytree, arguments by name, and hooks the graph calls after a prune."""
import ast
import pathlib
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

import structprune as tp
from oracle import assert_lossless
from structprune.graph.hooks import ModelHook, register_graph_hook, unregister_graph_hook

Pair = namedtuple("Pair", "first second")


class Pieces(list):
    """A list subclass: torch's pytree keeps it whole, the tracer opens it."""


class Nested(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(3, 4, 1)
        self.out = nn.Conv2d(9 if how != "stack" else 4, 2, 1)

    def forward(self, x):
        if self.how == "list subclass":
            return self.out(torch.cat(Pieces([self.a(x), self.b(x)]), 1))
        if self.how == "named tuple":
            return self.out(torch.cat(Pair(self.a(x), self.b(x)), dim=1))
        # stack is replayed on labels: its tensors must be found again inside the named tuple
        stacked = torch.stack(Pair(self.a(x), self.c(x)), 2)
        return self.out(stacked.sum(2))


def test_tensors_inside_named_tuples_and_list_subclasses_are_traced_and_replayed():
    x = torch.randn(1, 3, 4, 4)
    for how in ("list subclass", "named tuple"):
        model = Nested(how)
        group = assert_lossless(model, x, model.b, [0, 3])
        assert {item.dep.target.name: item.idxs for item in group}["out"] == [4, 7]
    model = Nested("stack")
    group = assert_lossless(model, x, model.a, [1])
    assert {item.dep.target.name: item.idxs for item in group} == {"a": [1], "c": [1], "out": [1]}


class Spelled(nn.Module):
    """conv groups and keepdim given by position or by keyword."""

    def __init__(self, by_keyword, groups):
        super().__init__()
        self.by_keyword, self.groups = by_keyword, groups
        self.conv = nn.Conv2d(4, 8, 1)
        self.mix = nn.Conv2d(8, 8, 1, groups=groups)  # never called: its weight is used bare
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        weight = self.mix.weight
        if self.by_keyword:
            z = F.conv2d(y, weight, None, groups=self.groups) + y * y.norm(p=2, dim=-1, keepdim=True)
        else:
            z = F.conv2d(y, weight, None, 1, 0, 1, self.groups) + y * torch.norm(y, 2, -1, True)
        return self.head(z)


def group_of(by_keyword, groups):
    model = Spelled(by_keyword, groups)
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 4, 5, 5))
    group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [0, 1])
    return sorted((item.dep.target.name, item.side.value, tuple(item.idxs)) for item in group), group.blocked


def test_arguments_are_read_by_name_whatever_the_spelling():
    items, blocked = group_of(by_keyword=False, groups=1)
    assert (items, blocked) == group_of(by_keyword=True, groups=1)
    # a keepdim norm keeps the channel dim: channels go on through it
    assert not blocked and {("head", "in", (0, 1)), ("mix", "in", (0, 1)), ("mix", "out", (0, 1))} <= set(items)
    # groups=2 given positionally (F.conv2d's 7th argument) is read as groups, as by keyword: no letters map it
    items, blocked = group_of(by_keyword=False, groups=2)
    assert [(r.kind, r.layer) for r in blocked] == [(tp.graph.RefusalKind.UNMAPPABLE_OP, "conv2d")]
    assert (items, blocked) == group_of(by_keyword=True, groups=2)


def test_after_apply_hooks_hear_each_applied_group():
    heard = []

    def factory(model):
        if not isinstance(model, nn.Sequential):
            return None
        return ModelHook(lambda removed: heard.append({model_name(model, m): r.tolist() for m, r in removed.items()}))

    def model_name(model, module):
        return next(name for name, m in model.named_modules() if m is module)

    register_graph_hook(factory)
    try:
        model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
        graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 4, 4))
        graph.get_pruning_group(model[0], tp.prune_conv_out_channels, [2, 4]).prune()
    finally:
        unregister_graph_hook(factory)
    assert heard == [{"0": [2, 4], "1": [2, 4]}]  # output sides only: not the conv that lost inputs
    tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 4, 4))
    graph.get_pruning_group(model[0], tp.prune_conv_out_channels, [0]).prune()
    assert len(heard) == 2  # a graph keeps the hooks it attached when built


def test_the_graph_imports_no_model_family():
    graph_dir = pathlib.Path(tp.graph.__file__).parent
    for path in graph_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert "adapters" not in module and "transformers" not in module and "timm" not in module, path
