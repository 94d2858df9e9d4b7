"""Count multiply-accumulate operations (MACs) and parameters of a model.

The counter runs one forward pass of the model on example inputs and adds up
the MACs of every operation it sees. Two mechanisms cooperate:

* **Module hooks.** Modules whose type (or a base class of it) appears in
  ``MODULE_COUNTERS`` are "counted modules": a forward hook computes their MACs
  from the weight and input/output shapes. Their submodules are not hooked, so
  e.g. ``nn.MultiheadAttention.out_proj`` is not counted twice.
* **A TorchFunctionMode.** Matrix products that are called functionally
  outside any counted module (``torch.matmul``/``@``, ``bmm``, ``mm``,
  ``addmm``, ``baddbmm``, ``einsum``, ``F.linear``, ``F.conv*``,
  ``F.scaled_dot_product_attention``, ...) are counted as they execute; this is
  what catches the attention-score matmuls of hand-written attention blocks.

Conventions (one MAC = one multiply followed by one add):

* Convolution / linear / matmul: one MAC per weight-input product; bias
  additions are not counted (the usual convention behind the published
  "4.1 GMACs" for ResNet-50).
* Normalisation layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm,
  RMSNorm): 1 MAC per output element for the normalisation itself plus 1 more
  when the layer has an affine weight, i.e. 2 per element for the common case.
* Pooling: average/max/LP pooling with a kernel counts one MAC per element read
  (``output elements * kernel size``); adaptive pooling counts the input
  elements (each is read about once).
* Upsample: per output element, the number of source elements blended
  (nearest 1, linear 2, bilinear 4, bicubic 16, trilinear 8).
* Multi-head attention: the q/k/v and output projections plus the two
  attention matmuls (``QK^T`` and ``attn @ V``); softmax is not counted.
* RNN/LSTM/GRU (and their cells): per time step and per layer-direction, the
  input and hidden matrix products (plus the LSTM projection), and the
  element-wise gate products (3 per hidden unit for LSTM and GRU, none for a
  vanilla RNN).
* Fused mixture-of-experts (transformers' ``gate_up_proj``/``down_proj`` experts): per (token, chosen
  expert) pair, that expert's projections; routing itself is the router's ``F.linear``.
* Activations, dropout, embeddings, element-wise additions: 0.
* ``einsum``: the product of all index sizes, which is exact for two operands
  and an upper bound (naive evaluation) for three or more.

Parameters are ``sum(p.numel() for p in model.parameters())``; shared
parameters are counted once.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from .nested import call_model, evaluating, first_tensor

__all__ = ["count_ops_and_params", "count_params", "MODULE_COUNTERS", "FUNCTION_COUNTERS"]

ModuleCounter = Callable[[nn.Module, tuple, dict, Any], int]
FunctionCounter = Callable[[tuple, dict, Any], int]


def count_params(model: nn.Module) -> int:
    """Return the number of parameters of ``model`` (shared ones counted once)."""
    # parameters() already de-duplicates parameters registered under several names.
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- #
# Small shape helpers
# --------------------------------------------------------------------------- #


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    """Fetch an argument that may have been passed positionally or by name."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name)


def _output_tensor(output: Any) -> torch.Tensor:
    """Main output tensor of a module (the first tensor of tuple outputs)."""
    tensor = first_tensor(output)
    if tensor is None:
        raise TypeError(f"expected a tensor output, got {type(output).__name__}")
    return tensor


def _kernel_volume(weight: torch.Tensor) -> int:
    """Product of the spatial kernel dimensions of a conv weight."""
    return math.prod(weight.shape[2:])


def _as_tuple(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    return tuple(value)


# --------------------------------------------------------------------------- #
# Per-module counters: (module, args, kwargs, output) -> MACs
# --------------------------------------------------------------------------- #


def _conv_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    # Weight is (C_out, C_in / groups, *k); read shapes from the weight rather than
    # from in_channels/groups so that hand-pruned layers are counted correctly.
    weight = module.weight
    return _output_tensor(output).numel() * weight.shape[1] * _kernel_volume(weight)


def _conv_transpose_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    # Weight is (C_in, C_out / groups, *k): every input element is scattered
    # into C_out / groups * k outputs.
    weight = module.weight
    inputs = _arg(args, kwargs, 0, "input")
    return inputs.numel() * weight.shape[1] * _kernel_volume(weight)


def _linear_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    return _output_tensor(output).numel() * module.weight.shape[1]


def _bilinear_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    weight = module.weight  # (out, in1, in2)
    return _output_tensor(output).numel() * weight.shape[1] * weight.shape[2]


def _norm_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    per_element = 1 + int(getattr(module, "weight", None) is not None)
    return _output_tensor(output).numel() * per_element


def _kernel_pool_macs(
    module: nn.Module, args: tuple, kwargs: dict, output: Any, *, ndim: int
) -> int:
    kernel = _as_tuple(module.kernel_size, ndim)
    return _output_tensor(output).numel() * math.prod(kernel)


def _adaptive_pool_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    return _arg(args, kwargs, 0, "input").numel()


_UPSAMPLE_READS = {
    "nearest": 1,
    "nearest-exact": 1,
    "linear": 2,
    "bilinear": 4,
    "bicubic": 16,
    "trilinear": 8,
    "area": 1,
}


def _upsample_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    return _output_tensor(output).numel() * _UPSAMPLE_READS.get(module.mode, 1)


def _mha_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    query = _arg(args, kwargs, 0, "query")
    key = _arg(args, kwargs, 1, "key")
    value = _arg(args, kwargs, 2, "value")
    if query.dim() == 3:
        batch = query.shape[0] if module.batch_first else query.shape[1]
        seq_dim = 1 if module.batch_first else 0
    else:  # unbatched (L, E)
        batch, seq_dim = 1, 0
    len_q, len_k = query.shape[seq_dim], key.shape[seq_dim]
    # The projected width and output width come from out_proj, which stays
    # consistent with the in-projections even after pruning.
    inner, out_dim = module.out_proj.weight.shape[1], module.out_proj.weight.shape[0]
    # bias_k/bias_v and add_zero_attn each append one key position.
    attended = len_k + int(module.bias_k is not None) + int(module.add_zero_attn)
    projections = (
        len_q * query.shape[-1] * inner
        + len_k * key.shape[-1] * inner
        + len_k * value.shape[-1] * inner
        + len_q * inner * out_dim
    )
    attention = 2 * len_q * attended * inner  # QK^T and attn @ V
    return batch * (projections + attention)


# (gates, element-wise products per hidden unit) for each recurrent cell kind.
_RNN_CELL_COSTS = {
    "LSTM": (4, 3),
    "GRU": (3, 3),
    "RNN_TANH": (1, 0),
    "RNN_RELU": (1, 0),
}


def _rnn_steps(inputs: torch.Tensor | PackedSequence) -> int:
    """Number of (time step, sequence) pairs processed by a recurrent layer."""
    if isinstance(inputs, PackedSequence):
        return inputs.data.shape[0]
    if inputs.dim() == 3:
        return inputs.shape[0] * inputs.shape[1]
    return inputs.shape[0]  # unbatched (L, H_in)


def _rnn_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    gates, elementwise = _RNN_CELL_COSTS[module.mode]
    # Every weight matrix (ih, hh, and the LSTM projection hr, for each layer
    # and direction) is applied once per step, so their sizes add up directly.
    matrix = sum(p.numel() for n, p in module.named_parameters() if n.startswith("weight_"))
    hidden = module.weight_ih_l0.shape[0] // gates
    layer_directions = module.num_layers * (2 if module.bidirectional else 1)
    per_step = matrix + layer_directions * elementwise * hidden
    return _rnn_steps(_arg(args, kwargs, 0, "input")) * per_step


def _rnn_cell_macs(
    module: nn.Module, args: tuple, kwargs: dict, output: Any, *, kind: str
) -> int:
    gates, elementwise = _RNN_CELL_COSTS[kind]
    inputs = _arg(args, kwargs, 0, "input")
    batch = inputs.shape[0] if inputs.dim() == 2 else 1
    hidden = module.weight_ih.shape[0] // gates
    per_sample = module.weight_ih.numel() + module.weight_hh.numel() + elementwise * hidden
    return batch * per_sample


def _build_module_counters() -> dict[type[nn.Module], ModuleCounter]:
    counters: dict[type[nn.Module], ModuleCounter] = {
        nn.Conv1d: _conv_macs,
        nn.Conv2d: _conv_macs,
        nn.Conv3d: _conv_macs,
        nn.ConvTranspose1d: _conv_transpose_macs,
        nn.ConvTranspose2d: _conv_transpose_macs,
        nn.ConvTranspose3d: _conv_transpose_macs,
        nn.Linear: _linear_macs,
        nn.Bilinear: _bilinear_macs,
        nn.MultiheadAttention: _mha_macs,
        nn.RNN: _rnn_macs,
        nn.LSTM: _rnn_macs,
        nn.GRU: _rnn_macs,
        nn.RNNCell: partial(_rnn_cell_macs, kind="RNN_TANH"),
        nn.LSTMCell: partial(_rnn_cell_macs, kind="LSTM"),
        nn.GRUCell: partial(_rnn_cell_macs, kind="GRU"),
        nn.Upsample: _upsample_macs,
    }
    norms = [
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
        nn.LayerNorm, nn.GroupNorm,
        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    ]
    if hasattr(nn, "RMSNorm"):  # added in torch 2.4
        norms.append(nn.RMSNorm)
    counters.update({norm: _norm_macs for norm in norms})
    kernel_pools = {
        nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
        nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
        nn.LPPool1d: 1, nn.LPPool2d: 2,
    }
    counters.update({pool: partial(_kernel_pool_macs, ndim=n) for pool, n in kernel_pools.items()})
    adaptive_pools = [
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    ]
    counters.update({pool: _adaptive_pool_macs for pool in adaptive_pools})
    return counters


#: Module type -> MAC counting function. Looked up along the MRO, so subclasses
#: (e.g. ``NonDynamicallyQuantizableLinear``, timm's ``StdConv2d``) are covered.
#: Extend it to support custom layers.
MODULE_COUNTERS: dict[type[nn.Module], ModuleCounter] = _build_module_counters()


def _module_counter(module: nn.Module) -> ModuleCounter | None:
    for cls in type(module).__mro__:
        counter = MODULE_COUNTERS.get(cls)
        if counter is not None:
            return counter
    from ..layers.moe import is_fused_experts

    # transformers' fused MoE experts (60+ classes from one decorator), recognised by what they hold
    return _fused_experts_macs if is_fused_experts(module) else None


def _fused_experts_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    """Each (token, chosen expert) pair runs that expert's up (and gate) and down projections."""
    routes = _arg(args, kwargs, 1, "top_k_index")
    if not isinstance(routes, torch.Tensor):
        return 0
    pairs = int((routes < module.num_experts).sum())  # expert parallelism marks foreign experts out of range
    first = module.gate_up_proj if getattr(module, "has_gate", True) else module.up_proj
    return pairs * (first[0].numel() + module.down_proj[0].numel())


# --------------------------------------------------------------------------- #
# Functional counters: (args, kwargs, output) -> MACs
# --------------------------------------------------------------------------- #


def _matmul_macs(args: tuple, kwargs: dict, output: Any) -> int:
    # out[..., i, j] = sum_k a[..., i, k] b[..., k, j]: one MAC per output per k.
    # Also right for 1-D operands, where shape[-1] is still the reduced size.
    return output.numel() * args[0].shape[-1]


def _rmatmul_macs(args: tuple, kwargs: dict, output: Any) -> int:
    # Tensor.__rmatmul__(self, other) computes other @ self.
    return output.numel() * args[1].shape[-1]


def _addmm_macs(args: tuple, kwargs: dict, output: Any) -> int:
    # addmm(input, mat1, mat2) / baddbmm(input, batch1, batch2) / addmv(input, mat, vec)
    first = args[1] if len(args) > 1 else (
        kwargs.get("mat1", kwargs.get("batch1", kwargs.get("mat")))
    )
    return output.numel() * first.shape[-1]


def _addbmm_macs(args: tuple, kwargs: dict, output: Any) -> int:
    # addbmm sums the batch of products into one matrix, so batch size multiplies.
    batch1 = _arg(args, kwargs, 1, "batch1")
    return output.numel() * batch1.shape[0] * batch1.shape[-1]


def _functional_linear_macs(args: tuple, kwargs: dict, output: Any) -> int:
    return output.numel() * _arg(args, kwargs, 1, "weight").shape[-1]


def _functional_bilinear_macs(args: tuple, kwargs: dict, output: Any) -> int:
    weight = _arg(args, kwargs, 2, "weight")
    return output.numel() * weight.shape[1] * weight.shape[2]


def _functional_conv_macs(args: tuple, kwargs: dict, output: Any) -> int:
    weight = _arg(args, kwargs, 1, "weight")
    return output.numel() * weight.shape[1] * _kernel_volume(weight)


def _functional_conv_transpose_macs(args: tuple, kwargs: dict, output: Any) -> int:
    weight = _arg(args, kwargs, 1, "weight")
    return _arg(args, kwargs, 0, "input").numel() * weight.shape[1] * _kernel_volume(weight)


def _sdpa_macs(args: tuple, kwargs: dict, output: Any) -> int:
    query = _arg(args, kwargs, 0, "query")
    key = _arg(args, kwargs, 1, "key")
    value = _arg(args, kwargs, 2, "value")
    # Batch/head dims come from the output so that broadcasting and grouped-query
    # attention (fewer key heads) are handled implicitly.
    batch = math.prod(output.shape[:-2])
    len_q, len_k = query.shape[-2], key.shape[-2]
    return batch * len_q * len_k * (query.shape[-1] + value.shape[-1])


def _einsum_operands(args: tuple) -> tuple[str | None, Sequence[Any]]:
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    # The sublist form einsum(op, [0, 1], op, [1, 2]) is not parsed.
    return (equation if isinstance(equation, str) else None), operands


def _einsum_macs(args: tuple, kwargs: dict, output: Any) -> int:
    equation, operands = _einsum_operands(args)
    if equation is None or len(operands) < 2:
        return 0  # one operand: a permutation/reduction, no multiplications
    terms = equation.replace(" ", "").split("->")[0].split(",")
    if len(terms) != len(operands):
        return 0
    sizes: dict[str, int] = {}
    ellipsis_shapes: list[torch.Size] = []
    for term, operand in zip(terms, operands):
        head, _, tail = term.partition("...")
        n_ellipsis = operand.dim() - len(head) - len(tail) if "..." in term else 0
        shape = operand.shape
        ellipsis_shapes.append(shape[len(head) : len(head) + n_ellipsis])
        dims = list(shape[: len(head)]) + list(shape[len(head) + n_ellipsis :])
        for letter, size in zip(head + tail, dims):
            sizes[letter] = max(sizes.get(letter, 1), size)  # size-1 dims broadcast
    iterations = math.prod(sizes.values()) * math.prod(torch.broadcast_shapes(*ellipsis_shapes))
    return iterations * (len(operands) - 1)


def _build_function_counters() -> dict[Callable, FunctionCounter]:
    counters: dict[Callable, FunctionCounter] = {}
    for name, counter in (
        ("matmul", _matmul_macs),
        ("mm", _matmul_macs),
        ("bmm", _matmul_macs),
        ("mv", _matmul_macs),
        ("addmm", _addmm_macs),
        ("baddbmm", _addmm_macs),
        ("addmv", _addmm_macs),
        ("addbmm", _addbmm_macs),
    ):
        # Both spellings reach the mode as different objects: torch.matmul(a, b)
        # arrives as torch.matmul, while a @ b and a.matmul(b) arrive as the
        # Tensor method.
        counters[getattr(torch, name)] = counter
        counters[getattr(torch.Tensor, name)] = counter
    counters[torch.Tensor.__rmatmul__] = _rmatmul_macs
    counters[torch.einsum] = _einsum_macs
    counters[F.linear] = _functional_linear_macs
    counters[F.bilinear] = _functional_bilinear_macs
    counters[F.scaled_dot_product_attention] = _sdpa_macs
    for conv in (F.conv1d, F.conv2d, F.conv3d):
        counters[conv] = _functional_conv_macs
    for conv_t in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
        counters[conv_t] = _functional_conv_transpose_macs
    return counters


#: Torch function -> MAC counting function, applied to calls made outside counted modules.
FUNCTION_COUNTERS: dict[Callable, FunctionCounter] = _build_function_counters()


# --------------------------------------------------------------------------- #
# The counting machinery
# --------------------------------------------------------------------------- #


class _MacTally:
    """Accumulates MACs per module path while a forward pass runs."""

    def __init__(self) -> None:
        self.per_module: dict[str, int] = defaultdict(int)
        self.scope: list[str] = []  # paths of the modules currently executing
        self.counted_depth = 0  # > 0 while inside a module counted by a hook

    def add(self, path: str, macs: int) -> None:
        self.per_module[path] += int(macs)

    @property
    def total(self) -> int:
        return sum(self.per_module.values())


def _scope_hooks(
    tally: _MacTally, path: str, counter: ModuleCounter | None
) -> tuple[Callable[..., None], Callable[..., None]]:
    """Pre/post forward hooks tracking the module scope and counting ``counter`` modules."""

    def pre_hook(module: nn.Module, args: tuple) -> None:
        tally.scope.append(path)
        if counter is not None:
            tally.counted_depth += 1

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        tally.scope.pop()
        if counter is not None:
            tally.counted_depth -= 1
            tally.add(path, counter(module, args, kwargs, output))

    return pre_hook, post_hook


def _attach_hooks(model: nn.Module, tally: _MacTally) -> list[RemovableHandle]:
    handles: list[RemovableHandle] = []
    visited: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        # A module reachable under several names must only be hooked once,
        # otherwise each of its calls would be counted several times.
        if id(module) in visited:
            return
        visited.add(id(module))
        counter = _module_counter(module)
        pre_hook, post_hook = _scope_hooks(tally, path, counter)
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
        if counter is None:  # children of counted modules are part of their count
            for name, child in module.named_children():
                visit(child, f"{path}.{name}" if path else name)

    try:
        visit(model, "")
    except BaseException:
        _remove(handles)
        raise
    return handles


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


class _FunctionalMacsMode(TorchFunctionMode):
    """Counts matrix products called outside counted modules."""

    def __init__(self, tally: _MacTally) -> None:
        super().__init__()
        self.tally = tally

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if self.tally.counted_depth == 0:
            counter = _lookup_function_counter(func)
            if counter is not None:
                scope = self.tally.scope[-1] if self.tally.scope else ""
                self.tally.add(scope, counter(args, kwargs, output))
        return output


def _lookup_function_counter(func: Callable) -> FunctionCounter | None:
    try:
        return FUNCTION_COUNTERS.get(func)
    except TypeError:  # an unhashable callable can't be one of ours
        return None


def count_ops_and_params(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[Any] | Mapping[str, Any],
    layer_wise: bool = False,
) -> tuple[int, int] | tuple[int, int, dict[nn.Module, int], dict[nn.Module, int]]:
    """Count the MACs of one forward pass on ``example_inputs`` and the parameters.

    ``example_inputs`` is a tensor (single argument), a tuple/list (positional
    arguments) or a dict (keyword arguments); it must already be on the
    model's device. The pass runs in eval mode under ``torch.no_grad()``; the
    training flags of all modules are restored and every hook is removed
    afterwards, also when the forward raises.

    Returns ``(macs, params)``, or with ``layer_wise`` (torch_pruning's four
    values) ``(macs, params, layer_macs, layer_params)``: dicts keyed by every
    module of ``model`` (the root included) giving the MACs run inside that
    module, submodules included, and its parameter count, submodules
    included; ``layer_macs[model] == macs``. See the module docstring for the
    conventions.
    """
    tally = _MacTally()
    handles = _attach_hooks(model, tally)
    try:
        with evaluating(model), _FunctionalMacsMode(tally):
            call_model(model, example_inputs)
    finally:
        _remove(handles)
    macs, params = tally.total, count_params(model)
    if layer_wise:
        return macs, params, _cumulative_macs(model, tally.per_module), _layer_params(model)
    return macs, params


def _cumulative_macs(model: nn.Module, per_path: dict[str, int]) -> dict[nn.Module, int]:
    """Self MACs per module path, summed into every enclosing module."""
    totals: dict[str, int] = defaultdict(int)
    for path, count in per_path.items():
        parts = path.split(".") if path else []
        for depth in range(len(parts) + 1):
            totals[".".join(parts[:depth])] += count
    return {module: totals.get(path, 0) for path, module in model.named_modules()}


def _layer_params(model: nn.Module) -> dict[nn.Module, int]:
    return {module: count_params(module) for module in model.modules()}
