"""Record one forward pass: every module and torch-function call with its tensor inputs and outputs.

Values are identified by the autograd node that produced them (``grad_fn``, ``output_nr``), so in-place
ops, views and re-used tensors keep distinct identities. Module calls hide the functions they call
internally: walking back from an output jumps from a module's output straight to its inputs.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..utils.nested import container_contents, flatten_as_list

from .blocks import writes_in_place
from .sizes import ShapeRead, TracedSize, follows_pruning, wrap_numel, wrap_shape


@dataclass(eq=False)
class Call:
    """One call in the forward: a declared module, a torch function, or nothing (a leaf value)."""

    kind: str  # "module" | "function"
    target: Any  # module or function
    name: str  # module path or op name
    inputs: list  # value keys, None for non-tensors
    in_shapes: list
    outputs: list  # value keys of tensor outputs
    out_shapes: list
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    input_slots: list = field(default_factory=list)  # (arg position or kwarg name, index inside a list)
    input_dtypes: list = field(default_factory=list)
    output_dtypes: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # index maps computed on demand, reused by every group
    order: int = 0  # position in the forward, so nodes list in execution order

    def __repr__(self):
        return f"Call({self.kind}:{self.name})"


def value_key(tensor: torch.Tensor, keep_alive: list):
    """Hashable identity of a tensor value at this moment of the forward."""
    grad_fn = tensor.grad_fn
    if grad_fn is not None:
        return (grad_fn, tensor.output_nr)
    keep_alive.append(tensor)
    return ("leaf", id(tensor))


def flatten_args(obj) -> tuple[list, pytree.TreeSpec]:
    """Leaves and spec of nested call arguments (torch's pytree); a tensor's slot is its index among them.

    None counts as a leaf, so arguments frozen with None in place of their float tensors keep every slot.
    A container pytree keeps whole (a list subclass, a ModelOutput-like) is replaced by its plain contents
    first, so tensors inside it have slots too.
    """
    if _is_flat_call(obj):  # most calls: tensors and scalars, pytree's answer without its walk
        args, kwargs = obj
        return [*args, *kwargs.values()], _flat_spec(len(args), tuple(kwargs))
    leaves, spec = pytree.tree_flatten(obj, is_leaf=_is_none)
    contents = [container_contents(leaf) for leaf in leaves]
    if any(inner is not None for inner in contents):
        plain = [leaf if inner is None else inner for leaf, inner in zip(leaves, contents)]
        return flatten_args(pytree.tree_unflatten(plain, spec))
    return leaves, spec


def _is_none(leaf) -> bool:
    return leaf is None


_SCALARS = frozenset({int, float, bool, complex, str, type(None), slice, type(Ellipsis), torch.dtype, torch.device,
                      torch.memory_format, torch.layout})


def _is_flat_call(obj) -> bool:
    """``(args, kwargs)`` holding only tensors and scalars: pytree leaves, nothing to walk."""
    if type(obj) is not tuple or len(obj) != 2 or type(obj[0]) is not tuple or type(obj[1]) is not dict:
        return False
    return all(type(v) in _SCALARS or isinstance(v, torch.Tensor) for part in obj for v in (
        part if type(part) is tuple else part.values()))


@lru_cache(maxsize=1024)
def _flat_spec(n_args: int, keys: tuple) -> pytree.TreeSpec:
    return pytree.tree_structure(((None,) * n_args, dict.fromkeys(keys)), is_leaf=_is_none)


def _flatten(obj, out: list | None = None) -> list:
    """(slot, tensor) pairs of nested arguments or outputs, appended to ``out``."""
    out = [] if out is None else out
    out.extend((slot, leaf) for slot, leaf in enumerate(flatten_args(obj)[0]) if isinstance(leaf, torch.Tensor))
    return out


def rebuild(frozen, replaced: dict):
    """Frozen arguments with the tensors of ``replaced`` ({slot: tensor}) put at their slots."""
    leaves, spec = pytree.tree_flatten(frozen, is_leaf=_is_none)
    return pytree.tree_unflatten([replaced.get(slot, leaf) for slot, leaf in enumerate(leaves)], spec)


class FollowedSize(TracedSize):
    """An int attribute an adapter rewrites after pruning (timm's ``Attention.num_heads``).

    Swapped in for one trace only, so a reshape, split or slice that spells it out (or a sum, product
    or quotient of such sizes: split offsets, ``out_features // 2``) is known to follow the pruning.
    """

    def __new__(cls, value: int):
        return TracedSize.__new__(cls, value, ("followed", int(value)))


@contextlib.contextmanager
def followed_sizes(attributes: list, layers: list | None = None, derived: list | None = None):
    """Mark ``(module, names)`` int attributes as :class:`FollowedSize` for the duration of a trace, and
    the size attributes of declared ``layers`` (``(module, names)``) as sizes of those layers, which the
    graph evaluates exactly for any removal. Tuples of ints (a stored view shape) are marked item by item.
    ``derived`` (``(module, ((name, formula), ...))``) attributes are swapped for their formula evaluated
    on the marked layer sizes, when it gives the attribute's value: an expression of layer widths."""
    saved = []
    try:
        for module, names in attributes:
            for name in names:
                owner = module
                if "." in name:  # an attribute of an object the module holds (Phi-3 reads config.num_attention_heads)
                    path, name = name.rsplit(".", 1)
                    for part in path.split("."):
                        owner = getattr(owner, part, None)
                if not hasattr(owner, "__dict__"):
                    continue
                value = owner.__dict__.get(name)
                if type(value) is int:
                    saved.append((owner, name, value))
                    owner.__dict__[name] = FollowedSize(value)
                elif type(value) is tuple and value and all(type(item) is int for item in value):
                    saved.append((owner, name, value))
                    owner.__dict__[name] = tuple(FollowedSize(item) for item in value)
        for module, names in layers or ():
            for name in names:
                value = module.__dict__.get(name)
                if type(value) is int:
                    saved.append((module, name, value))
                    module.__dict__[name] = TracedSize(value, ("layer", module, name, value))
        for module, formulas in derived or ():
            for name, formula in formulas:
                value = module.__dict__.get(name)
                if type(value) is int:
                    expression = formula(module)
                    if isinstance(expression, TracedSize) and int(expression) == value:
                        saved.append((module, name, value))
                        module.__dict__[name] = expression
        yield
    finally:
        for owner, name, value in reversed(saved):
            owner.__dict__[name] = value


def _freeze(leaves: list, spec: pytree.TreeSpec, flat_call: tuple | None = None):
    """Arguments rebuilt from their flattened leaves, so later mutation (DenseNet appends to the list it
    concatenated) cannot change them; ``flat_call`` is the ``(args, kwargs)`` of a call with no nesting,
    rebuilt directly.

    Float tensors are dropped (replays substitute labels for them) and the rest detached, so a recorded
    call holds no activation and no autograd history.
    """
    if flat_call is not None:
        args, kwargs = flat_call
        return tuple(map(_frozen_leaf, args)), {key: _frozen_leaf(value) for key, value in kwargs.items()}
    return pytree.tree_unflatten([_frozen_leaf(leaf) for leaf in leaves], spec)


def _frozen_leaf(leaf):
    if isinstance(leaf, torch.Tensor):
        return None if leaf.is_floating_point() or leaf.is_complex() else leaf.detach()
    return leaf


def _op_name(func) -> str:
    name = getattr(func, "__name__", None)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", "property")
    return name or type(func).__name__


FACTORIES = {"zeros", "ones", "full", "empty", "rand", "randn"}
#: name of the calls standing for ops the trace cannot see (TorchScript functions)
OPAQUE = "<opaque op>"


def _note_followed_factory(tracer, func, args, kwargs, result) -> None:
    """A tensor made from sizes that follow the pruning (T5's ``torch.zeros((1, self.n_heads, q, k))``) is
    made at the new width after pruning: record which of its dims those sizes are."""
    if _op_name(func) not in FACTORIES or not isinstance(result, torch.Tensor):
        return
    size = kwargs.get("size", args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)
    if _op_name(func) == "full" and "size" not in kwargs:
        size = args[0] if args else ()
    if not isinstance(size, (tuple, list)) or len(size) != result.dim():
        return
    dims = frozenset(dim for dim, item in enumerate(size) if follows_pruning(item))
    if dims:
        tracer.keep_alive.append(result)
        tracer.followed_factories[id(result)] = dims


class _Recorder(TorchFunctionMode):
    def __init__(self, tracer: "Tracer"):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        if func in _SIZE_READS and args and isinstance(args[0], torch.Tensor):
            return tracer.read_size(func, args, kwargs, func(*args, **kwargs))
        leaves, spec = flatten_args((args, kwargs))
        flat_in = [(slot, leaf) for slot, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        in_keys = [value_key(t, tracer.keep_alive) for _, t in flat_in]
        in_shapes = [tuple(t.shape) for _, t in flat_in]
        written = tracer.written_views(func, args)
        result = func(*args, **kwargs)
        if not flat_in:
            _note_followed_factory(tracer, func, args, kwargs, result)
            return result
        # x[i] = y mutates x in place and returns None: the new value of x is the output
        flat_out = flatten_as_list(args[0] if _op_name(func) == "__setitem__" else result)
        if any(t.requires_grad for t in flat_out):
            tracer.note_views(flat_out, flat_in[0][1])
            # an op that returns its input unchanged (x.contiguous(), x.to(same)) is no new value
            outputs = [(value_key(t, tracer.keep_alive), tuple(t.shape)) for t in flat_out]
            if any(key in in_keys for key, _ in outputs):
                return result
            frozen_args, frozen_kwargs = _freeze(leaves, spec, (args, kwargs) if _is_flat_call((args, kwargs)) else None)
            call = Call(
                "function", func, _op_name(func), in_keys, in_shapes,
                [key for key, _ in outputs], [shape for _, shape in outputs], frozen_args, frozen_kwargs,
                [slot for slot, _ in flat_in], [t.dtype for _, t in flat_in], [t.dtype for t in flat_out],
            )
            call.order = tracer.next_order()
            for key in call.outputs:
                tracer.function_by_output.setdefault(key, call)
            if written:
                tracer.record_view_writes(written)
        return result


_SIZE_READS = {torch.Tensor.shape.__get__, torch.Tensor.size, torch.Tensor.numel}

#: name of the calls standing for an in-place op on a view writing into the view's base
WRITE_VIEW = "__write_view__"


def write_into_view(base: torch.Tensor, value: torch.Tensor, size, stride, offset: int,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """What an in-place op on a view does to its base, as a function: ``base`` with ``value`` written at
    the view's place: ``size``, ``stride``, ``offset`` in the elements of a contiguous ``base``, or, for a
    base that is itself a strided view, ``positions`` (the flat position in ``base`` of each view element)."""
    out = base.clone(memory_format=torch.contiguous_format)
    if positions is None:
        out.as_strided(size, stride, out.storage_offset() + offset).copy_(value)
    else:
        out.view(-1)[positions] = torch.broadcast_to(value, tuple(size)).reshape(-1).to(out.dtype)
    return out


def _positions_in(child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor | None:
    """Flat positions in ``parent`` of each element of ``child`` (a view into the same storage), or None
    when some element of the child is not one of the parent's."""
    span = max(child.storage_offset() + sum((n - 1) * s for n, s in zip(child.shape, child.stride())),
               parent.storage_offset() + sum((n - 1) * s for n, s in zip(parent.shape, parent.stride()))) + 1
    where = torch.full((span,), -1, dtype=torch.long)
    where.as_strided(tuple(parent.shape), parent.stride(), parent.storage_offset()).copy_(
        torch.arange(parent.numel()).view(tuple(parent.shape)))
    positions = where.as_strided(tuple(child.shape), child.stride(), child.storage_offset()).reshape(-1)
    return None if bool((positions < 0).any()) else positions


class Tracer:
    """Runs the model once, recording calls of declared modules and of torch functions."""

    def __init__(self, is_declared: Callable[[nn.Module], bool]):
        self.is_declared = is_declared
        self.module_by_output: dict = {}
        self.function_by_output: dict = {}
        self.keep_alive: list = []
        #: id(view) -> (view, the tensors it is a view of, nearest first), all weakly held
        self.view_parents: dict = {}
        self.followed_factories: dict = {}  # id(tensor) -> dims sized by followed attributes
        self.calls: list[Call] = []
        self.shape_reads: list[ShapeRead] = []  # renumbered with the values when the graph compacts them
        self._order = 0

    def note_views(self, outputs: list, source: torch.Tensor) -> None:
        """Remember which outputs of a recorded call are views of its first input (``x[:, 1:]``, ``x.view``):
        a later in-place write into such a view changes that input too."""
        for tensor in outputs:
            if tensor._base is not None and tensor is not source and tensor.numel() and \
                    tensor.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
                self.view_parents[id(tensor)] = (weakref.ref(tensor), [weakref.ref(source)] + self._ancestors(source))

    def _ancestors(self, tensor: torch.Tensor) -> list:
        entry = self.view_parents.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else []

    def written_views(self, func, args) -> list:
        """For an in-place op on a view of recorded tensors: ``[(child, parent, parent's key before)]`` up
        the chain of views still alive (each parent changes with its child). Empty otherwise."""
        if not args or not isinstance(args[0], torch.Tensor) or args[0]._base is None:
            return []
        if not writes_in_place(_op_name(func)):
            return []
        chain, child = [], args[0]
        for ancestor in self._ancestors(child):
            parent = ancestor()
            if parent is not None:  # a temporary view (x.narrow(...)[:, :2]) is gone: nothing reads it again
                chain.append((child, parent, value_key(parent, self.keep_alive)))
                child = parent
        return chain

    def record_view_writes(self, chain: list) -> None:
        """Each parent a view was written through is a new value: its old value with the child's new one
        written in at the child's place (:func:`write_into_view`, mapped element by element like any
        movement op)."""
        for child, parent, before in chain:
            after = value_key(parent, self.keep_alive)
            if after == before or not parent.requires_grad:
                return
            offset = child.storage_offset() - parent.storage_offset()
            positions = None
            if not parent.is_contiguous():  # the child's strides are not in the parent's own element units
                positions = _positions_in(child, parent)
                if positions is None:
                    return
            call = Call("function", write_into_view, WRITE_VIEW, [before, value_key(child, self.keep_alive)],
                        [tuple(parent.shape), tuple(child.shape)], [after], [tuple(parent.shape)],
                        (None, None, tuple(child.shape), tuple(child.stride()), offset, positions), {}, [0, 1],
                        [parent.dtype, child.dtype], [parent.dtype])
            call.order = self.next_order()
            self.function_by_output.setdefault(after, call)

    def read_size(self, func, args, kwargs, result):
        """A size read from a tensor, as TracedSizes naming the tensor's value and dim (see sizes.py)."""
        tensor = args[0]
        key = value_key(tensor, self.keep_alive)
        if func is torch.Tensor.numel:
            return wrap_numel(result, tuple(tensor.shape), key, self._read) if type(result) is int else result
        if isinstance(result, torch.Size):
            return wrap_shape(result, key, self._read)
        if type(result) is int:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if isinstance(dim, int) and tensor.dim():
                return TracedSize(result, ("shape", self._read(key, dim % tensor.dim(), result)))
        return result

    def _read(self, key, dim: int, value: int) -> ShapeRead:
        read = ShapeRead(key, dim, value)
        self.shape_reads.append(read)
        return read

    def run(self, model: nn.Module, forward: Callable[[], Any]):
        names = {module: name for name, module in model.named_modules()}
        handles = []
        pending: dict[int, list] = {}

        def pre_hook(module, args, kwargs):
            flat = _flatten((args, kwargs))
            pending.setdefault(id(module), []).append(
                ([value_key(t, self.keep_alive) for _, t in flat], [tuple(t.shape) for _, t in flat],
                 [slot for slot, _ in flat], [t.dtype for _, t in flat])
            )

        def post_hook(module, args, kwargs, output):
            keys, shapes, slots, dtypes = pending[id(module)].pop()
            flat_out = flatten_as_list(output)
            call = Call("module", module, names.get(module, type(module).__name__), keys, shapes,
                        [value_key(t, self.keep_alive) for t in flat_out], [tuple(t.shape) for t in flat_out],
                        input_slots=slots, input_dtypes=dtypes, output_dtypes=[t.dtype for t in flat_out],
                        order=self.next_order())
            self.calls.append(call)
            for key in call.outputs:
                # the outer module's hook fires last and wins: nested declared layers stay hidden
                self.module_by_output[key] = call

        for module in model.modules():
            if self.is_declared(module):
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
                handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
        try:
            with _Recorder(self):
                output = forward()
        finally:
            for handle in handles:
                handle.remove()
        return output

    def calls_after(self, order: int) -> list[Call]:
        """Recorded function calls made after position ``order`` of the forward."""
        return [call for call in self.function_by_output.values() if call.order > order]

    def next_order(self) -> int:
        self._order += 1
        return self._order

    def producer(self, key):
        return self.module_by_output.get(key) or self.function_by_output.get(key)
