"""What each torch function does to channels.

Every recorded function call is classified once into a kind; each kind maps a channel state on one
operand to states on the others (inputs first, then outputs). Movement ops (cat, split, view, permute,
expand, indexing...) are replayed on integer labels, so their index maps are exact by construction.

A kind is registered on its index map with :func:`op_kind`, naming the ops it handles; a new op is one
more name there, a new kind one more decorated function.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from .channels import ChannelState, backward_through, forward_through, through_letters
from .refusal import Blocked, RefusalKind
from .pointwise import not_pointwise
from .blocks import mark_views, passes_through, writes_in_place
from .replays import Unshareable, replay_key, shared_labels, shared_replay
from .signatures import argument
from .sizes import FREE, has_followed, is_traced
from ..utils.nested import flatten_as_list
from .trace import OPAQUE, WRITE_VIEW, Call, rebuild

IndexMap = Callable[[Call, int, ChannelState], "list[tuple[int, ChannelState]]"]


@dataclass(frozen=True)
class OpKind:
    """What an op does to the channel axis, and the pure index map that says it exactly."""

    name: str
    #: the op names (function or method names as traced) of this kind; empty for a fallback kind
    op_names: frozenset
    index_map: IndexMap
    #: a narrower test than the name (grouped-query SDPA); kinds with one are tried first
    applies: Callable[[Call], bool] | None = None
    #: channels may vanish from every other operand (contractions, reductions) without a refusal
    contracts: bool = False


#: every registered kind, in registration order
OP_KINDS: list[OpKind] = []
_BY_OP_NAME: dict[str, list[OpKind]] = {}
_FALLBACKS: list[OpKind] = []


def op_kind(name: str, op_names=(), applies: Callable[[Call], bool] | None = None,
            contracts: bool = False) -> Callable[[IndexMap], IndexMap]:
    """Register the decorated index map as op kind ``name`` for ``op_names`` (none: a fallback, tried in
    registration order on ops no named kind claims, each with its ``applies`` test)."""

    def register(index_map: IndexMap) -> IndexMap:
        kind = OpKind(name, frozenset(op_names), index_map, applies, contracts)
        OP_KINDS.append(kind)
        if not kind.op_names:
            _FALLBACKS.append(kind)
        for op in kind.op_names:
            kinds = _BY_OP_NAME.setdefault(op, [])
            kinds.append(kind)
            kinds.sort(key=lambda k: k.applies is None)  # stable: conditional kinds first
        return index_map

    return register


def kind_of(call: Call) -> OpKind:
    """The kind of a recorded call, found once and cached on it."""
    kind = call.cache.get("kind")
    if kind is None:
        kind = _classify(call)
        call.cache["kind"] = kind
    return kind


def _classify(call: Call) -> OpKind:
    for kind in _BY_OP_NAME.get(call.name, []) + _FALLBACKS:
        if kind.applies is None or kind.applies(call):
            return kind
    raise LookupError(f"no op kind claims '{call.name}'")  # the last fallback applies to every call


def relate(call: Call, operand: int, state: ChannelState) -> list[tuple[int, ChannelState]]:
    """Channel states on every other operand of ``call`` implied by ``state`` on ``operand``."""
    return kind_of(call).index_map(call, operand, state)


# -- elementwise -----------------------------------------------------------------------------------
def _is_broadcast(call: Call) -> bool:
    if "broadcast" not in call.cache:
        call.cache["broadcast"] = _compute_is_broadcast(call)
    return call.cache["broadcast"]


def _compute_is_broadcast(call: Call) -> bool:
    try:
        shape = torch.broadcast_shapes(*call.in_shapes)
    except RuntimeError:
        return False
    return all(tuple(out) == tuple(shape) for out in call.out_shapes)


@op_kind("elementwise", applies=_is_broadcast)
def _elementwise(call, operand, state):
    shapes = call.in_shapes + call.out_shapes
    out_shape = tuple(call.out_shapes[0])
    n_in = len(call.in_shapes)
    if tuple(shapes[operand]) == out_shape:
        anchor = state
    else:
        anchor = forward_through(_broadcast_map(tuple(shapes[operand]), out_shape), shapes[operand], state)
        if anchor is None:
            return []
    results = []
    for other, shape in enumerate(shapes):
        if other == operand:
            continue
        if tuple(shape) == out_shape:
            results.append((other, anchor))
        elif other < n_in:
            # a broadcast operand (a norm's per-token statistic, a per-channel weight) keeps the letters
            # of the dims it shares with the output; the broadcast ones are projected away, which is what
            # the element correspondence gives (an element goes when all its readers go), without it
            out_letters = [f"d{d}" for d in range(len(out_shape))]
            mapped = through_letters(anchor, out_letters, out_shape, _broadcast_letters(tuple(shape), out_shape),
                                     tuple(shape))
            if mapped is not None:
                results.append((other, mapped))
    return results


def _broadcast_letters(shape, out_shape) -> list[str]:
    # a one-wide dim is broadcast-like even where the output is one wide too: it tells no channels apart
    offset = len(out_shape) - len(shape)
    return [f"d{d + offset}" if size == out_shape[d + offset] and size > 1 else f"broadcast{d}"
            for d, size in enumerate(shape)]


@lru_cache(maxsize=256)
def _broadcast_map(shape, out_shape):
    numel = 1
    for size in shape:
        numel *= size
    # left a view: element i reads sum(i * stride), an affine map whose parts (blocks.py) need no check
    # over every element, and a video model's feature map is never written out (millions of elements)
    mapped = torch.broadcast_to(torch.arange(numel).view(shape), out_shape)
    mapped.__dict__["_structprune_view_of_labels"] = True
    return mapped


# -- movement --------------------------------------------------------------------------------------
MOVEMENT = {
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "split", "split_with_sizes",
    "tensor_split", "chunk", "unbind", "narrow", "select", "__getitem__", "index_select", "view", "reshape",
    "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose", "transpose_", "t", "T", "mT",
    "movedim", "moveaxis", "swapaxes", "swapdims", "expand", "expand_as", "broadcast_to", "repeat",
    "repeat_interleave", "tile", "flip", "roll", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "native_channel_shuffle", "view_as", "reshape_as", "unfold", "gather", "take_along_dim", "squeeze_",
    "unsqueeze_", "contiguous", "clone", "as_strided",
}


@op_kind("movement", MOVEMENT)
def _movement(call, operand, state):
    return _movement_unchecked(call, operand, state)


@op_kind("pad", {"pad"})
def _pad(call, operand, state):
    """``F.pad``: dims it leaves alone keep their channels (by letters, as any same-size op); a padded
    channel dim (EfficientViT pads v with a constant channel and slices it off after the attention) is
    mapped element by element: the pad reads no channel, so the channels keep their places around it."""
    padded = _padded_dims(call)
    if padded is not None and not set(state.dims) & padded:
        return _lettered(call, operand, state, _same_size_letters(call))
    return _movement_unchecked(call, operand, state)


def _padded_dims(call) -> set | None:
    amounts = call.args[1] if len(call.args) > 1 else call.kwargs.get("pad")
    if not isinstance(amounts, (tuple, list)) or not call.in_shapes:
        return None
    ndim = len(call.in_shapes[0])
    return {ndim - 1 - i for i in range(len(amounts) // 2) if amounts[2 * i] or amounts[2 * i + 1]}


def _pad_reads_nothing(args, kwargs):
    """A constant pad replays with -1 (reads no element) instead of its value, which could be a label."""
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    if mode != "constant":
        return args, kwargs
    if len(args) > 3:
        return (*args[:3], -1, *args[4:]), kwargs
    return args, {**kwargs, "value": -1}


@op_kind("write into an index", {"__setitem__", WRITE_VIEW})
def _write(call, operand, state):
    """``x[index] = value``, or an in-place op on a view of x (``x[:, 1:] += y``: the trace's WRITE_VIEW
    call): the written x reads ``value`` inside the region and x outside it, element by element (a replay
    on labels, as for movement ops). A channel dim of x the region cuts (``x[..., :4] = v``) is refused:
    its bounds are literal, so after a removal they would overwrite other channels."""
    n_in = len(call.inputs)
    box = _write_box(call)
    if box is not None:
        # a box (slices, a strided view): x and the output share every dim, the value those the box takes whole
        letters = _write_letters(call, box)
        if operand not in (0, n_in):
            unmatched = [d for d in state.dims if letters[operand][d].startswith("v")]
            if unmatched:
                _refuse_value_dim(call, operand, unmatched[0], box)
        results = _lettered(call, operand, state, letters)
    else:
        results = _movement_unchecked(call, operand, state)
    on_x = [state] if operand in (0, n_in) else [mapped for other, mapped in results if other in (0, n_in)]
    for mapped in on_x:
        cut = [d for d in mapped.dims if not (box[d] if box is not None else _writes_whole_lines(call, d))]
        if cut:
            _refuse_partial_write(call, cut[0])
    return results


def _refuse_partial_write(call, dim: int):
    raise Blocked(RefusalKind.UNPRUNABLE_ARGUMENT, call.name,
                  f"'{call.name}' writes into part of dim {dim} of a {tuple(call.in_shapes[0])} tensor, which "
                  f"carries channels: the same region would hold other channels once some are removed")


def _refuse_value_dim(call, operand: int, dim: int, box) -> None:
    """A value's channel dim that does not land on a whole dim of x: written into part of that dim, or
    broadcast along all of it."""
    value, shape = tuple(call.in_shapes[operand]), tuple(call.in_shapes[0])
    at = dim + len(shape) - len(value)
    if not box[at]:
        _refuse_partial_write(call, at)
    raise Blocked(RefusalKind.UNPRUNABLE_ARGUMENT, call.name,
                  f"'{call.name}' value dim {dim} ({value[dim]} wide) is broadcast along dim {at} of a {shape} "
                  f"tensor: its channels have no counterpart there to go with")


def _write_box(call) -> list | None:
    """For a write into a box of x (``x[1:, :, ::2] = v``, an in-place op on a slice view): per dim of x
    whether the box takes it whole; None for other regions (ints, masks, tensor indices, reshaped views),
    which the label replay maps. Cached on the call."""
    if "write box" not in call.cache:
        call.cache["write box"] = _find_write_box(call)
    return call.cache["write box"]


def _find_write_box(call):
    shape = tuple(call.in_shapes[0])
    if call.name == "__setitem__":
        if len(call.args) != 3 or len(call.inputs) > 2 or (len(call.inputs) == 2 and call.input_slots[1] != 2):
            return None
        index = call.args[1]
        entries = _entries_per_dim(index, len(shape))
        # ints drop a dim of the region and None adds one: the value would not line up with x dim by dim
        if entries is None or any(entry is None for entry in (index if isinstance(index, tuple) else (index,))) \
                or not all(isinstance(entry, slice) for entry in entries):
            return None
        return [len(range(*entry.indices(size))) == size for entry, size in zip(entries, shape)]
    size, stride, offset, positions = call.args[2:6]
    if positions is not None or len(size) != len(shape):
        return None
    contiguous = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        contiguous[d] = contiguous[d + 1] * shape[d + 1]
    starts, rest = [], offset
    for d in range(len(shape)):
        if size[d] > 1 and stride[d] != contiguous[d]:
            return None
        start, rest = divmod(rest, contiguous[d])
        starts.append(start)
    if rest or any(start + n > limit for start, n, limit in zip(starts, size, shape)):
        return None
    return [n == limit for n, limit in zip(size, shape)]


def _write_letters(call, box) -> list:
    """Letters of x, the value (if a tensor) and the written output: the value's dims, right-aligned to the
    box, share x's letter where the box takes the dim whole and the value is not broadcast along it."""
    shape = tuple(call.in_shapes[0])
    letters = [f"d{d}" for d in range(len(shape))]
    operands = [letters]
    if len(call.inputs) == 2:
        value = tuple(call.in_shapes[1])
        shift = len(shape) - len(value)
        operands.append([letters[j + shift] if j + shift >= 0 and box[j + shift] and value[j] == shape[j + shift]
                         else f"v{j}" for j in range(len(value))])
    return operands + [letters]


def _writes_whole_lines(call, dim: int) -> bool:
    """Whether the written region takes every position of ``dim`` wherever it takes one (cached per dim)."""
    cache = call.cache.setdefault("whole lines", {})
    if dim not in cache:
        shape = call.in_shapes[0]
        index = call.args[1] if call.name == "__setitem__" and len(call.args) > 1 else None
        if index is not None and _index_keeps_dim(index, len(shape), dim):
            cache[dim] = True
        else:
            # the output elements that do not read x are the written ones
            written = (_correspondence(call, 0)[0] < 0).view(tuple(shape))
            cache[dim] = bool(torch.equal(written.all(dim=dim), written.any(dim=dim)))
    return cache[dim]


def keeps_product(state: ChannelState, shape) -> bool:
    """After removal, channels spread over several dims must still form a full grid (a valid shape)."""
    if len(state.dims) < 2:
        return True
    sizes = [shape[d] for d in state.dims]
    kept = torch.ones(sizes, dtype=torch.bool).reshape(-1)
    kept[state.idxs] = False
    kept = kept.view(sizes)
    if not bool(kept.any()):
        return True
    grid = torch.ones(sizes, dtype=torch.bool)
    for axis in range(len(sizes)):
        others = tuple(d for d in range(len(sizes)) if d != axis)
        along = kept.any(dim=others) if others else kept
        view = [1] * len(sizes)
        view[axis] = sizes[axis]
        grid = grid & along.view(view)
    return bool(torch.equal(grid, kept))


CONCATS = {"cat", "concat", "concatenate"}
SPLITS = {"split", "split_with_sizes", "chunk", "tensor_split", "narrow"}


def _movement_unchecked(call, operand, state):
    fast = _fast_concat_or_split(call, operand, state)
    if fast is not None:
        return fast
    n_in = len(call.inputs)
    results = []
    if operand < n_in:
        for index, correspondence in enumerate(_correspondence(call, operand)):
            mapped = forward_through(correspondence, call.in_shapes[operand], state)
            if mapped is not None:
                results.append((n_in + index, mapped))
        return results
    out_index = operand - n_in
    for source in range(n_in):
        if call.inputs[source] is None or not _is_float(call, source):
            continue
        every_output = _correspondence(call, source)
        siblings = [c for index, c in enumerate(every_output) if index != out_index]
        mapped = backward_through(every_output[out_index], call.in_shapes[source], state, siblings)
        if mapped is not None:
            results.append((source, mapped))
    return results


def _fast_concat_or_split(call, operand, state):
    """Offsets along one dim: the common case (DenseNet, Inception, qkv chunks) without replaying the op."""
    if call.name in CONCATS:
        pieces, whole = call.in_shapes, call.out_shapes[0]
    elif call.name in SPLITS and len(call.in_shapes) == 1:
        pieces, whole = call.out_shapes, call.in_shapes[0]
    else:
        return None
    dim = _dim_argument(call, len(whole))
    if dim is None or any(len(p) != len(whole) for p in pieces):
        return None
    if call.name == "narrow":
        start = argument(call, "start")
        offsets = [int(start)]
    else:
        offsets = [0]
        for piece in pieces[:-1]:
            offsets.append(offsets[-1] + piece[dim])
    n_pieces = len(pieces)
    # operand numbering: inputs first, then outputs
    piece_operands = list(range(n_pieces)) if call.name in CONCATS else [1 + i for i in range(n_pieces)]
    whole_operand = n_pieces if call.name in CONCATS else 0
    if dim not in state.dims:
        if not all(p[d] == whole[d] for p in pieces for d in state.dims):
            return None
        return [(o, state) for o in piece_operands + [whole_operand] if o != operand]
    if state.dims != (dim,):
        return None
    if operand == whole_operand:
        results = []
        bounds = torch.tensor(offsets + [offsets[-1] + pieces[-1][dim]])
        cuts = torch.searchsorted(state.idxs, bounds).tolist()  # idxs are sorted: one slice per piece
        for index, (o, offset) in enumerate(zip(piece_operands, offsets)):
            begin, end = cuts[index], cuts[index + 1]
            if end > begin:
                results.append((o, ChannelState((dim,), state.idxs[begin:end] - offset, state.roots[begin:end])))
        return results
    offset = offsets[piece_operands.index(operand)]
    return [(whole_operand, ChannelState((dim,), state.idxs + offset, state.roots))]


PIECEWISE = SPLITS | {"__getitem__", "select", "index_select", "unbind"}


def shifts_channels(call: Call, state: ChannelState, sizes=None) -> bool:
    """Whether re-running a split/slice on the pruned input hands an output other channels.

    The op runs again after pruning with the sizes, bounds and indices the code wrote: ``split(4)`` of
    7 channels gives the first piece a channel of the second, ``x[:, 3]`` picks another channel. Replay
    it on the kept labels and compare with the full output minus the removed channels (removing slices
    along one dim keeps row-major order, so the flattened outputs must be equal). Sizes read from the data
    or from layers are replayed as they will be after the removal (``sizes``: a size_checks.RemovalSizes);
    adapter-followed attributes are not literal: such calls are left to the element maps.
    """
    if call.name not in PIECEWISE or len(state.dims) != 1 or has_followed((call.args, call.kwargs)):
        return False
    arguments = (call.args, call.kwargs)
    if sizes is not None and is_traced(arguments):
        arguments = sizes.evaluate(arguments)
        if arguments is FREE:
            return False
    floats = [i for i in range(len(call.inputs)) if call.inputs[i] is not None and _is_float(call, i)]
    if floats != [0]:
        return False
    shape, dim = tuple(call.in_shapes[0]), state.dims[0]
    if _same_arguments(arguments, (call.args, call.kwargs)) and _cuts_elsewhere(call, shape, dim):
        return False  # the pieces are cut along other dims: the removal cannot move a channel between them
    keep = torch.ones(shape[dim], dtype=torch.bool)
    keep[state.idxs] = False
    if bool(keep.all()):
        return False
    numel = 1
    for size in shape:
        numel *= size
    labels = torch.arange(numel).view(shape)
    stride = labels.stride(dim)
    before = _correspondence(call, 0)  # the same replay on the full width, cached for the element maps
    try:
        after = _replay_on(call, labels.index_select(dim, torch.nonzero(keep).reshape(-1)), arguments)
    except Exception:  # noqa: BLE001 - the code itself would fail on the pruned width
        return True
    if len(before) != len(after):
        return True
    for full, pruned in zip(before, after):
        flat = full.reshape(-1)
        expected = flat[keep[(flat // stride) % shape[dim]]]
        if not torch.equal(pruned.reshape(-1), expected):
            return True
    return False


def _cuts_elsewhere(call: Call, shape, dim: int) -> bool:
    """Whether the op takes every position of ``dim`` in order: from its arguments where they say so (a
    split's dim, an index of slices and ints), else from the parts of its replay (blocks.py)."""
    if call.name in SPLITS:
        cut = _dim_argument(call, len(shape))
        if cut is not None:
            return cut != dim
    if call.name == "__getitem__" and len(call.args) == 2:
        untouched = _index_keeps_dim(call.args[1], len(shape), dim)
        if untouched is not None:
            return untouched
    return all(passes_through(full, shape, dim) for full in _correspondence(call, 0))


def _index_keeps_dim(index, ndim: int, dim: int) -> bool | None:
    """For ``x[index]`` of slices, ints, None and Ellipsis: whether input dim ``dim`` is taken whole (a
    full slice, or no entry). None for anything else (tensors, lists, masks): the replay decides."""
    entries = _entries_per_dim(index, ndim)
    if entries is None:
        return None
    entry = entries[dim]
    return isinstance(entry, slice) and entry.start is None and entry.stop is None and entry.step is None


def _entries_per_dim(index, ndim: int) -> list | None:
    """The entry of a basic index (slices, ints, None, Ellipsis) that each of the ``ndim`` input dims gets,
    Ellipsis expanded and missing ones full slices; None (the index adds no input dim) left out. None for
    anything else (tensors, lists, masks)."""
    entries = list(index) if isinstance(index, tuple) else [index]
    for entry in entries:
        if isinstance(entry, bool) or not (entry is None or entry is Ellipsis or isinstance(entry, (int, slice))):
            return None
    consuming = [entry for entry in entries if entry is not None]
    if consuming.count(Ellipsis) > 1:
        return None
    if Ellipsis in consuming:
        at = consuming.index(Ellipsis)
        consuming = consuming[:at] + [slice(None)] * (ndim - len(consuming) + 1) + consuming[at + 1:]
    if len(consuming) > ndim:
        return None
    return consuming + [slice(None)] * (ndim - len(consuming))


def _same_arguments(evaluated, original) -> bool:
    if evaluated is original:
        return True
    try:
        return replay_key(evaluated) == replay_key(original)
    except Unshareable:
        return False


def _replay_on(call: Call, labels: torch.Tensor, arguments=None) -> list[torch.Tensor]:
    args, kwargs = rebuild(arguments or (call.args, call.kwargs), {call.input_slots[0]: labels})
    return flatten_as_list(call.target(*args, **kwargs))


def _dim_argument(call, ndim):
    dim = argument(call, "dim", None if call.name == "narrow" else 0)
    return dim % ndim if isinstance(dim, int) else None


def _is_float(call, index) -> bool:
    dtype = call.input_dtypes[index]
    return dtype is not None and (dtype.is_floating_point or dtype.is_complex)


def _correspondence(call: Call, source: int) -> list[torch.Tensor]:
    """Per output: which flat element of input ``source`` each output element reads (-1: another input)."""
    cache = call.cache.setdefault("correspondence", {})
    if source not in cache:
        cache[source] = shared_replay(call, source, lambda: _replay_labels(call, source))
    return cache[source]


def _replay_labels(call: Call, source: int) -> list[torch.Tensor]:
    (args, kwargs), labels = _substitute(call, source)
    if call.name == "__setitem__" and len(args) == 3 and not isinstance(args[2], torch.Tensor):
        args = (args[0], args[1], -1)  # x[index] = 0.0: the region reads no element of x (a label would)
    if call.name == "pad":
        args, kwargs = _pad_reads_nothing(args, kwargs)
    try:
        result = call.target(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure means we cannot map this op
        raise Blocked(RefusalKind.UNMAPPABLE_OP, call.name, f"cannot map channels through '{call.name}': {error}") from error
    if call.name == "__setitem__":
        result = args[0]  # x[index] = value returns nothing: its output is x, written (as the trace records it)
    outputs = [tensor.reshape(tuple(shape)) for tensor, shape in zip(flatten_as_list(result), call.out_shapes)]
    mark_views(outputs, labels, call.name)
    return outputs


def _substitute(call, source):
    """Replay arguments with integer labels on ``source`` and -1 on the other float tensors; and the labels."""
    replaced = {}
    writes = writes_in_place(call.name) or "out" in call.kwargs
    for index, slot in enumerate(call.input_slots):
        shape = call.in_shapes[index]
        if index == source:
            if writes:
                numel = 1
                for size in shape:
                    numel *= size
                replaced[slot] = torch.arange(numel).view(shape)
            else:
                replaced[slot] = shared_labels(tuple(shape))
        elif _is_float(call, index):
            replaced[slot] = torch.full(shape, -1, dtype=torch.long)
    return rebuild((call.args, call.kwargs), replaced), replaced[call.input_slots[source]]


# -- grouped-query attention ------------------------------------------------------------------------
def _is_grouped_query(call) -> bool:
    q, k = call.in_shapes[0], call.in_shapes[1]
    return len(q) >= 3 and len(k) >= 3 and q[-3] != k[-3]


@op_kind("grouped-query attention", {"scaled_dot_product_attention"}, applies=_is_grouped_query)
def _grouped_query_attention(call, operand, state):
    """SDPA with enable_gqa: each k/v head serves q_heads / kv_heads consecutive q heads.

    Modelled as k' = repeat_interleave(k, groups, dim=-3) (likewise v), then plain attention letters
    between q, k', v' and the output; a k/v head goes only when all the q heads it serves go.
    """
    not_pointwise("a key/value head goes only with every query head it serves")
    shapes = call.in_shapes
    q, k, v, out = shapes[0], shapes[1], shapes[2], call.out_shapes[0]
    groups = q[-3] // k[-3]
    expanded_k = tuple(k[:-3]) + (q[-3],) + tuple(k[-2:])
    expanded_v = tuple(v[:-3]) + (q[-3],) + tuple(v[-2:])
    letters = {0: _right_aligned(q, ["L", "E"], "B"), 1: _right_aligned(expanded_k, ["S", "E"], "B"),
               2: _right_aligned(expanded_v, ["S", "V"], "B"), "out": _right_aligned(out, ["L", "V"], "B")}
    virtual = {0: q, 1: expanded_k, 2: expanded_v, "out": out}
    maps = {1: _repeat_heads(k, groups), 2: _repeat_heads(v, groups)}
    n_in = len(call.inputs)
    source = "out" if operand >= n_in else operand
    if source not in letters:
        raise Blocked(RefusalKind.UNPRUNABLE_ARGUMENT, call.name,
                      "channels reach the attention mask of scaled_dot_product_attention")
    if source in maps:  # k or v: into the expanded space first
        state = forward_through(maps[source], shapes[source], state)
        if state is None:
            return []
    _check_head_grid(state, letters[source], virtual[source], k[-3], groups, call.name)
    results = []
    for target in (0, 1, 2, "out"):
        if target == source:
            continue
        mapped = through_letters(state, letters[source], virtual[source], letters[target], virtual[target])
        if mapped is None:
            continue
        if target in maps:
            mapped = backward_through(maps[target], shapes[target], mapped)
            if mapped is None:
                continue
        results.append((n_in if target == "out" else target, mapped))
    return results


def _check_head_grid(state, letters, shape, kv_heads, groups, name=None):
    """Removed q heads must leave every k/v head serving the same number of q heads (a product grid)."""
    head_dim = len(shape) - 3
    heads = through_letters(state, letters, shape, [letters[head_dim]], (shape[head_dim],))
    if heads is None:
        return
    kept = torch.ones(kv_heads * groups, dtype=torch.bool)
    kept[heads.idxs] = False
    grid = kept.view(kv_heads, groups)
    if bool(kept.any()) and not torch.equal(grid, grid.any(1, keepdim=True) & grid.any(0, keepdim=True)):
        raise Blocked(
            RefusalKind.GROUPED_QUERY, name,
            "grouped-query attention: removed query heads must be whole key/value groups or the same position "
            "in every group, so each key/value head keeps serving as many query heads"
        )


@lru_cache(maxsize=64)
def _repeat_heads(shape, groups):
    numel = 1
    for size in shape:
        numel *= size
    return torch.arange(numel).view(tuple(shape)).repeat_interleave(groups, dim=-3)


# -- lettered ops ----------------------------------------------------------------------------------
MATMULS = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "einsum", "scaled_dot_product_attention",
           "linear", "conv1d", "conv2d", "conv3d"}
REDUCTIONS = {
    "sum", "mean", "amax", "amin", "max", "min", "norm", "var", "std", "prod", "logsumexp", "nansum",
    "nanmean", "var_mean", "std_mean", "median", "nanmedian",
}


@op_kind("matmul", MATMULS, contracts=True)
def _matmul(call, operand, state):
    return _lettered(call, operand, state, _matmul_letters(call))


@op_kind("reduction", REDUCTIONS, contracts=True)
def _reduction(call, operand, state):
    return _lettered(call, operand, state, _reduction_letters(call))


def _lettered(call, operand, state, letters):
    if letters is None:
        raise Blocked(RefusalKind.UNMAPPABLE_OP, call.name, f"'{call.name}' changes the shape of channels it does not name")
    shapes = call.in_shapes + call.out_shapes
    source_letters = letters[operand]
    if source_letters is None:
        raise Blocked(RefusalKind.UNPRUNABLE_ARGUMENT, call.name, f"'{call.name}' operand {operand} cannot carry channels")
    results = []
    for other, other_letters in enumerate(letters):
        if other == operand or other_letters is None:
            continue
        mapped = through_letters(state, source_letters, shapes[operand], other_letters, shapes[other])
        if mapped is not None:
            results.append((other, mapped))
    if not results and letters[-1] is not None and operand < len(call.in_shapes):
        _check_not_dropped(call, operand, state, source_letters, letters)
    return results


def _check_not_dropped(call, operand, state, source_letters, letters):
    """A state whose letters vanish everywhere is fine only for contractions and reductions."""
    if kind_of(call).contracts:
        return
    raise Blocked(RefusalKind.UNMAPPABLE_OP, call.name, f"'{call.name}' changes the size of the channel dim {state.dims}")


def _right_aligned(shape, tail_letters, prefix):
    batch = len(shape) - len(tail_letters)
    return [f"{prefix}{len(shape) - i}" for i in range(batch)] + list(tail_letters)


def _matmul_letters(call):
    shapes = call.in_shapes
    name = call.name
    if name in ("matmul", "__matmul__", "mm", "bmm"):
        return _mm_letters(shapes[0], shapes[1], call.out_shapes[0]) + [None] * (len(shapes) - 2)
    if name == "baddbmm" and len(shapes) == 3:  # beta * input + alpha * (batch1 @ batch2), input broadcast
        first, second, out = _mm_letters(shapes[1], shapes[2], call.out_shapes[0])
        return [_right_aligned(shapes[0], out[-2:], "B"), first, second, out]
    if name == "__rmatmul__":  # x.__rmatmul__(y) computes y @ x
        la, lb, out = _mm_letters(shapes[1], shapes[0], call.out_shapes[0])
        return [lb, la, out]
    if name == "linear":
        x = _right_aligned(shapes[0], ["i"], "B")
        result = [x, ["o", "i"]] + ([["o"]] if len(shapes) > 2 else [])
        return result + [_right_aligned(call.out_shapes[0], ["o"], "B")]
    if name in ("conv1d", "conv2d", "conv3d"):
        groups = argument(call, "groups", 1)
        if groups != 1:
            return None
        spatial = len(shapes[0]) - 2
        x = ["b", "i"] + [f"s{d}" for d in range(spatial)]
        w = ["o", "i"] + [f"k{d}" for d in range(spatial)]
        out = ["b", "o"] + [f"t{d}" for d in range(spatial)]
        return [x, w] + ([["o"]] if len(shapes) > 2 else []) + [out]
    if name == "scaled_dot_product_attention":
        q, k, v = shapes[0], shapes[1], shapes[2]
        if len(q) >= 3 and q[-3] != k[-3]:
            return None  # grouped-query heads through enable_gqa: heads are not one-to-one
        letters = [_right_aligned(q, ["L", "E"], "B"), _right_aligned(k, ["S", "E"], "B"),
                   _right_aligned(v, ["S", "V"], "B")]
        if len(shapes) > 3 and len(shapes[3]) >= 2:
            # an additive mask with a head dim (T5's relative position bias) loses the heads q loses;
            # a broadcast head dim of size 1 (causal masks) carries none
            letters.append(_right_aligned(shapes[3], ["L", "S"], "B"))
        letters += [None] * (len(shapes) - len(letters))
        return letters + [_right_aligned(call.out_shapes[0], ["L", "V"], "B")]
    if name == "einsum":
        return _einsum_letters(call)
    return None


def _mm_letters(a, b, out):
    la = ["k"] if len(a) == 1 else _right_aligned(a, ["n", "k"], "B")
    lb = ["k"] if len(b) == 1 else _right_aligned(b, ["k", "m"], "B")
    tail = (["n"] if len(a) > 1 else []) + (["m"] if len(b) > 1 else [])
    return [la, lb, _right_aligned(out, tail, "B")]


def _einsum_letters(call):
    equation = argument(call, "equation")
    equation = equation if isinstance(equation, str) else None
    if equation is None or "->" not in equation:
        return None
    lhs, rhs = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    shapes = call.in_shapes
    if len(terms) != len(shapes):
        return None

    def expand(term, ndim):
        if "..." not in term:
            return list(term)
        head, tail = term.split("...")
        count = ndim - len(head) - len(tail)
        return list(head) + [f"E{count - i}" for i in range(count)] + list(tail)

    letters = [expand(term, len(shape)) for term, shape in zip(terms, shapes)]
    return letters + [expand(rhs, len(call.out_shapes[0]))]


def _reduction_dims(call, ndim):
    dim = argument(call, "dim")
    if dim is None:
        return set(range(ndim))
    if isinstance(dim, int):
        dim = (dim,)
    return {d % ndim for d in dim}


def _reduction_letters(call):
    shape = call.in_shapes[0]
    letters = list(string.ascii_letters[: len(shape)])
    reduced = _reduction_dims(call, len(shape))
    keep = argument(call, "keepdim", False)
    out = [("_" if d in reduced else l) for d, l in enumerate(letters)] if keep else [
        l for d, l in enumerate(letters) if d not in reduced]
    outputs = [out if len(s) == len(out) else None for s in call.out_shapes]
    return [letters] + [None] * (len(call.in_shapes) - 1) + outputs


@op_kind("grid sample", {"grid_sample"})
def _grid_sample(call, operand, state):
    """``F.grid_sample(input (N, C, *in), grid (N, *out, coords))`` -> ``(N, C, *out)``: N is one sample
    in all three (deformable attention folds its heads into it, so a head's sampling offsets go with its
    values), C passes from the input to the output, the output's spatial dims are the grid's. The input's
    spatial dims and the grid's coordinate dim reach nothing: channels there cannot go."""
    return _lettered(call, operand, state, _grid_sample_letters(call))


def _grid_sample_letters(call):
    if len(call.in_shapes) < 2 or not call.out_shapes:
        return None
    source, grid, out = call.in_shapes[0], call.in_shapes[1], call.out_shapes[0]
    spatial = len(source) - 2
    if len(grid) != spatial + 2 or len(out) != len(source):
        return None
    places = [f"t{d}" for d in range(spatial)]
    return [["N", "C"] + [f"s{d}" for d in range(spatial)], ["N"] + places + ["coords"]] \
        + [None] * (len(call.in_shapes) - 2) + [["N", "C"] + places]


@op_kind("opaque", {OPAQUE}, applies=lambda call: not _is_broadcast(call))
def _opaque(call, operand, state):
    """Ops the trace cannot see into (a TorchScript function) that change shapes; an opaque op whose shapes
    broadcast is taken as elementwise (the fallback kind after it)."""
    raise Blocked(RefusalKind.UNMAPPABLE_OP, call.name,
                  f"channels reach an op the trace cannot see into (a TorchScript function?) that changes "
                  f"shapes {call.in_shapes} -> {call.out_shapes}")


@op_kind("same size")
def _same_size(call, operand, state):
    """Unknown op (pooling, interpolate, pad...): the last fallback, it claims every call."""
    return _lettered(call, operand, state, _same_size_letters(call))


def _same_size_letters(call):
    """Unknown op (pooling, interpolate, pad...): dims of unchanged size keep their channels."""
    if not call.in_shapes or not call.out_shapes:
        return None
    shape = call.in_shapes[0]
    letters = list(string.ascii_letters[: len(shape)])
    outputs = []
    for out_shape in call.out_shapes:
        if len(out_shape) != len(shape):
            outputs.append(None)
            continue
        outputs.append([l if out_shape[d] == shape[d] else f"{l}'" for d, l in enumerate(letters)])
    if all(o is None for o in outputs):
        return None
    return [letters] + [None] * (len(call.in_shapes) - 1) + outputs
