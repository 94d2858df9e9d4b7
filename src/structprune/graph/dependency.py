"""DependencyGraph: trace once, then find the coupled channels of any layer by walking channel states."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..layers.base import BasePruningFunc, as_index_tensor, pruning_once, validate_idxs
from ..layers.declarations import DEFAULT_PRUNERS, ParameterPruner, find_pruner
from .group import Group, Node, is_in_channel_pruning_fn, is_out_channel_pruning_fn, item_axes  # noqa: F401
from .discovery import IN, OUT, GroupFinder
from .snapshot import Snapshot
from ..utils.nested import call_model
from .trace import LAYER_SIZE_NAMES, Call, Tracer, _flatten, followed_sizes



class _Value:
    __slots__ = ("key", "shape", "producer", "consumers", "leaf")

    def __init__(self, key, shape):
        self.key = key
        self.shape = tuple(shape)
        self.producer = None  # (call, output index)
        self.consumers = []  # (call, input index)
        self.leaf = None  # the tensor, for values with no producer


class DependencyGraph(GroupFinder):
    """Coupled-channel analysis of a model, built from one traced forward pass."""

    def __init__(self):
        self.REGISTERED_PRUNERS: dict = dict(DEFAULT_PRUNERS)
        self.CUSTOMIZED_PRUNERS: dict = {}
        self.module2node: dict = {}
        self.module2name: dict = {}
        self._history: list = []
        self.IGNORED_LAYERS: list = []
        self.ignored_params: list = []
        self._all_groups_cache: dict = {}

    # -- registration --------------------------------------------------------------------------------
    def register_customized_layer(self, layer_type_or_instance, layer_pruner: BasePruningFunc):
        """Teach the graph a layer: a type (all its instances) or one module instance."""
        self.CUSTOMIZED_PRUNERS[layer_type_or_instance] = layer_pruner
        self.REGISTERED_PRUNERS[layer_type_or_instance] = layer_pruner

    def get_pruner_of_module(self, module) -> BasePruningFunc | None:
        if isinstance(module, nn.Parameter):
            node = self.module2node.get(module)
            return node.pruner if node is not None else ParameterPruner()
        return find_pruner(module, self.REGISTERED_PRUNERS)

    def get_out_channels(self, module_or_node):
        module = module_or_node.module if isinstance(module_or_node, Node) else module_or_node
        pruner = self.get_pruner_of_module(module)
        return None if pruner is None else pruner.get_out_channels(module)

    def get_in_channels(self, module_or_node):
        module = module_or_node.module if isinstance(module_or_node, Node) else module_or_node
        pruner = self.get_pruner_of_module(module)
        return None if pruner is None else pruner.get_in_channels(module)

    is_out_channel_pruning_fn = staticmethod(is_out_channel_pruning_fn)
    is_in_channel_pruning_fn = staticmethod(is_in_channel_pruning_fn)

    # -- building ------------------------------------------------------------------------------------
    def build_dependency(
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Callable | None = None,
        output_transform: Callable | None = None,
        unwrapped_parameters=None,
        customized_pruners: dict | None = None,
        ignored_layers=None,
        ignored_params=None,
        verbose: bool = True,
    ) -> "DependencyGraph":
        if not torch.is_grad_enabled():
            raise RuntimeError(
                "build_dependency needs autograd to trace the model, but gradients are disabled "
                "(torch.no_grad() or torch.inference_mode()); build the graph outside that context"
            )
        self.model = model
        self.verbose = verbose
        from ..layers.declarations import register_optional_layers

        for layer_type in register_optional_layers():  # layers of libraries already imported (transformers)
            self.REGISTERED_PRUNERS.setdefault(layer_type, DEFAULT_PRUNERS[layer_type])
        for layer, pruner in (customized_pruners or {}).items():
            self.register_customized_layer(layer, pruner)
        for item in list(ignored_layers or []) + list(ignored_params or []):
            if not isinstance(item, (nn.Module, type, nn.Parameter)):
                raise TypeError(
                    f"ignored_layers accepts modules, module types and nn.Parameters; got {type(item).__name__} "
                    f"({item!r}): pass the module itself, e.g. model.fc"
                )
        self.IGNORED_LAYERS = list(ignored_layers or [])
        self.ignored_params = list(ignored_params or [])
        self.module2name = {module: name for name, module in model.named_modules()}
        for module in self.module2name:
            # layer meanings (a conv being depthwise) are fixed per trace: a fresh trace looks afresh
            module.__dict__.pop("_structprune_depthwise", None)
        self._param_names = {param: name for name, param in model.named_parameters(remove_duplicate=False)}
        self._buffer_ids = {id(buffer) for buffer in model.buffers()}
        self._unwrapped_dims = _normalise_unwrapped(unwrapped_parameters)
        from ..adapters import matching_modules

        self._adapted_modules = matching_modules(model)
        followed = [(module, adapter.follows) for module, adapter in self._adapted_modules]
        layers = [(module, LAYER_SIZE_NAMES) for module in self.module2name if self._is_declared(module)]
        derived = [(module, adapter.derives) for module, adapter in self._adapted_modules if adapter.derives]
        with followed_sizes(followed, layers, derived):
            self._trace(model, example_inputs, forward_fn, output_transform)
        self._all_groups_cache = {}
        self._size_dependents = None  # reshapes by the sizes they read; found on the first discovery
        self._init_alive()
        return self

    def _is_declared(self, module) -> bool:
        return find_pruner(module, self.REGISTERED_PRUNERS) is not None

    def _trace(self, model, example_inputs, forward_fn, output_transform):
        tracer = Tracer(self._is_declared)
        was_training = model.training
        model.eval()  # tracing must not move BatchNorm running statistics

        def forward():
            if forward_fn is not None:
                return forward_fn(model, example_inputs)
            return call_model(model, example_inputs)

        # frozen layers must still be traced: their outputs need a grad_fn to be told apart from constants
        frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
        for param in frozen:
            param.requires_grad_(True)
        try:
            output = tracer.run(model, forward)
        except Exception as error:
            raise RuntimeError(
                f"{type(model).__name__} does not run on the given example_inputs ({_describe_inputs(example_inputs)}): "
                f"{type(error).__name__}: {error}. Pass example_inputs with the shape, dtype and device its forward "
                f"expects (the model's parameters are on {_model_device(model)})"
            ) from error
        finally:
            for param in frozen:
                param.requires_grad_(False)
            model.train(was_training)
        if output_transform is not None:
            output = output_transform(output)
        leaves = [tensor for _, tensor in _flatten(output, []) if isinstance(tensor, torch.Tensor)]
        roots = [tensor for tensor in leaves if tensor.grad_fn is not None]
        if not roots:
            raise RuntimeError(
                f"no parameter of {type(model).__name__} reaches its outputs ({len(leaves)} tensor outputs, "
                f"none with a grad_fn): check requires_grad on the parameters and that the forward uses them"
            )
        self._output_keys = {(t.grad_fn, t.output_nr) for t in roots}
        self._collect(tracer, list(self._output_keys))
        self._compact(tracer.shape_reads)

    def _compact(self, shape_reads=()):
        """Swap autograd nodes for plain ids so the traced graph is freed.

        Holding it would keep each parameter's gradient accumulator alive with the pre-pruning shape, and
        the next backward after pruning would fail. Sizes read from tensors name values the same way
        (None: a value that never reaches an output, whose size nothing prunes).
        """
        ids = {key: index for index, key in enumerate(self.values)}
        for read in shape_reads:
            read.key = ids.get(read.key)
        for key, value in self.values.items():
            value.key = ids[key]
        self.values = {ids[key]: value for key, value in self.values.items()}
        for call in self.calls:
            call.inputs = [ids.get(key) for key in call.inputs]
            call.outputs = [ids.get(key) for key in call.outputs]
        self._output_keys = {ids[key] for key in self._output_keys if key in ids}

    def _collect(self, tracer: Tracer, output_keys: list):
        """Walk back from the outputs once, iteratively, keeping only calls that reach them."""
        self.values: dict = {}
        self.calls: list[Call] = []
        seen_calls = set()
        stack = list(output_keys)
        param_owner = {}
        for module in self.module2name:
            if self._is_declared(module):
                for param in module.parameters():
                    param_owner.setdefault(param, module)
        self._declared_params = param_owner
        while stack:
            key = stack.pop()
            if key in self.values:
                continue
            call = tracer.producer(key)
            value = _Value(key, ())
            self.values[key] = value
            if call is None:
                continue
            if id(call) not in seen_calls:
                seen_calls.add(id(call))
                self.calls.append(call)
                for input_key in call.inputs:
                    if input_key is not None and input_key not in self.values:
                        stack.append(input_key)
        self.calls.sort(key=lambda call: call.order)
        self._calls_of = {}
        for call in self.calls:
            if call.kind == "module":
                self._calls_of.setdefault(call.target, []).append(call)
        for call in self.calls:
            for index, key in enumerate(call.outputs):
                if key in self.values:
                    self.values[key].producer = (call, index)
                    self.values[key].shape = tuple(call.out_shapes[index])
            for index, key in enumerate(call.inputs):
                value = self.values.get(key)
                if value is None:
                    continue
                value.consumers.append((call, index))
                value.shape = tuple(call.in_shapes[index])
        leaf_tensors = {id(t): t for t in tracer.keep_alive}
        for key, value in self.values.items():
            if value.producer is None and key[0] == "leaf":
                tensor = leaf_tensors.get(key[1])
                value.leaf = tensor
        self._build_nodes()

    def _build_nodes(self):
        self.module2node = {}
        for call in self.calls:
            if call.kind == "module" and call.target not in self.module2node:
                module = call.target
                self.module2node[module] = Node(module, self.module2name.get(module, call.name),
                                                self.get_pruner_of_module(module))
        named = self._param_names
        for value in self.values.values():
            tensor = value.leaf
            owner = self._declared_params.get(tensor) if isinstance(tensor, nn.Parameter) else None
            if owner is not None and owner not in self.module2node:
                # a declared layer whose weight the forward uses bare (timm EVA/BEiT: F.linear(x, qkv.weight))
                self.module2node[owner] = Node(owner, self.module2name.get(owner, type(owner).__name__),
                                               self.get_pruner_of_module(owner))
            if isinstance(tensor, nn.Parameter) and tensor not in self._declared_params and tensor in named:
                dim = self._unwrapped_dims.get(tensor)
                dim = _guess_parameter_dim(tensor) if dim is None else dim % tensor.dim()
                self.module2node[tensor] = Node(tensor, named[tensor], ParameterPruner(dim), dim)
        self._link_nodes()

    def _link_nodes(self):
        """Module-level inputs/outputs: nearest nodes across function calls (for inspection and drawing)."""
        upstream: dict = {}

        def nodes_feeding(key):
            found, stack, seen = [], [key], set()
            while stack:
                current = stack.pop()
                if current in seen or current not in self.values:
                    continue
                seen.add(current)
                if current in upstream:
                    found.extend(upstream[current])
                    continue
                value = self.values[current]
                if value.producer is None:
                    if value.leaf is not None and value.leaf in self.module2node:
                        found.append(self.module2node[value.leaf])
                    continue
                call = value.producer[0]
                if call.kind == "module":
                    found.append(self.module2node[call.target])
                else:
                    stack.extend(k for k in call.inputs if k is not None)
            return found

        for call in self.calls:
            if call.kind != "module":
                continue
            node = self.module2node[call.target]
            for key in call.inputs:
                if key is None:
                    continue
                for source in nodes_feeding(key):
                    if source is not node and source not in node.inputs:
                        node.inputs.append(source)
                        source.outputs.append(node)

    # -- groups ----------------------------------------------------------------------------------------
    def get_pruning_group(self, module, pruning_fn, idxs) -> Group:
        """Every (layer, side, indices) that must go with removing ``idxs`` via ``pruning_fn`` on ``module``."""
        node = self.module2node.get(module)
        if node is None:
            if module not in self.module2name and module not in self._param_names:
                raise KeyError(
                    f"{type(module).__name__} does not belong to the traced model: it comes from a different model; "
                    f"build a DependencyGraph for that model, or pass this model's own layer"
                )
            raise KeyError(
                f"{self._name(module)} is not in the dependency graph: it is not a declared layer type or it "
                f"does not take part in the traced forward; register a customized pruner for its type"
            )
        idxs = as_index_tensor(idxs)
        side = OUT if is_out_channel_pruning_fn(pruning_fn) else IN
        if isinstance(module, nn.Parameter) or node.pruner.is_coupled(module):
            side = OUT
        total = self._channels(node, side)
        if total is not None:
            # a group over every channel is fine to inspect and score; pruning it is refused later
            validate_idxs(module, idxs, total, side + "put", name=node.name, allow_all=True)
        alive = self._alive.get((module, side))
        original = alive[idxs] if alive is not None and (module, side) in self._position_maps else idxs
        return self._to_current(self._discover(node, side, original, pruning_fn))

    # The trace describes the model as built; after pruning, its index maps still hold for the channels
    # that remain. Groups are found in original numbering and shown in current numbering.
    def _init_alive(self):
        # original indices still alive, and original -> current position maps, only for pruned sides
        self._position_maps = {}
        self._original_counts = {}
        self._alive = {}
        for module, node in self.module2node.items():
            out_total = self._safe_channels(node, OUT)
            if out_total is not None:
                self._alive[(module, OUT)] = torch.arange(out_total)
                self._original_counts[(module, OUT)] = out_total
            if not isinstance(module, nn.Parameter) and not node.pruner.is_coupled(module):
                in_total = self._safe_channels(node, IN)
                if in_total is not None:
                    self._alive[(module, IN)] = torch.arange(in_total)
                    self._original_counts[(module, IN)] = in_total

    def _safe_channels(self, node, side):
        try:
            return self._channels(node, side)
        except (NotImplementedError, AttributeError):
            return None

    def _side_of(self, item) -> str:
        module = item.dep.target.module
        if isinstance(module, nn.Parameter) or item.dep.target.pruner.is_coupled(module):
            return OUT
        return OUT if is_out_channel_pruning_fn(item.dep.handler) else IN

    def _to_current(self, original: Group) -> Group:
        group = Group(self)
        group.blocked = original.blocked
        group.size_ties = original.size_ties
        root_map = self._position_maps.get((original[0].dep.target.module, self._side_of(original[0])))
        for k, item in enumerate(original):
            position_map = self._position_maps.get((item.dep.target.module, self._side_of(item)))
            idxs, roots = original.item_tensors(k)
            keep = None
            if position_map is not None:
                idxs = position_map[idxs]
                keep = idxs >= 0
            if root_map is not None:
                roots = root_map[roots]
                keep = roots >= 0 if keep is None else keep & (roots >= 0)
            if keep is not None and not bool(keep.all()):
                idxs, roots = idxs[keep], roots[keep]
            if len(idxs) or k == 0:
                group.add_dep(item.dep, idxs, roots)
        return group

    def _channels(self, node, side):
        pruner = node.pruner
        module = node.module
        return pruner.get_out_channels(module) if side == OUT else pruner.get_in_channels(module)

    def get_all_groups(self, ignored_layers=None, root_module_types=None, include_blocked: bool = False) -> Iterable[Group]:
        """One group per independent set of coupled channels, rooted at the first layer that owns it.

        Groups whose full channel set cannot be removed (``group.blocked``) are skipped unless
        ``include_blocked``: some of their subsets may still be removable (whole attention heads when
        rotary embeddings pin the head dims).
        """
        ignored = list(ignored_layers or []) + list(self.IGNORED_LAYERS)
        from ..layers.declarations import default_root_types

        types = tuple(root_module_types) if root_module_types else default_root_types()
        covered = set()
        for module, node in self.module2node.items():
            if isinstance(module, nn.Parameter) or not isinstance(module, types):
                continue
            if _is_ignored(module, ignored) or (module, OUT) in covered:
                continue
            total = node.pruner.get_out_channels(module)
            if not total:
                continue
            group = self._cached_group(node)
            if len(group[0].idxs) == 0:
                continue
            for item in group:
                # only a one-to-one image of the root is covered: channels reached as whole heads (many
                # channels per root channel) still deserve a group of their own for finer pruning
                if self._side_of(item) == OUT and len(set(item.root_idxs)) == len(item.root_idxs):
                    covered.add((item.dep.target.module, OUT))
            if group.blocked and not include_blocked:
                continue
            if any(_is_ignored(item.dep.target.module, ignored) and is_out_channel_pruning_fn(item.dep.handler)
                   for item in group):
                continue
            if any(self._owns_ignored_param(item) for item in group):
                continue
            yield group

    def _owns_ignored_param(self, item) -> bool:
        """A group that would slice an ignored parameter (e.g. ``bn.weight``) is left alone."""
        if not self.ignored_params:
            return False
        module = item.dep.target.module
        if isinstance(module, nn.Parameter):
            return any(module is p for p in self.ignored_params)
        return any(any(axis.tensor(module) is p for p in self.ignored_params) for axis in item_axes(item))

    def _cached_group(self, node):
        module = node.module
        if module not in self._all_groups_cache:
            full = self._alive[(module, OUT)]
            self._all_groups_cache[module] = self._discover(node, OUT, full, node.pruner.prune_out_channels)
        return self._to_current(self._all_groups_cache[module])

    def check_pruning_group(self, group: Group) -> bool:
        """True when pruning the group leaves every layer with at least one channel and breaks nothing."""
        if group.blocked:
            return False
        for item in group:
            module = item.dep.target.module
            pruner = item.dep.target.pruner
            if is_out_channel_pruning_fn(item.dep.handler):
                total = pruner.get_out_channels(module)
            else:
                total = pruner.get_in_channels(module)
            if total is not None and len(set(item.idxs)) >= total:
                return False
            if not isinstance(module, nn.Parameter) and not pruner.is_coupled(module):
                side = "output" if is_out_channel_pruning_fn(item.dep.handler) else "input"
                try:
                    pruner.check_structure(module, item.idxs, side)
                except ValueError:
                    return False
        return True

    # -- applying --------------------------------------------------------------------------------------
    def _apply_group(self, group: Group):
        for item in group:
            module = item.dep.target.module
            pruner = item.dep.target.pruner
            total = pruner.get_out_channels(module) if is_out_channel_pruning_fn(item.dep.handler) else pruner.get_in_channels(module)
            side = "output" if is_out_channel_pruning_fn(item.dep.handler) else "input"
            if total is not None:
                validate_idxs(module, as_index_tensor(item.idxs), total, side, name=item.dep.target.name)
            if not isinstance(module, nn.Parameter) and not pruner.is_coupled(module):
                try:
                    pruner.check_structure(module, item.idxs, side)
                except ValueError as error:
                    raise ValueError(f"{item.dep.target.name}: {error}") from None
        snapshot = Snapshot([item.dep.target.module for item in group])
        try:
            with pruning_once():
                for item in group:
                    item.dep(item.idxs)
        except BaseException:
            snapshot.restore()
            raise
        from ..adapters import removed_outputs, sync_attributes

        # the removed indices tell an attention adapter fewer heads from narrower heads
        sync_attributes(self.model, self._adapted_modules, removed_outputs(group))
        for item in group:
            key = (item.dep.target.module, self._side_of(item))
            if key in self._alive:
                keep = torch.ones(len(self._alive[key]), dtype=torch.bool)
                keep[torch.tensor(item.idxs, dtype=torch.long)] = False
                alive = self._alive[key][keep]
                self._alive[key] = alive
                original_count = self._original_counts[key]
                position_map = torch.full((original_count,), -1, dtype=torch.long)
                position_map[alive] = torch.arange(len(alive))
                self._position_maps[key] = position_map

    def _record(self, node: Node, fn, idxs):
        self._history.append((node.name, is_out_channel_pruning_fn(fn), [int(i) for i in idxs]))

    def pruning_history(self) -> list:
        return list(self._history)

    def load_pruning_history(self, history):
        named = dict(self.model.named_modules())
        params = dict(self.model.named_parameters())
        for name, is_out, idxs in history:
            module = named.get(name, params.get(name))
            if module is None:
                raise KeyError(f"pruning history names '{name}', which the model does not have")
            pruner = self.get_pruner_of_module(module)
            fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
            self.get_pruning_group(module, fn, idxs).prune(record_history=True)

    def _name(self, module) -> str:
        if isinstance(module, nn.Parameter):
            return self._param_names.get(module, "parameter")
        return self.module2name.get(module, type(module).__name__)


def _describe_inputs(inputs) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"tensor {list(inputs.shape)} {str(inputs.dtype).replace('torch.', '')} on device {inputs.device}"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {_describe_inputs(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(_describe_inputs(v) for v in inputs) + ")"
    return type(inputs).__name__


def _model_device(model) -> str:
    param = next(model.parameters(), None)
    return f"device {param.device}" if param is not None else "no device (no parameters)"


def _guess_parameter_dim(tensor) -> int:
    """The only non-singleton dim, else the last one (token layouts such as [1, N, C] position embeddings)."""
    wide = [d for d, size in enumerate(tensor.shape) if size > 1]
    return wide[0] if len(wide) == 1 else tensor.dim() - 1


def _is_ignored(module, ignored) -> bool:
    for item in ignored:
        if isinstance(item, type) and not isinstance(module, nn.Parameter) and isinstance(module, item):
            return True
        if item is module:
            return True
    return False


def _normalise_unwrapped(unwrapped) -> dict:
    result = {}
    if not unwrapped:
        return result
    items = unwrapped.items() if isinstance(unwrapped, dict) else unwrapped
    for param, dim in items:
        result[param] = dim
    return result
