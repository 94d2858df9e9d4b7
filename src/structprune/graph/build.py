"""Building a DependencyGraph: one traced forward pass, kept as values, calls and nodes."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..layers.constant_buffer import ConstantBuffer, ConstantBufferPruner, is_constant_buffer
from ..layers.declarations import DEFAULT_PRUNERS, ParameterPruner, find_pruner
from ..layers.registry import LAYER_SIZE_NAMES
from ..utils.nested import call_model, eval_mode, flatten_as_list
from ..utils.gc_pause import gc_paused
from ..utils.sharding import refuse_sharded
from .group import Node
from .hooks import hooks_for
from .trace import OPAQUE, Call, Tracer, followed_sizes


class _Value:
    __slots__ = ("key", "shape", "producer", "consumers", "leaf")

    def __init__(self, key, shape):
        self.key = key
        self.shape = tuple(shape)
        self.producer = None  # (call, output index)
        self.consumers = []  # (call, input index)
        self.leaf = None  # the tensor, for values with no producer


class GraphBuilder:
    """Mixin of DependencyGraph: trace the model once and keep what reaches its outputs."""

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
        refuse_sharded(model, "building a dependency graph")
        self.model = model
        self.verbose = verbose
        from ..layers.declarations import register_optional_layers

        for layer_type in register_optional_layers(model):  # layers of libraries already imported (transformers)
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
        self._hooks = hooks_for(model)
        followed = [pair for hook in self._hooks for pair in hook.follows]
        layers = [(module, LAYER_SIZE_NAMES) for module in self.module2name if self._is_declared(module)]
        derived = [pair for hook in self._hooks for pair in hook.derives]
        with followed_sizes(followed, layers, derived), gc_paused():
            self._trace(model, example_inputs, forward_fn, output_transform)
        self._all_groups_cache = {}
        self._size_dependents = None  # reshapes by the sizes they read; found on the first discovery
        self._init_alive()
        return self

    def _is_declared(self, module) -> bool:
        return find_pruner(module, self.REGISTERED_PRUNERS) is not None

    def _trace(self, model, example_inputs, forward_fn, output_transform):
        tracer = Tracer(self._is_declared)

        def forward():
            output = forward_fn(model, example_inputs) if forward_fn is not None else call_model(model, example_inputs)
            if output_transform is None:
                return output, None, None
            # inside the trace, so the transform's ops (a .sum(), a cat of two heads) join the graph
            boundary = tracer.next_order()
            return output, output_transform(output), boundary

        # frozen layers must still be traced: their outputs need a grad_fn to be told apart from constants
        frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
        for param in frozen:
            param.requires_grad_(True)
        try:
            with eval_mode(model):  # tracing must not move BatchNorm running statistics
                output, transformed, boundary = tracer.run(model, forward)
        except Exception as error:
            raise RuntimeError(
                f"{type(model).__name__} does not run on the given example_inputs ({_describe_inputs(example_inputs)}): "
                f"{type(error).__name__}: {error}. Pass example_inputs with the shape, dtype and device its forward "
                f"expects (the model's parameters are on {_model_device(model)})"
            ) from error
        finally:
            for param in frozen:
                param.requires_grad_(False)
        leaves = flatten_as_list(output if transformed is None else transformed)
        roots = [tensor for tensor in leaves if tensor.grad_fn is not None]
        if not roots:
            raise RuntimeError(
                f"no parameter of {type(model).__name__} reaches its outputs ({len(leaves)} tensor outputs, "
                f"none with a grad_fn): check requires_grad on the parameters and that the forward uses them"
            )
        root_keys = {(t.grad_fn, t.output_nr) for t in roots}
        self._output_keys = root_keys if transformed is None else _kept_outputs(tracer, output, root_keys, boundary)
        self._collect(tracer, list(root_keys))
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
        read_as: dict = {}  # value key -> (shape, dtype, order) of a call reading it
        while stack:
            key = stack.pop()
            if key in self.values:
                continue
            call = tracer.producer(key)
            if call is None and key[0] != "leaf" and key in read_as:
                call = _opaque_call(tracer, key, *read_as[key])
            value = _Value(key, ())
            self.values[key] = value
            if call is None:
                continue
            if id(call) not in seen_calls:
                seen_calls.add(id(call))
                self.calls.append(call)
                for index, input_key in enumerate(call.inputs):
                    if input_key is not None and input_key not in self.values:
                        read_as.setdefault(input_key, (call.in_shapes[index], call.input_dtypes[index]
                                                       if index < len(call.input_dtypes) else None, call.order))
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
        self._followed_constants = dict(tracer.followed_factories)
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
        self._guessed_dims = set()
        for value in self.values.values():
            tensor = value.leaf
            owner = self._declared_params.get(tensor) if isinstance(tensor, nn.Parameter) else None
            if owner is not None and owner not in self.module2node:
                # a declared layer whose weight the forward uses bare (timm EVA/BEiT: F.linear(x, qkv.weight))
                self.module2node[owner] = Node(owner, self.module2name.get(owner, type(owner).__name__),
                                               self.get_pruner_of_module(owner))
            if isinstance(tensor, nn.Parameter) and tensor not in self._declared_params and tensor in named:
                if tensor.dim() == 0:
                    continue  # a scalar (CLIP's logit_scale) has no channels to remove
                dim = self._unwrapped_dims.get(tensor)
                if dim is None:
                    self._guessed_dims.add(tensor)  # until channels first arrive (discovery._settle_dim)
                dim = _guess_parameter_dim(tensor) if dim is None else dim % tensor.dim()
                self.module2node[tensor] = Node(tensor, named[tensor], ParameterPruner(dim), dim)
        self._add_inner_layers()
        self._add_constant_buffers()
        self._link_nodes()

    def _add_inner_layers(self):
        """Nodes for widths a layer holds inside (an MoE experts module's intermediate width and expert
        count): layers with no calls, so their groups hold only themselves."""
        from .queries import _is_ignored

        by_name = {name: module for module, name in self.module2name.items()}
        self._inner_owner = {}
        for module, node in list(self.module2node.items()):
            if isinstance(module, nn.Parameter) or _is_ignored(module, self.IGNORED_LAYERS):
                continue
            parent = by_name.get(node.name.rpartition(".")[0]) if "." in node.name else self.model
            for inner in node.pruner.inner_layers(module, parent):
                if any(_is_ignored(child, self.IGNORED_LAYERS) for child in inner.children()):
                    continue
                name = f"{node.name}[{type(inner).__name__}]"
                self.module2name[inner] = name
                self.module2node[inner] = Node(inner, name, self.get_pruner_of_module(inner))
                self._inner_owner[inner] = module

    def _add_constant_buffers(self):
        """Layers for constant buffers the forward reads (layers/constant_buffer.py), keyed by the traced
        tensor's id; their owner stands in for them where a layer must be found in the model."""
        self._constant_buffers = {}
        leaves = {id(value.leaf) for value in self.values.values() if value.leaf is not None}
        for owner_name, owner in self.model.named_modules():
            if owner in self.module2node:
                continue
            for name, buffer in owner._buffers.items():
                if buffer is None or id(buffer) not in leaves or id(buffer) in self._constant_buffers:
                    continue
                if not is_constant_buffer(owner, name, buffer):
                    continue
                proxy = ConstantBuffer(owner, name)
                full = f"{owner_name}.{name}" if owner_name else name
                self.module2name[proxy] = full
                self.module2node[proxy] = Node(proxy, full, ConstantBufferPruner())
                self._inner_owner[proxy] = owner
                self._constant_buffers[id(buffer)] = proxy

    def inner_layers_of(self, module: nn.Module) -> list:
        """The inner layers (see ``BasePruningFunc.inner_layers``) of ``module`` and its submodules."""
        within = set(map(id, module.modules()))
        return [inner for inner, owner in getattr(self, "_inner_owner", {}).items() if id(owner) in within]

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


def _kept_outputs(tracer: Tracer, output, transformed_keys: set, boundary: int) -> set:
    """Model outputs that ``output_transform`` keeps: those it returns or reads with an op.

    torch_pruning's transforms often end in a reduction (``out.logits.sum()``): the logits are still
    what the model outputs, so they keep their shape as they would with ``lambda out: out.logits``;
    outputs the transform never touches (``last_hidden_state`` beside ``pooler_output``) are internal.
    """
    raw = {(t.grad_fn, t.output_nr) for t in flatten_as_list(output) if t.grad_fn is not None}
    read = {key for call in tracer.calls_after(boundary) for key in call.inputs if key in raw}
    return (raw & transformed_keys) | read | (transformed_keys - _all_call_outputs(tracer, boundary))


def _all_call_outputs(tracer: Tracer, boundary: int) -> set:
    """Values the transform computed itself (a scalar sum is no model output)."""
    return {key for call in tracer.calls_after(boundary) for key in call.outputs}


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


def _opaque_call(tracer: Tracer, key, shape, dtype, order) -> Call | None:
    """A value made by ops the trace cannot see (a TorchScript function: BLOOM's gelu) gets a call whose
    inputs are the nearest recorded values behind it in the autograd graph, so channels still flow through
    it (as an elementwise op when the shapes broadcast; the opaque op kind refuses it otherwise)."""
    inputs, seen, frontier = [], set(), list(key[0].next_functions)
    while frontier and len(seen) < 10000:
        fn, index = frontier.pop()
        if fn is None or (id(fn), index) in seen:
            continue
        seen.add((id(fn), index))
        variable = getattr(fn, "variable", None)
        if isinstance(variable, torch.Tensor):  # AccumulateGrad: a parameter
            tracer.keep_alive.append(variable)
            inputs.append((("leaf", id(variable)), tuple(variable.shape), variable.dtype))
            continue
        producer = tracer.producer((fn, index))
        if producer is not None:
            position = producer.outputs.index((fn, index))
            inputs.append(((fn, index), tuple(producer.out_shapes[position]), producer.output_dtypes[position]))
            continue
        frontier.extend(fn.next_functions)
    if not inputs:
        return None
    return Call("function", None, OPAQUE, [k for k, _, _ in inputs], [s for _, s, _ in inputs], [key], [shape],
                input_slots=[(i,) for i in range(len(inputs))], input_dtypes=[d for _, _, d in inputs],
                output_dtypes=[dtype], order=order - 0.5)


def _normalise_unwrapped(unwrapped) -> dict:
    result = {}
    if not unwrapped:
        return result
    items = unwrapped.items() if isinstance(unwrapped, dict) else unwrapped
    for param, dim in items:
        result[param] = dim
    return result
