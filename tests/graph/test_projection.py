"""A chosen subset's group read off the walk of the whole group (graph/projection.py, graph/pointwise.py).

The claim: when a discovery's maps all went channel by channel, restricting its walk to some root channels
gives exactly what a new discovery from those channels finds. Checked three ways: on single maps (each op
that records no reason commutes with restriction, for random subsets), on the groups of real models (every
group with a walk, several subsets, item by item), and on whole pruning steps (the pruned model is the same,
weight for weight, with the projection and without it).
"""
import copy
import random

import pytest
import torch

import structprune as tp
from structprune.graph import blocks
from structprune.graph.channels import ChannelState, backward_through, forward_through, squeeze_state, through_letters
from structprune.graph.discovery import _merge
from structprune.graph.pointwise import not_pointwise, recording
from structprune.graph.refusal import RefusalKind
from structprune.graph.side import Side

from test_channel_plans import _ops, _spatial_ops


def _restrict(state, chosen):
    if state is None:
        return None
    keep = chosen[state.roots]
    if not bool(keep.any()):
        return None
    return ChannelState(state.dims, state.idxs[keep], state.roots[keep])


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.dims == b.dims and torch.equal(a.idxs, b.idxs) and torch.equal(a.roots, b.roots)


def _through(kind, out, shape, state, siblings):
    """A map as the walk applies it: forward or backward, then the squeeze every multi-dim push gets."""
    mapped = forward_through(out, shape, state) if kind == "forward" else backward_through(out, shape, state, siblings)
    if mapped is not None and len(mapped.dims) > 1:
        mapped = squeeze_state(mapped, tuple(out.shape) if kind == "forward" else shape)
    return mapped


def _check_ops(rng, shape, op_list):
    """Every (op, direction, dims, root layout) that records no reason commutes with restriction."""
    numel = 1
    for size in shape:
        numel *= size
    labels = torch.arange(numel).view(shape)
    pointwise = marked = 0
    for name, op in op_list:
        outputs = op(labels)
        blocks.mark_views(outputs, labels, name)
        outputs = [out if "_structprune_view_of_labels" in out.__dict__ else out.contiguous() for out in outputs]
        for index, out in enumerate(outputs):
            siblings = [other for k, other in enumerate(outputs) if k != index] or None
            for kind in ("forward", "backward"):
                source = shape if kind == "forward" else tuple(out.shape)
                for _ in range(3):
                    dims = tuple(sorted(rng.sample(range(len(source)), rng.randint(1, min(2, len(source))))))
                    total = 1
                    for d in dims:
                        total *= source[d]
                    idxs = torch.arange(total)
                    # distinct roots, or each root fanned out over a run of channels (a head's channels)
                    fan = rng.choice([1, 1, 2, 3])
                    roots = idxs // fan
                    full = ChannelState(dims, idxs, roots)
                    with recording() as reasons:
                        mapped = _through(kind, out, shape, full, siblings)
                    if reasons:
                        marked += 1
                        continue
                    pointwise += 1
                    for _ in range(4):
                        chosen = torch.zeros(int(roots.max()) + 1, dtype=torch.bool)
                        chosen[torch.tensor(rng.sample(range(len(chosen)), rng.randint(1, len(chosen))))] = True
                        subset = _restrict(full, chosen)
                        assert _same(_through(kind, out, shape, subset, siblings), _restrict(mapped, chosen)), (
                            name, kind, dims, fan)
    return pointwise, marked


@pytest.mark.parametrize("seed", range(4))
def test_maps_that_record_no_reason_commute_with_restriction(seed):
    rng = random.Random(seed)
    shape = (rng.choice([1, 2]), rng.choice([1, 3, 4]), 12)
    pointwise, marked = _check_ops(rng, shape, _ops(shape))
    spatial = (rng.choice([1, 2]), 4, 4, rng.choice([6, 12]))
    more, also = _check_ops(rng, spatial, _spatial_ops(spatial))
    # both kinds occur: most maps are pointwise, and the ones that are not say so
    assert pointwise + more > 60 and marked + also > 5


def test_a_position_read_through_two_channels_is_not_pointwise():
    labels = torch.arange(8).view(1, 8)
    doubled = labels[:, torch.tensor([0, 1, 1, 2, 5, 5, 5, 0])].contiguous()  # position 1 read by channels 1, 2
    with recording() as reasons:
        backward_through(doubled, (1, 8), ChannelState((1,), torch.tensor([1]), torch.tensor([1])))
    assert reasons == ["a source element goes only when every channel reading it goes"]


def test_a_fused_bias_split_into_heads_is_pointwise():
    """A 1-D q/k/v bias reshaped to (3, heads, head_dim): each element is read through one (q/k/v, head)."""
    bias = torch.arange(3 * 4 * 8).view(3, 4, 8)
    state = ChannelState((0, 1), torch.tensor([1, 5, 9]), torch.tensor([1, 5, 9]))
    with recording() as reasons:
        mapped = backward_through(bias, (96,), state)
    assert reasons == []
    assert mapped.dims == (0,) and mapped.idxs.tolist() == list(range(8, 16)) + list(range(40, 48)) + list(range(72, 80))


def test_projecting_a_fine_state_onto_coarse_channels_is_not_pointwise():
    state = ChannelState((1, 2), torch.arange(8), torch.arange(8))
    with recording() as reasons:
        through_letters(state, ["b", "h", "d"], (1, 2, 4), ["b", "h"], (1, 2))
    assert reasons == ["a coarse channel goes only when every finer channel under it goes"]
    with recording() as reasons:  # one dim keeps its letter: a renaming
        through_letters(ChannelState((1,), torch.tensor([1]), torch.tensor([3])), ["b", "h", "d"], (1, 2, 4),
                        ["h", "x"], (2, 5))
    assert reasons == []


def test_a_channel_reached_from_two_roots_is_not_pointwise():
    old = ChannelState((0,), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    cases = {
        "same channels, other roots": ChannelState((0,), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 5])),
        "fewer channels, other roots": ChannelState((0,), torch.tensor([1]), torch.tensor([7])),
        "growing, overlapping with other roots": ChannelState((0,), torch.tensor([2, 3]), torch.tensor([9, 3])),
    }
    for name, new in cases.items():
        with recording() as reasons:
            _merge(old, new)
        assert reasons == ["a channel reached from two root channels"], name
    with recording() as reasons:
        merged, grew = _merge(old, ChannelState((0,), torch.tensor([2, 3]), torch.tensor([2, 3])))
    assert reasons == [] and grew and merged.roots.tolist() == [0, 1, 2, 3]


def test_squeezing_is_pointwise_unless_a_kept_axis_has_a_line_from_one_root():
    # (head, head_dim) with each head's channels from one root: head_dim goes, for any set of heads
    heads = ChannelState((0, 1), torch.arange(8), torch.arange(8) // 4)
    with recording() as reasons:
        squeezed = squeeze_state(heads, (2, 4))
    assert reasons == [] and squeezed.dims == (0,) and squeezed.roots.tolist() == [0, 1]
    # head 0 from one root, head 1 channel by channel: head 0 alone would lose head_dim, all of them do not
    mixed = ChannelState((0, 1), torch.arange(8), torch.tensor([0, 0, 0, 0, 4, 5, 6, 7]))
    with recording() as reasons:
        squeezed = squeeze_state(mixed, (2, 4))
    assert reasons == ["the dims a state keeps depend on which channels it holds"] and squeezed.dims == (0, 1)


def test_not_pointwise_outside_a_recording_does_nothing():
    not_pointwise("no discovery is recording")
    with recording() as outer:
        with recording() as inner:
            not_pointwise("inner")
        not_pointwise("outer")
    assert inner == ["inner"] and outer == ["outer"]


# -- real models ------------------------------------------------------------------------------------------
def _items(group):
    """The root item, then the others in any order: a subset may reach a layer by another path first (YOLO's
    C2PSA: its last channel meets cv2 after the attention block), which changes nothing that is removed."""
    items = [(item.dep.target.name, item.side.word, list(item.idxs), list(item.root_idxs)) for item in group]
    return items[0], sorted(items[1:])


def _subsets(rng, total):
    subsets = [list(range(0, total, 2)), list(range(total // 2)), [total - 1]]
    for _ in range(2):
        subsets.append(sorted(rng.sample(range(total), rng.randint(1, total))))
    return subsets


def assert_projection_matches_discovery(graph, seed=0):
    """Every group with a walk, restricted to several subsets, equals the group discovered from them."""
    rng = random.Random(seed)
    projected, walked_again = 0, []
    for group in graph.get_all_groups(include_blocked=True):
        module = group[0].dep.target.module
        if graph._all_groups_cache[module].walk is None:
            if not any(refusal.kind is RefusalKind.MODEL_OUTPUT for refusal in group.blocked):
                walked_again.append(group[0].dep.target.name)
            continue
        projected += 1
        for subset in _subsets(rng, len(group[0].idxs)):
            chosen = graph._chosen_group(module, Side.OUT, subset)
            found = graph.get_group_by_side(module, Side.OUT, subset)
            assert _items(chosen) == _items(found), (group[0].dep.target.name, subset)
            assert chosen.blocked == found.blocked, (group[0].dep.target.name, subset)
            assert (chosen.block_hint, len(chosen.size_ties)) == (found.block_hint, len(found.size_ties))
    return projected, walked_again


def _torchvision(name, size, **kwargs):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval(), torch.randn(1, 3, size, size)


def _timm(name, size, **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval(), torch.randn(1, 3, size, size)


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 64, (1, 8))


def _yolo():
    ultralytics = pytest.importorskip("ultralytics")
    torch.manual_seed(0)
    return ultralytics.YOLO("yolo11n.yaml").model.eval(), torch.randn(1, 3, 64, 64)


MODELS = {
    "resnet18": lambda: _torchvision("resnet18", 64),
    "densenet121": lambda: _torchvision("densenet121", 64),
    "mobilenet_v3_small": lambda: _torchvision("mobilenet_v3_small", 64),
    "swin_t": lambda: _torchvision("swin_t", 96),
    "vit_b_16": lambda: _torchvision("vit_b_16", 64, image_size=64),
    "swinv2_tiny_window8_256": lambda: _timm("swinv2_tiny_window8_256", 64, img_size=64, window_size=4),
    "caformer_s18": lambda: _timm("caformer_s18", 64),
    "ghostnet_100": lambda: _timm("ghostnet_100", 64),
    "pvt_v2_b0": lambda: _timm("pvt_v2_b0", 64),
    "llama (grouped-query attention)": _llama,
    "yolo11n": _yolo,
}

#: every group of these but the classifier's has a walk. Attention heads go only whole (a coarse channel), and a
#: ghost module's cheap half is made from its primary half, so one channel there is reached from two roots
ALL_PROJECTED = {"resnet18", "densenet121", "mobilenet_v3_small"}


@pytest.mark.parametrize("name", list(MODELS))
def test_chosen_groups_equal_discovered_ones_on_real_models(name):
    model, x = MODELS[name]()
    graph = tp.DependencyGraph().build_dependency(model, x)
    projected, walked_again = assert_projection_matches_discovery(graph)
    assert projected > 0
    if name in ALL_PROJECTED:  # only the classifier's group (it reaches the output) has no walk
        assert walked_again == []


def _pruned(build, projection: bool, monkeypatch, **options):
    model, x = build()
    if not projection:
        monkeypatch.setattr(tp.DependencyGraph, "_chosen_group",
                            lambda self, module, side, idxs: self.get_group_by_side(module, side, idxs))
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(p=2), ignored_layers=[_head(model)],
                                  **options)
    for _ in range(pruner.iterative_steps):
        pruner.step()
    monkeypatch.undo()
    return model


def _head(model):
    return model.get_classifier() if hasattr(model, "get_classifier") else list(model.modules())[-1]


@pytest.mark.parametrize("name, options", [
    ("resnet18", {"pruning_ratio": 0.5, "iterative_steps": 3}),
    ("swin_t", {"pruning_ratio": 0.5}),
    ("swinv2_tiny_window8_256", {"pruning_ratio": 0.4, "iterative_steps": 2, "global_pruning": True}),
])
def test_a_step_prunes_the_same_weights_with_and_without_projection(name, options, monkeypatch):
    with_projection = _pruned(MODELS[name], True, monkeypatch, **options)
    without = _pruned(MODELS[name], False, monkeypatch, **options)
    expected = without.state_dict()
    got = with_projection.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape and torch.equal(got[key], value), key
    assert sum(p.numel() for p in with_projection.parameters()) < 0.8 * sum(
        p.numel() for p in MODELS[name]()[0].parameters())


def test_a_step_walks_no_group_a_second_time_when_every_walk_is_pointwise(monkeypatch):
    model, x = MODELS["resnet18"]()
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    walks = []
    original = tp.DependencyGraph._walk
    monkeypatch.setattr(tp.DependencyGraph, "_walk", lambda self, *args: walks.append(args[0].name) or original(self, *args))
    pruner.step()
    assert walks == []
    assert model.conv1.out_channels == 32
