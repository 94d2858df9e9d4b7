"""The cached channel plans of forward_through / backward_through against an element-by-element reference.

The plans collapse dims along which nothing about the map changes (tokens, batch) and are reused for
every state on the same dims; the reference below works on every element, as the maps did before
(issue 14), and both must give the same channel states on random ops, dims and removals.
"""
import random

import pytest
import torch

from structprune.graph import blocks
from structprune.graph.channels import (ChannelState, backward_through, channel_labels, dense_tables,
                                        forward_through, reduce_to, varying_dims)


def _count(shape, dims):
    count = 1
    for dim in dims:
        count *= shape[dim]
    return count


def reference_forward(correspondence, source_shape, state):
    source_channel = channel_labels(tuple(source_shape), state.dims).reshape(-1)
    label = torch.where(correspondence >= 0, source_channel[correspondence.clamp(min=0)], -1)
    dims = varying_dims(label)
    if label.dim() == len(source_shape) and bool((label >= 0).any()):
        dims = tuple(sorted(set(dims) | {d for d in state.dims if label.shape[d] == 1}))
    table = reduce_to(label, dims)
    member, root_table = dense_tables(state, _count(tuple(source_shape), state.dims))
    hit = (table >= 0) & member[table.clamp(min=0)]
    positions = torch.nonzero(hit).reshape(-1)
    if len(positions) == 0:
        return None
    return ChannelState(dims, positions, root_table[table[positions]])


def reference_backward(correspondence, source_shape, state, siblings=None):
    target_shape = tuple(correspondence.shape)
    shape = tuple(source_shape)
    numel = _count(shape, range(len(shape)))
    flat = correspondence.reshape(-1)
    valid = flat >= 0
    readers = flat[valid]
    target_channel = channel_labels(target_shape, state.dims).reshape(-1)[valid]
    member, root_table = dense_tables(state, _count(target_shape, state.dims))
    removed = member[target_channel]
    read = torch.zeros(numel, dtype=torch.long).index_add_(0, readers, torch.ones_like(readers))
    gone = torch.zeros(numel, dtype=torch.long).index_add_(0, readers, removed.long())
    low = torch.full((numel,), numel + 1, dtype=torch.long).scatter_reduce_(0, readers, target_channel, "amin")
    high = torch.full((numel,), -1, dtype=torch.long).scatter_reduce_(0, readers, target_channel, "amax")
    is_read = (read > 0).view(shape)
    determined = is_read.clone()
    for sibling in siblings or ():
        others = sibling.reshape(-1)
        determined.view(-1)[others[others >= 0]] = True
    element_gone = is_read & (gone == read).view(shape)
    dims = set(varying_dims(low.view(shape), is_read)) | set(varying_dims(high.view(shape), is_read))
    dims |= set(varying_dims(element_gone.long(), determined))
    dims = tuple(sorted(dims))
    all_gone = torch.where(determined, element_gone, True)
    if not dims:
        return None
    removed_source = reduce_to(all_gone, dims, "all") & reduce_to(is_read, dims, "any")
    positions = torch.nonzero(removed_source).reshape(-1)
    if len(positions) == 0:
        return None
    big = torch.iinfo(torch.long).max
    roots = torch.full((numel,), big, dtype=torch.long).scatter_reduce_(
        0, readers[removed], root_table[target_channel[removed]], "amin")
    return ChannelState(dims, positions, reduce_to(roots.view(shape), dims, "amin")[positions])


def _ops(shape):
    """(name, function on a label tensor of ``shape``, outputs) for movement ops valid on ``shape``."""
    b, n, c = shape
    return [
        ("reshape heads", lambda t: [t.reshape(b, n, 2, c // 2)]),
        ("reshape fused qkv", lambda t: [t.reshape(b, n, 3, c // 6, 2).permute(2, 0, 3, 1, 4)]),
        ("unbind qkv", lambda t: list(t.reshape(b, n, 3, c // 3).unbind(2))),
        ("unbind heads", lambda t: list(t.reshape(b, n, 3, 2, c // 6).transpose(1, 3).unbind(2))),

        ("split", lambda t: list(t.split([c // 3, c - c // 3], dim=2))),
        ("transpose", lambda t: [t.transpose(1, 2)]),
        ("expand", lambda t: [t[:, :, None].expand(b, n, 2, c)]),
        ("repeat", lambda t: [t.repeat(1, 1, 2)]),
        ("repeat_interleave", lambda t: [t.repeat_interleave(2, dim=2)]),
        ("duplicate gather", lambda t: [t[:, :, torch.tensor([0, 1, 1, 2, 5, 5, 5, 0])]]),
        ("slice", lambda t: [t[:, :, 2:]]),
        ("flip", lambda t: [t.flip(2)]),
        ("token mix", lambda t: [t.flatten(1).view(b, c, n)]),
        ("first token", lambda t: [t[:, 0]]),
    ] + ([("token split", lambda t: list(torch.tensor_split(t, (1,), dim=1)))] if n > 1 else [])


def _random_state(rng, shape, dims):
    total = _count(shape, dims)
    size = rng.randint(1, total)
    idxs = torch.tensor(sorted(rng.sample(range(total), size)))
    roots = torch.tensor([rng.randint(0, 40) for _ in range(size)])
    return ChannelState(dims, idxs, roots)


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.dims == b.dims and torch.equal(a.idxs, b.idxs) and torch.equal(a.roots, b.roots)


def _spatial_ops(shape):
    """Movement ops of windowed attention on a (b, h, w, c) map: Swin's rolls, window partitions and
    patch merging, which the renumbering path (no element-level plan) must map exactly as the reference."""
    b, h, w, c = shape
    return [
        ("roll", lambda t: [t.roll((1, 1), (1, 2))]),
        ("window partition", lambda t: [t.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)]),
        ("patch merging", lambda t: [t.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)]),
        ("token narrow", lambda t: [t.narrow(1, 1, h - 1)]),
        ("channel chunks", lambda t: list(t.chunk(3, dim=3))),
        ("strided channels", lambda t: [t[..., ::2]]),
        ("pad", lambda t: [torch.nn.functional.pad(t, (0, 0, 1, 1), value=-1)]),
    ]


def _compare(rng, shape, op_list):
    numel = _count(shape, range(len(shape)))
    labels = torch.arange(numel).view(shape)
    compared = 0
    for name, op in op_list:
        outputs = op(labels)
        blocks.mark_views(outputs, labels, name)
        # views stay views (the parts path trusts them as affine); copies are made contiguous as a replay's are
        outputs = [out if "_structprune_view_of_labels" in out.__dict__ else out.contiguous() for out in outputs]
        for index, out in enumerate(outputs):
            siblings = [other for k, other in enumerate(outputs) if k != index]
            for _ in range(4):
                dims = tuple(sorted(rng.sample(range(len(shape)), rng.randint(1, 2))))
                state = _random_state(rng, shape, dims)
                assert _same(forward_through(out, shape, state), reference_forward(out, shape, state))
                out_dims = tuple(sorted(rng.sample(range(out.dim()), rng.randint(1, min(2, out.dim())))))
                back = _random_state(rng, tuple(out.shape), out_dims)
                for sibs in (siblings, None):
                    assert _same(backward_through(out, shape, back, sibs), reference_backward(out, shape, back, sibs))
                    compared += 1
    return compared


@pytest.fixture(params=["full", "parts"])
def plan_size(request, monkeypatch):
    """Every comparison runs twice: at full size, and with every correspondence split into its independent
    parts (blocks.py, which otherwise waits for maps large enough to be worth it)."""
    if request.param == "parts":
        monkeypatch.setattr(blocks, "_WORTH", 0)
    return request.param


@pytest.mark.parametrize("seed", range(8))
def test_plans_match_the_element_reference(seed, plan_size):
    rng = random.Random(seed)
    shape = (rng.choice([1, 2]), rng.choice([1, 3, 4]), 12)
    assert _compare(rng, shape, _ops(shape)) > 50
    spatial = (rng.choice([1, 2]), 4, 4, rng.choice([6, 12]))
    assert _compare(rng, spatial, _spatial_ops(spatial)) > 30


def test_an_empty_input_of_a_concat_maps_like_the_reference():
    """A cache with no past tokens is cat'ed with the new keys: the empty input reads nothing."""
    past, new = torch.arange(0).view(1, 0, 4), torch.arange(8).view(1, 2, 4)
    out = torch.cat([torch.full_like(past, -1), new], dim=1)
    state = ChannelState((2,), torch.tensor([1, 3]), torch.tensor([4, 5]))
    assert backward_through(out, (1, 0, 4), state) is None
    assert _same(backward_through(out, (1, 2, 4), state), reference_backward(out, (1, 2, 4), state))
    assert backward_through(out, (1, 2, 4), state).idxs.tolist() == [1, 3]


def _renumbered(correspondence):
    return [plan for key, plan in correspondence.__dict__.get("_structprune_plans", {}).items()
            if key[0].startswith("affine")]


@pytest.mark.parametrize("name", ["roll", "window partition", "token narrow", "channel chunks"])
def test_window_ops_are_renumbered_without_an_element_plan(name):
    """The renumbering path answers for Swin's movement ops (the speed of issue 14 rests on it), and its
    answer is the reference's, forward and back, siblings included."""
    shape = (1, 4, 4, 12)
    labels = torch.arange(_count(shape, range(4))).view(shape)
    op = dict(_spatial_ops(shape))[name]
    outputs = [out.contiguous() for out in op(labels)]
    out = outputs[0]
    channel = ChannelState((3,), torch.tensor([1, 2, 7]), torch.tensor([5, 6, 7]))
    assert _same(forward_through(out, shape, channel), reference_forward(out, shape, channel))
    back = ChannelState((out.dim() - 1,), torch.tensor([0, 3]), torch.tensor([1, 2]))
    assert _same(backward_through(out, shape, back, outputs[1:]), reference_backward(out, shape, back, outputs[1:]))
    plans = _renumbered(out)
    assert len(plans) == 2 and all(plan is not None for plan in plans)
    assert not [key for key in out.__dict__["_structprune_plans"] if key[0] in ("forward", "backward")]


def test_a_plan_is_reused_for_other_channels_on_the_same_dims():
    labels = torch.arange(2 * 5 * 6).view(2, 5, 6)
    out = labels.reshape(2, 5, 3, 2).contiguous()
    first = backward_through(out, (2, 5, 6), ChannelState((2, 3), torch.tensor([0, 1]), torch.tensor([0, 1])))
    second = backward_through(out, (2, 5, 6), ChannelState((2, 3), torch.tensor([4, 5]), torch.tensor([7, 8])))
    assert first.dims == second.dims == (2,)
    assert first.idxs.tolist() == [0, 1] and second.idxs.tolist() == [4, 5] and second.roots.tolist() == [7, 8]
    plans = [key for key in out.__dict__["_structprune_plans"] if key[0] != "parts"]
    assert len(plans) == 1  # one plan per (dims, shapes), not per removal


def test_renumbering_stays_quiet_under_deterministic_algorithms():
    """Ultralytics' trainer turns on torch.use_deterministic_algorithms(warn_only=True) for the whole
    process; the maps must not warn then (the pruners' warnings are the user's signal)."""
    import warnings

    shape = (1, 4, 4, 12)
    labels = torch.arange(_count(shape, range(4))).view(shape)
    outputs = [out.contiguous() for out in labels.chunk(3, dim=3)]
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            back = ChannelState((3,), torch.tensor([0, 3]), torch.tensor([1, 2]))
            mapped = backward_through(outputs[1], shape, back, [outputs[0], outputs[2]])
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    assert mapped.dims == (3,) and mapped.idxs.tolist() == [4, 7]


def test_views_of_the_labels_are_trusted_as_affine_and_writes_are_not():
    """A replay's output that is a view of its labels skips the parts' check over every element; a copy
    (roll) or an op that writes into the labels (x[i] = y) does not."""
    labels = torch.arange(24).view(2, 3, 4)
    view, copy = labels.permute(2, 0, 1), labels.roll(1, 0)
    blocks.mark_views([view, copy], labels, "permute")
    assert "_structprune_view_of_labels" in view.__dict__ and "_structprune_view_of_labels" not in copy.__dict__
    written = labels.view(2, 3, 4)
    blocks.mark_views([written], labels, "__setitem__")
    assert "_structprune_view_of_labels" not in written.__dict__
    from structprune.graph import ops
    from structprune.graph.trace import Call

    call = Call("function", torch.Tensor.permute, "permute", [0], [(2, 3, 4)], [1], [(4, 2, 3)], (None, 2, 0, 1), {},
                [0], [torch.float32], [torch.float32])
    (replayed,) = ops._replay_labels(call, 0)
    assert "_structprune_view_of_labels" in replayed.__dict__
    assert torch.equal(replayed, labels.permute(2, 0, 1))


def test_a_cut_along_other_dims_passes_the_channel_dim_through():
    """The size checks skip replaying a slice or split on pruned labels when it cuts along other dims only;
    one that cuts the channel dim itself (or takes one position of it) is still replayed."""
    shape = (2, 5, 6)
    labels = torch.arange(60).view(shape)
    tokens = labels[:, 1:]
    assert blocks.passes_through(tokens, shape, 2) and not blocks.passes_through(tokens, shape, 1)
    for piece in labels.split([2, 4], dim=2):
        assert not blocks.passes_through(piece, shape, 2)
    assert not blocks.passes_through(labels[..., 3], shape, 2)
    assert not blocks.passes_through(labels.flip(2), shape, 2)  # every channel kept, but reordered


@pytest.mark.parametrize("index, dim, expected", [
    ((slice(None), slice(1, None)), 2, True), ((slice(None), slice(1, None)), 1, False),
    ((Ellipsis, 0), 1, True), ((Ellipsis, 0), 2, False), ((None, slice(None), 3), 0, True),
    ((0,), 0, False), (slice(None, None, 2), 0, False), ((Ellipsis, slice(None)), 2, True),
])
def test_an_index_of_slices_says_which_dims_it_cuts(index, dim, expected):
    """Read from the index itself, so a slice along the tokens needs no replay on a video's labels."""
    from structprune.graph.ops import _index_keeps_dim

    assert _index_keeps_dim(index, 3, dim) is expected
    labels = torch.arange(2 * 5 * 6).view(2, 5, 6)
    replayed = labels[index]
    if replayed.numel() >= 1 and expected:
        assert blocks.passes_through(replayed, (2, 5, 6), dim)


def test_an_index_with_tensors_is_left_to_the_replay():
    from structprune.graph.ops import _index_keeps_dim

    assert _index_keeps_dim((slice(None), torch.tensor([0, 2])), 3, 2) is None
    assert _index_keeps_dim((Ellipsis, Ellipsis), 3, 0) is None


@pytest.mark.parametrize("shape,out_shape", [((32,), (2, 64, 32)), ((64, 1), (2, 64, 32)), ((1, 64, 32), (3, 64, 32)),
                                             ((8, 1, 32), (8, 16, 32))])
def test_a_broadcast_map_left_as_a_view_maps_like_its_copy(shape, out_shape, plan_size):
    """The elementwise maps broadcast an operand without writing the broadcast out (a video model's
    feature map has millions of elements); trusted as affine, it must map as the materialised copy does."""
    from structprune.graph.ops import _broadcast_map

    view = _broadcast_map(shape, out_shape)
    assert "_structprune_view_of_labels" in view.__dict__ and view.stride() != view.contiguous().stride()
    rng = random.Random(len(shape))
    for _ in range(6):
        dims = tuple(sorted(rng.sample([d for d, size in enumerate(shape) if size > 1], 1)))
        state = _random_state(rng, shape, dims)
        assert _same(forward_through(view, shape, state), reference_forward(view.contiguous(), shape, state))


def test_replays_share_one_label_range_and_writes_get_their_own():
    """Replays of ops that write into no input label from views of one range (no fresh pages for each);
    an op that writes into its input (x[i] = y, add_) gets a range of its own, so the shared one stays
    a range for every later replay."""
    from structprune.graph import ops
    from structprune.graph.replays import shared_labels
    from structprune.graph.trace import Call

    first, second = shared_labels((4, 6)), shared_labels((3, 5))
    assert torch.equal(first, torch.arange(24).view(4, 6)) and torch.equal(second, torch.arange(15).view(3, 5))
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    larger = shared_labels((10, 10))  # grows past the held range: a new one, still a range
    assert torch.equal(larger, torch.arange(100).view(10, 10))

    permute = Call("function", torch.Tensor.permute, "permute", [0], [(4, 6)], [1], [(6, 4)], (None, 1, 0), {},
                   [0], [torch.float32], [torch.float32])
    (replayed,) = ops._replay_labels(permute, 0)
    assert replayed.untyped_storage().data_ptr() == larger.untyped_storage().data_ptr()
    fill = Call("function", torch.Tensor.fill_, "fill_", [0], [(4, 6)], [1], [(4, 6)], (None, 7), {},
                [0], [torch.float32], [torch.float32])
    (written,) = ops._replay_labels(fill, 0)
    assert bool((written == 7).all())
    assert written.untyped_storage().data_ptr() != larger.untyped_storage().data_ptr()
    assert torch.equal(shared_labels((10, 10)), torch.arange(100).view(10, 10))
