"""Measure inference latency, speed and memory of a model.

All measurements run the model in eval mode under ``torch.no_grad()`` and
restore the training flags afterwards. ``example_inputs`` follows the same
convention as the op counter: a tensor, a tuple/list of positional arguments or
a dict of keyword arguments, already on the model's device.

On CUDA, timings use CUDA events recorded around the forward passes and a
single ``torch.cuda.synchronize`` per measurement, so the host never stalls
between iterations. On other devices the wall clock (``time.perf_counter``)
is used around each forward pass.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode

from .nested import call_model, evaluating, first_tensor, flatten_as_list

__all__ = ["measure_latency", "measure_fps", "measure_throughput", "measure_memory"]

ExampleInputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]


def _model_device(model: nn.Module, example_inputs: Any) -> torch.device:
    """Device of the model's first parameter/buffer, else of the first input tensor."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    tensor = first_tensor(example_inputs)
    return tensor.device if tensor is not None else torch.device("cpu")


def _check_counts(repeat: int, warmup: int) -> None:
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")


def _warm_up(model: nn.Module, example_inputs: Any, warmup: int) -> None:
    # Warm-up passes absorb one-off costs (allocator growth, cuDNN autotuning,
    # lazy initialisation) that would otherwise inflate the first timings.
    for _ in range(warmup):
        call_model(model, example_inputs)


def _per_call_ms(model: nn.Module, example_inputs: Any, repeat: int, device: torch.device) -> list[float]:
    """Duration of each of ``repeat`` forward passes, in milliseconds."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
            for start, end in zip(starts, ends):
                start.record()
                call_model(model, example_inputs)
                end.record()
            torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]
    durations = []
    for _ in range(repeat):
        begin = time.perf_counter()
        call_model(model, example_inputs)
        durations.append((time.perf_counter() - begin) * 1e3)
    return durations


def _total_seconds(model: nn.Module, example_inputs: Any, repeat: int, device: torch.device) -> float:
    """Wall time of ``repeat`` back-to-back forward passes, in seconds."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeat):
                call_model(model, example_inputs)
            end.record()
            torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    for _ in range(repeat):
        call_model(model, example_inputs)
    return time.perf_counter() - begin


def measure_latency(
    model: nn.Module, example_inputs: ExampleInputs, repeat: int = 50, warmup: int = 10
) -> tuple[float, float]:
    """Return the mean and sample standard deviation of one forward pass, in ms."""
    _check_counts(repeat, warmup)
    device = _model_device(model, example_inputs)
    with evaluating(model):
        _warm_up(model, example_inputs, warmup)
        durations = _per_call_ms(model, example_inputs, repeat, device)
    std = statistics.stdev(durations) if len(durations) > 1 else 0.0
    return statistics.fmean(durations), std


def measure_fps(
    model: nn.Module, example_inputs: ExampleInputs, repeat: int = 50, warmup: int = 10
) -> float:
    """Return forward passes per second over ``repeat`` back-to-back passes."""
    _check_counts(repeat, warmup)
    device = _model_device(model, example_inputs)
    with evaluating(model):
        _warm_up(model, example_inputs, warmup)
        seconds = _total_seconds(model, example_inputs, repeat, device)
    # A timer resolution of zero on a trivial model must not divide by zero.
    return repeat / max(seconds, 1e-9)


def _batch_size(example_inputs: Any) -> int:
    tensor = first_tensor(example_inputs)
    if tensor is None or tensor.dim() == 0:
        return 1
    return tensor.shape[0]


def measure_throughput(
    model: nn.Module,
    example_inputs: ExampleInputs,
    repeat: int = 50,
    warmup: int = 10,
    batch_size: int | None = None,
) -> float:
    """Return samples per second: batch size times :func:`measure_fps`.

    The batch size defaults to the leading dimension of the first input tensor.
    """
    if batch_size is None:
        batch_size = _batch_size(example_inputs)
    return batch_size * measure_fps(model, example_inputs, repeat=repeat, warmup=warmup)


# --------------------------------------------------------------------------- #
# Memory
# --------------------------------------------------------------------------- #


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    """Identify a tensor's storage (views of one buffer share it); None if empty."""
    storage = tensor.untyped_storage()
    pointer = storage.data_ptr()
    return (pointer, storage.nbytes()) if pointer else None


class _LiveBytes:
    """Tracks the bytes of live tensor storages and their high-water mark.

    A storage enters when the first tensor using it is seen and leaves when
    the last tracked tensor using it is garbage collected (weakref finalizer).
    Storages registered as ``fixed`` (weights, inputs) are always counted.
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._fixed: set[tuple[int, int]] = set()
        self._refs: dict[tuple[int, int], int] = {}
        self._finalizers: list[weakref.finalize] = []

    def add_fixed(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if key is None or key in self._fixed:
            return
        self._fixed.add(key)
        self._grow(key[1])

    def track(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if key is None or key in self._fixed:
            return
        if key not in self._refs:
            self._refs[key] = 0
            self._grow(key[1])
        self._refs[key] += 1
        self._finalizers.append(weakref.finalize(tensor, self._release, key))

    def detach(self) -> None:
        """Drop all finalizers so tensors outliving the measurement don't call back."""
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()

    def _grow(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _release(self, key: tuple[int, int]) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= key[1]


class _TrackOutputsMode(TorchFunctionMode):
    """Feeds every tensor returned by a torch function to a :class:`_LiveBytes`."""

    def __init__(self, live: _LiveBytes) -> None:
        super().__init__()
        self.live = live

    def __torch_function__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in flatten_as_list(output):
            self.live.track(tensor)
        return output


def _estimate_host_peak(model: nn.Module, example_inputs: Any) -> int:
    live = _LiveBytes()
    for tensor in (*model.parameters(), *model.buffers(), *flatten_as_list(example_inputs)):
        live.add_fixed(tensor)
    try:
        with evaluating(model), _TrackOutputsMode(live):
            call_model(model, example_inputs)
        return live.peak
    finally:
        live.detach()


def _cuda_peak(model: nn.Module, example_inputs: Any, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    with evaluating(model):
        call_model(model, example_inputs)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _to_device(obj: Any, device: torch.device) -> Any:
    """Copy the tensors of a nested tuple/list/dict input to ``device``."""
    if isinstance(obj, (torch.Tensor, PackedSequence)):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {key: _to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuple
        return type(obj)(*(_to_device(item, device) for item in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(item, device) for item in obj)
    return obj


def measure_memory(
    model: nn.Module, example_inputs: ExampleInputs, device: torch.device | str | None = None
) -> int:
    """Return the peak memory, in bytes, of one inference forward pass.

    ``device`` defaults to the model's device. When it is given and differs,
    the model and the inputs are moved there for the measurement and the
    model is moved back afterwards.

    * CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak
      statistics, so the figure includes the resident weights and inputs (and
      any other tensor this process keeps on that GPU).
    * Other devices: an estimate, since host allocations can't be queried per
      tensor without tracing the allocator. It is the bytes of the unique
      parameter, buffer and input storages plus the peak of the storages of
      tensors returned by torch functions during the forward that are alive
      at the same time (liveness followed with weakref finalizers). Temporaries
      created inside a single C++ kernel are not seen, so this is a lower
      bound of the true high-water mark, but it tracks activation memory well.
    """
    home = _model_device(model, example_inputs)
    target = torch.device(device) if device is not None else home
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    moved = target != home
    if moved:
        model.to(target)
        example_inputs = _to_device(example_inputs, target)
    try:
        if target.type == "cuda":
            return _cuda_peak(model, example_inputs, target)
        return _estimate_host_peak(model, example_inputs)
    finally:
        if moved:
            model.to(home)
