"""The adapter registry: registration, explicit order, claims, deferred syncs, and one reading of head layouts."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import structprune as tp
from structprune.adapters import ADAPTERS, MODEL, MODULE, Adapter, matching_modules, register_adapter
from structprune.adapters import deferred_late_sync, sync_attributes, unregister_adapter
from structprune.adapters.layout import grid_layout, head_layout, kept_grid_layout, out_width

DOC = Path(__file__).resolve().parents[2] / "docs" / "adding_a_family.md"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)


@pytest.fixture
def registered():
    """Register adapters for the test, and remove them afterwards whatever happened."""
    added = []

    def register(adapter):
        added.append(register_adapter(adapter))
        return adapter

    yield register
    for adapter in added:
        unregister_adapter(adapter)


def test_registering_the_same_adapter_twice_keeps_one(registered):
    adapter = Adapter("test block width", lambda module: isinstance(module, Block), lambda module: None)
    registered(adapter)
    register_adapter(adapter)
    assert ADAPTERS.count(adapter) == 1


def test_another_adapter_under_a_registered_name_is_refused(registered):
    registered(Adapter("test block width", lambda module: isinstance(module, Block), lambda module: None))
    with pytest.raises(ValueError, match=r"'test block width' is already registered.*unregister_adapter"):
        register_adapter(Adapter("test block width", lambda module: False, lambda module: None))


def test_two_adapters_of_one_claim_need_different_orders(registered):
    registered(Adapter("test first", lambda module: True, lambda module: None, order=MODULE + 5, claim="test"))
    with pytest.raises(ValueError, match=r"both claim 'test' at order 105: give one a lower order"):
        register_adapter(Adapter("test second", lambda module: True, lambda module: None, order=MODULE + 5,
                                 claim="test"))


def test_adapters_sync_by_order_then_model_order_and_a_claim_goes_to_the_lowest_order(registered):
    calls = []
    model = nn.Sequential(Block(), Block())

    def record(tag):
        return lambda module: calls.append((tag, module))

    # registered in the opposite order of their orders: the order decides, not registration
    registered(Adapter("test late", lambda module: isinstance(module, Block), record("late"), order=MODULE + 9))
    registered(Adapter("test generic", lambda module: isinstance(module, Block), record("generic"),
                       order=MODULE + 2, claim="test block"))
    registered(Adapter("test specific", lambda module: module is model[1], record("specific"),
                       order=MODULE + 1, claim="test block"))
    ours = [(module, adapter.name) for module, adapter in matching_modules(model) if adapter.name.startswith("test")]
    assert ours == [(model[1], "test specific"), (model[0], "test generic"), (model[0], "test late"),
                    (model[1], "test late")]
    sync_attributes(model, [pair for pair in matching_modules(model) if pair[1].name.startswith("test")])
    assert calls == [("specific", model[1]), ("generic", model[0]), ("late", model[0]), ("late", model[1])]


def test_a_model_order_adapter_runs_once_after_the_groups_of_a_step(registered):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    seen = []
    registered(Adapter("test model width record", lambda module: module is model,
                       lambda module: seen.append((module[0].out_features, module[2].out_features)), order=MODEL))
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 4))
    graph.get_pruning_group(model[0], tp.prune_linear_out_channels, [0, 1]).prune()
    assert seen == [(6, 4)]  # outside a step: after the group
    with deferred_late_sync(model):
        graph.get_pruning_group(model[0], tp.prune_linear_out_channels, [0]).prune()
        graph.get_pruning_group(model[2], tp.prune_linear_out_channels, [0]).prune()
        assert seen == [(6, 4)]
    assert seen == [(6, 4), (5, 3)]


# -- one reading of head layouts ----------------------------------------------------------------------
def test_kept_grid_layout_counts_the_channels_each_kept_head_keeps():
    kept = torch.ones(4, 6, dtype=torch.bool)
    kept[1] = False  # head 1 gone
    kept[0, [0, 1]] = kept[2, [2, 3]] = kept[3, [4, 5]] = False  # two dims from every other head, not the same two
    assert kept_grid_layout(kept, 0, 1) == (3, 4)
    kept[3, 0] = False  # one head keeps fewer: no layout explains it
    assert kept_grid_layout(kept, 0, 1) is None


def test_kept_grid_layout_needs_the_same_heads_in_every_block():
    kept = torch.ones(3, 4, 2, dtype=torch.bool)  # (q/k/v, heads, dims)
    kept[:, 2] = False
    assert kept_grid_layout(kept, 1, 2) == (3, 2)
    kept[0, 1] = False  # head 1 gone from q only
    assert kept_grid_layout(kept, 1, 2) is None


def test_grid_layout_reads_head_first_fused_projections():
    # BLOOM / maxxvit head_first: (heads, 3, dim); head 0 removed from q, k and v
    removed = [0 * 12 + block * 4 + dim for block in range(3) for dim in range(4)]
    assert grid_layout(24, (3, 3, 4), 0, 2, removed) == (2, 4)
    assert grid_layout(24, (3, 3, 4), 0, 2, [40]) is None  # an index outside the layer
    # (3, heads, dim): head 0 out of q, k and v is a layout; a different head out of each block is none, so
    # the head count the forward spells out stays and the forward fails loudly
    assert head_layout(24, 3, 4, [block * 12 + dim for block in range(3) for dim in range(4)], blocks=3,
                       fixed="num_heads") == (2, 4)
    assert head_layout(24, 3, 4, [block * 12 + block * 4 + dim for block in range(3) for dim in range(4)],
                       blocks=3, fixed="num_heads") == (3, 4)


def test_out_width_reads_linear_conv_and_transformers_conv1d():
    assert out_width(nn.Linear(3, 5)) == 5 and out_width(nn.Conv2d(3, 7, 1)) == 7

    class Conv1D(nn.Module):  # transformers' layout: weight [in, out], nf = out
        def __init__(self):
            super().__init__()
            self.nf, self.weight = 9, nn.Parameter(torch.zeros(4, 9))

    assert out_width(Conv1D()) == 9


# -- the recipe in docs/adding_a_family.md runs as written ----------------------------------------------
def test_the_adding_a_family_recipe_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    try:
        exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)
        namespace["test_toy_attention_loses_a_whole_head_exactly"]()
    finally:
        for adapter in [a for a in ADAPTERS if a.name == "toy ToyAttention (heads, head_dim)"]:
            unregister_adapter(adapter)
