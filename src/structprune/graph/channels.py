"""Channel sets on tensor values and the two ways they move between tensors.

A channel state is (dims, idxs, roots): ``dims`` are ascending tensor dimensions, ``idxs`` are flat
row-major positions over those dimensions, ``roots`` the root index each position came from.
Data-movement ops are described by an element correspondence (which source element each target element
reads); arithmetic ops by letters (einsum-style names per dimension). Both are pure functions, tested
on their own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blocks import parts_of, ravel, reduced, reduced_with_siblings, unravel
from .pointwise import not_pointwise, undecided


@dataclass
class ChannelState:
    dims: tuple[int, ...]
    idxs: torch.Tensor
    roots: torch.Tensor

    def __post_init__(self):
        idxs = self.idxs
        if idxs.numel() > 1 and not bool((idxs[1:] > idxs[:-1]).all()):
            order = torch.argsort(idxs)
            self.idxs, self.roots = idxs[order], self.roots[order]


def channel_labels(shape: tuple[int, ...], dims: tuple[int, ...]) -> torch.Tensor:
    """Tensor of ``shape`` whose value is each element's flat channel index over ``dims``."""
    label = torch.zeros((), dtype=torch.long)
    for dim in dims:
        view = [1] * len(shape)
        view[dim] = shape[dim]
        label = label * shape[dim] + torch.arange(shape[dim]).view(view)
    return torch.broadcast_to(label, shape)


def varying_dims(label: torch.Tensor, defined: torch.Tensor | None = None) -> tuple[int, ...]:
    """Dims along which ``label`` changes, looking only at ``defined`` elements (label >= 0 by default)."""
    defined = label >= 0 if defined is None else defined
    dims = []
    for dim in range(label.dim()):
        if label.shape[dim] < 2:
            continue
        top = torch.where(defined, label, torch.iinfo(torch.long).min).amax(dim=dim, keepdim=True)
        if bool((defined & (label != top)).any()):
            dims.append(dim)
    return tuple(dims)


def reduce_to(tensor: torch.Tensor, dims: tuple[int, ...], how: str = "amax") -> torch.Tensor:
    """Reduce every dim not in ``dims`` and flatten the rest (row-major)."""
    others = tuple(d for d in range(tensor.dim()) if d not in dims)
    if others:
        tensor = getattr(tensor, how)(dim=others)
    return tensor.reshape(-1)


def dense_tables(state: ChannelState, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Membership and root lookups by channel index: one gather each, instead of a sort or a search."""
    member = torch.zeros(total, dtype=torch.bool)
    member[state.idxs] = True
    roots = torch.zeros(total, dtype=torch.long)
    roots[state.idxs] = state.roots
    return member, roots


def squeeze_state(state: ChannelState, shape) -> ChannelState:
    """Drop the dims a removal does not depend on: channel ``c`` at every spatial position is channel ``c``.

    Walking back through a space-to-depth reshape (Swin's patch merging, pixel unshuffle) labels each
    element by (row parity, column parity, channel), so the state comes back spread over the spatial
    dims although every position of a removed channel goes; layers and reshape checks need the plain
    channel dim. A dim stays when membership or root differs along it, and one-wide dims always stay
    (they carry a one-channel slice).
    """
    if len(state.dims) < 2:
        return state
    sizes = [shape[d] for d in state.dims]
    total = _channel_count(shape, state.dims)
    member = torch.zeros(total, dtype=torch.bool)
    member[state.idxs] = True
    roots = torch.full((total,), -1, dtype=torch.long)
    roots[state.idxs] = state.roots
    member, roots = member.view(sizes), roots.view(sizes)
    if undecided():
        same = [(member == member.narrow(axis, 0, 1)) & (roots == roots.narrow(axis, 0, 1)) if size > 1 else None
                for axis, size in enumerate(sizes)]
        drop = [axis for axis, size in enumerate(sizes) if size > 1 and bool(same[axis].all())]
        if len(drop) < len(sizes) and _has_uniform_line(member, same, drop):
            not_pointwise("the dims a state keeps depend on which channels it holds")
    else:
        drop = [axis for axis, size in enumerate(sizes) if size > 1
                and bool((member == member.narrow(axis, 0, 1)).all())
                and bool((roots == roots.narrow(axis, 0, 1)).all())]
    if not drop or len(drop) == len(sizes):
        return state
    for axis in reversed(drop):
        member, roots = member.select(axis, 0), roots.select(axis, 0)
    positions = torch.nonzero(member.reshape(-1)).reshape(-1)
    dims = tuple(d for axis, d in enumerate(state.dims) if axis not in drop)
    return ChannelState(dims, positions, roots.reshape(-1)[positions])


def _has_uniform_line(member: torch.Tensor, same: list, drop: list) -> bool:
    """Whether an axis the state keeps has a line of members that all came from one root: some of the
    root's channels would then hold only such lines and lose that axis, which the full state keeps
    (graph/pointwise.py). Axes dropped here are uniform on every line, for any of the root's channels."""
    for axis, along in enumerate(same):
        if along is not None and axis not in drop and bool((member.all(dim=axis) & along.all(dim=axis)).any()):
            return True
    return False


def _channel_count(shape, dims) -> int:
    count = 1
    for dim in dims:
        count *= shape[dim]
    return count


def forward_through(correspondence: torch.Tensor, source_shape, state: ChannelState) -> ChannelState | None:
    """Source -> target, where ``correspondence[e]`` is the flat source element target element e reads (-1: none)."""
    if correspondence.numel() == 0:
        return None  # an empty slice (Phi-3's q[..., rotary_dim:] when rotary covers the whole head)
    small = _reduced_forward(correspondence, source_shape, state)
    if small is not None:
        corr, shape, dims, sources = small
        mapped = forward_through(corr, shape, _sorted_state(tuple(sources.index(d) for d in state.dims),
                                                            state.idxs, state.roots))
        # renaming ascending dims to ascending dims keeps every flat index: the state stays sorted
        return None if mapped is None else _sorted_state(tuple(dims[d] for d in mapped.dims), mapped.idxs,
                                                         mapped.roots)
    renumbered = _plan(correspondence, ("affine", tuple(source_shape), state.dims), _affine_plan, source_shape,
                       state.dims, True)
    if renumbered is not None:
        return _renumbered(renumbered, state)
    return _forward_general(correspondence, source_shape, state)


def _reduced_forward(correspondence, source_shape, state):
    """The problem on the parts of the op that move the state's dims (blocks.py), when that is smaller."""
    if any(source_shape[d] < 2 for d in state.dims):
        return None  # a one-wide dim stays on the state by position: left to the full-size plans
    if len(correspondence.shape) == len(source_shape) and any(correspondence.shape[d] == 1 for d in state.dims):
        return None
    parts = parts_of(correspondence, source_shape)
    return None if parts is None else reduced(parts, source_dims=state.dims)


def _reduced_backward(correspondence, source_shape, state, siblings):
    if any(correspondence.shape[d] < 2 for d in state.dims):
        return None
    parts = parts_of(correspondence, source_shape)
    if parts is None:
        return None
    if siblings:
        return reduced_with_siblings(parts, [parts_of(other, source_shape) for other in siblings], state.dims)
    small = reduced(parts, target_dims=state.dims)
    return None if small is None else (small, None)


def _forward_general(correspondence: torch.Tensor, source_shape, state: ChannelState) -> ChannelState | None:
    dims, table = _plan(correspondence, ("forward", tuple(source_shape), state.dims), _forward_plan, source_shape,
                        state.dims)
    member, root_table = dense_tables(state, _channel_count(tuple(source_shape), state.dims))
    hit = (table >= 0) & member[table.clamp(min=0)]
    positions = torch.nonzero(hit).reshape(-1)
    if len(positions) == 0:
        return None
    return ChannelState(dims, positions, root_table[table[positions]])


def _affine_plan(correspondence, source_shape, dims: tuple[int, ...], forward: bool, siblings=None):
    """(dims, table) when the channels on ``dims`` reach the other side as a plain renumbering, else None.

    Window partitions, rolls, permutes, head splits and merges, slices and unbinds move elements without
    mixing channels: the channel an element carries is then an affine function of its coordinates on the
    other side (mixed radix: each dim a digit, plus an offset for a slice), and a state passes by renaming
    its dims and renumbering its flat positions, with no element-level plan (a pass over every element of
    a large feature map per op). ``dims`` are the source's going forward and the target's going backward;
    ``table`` maps a flat channel over ``dims`` to its flat position over the returned dims (-1: the
    channel does not reach that side). None for anything else (a padding, channels mixed or repeated):
    the general plan decides those, and tests check that both agree wherever this one answers.
    """
    target_shape, source_shape = tuple(correspondence.shape), tuple(source_shape)
    known = source_shape if forward else target_shape
    if math.prod(source_shape) == 0:
        return None  # an empty input (a cache with no past tokens): the general plan says what it reads
    if any(known[d] < 2 for d in dims):
        return None  # a one-wide dim stays on the state for what it carries; left to the general plan
    total = _channel_count(known, dims)
    flat = correspondence.reshape(-1)
    if forward:
        if not bool((flat >= 0).all()):
            return None
        label = channel_labels(source_shape, dims).reshape(-1).index_select(0, flat).view(target_shape)
        found = _mixed_radix(label, total)
        if found is None:
            return None
        steps, offset, count = found
        out_dims = set(steps)
        if len(target_shape) == len(source_shape):
            # as the general plan: a one-wide dim of the state's stays on it (it is the channel's slice)
            out_dims |= {d for d in dims if target_shape[d] == 1}
        out_dims = tuple(sorted(out_dims))
        table = torch.full((total,), -1, dtype=torch.long)
        table[offset:offset + count] = _ravel_digits(torch.arange(count), steps, target_shape, target_shape, {},
                                                     out_dims)
        return _ordered(out_dims, table)
    return _affine_backward(flat, source_shape, target_shape, dims, total, siblings)


def _affine_backward(flat, source_shape, target_shape, dims, total, siblings):
    # boolean masks and advanced indexing cost several times index_copy_/index_select on feature-map sized tensors
    readers, read_label = _valid(flat), channel_labels(target_shape, dims).reshape(-1)
    if len(readers) != len(flat):
        read_label = read_label[flat >= 0]
    label = torch.full((math.prod(source_shape),), UNREAD, dtype=torch.long)
    label.index_copy_(0, readers, read_label)
    if not bool(torch.equal(label.index_select(0, readers), read_label)):
        return None  # an element read through two channels (a broadcast along the channel dim)
    if siblings:
        others = torch.cat([_valid(sibling.reshape(-1)) for sibling in siblings])
        if bool((label.index_select(0, others) >= 0).any()):
            return None  # an element read by this output and a sibling: left to the general plan
        label.index_copy_(0, others, torch.full_like(others, READ_BY_SIBLING))
    label = label.view(source_shape)
    own = label >= 0
    slab = None
    if not bool(own.all()):
        slab = _slab(own)
        if slab is None:
            return None
        axis, low, high = slab
        outside = torch.cat([label.narrow(axis, 0, low), label.narrow(axis, high, source_shape[axis] - high)], axis)
        rest = int(outside.reshape(-1)[0])
        if not bool((outside == rest).all()) or (rest == READ_BY_SIBLING) != bool(siblings):
            return None  # unread and sibling-read mixed outside the slab
        label = label.narrow(axis, low, high - low)
    found = _mixed_radix(label, total)
    if found is None or found[1] != 0 or found[2] != total:
        return None
    steps, offsets = found[0], {}
    out_dims = set(steps)
    if slab is not None:
        axis, low, high = slab
        offsets[axis] = low
        if siblings and axis not in steps:
            if high - low != 1:
                return None  # one channel at several positions of the slab: the general plan says which
            out_dims.add(axis)
    table = _ravel_digits(torch.arange(total), steps, tuple(label.shape), source_shape, offsets,
                          tuple(sorted(out_dims)))
    return _ordered(tuple(sorted(out_dims)), table)


def _valid(flat: torch.Tensor) -> torch.Tensor:
    return flat if bool((flat >= 0).all()) else flat[flat >= 0]


def _slab(mask: torch.Tensor):
    """(axis, low, high) when ``mask`` holds exactly the positions low..high-1 along one axis, else None."""
    axes = [d for d in range(mask.dim()) if mask.shape[d] > 1 and not bool((mask == mask.narrow(d, 0, 1)).all())]
    if len(axes) != 1:
        return None
    axis = axes[0]
    line = mask
    for d in reversed(range(mask.dim())):
        if d != axis:
            line = line.select(d, 0)
    where = torch.nonzero(line).reshape(-1)
    if len(where) == 0 or int(where[-1]) - int(where[0]) + 1 != len(where):
        return None
    return axis, int(where[0]), int(where[-1]) + 1


def _mixed_radix(label: torch.Tensor, total: int):
    """({dim: step}, offset, count) when ``label`` is ``offset + sum(coord[d] * step[d])`` over its grid and
    the digits cover ``count`` consecutive channels once, inside 0..total-1; else None."""
    shape = tuple(label.shape)
    flat = label.reshape(-1)
    if flat.numel() == 0:
        return None  # an empty tensor (a cache with no past tokens) carries no channel
    offset = int(flat[0])
    if offset < 0:
        return None
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    steps = {d: int(flat[strides[d]]) - offset for d in range(len(shape)) if shape[d] > 1}
    steps = {d: step for d, step in steps.items() if step != 0}
    count = 1
    for step, d in sorted((step, d) for d, step in steps.items()):
        if step != count:
            return None
        count *= shape[d]
    if not steps or offset + count > total:
        return None
    predicted = torch.full((), offset, dtype=torch.long)
    for d, step in steps.items():
        view = [1] * len(shape)
        view[d] = shape[d]
        predicted = predicted + (torch.arange(shape[d]) * step).view(view)
    if not bool((label == predicted).all()):
        return None
    return steps, offset, count


def _ravel_digits(channel, steps, digit_shape, shape, offsets, dims=None):
    """Flat position over ``dims`` of ``shape`` (default: the digit dims) of each channel, given its
    digits over ``digit_shape`` (a slab of ``shape`` starting at ``offsets``)."""
    position = torch.zeros_like(channel)
    for d in dims if dims is not None else sorted(steps):
        digit = (channel // steps[d]) % digit_shape[d] if d in steps else torch.zeros_like(channel)
        position = position * shape[d] + digit + offsets.get(d, 0)
    return position


def _plan(correspondence: torch.Tensor, key: tuple, build, *args):
    """What a correspondence does to channels on given dims, worked out once per correspondence.

    A correspondence has one element per target element (tokens x channels), but what it does to the
    channels of a state depends only on the state's dims, not on which channels it holds; every group
    that crosses the op reuses the plan, so a visit costs a lookup over channels, not over elements.
    The plans live on the correspondence tensor, so they go when it does.
    """
    plans = correspondence.__dict__.setdefault("_structprune_plans", {})
    if key not in plans:
        plans[key] = build(correspondence, *args)
    return plans[key]


def _forward_plan(correspondence, source_shape, state_dims):
    """(target dims, table): the flat source channel each target channel position reads (-1: none)."""
    source_channel = channel_labels(tuple(source_shape), state_dims).reshape(-1)
    label = torch.where(correspondence >= 0, source_channel[correspondence.clamp(min=0)], -1)
    dims = varying_dims(label)
    if label.dim() == len(source_shape) and bool((label >= 0).any()):
        # a slice one channel wide: nothing varies along it, but the channel still sits on the state's dim
        dims = tuple(sorted(set(dims) | {d for d in state_dims if label.shape[d] == 1}))
    return dims, reduce_to(label, dims)


def _ordered(dims, table):
    """A renumbering plan, with whether it keeps channel order (then states it maps stay sorted)."""
    reached = table[table >= 0]
    return dims, table, bool((reached[1:] > reached[:-1]).all())


def _renumbered(plan, state: ChannelState) -> ChannelState | None:
    dims, table, in_order = plan
    positions = table[state.idxs]
    reached = positions >= 0
    if not bool(reached.any()):
        return None
    make = _sorted_state if in_order else ChannelState
    if bool(reached.all()):
        return make(dims, positions, state.roots)
    return make(dims, positions[reached], state.roots[reached])


def _sorted_state(dims, idxs, roots) -> ChannelState:
    """A ChannelState from indices already ascending (skips the check of every construction)."""
    state = object.__new__(ChannelState)
    state.dims, state.idxs, state.roots = dims, idxs, roots
    return state


def backward_through(correspondence: torch.Tensor, source_shape, state: ChannelState,
                     siblings: list[torch.Tensor] | None = None) -> ChannelState | None:
    """Target -> source: a source element is removed when every target element reading it is removed.

    Source elements nobody reads are free to go; those read only by ``siblings`` (other outputs of the
    same op, e.g. the q and k of an unbind) stay, so the state keeps the dim that tells them apart.
    """
    if correspondence.numel() == 0 or math.prod(source_shape) == 0:
        return None  # nothing reads the source through an empty tensor, and an empty source has nothing to lose
    small = _reduced_backward(correspondence, source_shape, state, siblings)
    if small is not None:
        (corr, shape, dims, sources), small_siblings = small
        mapped = backward_through(corr, shape, _sorted_state(tuple(dims.index(d) for d in state.dims),
                                                             state.idxs, state.roots), small_siblings)
        return None if mapped is None else _sorted_state(tuple(sources[d] for d in mapped.dims), mapped.idxs,
                                                         mapped.roots)
    sibling_ids = tuple(id(sibling) for sibling in siblings or ())
    renumbered = _plan(correspondence, ("affine-back", tuple(source_shape), state.dims, sibling_ids), _affine_plan,
                       source_shape, state.dims, False, siblings)
    if renumbered is not None:
        return _renumbered(renumbered, state)
    return _backward_general(correspondence, source_shape, state, siblings)


def _backward_general(correspondence: torch.Tensor, source_shape, state: ChannelState,
                      siblings: list[torch.Tensor] | None = None) -> ChannelState | None:
    key = ("backward", tuple(source_shape), state.dims, tuple(id(sibling) for sibling in siblings or ()))
    plan = _plan(correspondence, key, _backward_plan, source_shape, state.dims, siblings)
    classes, class_of_pair, channel_of_pair, static_dims, n_classes, pointwise = plan
    if not pointwise:
        not_pointwise("a source element goes only when every channel reading it goes")
    member, root_table = dense_tables(state, _channel_count(tuple(correspondence.shape), state.dims))
    # a class (the set of target channels reading an element) goes when every channel in it goes
    kept_pair = ~member[channel_of_pair]
    class_gone = torch.ones(n_classes, dtype=torch.bool)
    class_gone[class_of_pair[kept_pair]] = False
    big = torch.iinfo(torch.long).max
    class_root = torch.full((n_classes,), big, dtype=torch.long).scatter_reduce_(
        0, class_of_pair, root_table[channel_of_pair], "amin")
    is_read = classes >= 0
    determined = classes != UNREAD
    element_gone = is_read & class_gone[classes.clamp(min=0)]
    dims = tuple(sorted(set(static_dims) | set(varying_dims(element_gone.long(), determined))))
    if not dims:
        return None
    # a source position goes when something reads its slice and every determined element of it goes
    all_gone = torch.where(determined, element_gone, True)
    removed_source = reduce_to(all_gone, dims, "all") & reduce_to(is_read, dims, "any")
    positions = torch.nonzero(removed_source).reshape(-1)
    if len(positions) == 0:
        return None
    roots = torch.where(element_gone, class_root[classes.clamp(min=0)], big)
    return ChannelState(dims, positions, reduce_to(roots, dims, "amin")[positions])


#: class of a source element nobody reads; READ_BY_SIBLING: read only by another output of the same op
UNREAD, READ_BY_SIBLING = -1, -2


def _backward_plan(correspondence, source_shape, state_dims, siblings):
    """The element-level facts of a backward map that do not depend on which channels are removed.

    Each source element belongs to a class: the exact set of target channels (over ``state_dims``)
    that read it, or UNREAD / READ_BY_SIBLING. Every per-element quantity of the map is a function of
    the class, so dims along which the class never changes are collapsed to one position (all, any and
    amin over copies of one value give that value): a token dim costs nothing per visit. Returns
    (class grid, class of each (class, channel) pair, channel of each pair, dims that vary regardless of
    the removal, class count, whether the map is pointwise: every source position over those dims read
    through one channel, so it goes exactly when that channel goes, and its dims never depend on which).
    """
    shape = tuple(source_shape)
    numel = _channel_count(shape, tuple(range(len(shape))))
    flat = correspondence.reshape(-1)
    valid = flat >= 0
    readers = flat[valid]
    channels = channel_labels(tuple(correspondence.shape), state_dims).reshape(-1)[valid]
    n_channels = _channel_count(tuple(correspondence.shape), state_dims)
    low = torch.full((numel,), n_channels + 1, dtype=torch.long).scatter_reduce_(0, readers, channels, "amin")
    high = torch.full((numel,), -1, dtype=torch.long).scatter_reduce_(0, readers, channels, "amax")
    classes = torch.full((numel,), UNREAD, dtype=torch.long)
    for sibling in siblings or ():
        others = sibling.reshape(-1)
        classes[others[others >= 0]] = READ_BY_SIBLING
    read = high >= 0
    one_reader = bool((low[read] == high[read]).all())
    if one_reader:
        # each element read through one channel (reshapes, permutes, broadcasts): the channel is the class
        classes[read] = low[read]
        present = torch.unique(low[read])
        class_of_pair, channel_of_pair, n_classes = present, present, n_channels
    else:
        pairs = torch.unique(readers * n_channels + channels)  # distinct (source element, target channel), sorted
        elements, pair_channels = pairs // n_channels, pairs % n_channels
        counts = torch.zeros(numel, dtype=torch.long).index_add_(0, elements, torch.ones_like(elements))
        rank = torch.arange(len(pairs)) - (torch.cumsum(counts, 0) - counts)[elements]
        rows = torch.full((numel, int(counts.max())), -1, dtype=torch.long)
        rows[elements, rank] = pair_channels
        read_elements = torch.nonzero(counts).reshape(-1)
        unique_rows, inverse = torch.unique(rows[read_elements], dim=0, return_inverse=True)
        classes[read_elements] = inverse
        filled = unique_rows >= 0
        class_of_pair = torch.arange(len(unique_rows))[:, None].expand_as(unique_rows)[filled]
        channel_of_pair, n_classes = unique_rows[filled], len(unique_rows)
    classes = classes.view(shape)
    for dim in range(len(shape)):
        if shape[dim] > 1 and bool((classes == classes.narrow(dim, 0, 1)).all()):
            classes = classes.narrow(dim, 0, 1)
    classes = classes.contiguous()
    # the lowest and highest channel reading an element are functions of its class too
    is_read = classes >= 0
    class_low = torch.full((n_classes,), n_channels + 1, dtype=torch.long).scatter_reduce_(
        0, class_of_pair, channel_of_pair, "amin")
    class_high = torch.full((n_classes,), -1, dtype=torch.long).scatter_reduce_(
        0, class_of_pair, channel_of_pair, "amax")
    low, high = class_low[classes.clamp(min=0)], class_high[classes.clamp(min=0)]
    static_dims = tuple(sorted(set(varying_dims(low, is_read)) | set(varying_dims(high, is_read))))
    pointwise = one_reader and not siblings and bool(static_dims) and _one_channel_per_position(low, is_read, static_dims)
    return classes, class_of_pair, channel_of_pair, static_dims, n_classes, pointwise


def _one_channel_per_position(channel: torch.Tensor, is_read: torch.Tensor, dims) -> bool:
    """Whether the elements read at each position over ``dims`` are all read through one channel (varying_dims
    looks along one dim at a time, so two channels on a diagonal of unread elements would pass it)."""
    big = torch.iinfo(torch.long).max
    low = reduce_to(torch.where(is_read, channel, big), dims, "amin")
    high = reduce_to(torch.where(is_read, channel, -1), dims, "amax")
    return bool(((low == high) | ~reduce_to(is_read, dims, "any")).all())


def through_letters(state: ChannelState, source_letters, source_shape, target_letters, target_shape):
    """Map channels between operands that name their dims with letters (einsum, matmul, reductions).

    A letter missing from the target (contracted, reduced, broadcast) is projected away: a coarser channel
    is removed only when every finer channel under it is.
    """
    state_letters = [source_letters[d] for d in state.dims]
    sizes = [source_shape[d] for d in state.dims]
    if len(state.dims) == 1:
        # one dim: the channel either keeps its letter (same indices) or is projected away entirely
        letter = state_letters[0]
        if letter in target_letters:
            target_dim = target_letters.index(letter)
            if target_shape[target_dim] == sizes[0]:
                return ChannelState((target_dim,), state.idxs, state.roots)
        return None
    kept = []
    for position, letter in enumerate(state_letters):
        if letter in target_letters:
            target_dim = target_letters.index(letter)
            if target_shape[target_dim] == sizes[position]:
                kept.append((target_dim, position))
    if not kept:
        return None
    kept.sort()
    coords = unravel(state.idxs, sizes)
    kept_positions = [p for _, p in kept]
    kept_sizes = [sizes[p] for p in kept_positions]
    coarse = ravel(coords[:, kept_positions], kept_sizes)
    fiber = 1
    for position, size in enumerate(sizes):
        if position not in kept_positions:
            fiber *= size
    if fiber > 1:
        not_pointwise("a coarse channel goes only when every finer channel under it goes")
    unique, inverse, counts = torch.unique(coarse, return_inverse=True, return_counts=True)
    complete = counts == fiber
    if not bool(complete.any()):
        return None
    big = torch.iinfo(torch.long).max
    roots = torch.full((len(unique),), big, dtype=torch.long).scatter_reduce_(0, inverse, state.roots, "amin")
    return ChannelState(tuple(d for d, _ in kept), unique[complete], roots[complete])
