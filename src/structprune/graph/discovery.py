"""Group discovery: walk channel states from a root through values, ops and layers of the trace."""
from __future__ import annotations

import math
from collections import deque

import torch
from torch import nn

from ..layers.declarations import ParameterPruner, tensor_dims
from . import ops
from .channels import ChannelState, squeeze_state, through_letters
from .group import Dependency, Group, Node
from .pointwise import not_pointwise, recording, undecided
from .projection import Walk
from .refusal import Blocked, Refusal, RefusalKind
from .side import Side
from .size_checks import size_refusals
from .trace import Call

OUT, IN = Side.OUT, Side.IN


class GroupFinder:
    """Mixin of DependencyGraph: needs ``values``, ``module2node``, ``_calls_of`` and ``_output_keys``."""

    def _discover(self, node: Node, side: Side, idxs: torch.Tensor, trigger, explicit: bool = False) -> Group:
        self._past_outputs = explicit
        self._outputs_passed = []
        try:
            group = self._discover_states(node, side, idxs, trigger)
        finally:
            self._past_outputs = False
        group.explicit = explicit
        return group

    def _discover_states(self, node: Node, side: Side, idxs: torch.Tensor, trigger) -> Group:
        with recording() as reasons:
            states, deps, order, blocked = self._walk(node, side, idxs)
        blocked += self._outputs_passed
        group = self._finish(node, trigger, states, deps, order, blocked)
        if not blocked and not reasons:
            # every map went channel by channel: a subset of the root's channels finds exactly the part of
            # this walk they reached (graph/projection.py), without walking again
            group.walk = Walk(states, deps, order)
        return group

    def _walk(self, node: Node, side: Side, idxs: torch.Tensor):
        """Channel states on every value and layer the root's channels reach, and the refusals met on the way."""
        deps: dict = {}
        order: list = []
        blocked: list[Refusal] = []
        states: dict = {}
        queue: deque = deque()

        def add_dep(target: Node, target_side: Side, state: ChannelState):
            key = (target, target_side)
            if key not in deps:
                deps[key] = state
                order.append(key)
                # layers holding the very same weight (T5's encoder and decoder embeddings) lose the same
                # channels, and so does everything those layers feed
                for sibling, sibling_side in self._weight_siblings(target, target_side):
                    if (sibling, sibling_side) not in deps:
                        add_dep(sibling, sibling_side, state)
                        enter(sibling, sibling_side, state)
            else:
                deps[key] = _merge(deps[key], state)[0]

        def enter(target: Node, target_side: Side, state: ChannelState):
            """Queue the values a layer's channels reach from ``target_side``."""
            try:
                for value_key, entry in self._layer_entry(target, target_side, state):
                    push(value_key, entry)
            except Blocked as reason:
                blocked.append(reason.refusal)

        def push(value_key, state: ChannelState):
            if value_key is None:
                return
            if len(state.dims) > 1 and value_key in self.values:
                state = squeeze_state(state, self.values[value_key].shape)
            slot = (value_key, state.dims)
            if slot in states:
                merged, grew = _merge(states[slot], state)
                if not grew:
                    return
                states[slot] = merged
            else:
                states[slot] = state
            queue.append(slot)

        root_state = ChannelState((0,), idxs.clone(), idxs.clone())
        add_dep(node, side, root_state)
        enter(node, side, root_state)
        steps = 0
        limit = 64 * (len(self.values) + 1) * 8
        while queue:
            steps += 1
            if steps > limit:
                raise RuntimeError(f"group discovery from {node.name} did not converge after {steps} steps")
            slot = queue.popleft()
            state = states[slot]
            value = self.values.get(slot[0])
            if value is None:
                continue
            try:
                for target, target_side, dep_state, more in self._visit(value, state):
                    if target is not None:
                        add_dep(target, target_side, dep_state)
                    for next_key, next_state in more:
                        push(next_key, next_state)
            except Blocked as reason:
                blocked.append(reason.refusal)
        return states, deps, order, blocked

    def _finish(self, node: Node, trigger, states: dict, deps: dict, order: list, blocked: list) -> Group:
        """The group of a walk: the size and regrouping checks over its states, and an item per layer
        (``blocked``: the refusals met on the way)."""
        blocked = list(blocked)
        sizes, refusals, ties = size_refusals(self, states, deps)
        blocked.extend(refusals)
        block_hint = 1
        for (value_key, dims), state in states.items():
            value = self.values[value_key]
            for call, operand in value.consumers:
                if operand == 0 and not self._feeds_shape_only(call) and ops.shifts_channels(call, state, sizes):
                    blocked.append(Refusal(
                        RefusalKind.SPELLED_OUT_PIECES, call.name,
                        f"'{call.name}' spells out the size of its pieces (sizes, bounds or indices along dim "
                        f"{dims[0]} of {list(value.shape)}), so after this removal they would hold other channels; "
                        f"remove the same channels from every piece, or make the sizes follow the data"
                    ))
            # checked once states are merged: two inputs of a cat may each cover half of a head
            if len(dims) < 2:
                continue
            grid = [value.shape[d] for d in dims]
            block_hint = math.lcm(block_hint, math.prod(grid[:-1]))
            if not ops.keeps_product(state, value.shape):
                blocked.append(Refusal(
                    RefusalKind.REGROUP, value.producer[0].name if value.producer is not None else None,
                    f"channels regrouped into dims {grid} (by a reshape, view or split) would keep a different "
                    f"selection in each group; remove whole groups or the same index in every group"
                ))
        group = Group(self)
        group.blocked = sorted(set(blocked))
        group.size_ties = ties
        group.block_hint = block_hint
        for target, target_side in order:
            state = deps[(target, target_side)]
            handler = self._handler(target, target_side)
            group.add_dep(Dependency(trigger, handler, node, target, target_side), state.idxs, state.roots)
        return group

    def _feeds_shape_only(self, call: Call) -> bool:
        """Whether every output of ``call`` goes only where its shape alone matters (BART passes
        ``inputs_embeds[:, :, -1]`` to its positional embedding "for the shape only")."""
        if call.kind == "module" or not call.outputs:
            return False
        for key in call.outputs:
            value = self.values.get(key)
            if value is None or key in self._output_keys or not value.consumers:
                return False
            if not all(consumer.kind == "module" and _shape_only_input(consumer.target, consumer, index)
                       for consumer, index in value.consumers):
                return False
        return True

    def _weight_siblings(self, node: Node, side: str) -> list:
        """(node, side) of other layers whose channels on ``side`` live on the same tensor and dim."""
        if not hasattr(self, "_sibling_axes"):
            by_tensor: dict = {}
            for other in self.module2node.values():
                if isinstance(other.module, nn.Parameter):
                    continue
                for other_side in (OUT, IN):
                    for key in _axis_keys(other, other_side):
                        by_tensor.setdefault(key, []).append((other, other_side))
            self._sibling_axes = {key: entries for key, entries in by_tensor.items()
                                  if len({id(n.module) for n, _ in entries}) > 1}
        if isinstance(node.module, nn.Parameter) or not self._sibling_axes:
            return []
        found = []
        for key in _axis_keys(node, side):
            found.extend(entry for entry in self._sibling_axes.get(key, ()) if entry[0] is not node)
        return found

    def _bare_layer_use(self, tensor, state: ChannelState):
        """(node, side, state, []) when channels reach a declared layer's weight used outside its own
        call, along an axis the layer declares one channel per position (F.linear(x, layer.weight))."""
        module = self._declared_params[tensor]
        node = self.module2node.get(module)
        if node is None or len(state.dims) != 1 or node.pruner.is_coupled(module):
            return None
        for side, axes, count in ((OUT, node.pruner.out_axes(module), node.pruner.get_out_channels),
                                  (IN, node.pruner.in_axes(module), node.pruner.get_in_channels)):
            for axis in axes:
                if (axis.tensor(module) is tensor and axis.dim % tensor.dim() == state.dims[0]
                        and axis.blocks == 1 and tensor.shape[axis.dim] == count(module)):
                    return node, side, ChannelState((0,), state.idxs, state.roots), []
        return None

    def _bare_entry(self, module, pruner, side: Side, state: ChannelState):
        """A layer never called, whose parameters the forward uses bare: its channels start on them."""
        axes = pruner.out_axes(module) if side == OUT else pruner.in_axes(module)
        tensors = {id(axis.tensor(module)): axis for axis in axes if axis.tensor(module) is not None}
        for key, value in self.values.items():
            axis = tensors.get(id(value.leaf)) if isinstance(value.leaf, nn.Parameter) else None
            if axis is not None:
                if axis.blocks != 1:
                    raise Blocked(RefusalKind.UNMAPPABLE_OP, self._name(module),
                                  f"{self._name(module)} is used bare with fused blocks on {axis.name}; cannot map it")
                yield key, ChannelState((axis.dim % len(value.shape),), state.idxs, state.roots)

    def _handler(self, node: Node, side: Side):
        return node.pruner.prune_out_channels if side is OUT else node.pruner.prune_in_channels

    def _visit(self, value, state: ChannelState):
        """Yield (node, side, layer-state, [(value, state)...]) for everything touching ``value``."""
        if value.key in self._output_keys:
            detail = f"channels reach a model output {value.shape}; outputs keep their shape"
            if not getattr(self, "_past_outputs", False):
                raise Blocked(RefusalKind.MODEL_OUTPUT, None, detail)
            # an explicit request: refused all the same, but the group goes on past the output, so that a
            # prune() the user insists on removes every coupled channel
            self._outputs_passed.append(Refusal(RefusalKind.MODEL_OUTPUT, None, detail))
        if value.producer is None:
            yield from self._visit_leaf(value, state)
        else:
            call, index = value.producer
            yield from self._visit_call(call, len(call.inputs) + index, state)
        for call, index in value.consumers:
            yield from self._visit_call(call, index, state)

    def _visit_leaf(self, value, state: ChannelState):
        tensor = value.leaf
        proxy = getattr(self, "_constant_buffers", {}).get(id(tensor))
        if proxy is not None:  # every position holds the same value: any of them can go
            yield self.module2node[proxy], OUT, ChannelState((0,), state.idxs, state.roots), []
            return
        node = self.module2node.get(tensor) if isinstance(tensor, nn.Parameter) else None
        if node is None:
            if set(state.dims) <= getattr(self, "_followed_constants", {}).get(id(tensor), frozenset()):
                return  # made from followed sizes: the forward makes it at the new width
            bare = self._bare_layer_use(tensor, state) if tensor in self._declared_params else None
            if bare is not None:
                yield bare
                return
            layer = None
            if tensor in self._declared_params:
                kind, layer = RefusalKind.DECLARED_PARAMETER, self._param_names.get(tensor, '?')
                what = f"parameter {layer} of a declared layer, used outside that layer"
            elif isinstance(tensor, torch.Tensor) and id(tensor) in self._buffer_ids:
                kind, what = RefusalKind.BUFFER, "a buffer of the model"
            else:
                kind, what = RefusalKind.CONSTANT_OR_INPUT, "a constant or a model input"
            raise Blocked(kind, layer, f"channels reach {what}, shape {tuple(value.shape)}; it cannot lose channels")
        if any(tensor is p for p in self.ignored_params):
            raise Blocked(RefusalKind.IGNORED_PARAMETER, node.name, f"channels reach ignored parameter {node.name}")
        if len(state.dims) != 1:
            raise Blocked(RefusalKind.SEVERAL_DIMS, node.name,
                          f"parameter {node.name} would lose channels along several dims {state.dims}")
        dim = state.dims[0]
        if node.pruning_dim != dim and not self._settle_dim(node, tensor, dim):
            raise Blocked(
                RefusalKind.DIM_MISMATCH, node.name,
                f"parameter {node.name} {tuple(value.shape)} is pruned along dim {node.pruning_dim} but channels "
                f"arrive on dim {dim}; if it belongs to a layer type structprune does not know, register a customized "
                f"pruner for that type (customized_pruners={{Type: MyPruner()}} or register_customized_layer); if it "
                f"is used bare in forward, pass unwrapped_parameters=[(param, {dim})]"
            )
        getattr(self, "_guessed_dims", set()).discard(tensor)
        yield node, OUT, ChannelState((0,), state.idxs, state.roots), []

    def _settle_dim(self, node: Node, tensor, dim: int) -> bool:
        """A bare parameter whose dim was only guessed (no ``unwrapped_parameters`` entry) takes the dim
        channels first arrive on: a (1, C, H, W) position embedding added to a conv's output (Visformer)
        carries them on dim 1, where the guess for token layouts says the last. Later arrivals must agree."""
        guessed = getattr(self, "_guessed_dims", set())
        if tensor not in guessed:
            return False
        guessed.discard(tensor)
        if tensor.shape[dim] < 2 or self._safe_channels(node, OUT) != self._original_counts.get((tensor, OUT)):
            return False  # one wide there, or already pruned along the guessed dim
        node.pruning_dim, node.pruner = dim, ParameterPruner(dim)
        self._alive[(tensor, OUT)] = torch.arange(tensor.shape[dim])
        self._original_counts[(tensor, OUT)] = tensor.shape[dim]
        self._position_maps.pop((tensor, OUT), None)
        return True

    def _visit_call(self, call: Call, operand: int, state: ChannelState):
        n_in = len(call.inputs)
        if call.kind == "module":
            yield from self._visit_module(call, operand, state)
            return
        for other, mapped in ops.relate(call, operand, state):
            if other < n_in:
                key = call.inputs[other]
                if key is not None and key not in self.values:
                    key = None
            else:
                dtype = call.output_dtypes[other - n_in] if call.output_dtypes else None
                key = call.outputs[other - n_in] if dtype is None or dtype.is_floating_point else None
                if key is not None and key not in self.values:
                    continue  # an output nobody uses (and that is no model output)
            if key is None:
                if other < n_in:
                    raise Blocked(RefusalKind.UNPRUNABLE_ARGUMENT, call.name,
                                  f"channels reach a constant argument of '{call.name}'")
                continue
            yield None, None, None, [(key, mapped)]

    def _visit_module(self, call: Call, operand: int, state: ChannelState):
        module = call.target
        node = self.module2node[module]
        pruner = node.pruner
        n_in = len(call.inputs)
        out_dim, in_dim = self._tensor_dims(pruner, module, call)
        channel_inputs = pruner.channel_inputs if pruner.channel_inputs is not None else tuple(range(n_in))
        channel_inputs = tuple(i for i in channel_inputs if i < n_in and call.inputs[i] is not None)
        shapes = call.in_shapes + call.out_shapes
        shape = shapes[operand]
        if operand >= n_in:
            entered_dim, side, is_channel = out_dim, OUT, operand - n_in == 0 or self._is_state_output(module, operand - n_in)
        else:
            entered_dim, side, is_channel = in_dim, IN, operand in channel_inputs
        if entered_dim is None or not is_channel:
            if operand >= n_in and operand - n_in > 0:
                return  # secondary outputs such as attention weights carry no channels
            if operand < n_in and operand not in channel_inputs and not _shape_only_input(module, call, operand):
                raise Blocked(RefusalKind.UNPRUNABLE_ARGUMENT, node.name,
                              f"channels reach argument {operand} of {node.name}, which cannot be pruned")
            return
        entered_dim = entered_dim % len(shape)
        if entered_dim in state.dims:
            layer_state = _project(state, shape, entered_dim)
            fiber = 1
            for dim in state.dims:
                fiber *= shape[dim] if dim != entered_dim else 1
            if layer_state is None or len(layer_state.idxs) * fiber != len(state.idxs):
                raise Blocked(RefusalKind.PARTIAL_CHANNEL, node.name,
                              f"{node.name} would lose part of a channel: channels arrive along dims {state.dims}")
            side = node.side_for(side)
            # every call of the layer sees the change (shared layers, coupled norms)
            yield node, side, layer_state, list(self._layer_entry(node, side, layer_state))
            return
        # channels on dims the layer does not mix (e.g. a Linear applied over tokens) pass through
        more = []
        for target in ([n_in] if operand < n_in else list(channel_inputs)):
            tshape = shapes[target]
            changed = [d for d in state.dims if len(tshape) != len(shape) or tshape[d] != shape[d]]
            if changed:
                # a strided conv or a patch embedding maps positions, not channels: index i on one side is
                # not index i on the other (MLP-Mixer's token MLP reaching the patch-embedding conv)
                raise Blocked(
                    RefusalKind.SIZE_CHANGING_LAYER, node.name,
                    f"channels run along dim {changed[0]} of {shape}, which {node.name} changes to "
                    f"{tuple(tshape)}; removing them there has no counterpart on the other side"
                )
            letters = _layer_letters(shape, entered_dim)
            tletters = _layer_letters(tshape, (out_dim if target >= n_in else in_dim) % len(tshape), shape, letters)
            mapped = through_letters(state, letters, shape, tletters, tshape)
            if mapped is not None:
                key = call.inputs[target] if target < n_in else call.outputs[target - n_in]
                if key in self.values:
                    more.append((key, mapped))
        if more:
            yield None, None, None, more

    def _is_state_output(self, module, index) -> bool:
        return isinstance(module, nn.LSTM) and not module.bidirectional and index in (1, 2)

    def _tensor_dims(self, pruner, module, call):
        """Activation dims holding the layer's channels; declared dims are checked against the real sizes
        because subclasses may lay tensors out differently (timm/torchvision LayerNorm2d permute inside)."""
        if "dims" in call.cache:
            return call.cache["dims"]
        out_dim, in_dim = tensor_dims(pruner, module)
        if call.out_shapes:
            out_dim = _checked_dim(call.out_shapes[0], out_dim, self._safe_count(pruner.get_out_channels, module))
        if call.in_shapes:
            in_dim = _checked_dim(call.in_shapes[0], in_dim, self._safe_count(pruner.get_in_channels, module))
        call.cache["dims"] = (out_dim, in_dim)
        return out_dim, in_dim

    @staticmethod
    def _safe_count(getter, module):
        try:
            return getter(module)
        except (NotImplementedError, AttributeError):
            return None

    def _layer_entry(self, node: Node, side: Side, state: ChannelState):
        """Channel states on the tensors a layer produces/reads, for the root of a group."""
        module = node.module
        if isinstance(module, nn.Parameter):
            for key, value in self.values.items():
                if value.leaf is module:
                    dim = node.pruning_dim if node.pruning_dim is not None else len(value.shape) - 1
                    yield key, ChannelState((dim % len(value.shape),), state.idxs, state.roots)
            return
        pruner = node.pruner
        coupled = pruner.is_coupled(module)
        if module not in self._calls_of:
            yield from self._bare_entry(module, pruner, side, state)
        for call in self._calls_of.get(module, ()):
            out_dim, in_dim = self._tensor_dims(pruner, module, call)
            channel_inputs = pruner.channel_inputs if pruner.channel_inputs is not None else tuple(range(len(call.inputs)))
            if (side == OUT or coupled) and call.outputs and out_dim is not None:
                key = call.outputs[0]
                if key in self.values:
                    yield key, ChannelState((out_dim % len(call.out_shapes[0]),), state.idxs, state.roots)
                if self._is_state_output(module, 1):
                    for index in (1, 2):
                        if index < len(call.outputs) and call.outputs[index] in self.values:
                            shape = call.out_shapes[index]
                            yield call.outputs[index], ChannelState((len(shape) - 1,), state.idxs, state.roots)
            if (side == IN or coupled) and in_dim is not None:
                for index in channel_inputs:
                    if index < len(call.inputs) and call.inputs[index] in self.values:
                        shape = call.in_shapes[index]
                        yield call.inputs[index], ChannelState((in_dim % len(shape),), state.idxs, state.roots)


def _shape_only_input(module, call: Call, operand: int) -> bool:
    """A float tensor given to an embedding as its indices: a subclass reading only its shape (an actual
    lookup needs integer indices)."""
    dtype = call.input_dtypes[operand] if operand < len(call.input_dtypes) else None
    return isinstance(module, nn.Embedding) and operand == 0 and dtype is not None and dtype.is_floating_point


def _axis_keys(node: Node, side: str) -> list:
    """(tensor id, dim) of the unfused axes carrying a layer's channels on ``side``."""
    module, pruner = node.module, node.pruner
    if pruner.is_coupled(module):
        side = OUT
    axes = pruner.out_axes(module) if side == OUT else pruner.in_axes(module)
    keys = []
    for axis in axes:
        tensor = axis.tensor(module)
        if isinstance(tensor, nn.Parameter) and axis.blocks == 1 and tensor.dim():
            keys.append((id(tensor), axis.dim % tensor.dim()))
    return keys


def _merge(old: ChannelState, new: ChannelState):
    """The union of two states on one slot, each position keeping its lowest root; whether it grew."""
    check = undecided()
    if torch.equal(old.idxs, new.idxs):
        if check and not torch.equal(old.roots, new.roots):
            not_pointwise("a channel reached from two root channels")
        return old, False
    if len(new.idxs) <= len(old.idxs) and bool(torch.isin(new.idxs, old.idxs).all()):
        if check and not torch.equal(old.roots[torch.searchsorted(old.idxs, new.idxs)], new.roots):
            not_pointwise("a channel reached from two root channels")
        return old, False
    idxs = torch.cat([old.idxs, new.idxs])
    roots = torch.cat([old.roots, new.roots])
    unique, inverse = torch.unique(idxs, return_inverse=True)
    big = torch.iinfo(torch.long).max
    merged_roots = torch.full((len(unique),), big, dtype=torch.long).scatter_reduce_(0, inverse, roots, "amin")
    if check and len(unique) < len(idxs) and not torch.equal(merged_roots[inverse], roots):
        not_pointwise("a channel reached from two root channels")
    if len(unique) == len(old.idxs):
        return old, False
    return ChannelState(old.dims, unique, merged_roots), True


def _project(state: ChannelState, shape, dim) -> ChannelState | None:
    letters = [f"d{i}" for i in range(len(shape))]
    mapped = through_letters(state, letters, shape, [letters[dim]], (shape[dim],))
    return mapped


def _layer_letters(shape, channel_dim, reference_shape=None, reference_letters=None):
    letters = [f"d{i}" for i in range(len(shape))]
    letters[channel_dim] = "channel"
    if reference_letters is not None:
        for dim in range(len(shape)):
            if dim == channel_dim:
                letters[dim] = "other-channel"
            elif len(reference_shape) == len(shape) and reference_shape[dim] == shape[dim]:
                letters[dim] = reference_letters[dim]
    return letters


def _checked_dim(shape, declared, channels):
    if channels is None:
        return declared
    if declared is not None and -len(shape) <= declared < len(shape) and shape[declared] == channels:
        return declared
    return _find_dim(shape, channels)


def _find_dim(shape, channels):
    if channels is None:
        return None
    candidates = [d for d, size in enumerate(shape) if size == channels]
    if not candidates:
        return None
    return 1 if 1 in candidates else candidates[-1]
