"""``latency_profile``: each layer's cost as a function of its width, measured once and cached on disk.

One forward records every declared layer's input shapes. Each layer is then copied, narrowed with its own
pruning function (output side, then input side, at the few widths of :func:`~.cost_profile.grid_widths`)
and timed alone on random inputs of the recorded shapes: all widths of a layer in interleaved rounds, so a
machine that slows down for a moment slows every width alike, and the fastest round of each by default
(``statistic="min"``): other processes only ever add time, and on a loaded machine (four developers on two
cores) more than half the rounds are slowed, which moves a median by 2x; ``statistic="median"`` is there
for quiet machines. Layers, not the whole
model, because a model with one layer narrowed costs a full forward per width, and layers are where the
width shows. The same tables can hold MACs or parameter counts (``metric``), which the budget planner
uses the same way.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers.declarations import DEFAULT_PRUNERS, find_pruner, register_optional_layers
from .benchmark import _model_device, _per_call_ms, _to_device, _warm_up
from .cost_profile import METRICS, CostProfile, LayerCost, SideCost, grid_widths
from .nested import call_model, evaluating, flatten_as_list
from .op_counter import count_ops_and_params, count_params

__all__ = ["latency_profile", "cost_profile", "measure_cost", "profile_timer", "default_cache_dir"]

#: how the rounds of one timing are reduced to one number
STATISTICS = {"min": min, "median": statistics.median}


def default_cache_dir() -> Path:
    """``$STRUCTPRUNE_CACHE`` or ``~/.cache/structprune``: where profiles are kept between runs."""
    return Path(os.environ.get("STRUCTPRUNE_CACHE") or Path.home() / ".cache" / "structprune") / "profiles"


def latency_profile(model: nn.Module, example_inputs: Any, device: torch.device | str | None = None, *,
                    units: dict | None = None, repeat: int = 5, warmup: int = 1, statistic: str = "min",
                    cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> CostProfile:
    """Per-layer latency (ms) as a function of width, on ``device`` (default: the model's).

    Each declared layer (conv, linear, norm, embedding...) is timed alone on its recorded input shape at a
    few widths per side (see :mod:`.cost_profile`), ``warmup`` + ``repeat`` interleaved rounds reduced by
    ``statistic`` (``"min"`` or ``"median"``); the whole model is timed too. ``units`` maps ``(layer name, "out" | "in")`` to the multiple that side's
    width must stay (channel groups, heads; default: the layer's declared groups). The result is cached
    under ``cache_dir`` (default :func:`default_cache_dir`) by model structure, device, dtype, threads,
    input shapes and these settings; ``refresh`` measures again.
    """
    return cost_profile(model, example_inputs, "latency_ms", device, units=units, repeat=repeat, warmup=warmup,
                        statistic=statistic, cache_dir=cache_dir, refresh=refresh)


def cost_profile(model: nn.Module, example_inputs: Any, metric: str = "latency_ms",
                 device: torch.device | str | None = None, *, units: dict | None = None, repeat: int = 5,
                 warmup: int = 1, statistic: str = "min", cache_dir: str | os.PathLike | None = None,
                 refresh: bool = False) -> CostProfile:
    """:func:`latency_profile` for any of ``METRICS``; MACs and parameters are counted, not cached."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {tuple(STATISTICS)}, got {statistic!r}")
    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat must be >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    home = _model_device(model, example_inputs)
    target = torch.device(device) if device is not None else home
    moved = target != home
    if moved:
        model.to(target)
        example_inputs = _to_device(example_inputs, target)
    try:
        layers = _profiled_layers(model)
        records = _record_inputs(model, example_inputs, layers)
        units = dict(units or {})
        key = _cache_key(model, example_inputs, metric, target, units, repeat, warmup, statistic)
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        cached = path / f"{key}.json"
        if metric == "latency_ms" and not refresh and cached.exists():
            return CostProfile.from_json(cached.read_text())
        profile = _measure(model, example_inputs, layers, records, units, metric, target, key, repeat, warmup,
                           statistic)
        if metric == "latency_ms":
            path.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(".tmp")
            partial.write_text(profile.to_json())
            partial.replace(cached)  # a reader never sees half a file
        return profile
    finally:
        if moved:
            model.to(home)


def measure_cost(model: nn.Module, example_inputs: Any, metric: str = "latency_ms", repeat: int = 5,
                 warmup: int = 1, statistic: str = "min") -> float:
    """The whole model's cost now, on its device: the latency (ms) of ``repeat`` forwards after ``warmup``
    reduced by ``statistic`` (as :func:`latency_profile` times), or its MACs or parameter count."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return _model_cost(model, example_inputs, metric, _model_device(model, example_inputs), repeat, warmup,
                       STATISTICS[statistic])


def profile_timer(profile: CostProfile):
    """``timer(model, example_inputs) -> ms``: the whole model timed as ``profile`` timed the model it
    profiled (its device, thread count, statistic, forwards and warm-up), so a measurement of the pruned
    model and the profile's prediction differ by the model, not by how each was timed. A model on another
    device is moved there for the timing and back."""
    if profile.metric != "latency_ms":
        raise ValueError(f"profile_timer needs a latency profile, got a {profile.metric!r} one")
    device = torch.device(profile.device)
    reduce = STATISTICS.get(profile.statistic, min)

    def timer(model: nn.Module, example_inputs: Any) -> float:
        home = _model_device(model, example_inputs)
        moved = not _same_device(home, device)
        threads = torch.get_num_threads()
        try:
            if moved:
                model.to(device)
                example_inputs = _to_device(example_inputs, device)
            if threads != profile.threads:
                torch.set_num_threads(profile.threads)
            return _model_cost(model, example_inputs, "latency_ms", device, profile.repeat, profile.warmup, reduce)
        finally:
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            if moved:
                model.to(home)

    return timer


def _same_device(first: torch.device, second: torch.device) -> bool:
    if first.type != second.type:
        return False
    if first.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (first.index if first.index is not None else current) == (
        second.index if second.index is not None else current)


# -- which layers, and what they were called with -----------------------------------------------------
def _profiled_layers(model: nn.Module) -> dict[str, tuple[nn.Module, Any]]:
    """Declared layers that hold no declared layer (an attention module's projections are timed, not it)."""
    register_optional_layers(model)
    declared = {}
    for name, module in model.named_modules():
        pruner = find_pruner(module, DEFAULT_PRUNERS)
        if pruner is not None and name:
            declared[name] = (module, pruner)
    inner = {name for name in declared for other in declared if other != name and other.startswith(name + ".")}
    return {name: entry for name, entry in declared.items() if name not in inner}


def _record_inputs(model: nn.Module, example_inputs: Any, layers: dict) -> dict[str, dict]:
    """Per layer: its first call's positional inputs (shape and dtype; integer tensors themselves) and how
    many times the forward calls it."""
    records: dict[str, dict] = {}
    handles = []

    def hook_for(name):
        def hook(module, args):
            record = records.get(name)
            if record is not None:
                record["calls"] += 1
                return
            records[name] = {"calls": 1, "args": [_spec(arg) for arg in args]}
        return hook

    for name, (module, _) in layers.items():
        handles.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        with evaluating(model):
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return records


def _spec(value):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            return ("tensor", tuple(value.shape), value.dtype, value.device)
        return ("value", value.detach().clone())
    return ("value", value)


def _materialise(specs: list, channel_dim: int | None = None, width: int | None = None) -> tuple:
    """Inputs like the recorded ones (random values), the first tensor narrowed to ``width`` on ``channel_dim``."""
    args, narrowed = [], False
    for spec in specs:
        if spec[0] == "tensor":
            shape = list(spec[1])
            if channel_dim is not None and not narrowed:
                shape[channel_dim] = width
                narrowed = True
            args.append(torch.randn(shape, dtype=spec[2], device=spec[3]))
        else:
            args.append(spec[1])
    return tuple(args)


# -- measuring --------------------------------------------------------------------------------------
def _measure(model, example_inputs, layers, records, units, metric, device, key, repeat, warmup,
             statistic) -> CostProfile:
    reduce = STATISTICS[statistic]
    tables, skipped = {}, {}
    for name, (module, pruner) in layers.items():
        record = records.get(name)
        if record is None:
            continue  # not called in forward: it costs nothing
        try:
            tables[name] = _layer_cost(name, module, pruner, record, units, metric, device, repeat, warmup, reduce)
        except Exception as error:  # noqa: BLE001 - a layer that cannot run alone stays in the total
            skipped[name] = f"{type(error).__name__}: {error}"
    total = _model_cost(model, example_inputs, metric, device, repeat, warmup, reduce)
    dtype = next((str(p.dtype) for p in model.parameters()), "none")
    return CostProfile(metric, str(device), dtype, torch.get_num_threads(), key, total, tables, skipped,
                       statistic, repeat, warmup)


def _layer_cost(name, module, pruner, record, units, metric, device, repeat, warmup, reduce) -> LayerCost:
    coupled = pruner.is_coupled(module)
    out_width = pruner.get_out_channels(module)
    in_width = None if coupled else pruner.get_in_channels(module)
    specs = record["args"]
    configs = [("full", None, module, _materialise(specs))]
    plans = {}
    for side, width in (("out", out_width), ("in", in_width)):
        if not width or width < 2:
            continue
        unit = units.get((name, side)) or (pruner.get_out_channel_groups(module) if side == "out"
                                           else pruner.get_in_channel_groups(module)) or 1
        grid, anchor, steps = grid_widths(width, unit)
        reads_channels = side == "in" or coupled
        dim = _channel_dim(module, pruner, specs, width, side, unit) if reads_channels else None
        if reads_channels and dim is None:
            continue  # its inputs do not show the channels: the side keeps its full cost
        plans[side] = (width, grid, anchor, steps)
        wanted = set(grid) | {anchor - step for step in steps}
        for narrow in sorted(wanted - {width}):
            layer = _narrowed(module, pruner, side, width, narrow, unit)
            inputs = _materialise(specs, dim, narrow) if reads_channels else configs[0][3]
            configs.append((side, narrow, layer, inputs))
    costs = _costs(configs, metric, device, repeat, warmup, reduce)
    full = costs[0]
    tables = {}
    for side, (width, grid, anchor, steps) in plans.items():
        at = {narrow: cost for (s, narrow, _, _), cost in zip(configs, costs) if s == side}
        at[width] = full
        tables[side] = SideCost(width, grid, [at[w] for w in grid], anchor,
                                {step: at[anchor - step] for step in steps})
    return LayerCost(name, full, coupled, tables.get("out"), tables.get("in"), record["calls"])


def _narrowed(module: nn.Module, pruner, side: str, width: int, narrow: int, unit: int) -> nn.Module:
    """A copy of ``module`` with ``width - narrow`` channels of ``side`` removed, the same count from each
    of ``unit`` blocks (grouped convs and heads refuse uneven removals)."""
    layer = copy.deepcopy(module)
    idxs = _spread(width, width - narrow, unit)
    if side == "out":
        pruner.prune_out_channels(layer, idxs)
    else:
        pruner.prune_in_channels(layer, idxs)
    return layer


def _spread(total: int, remove: int, unit: int) -> list[int]:
    if unit > 1 and total % unit == 0 and remove % unit == 0:
        block, per = total // unit, remove // unit
        return [b * block + block - per + j for b in range(unit) for j in range(per)]
    return list(range(total - remove, total))


def _channel_dim(module, pruner, specs, width, side, unit) -> int | None:
    """The dim of the first input tensor that carries the channels: the declaration's, else the first dim
    (last, then 1, then the others) of that size on which a narrowed copy runs."""
    first = next((spec for spec in specs if spec[0] == "tensor"), None)
    if first is None:
        return None
    shape = first[1]
    declared = pruner.in_tensor_dim
    ndim = len(shape)
    order = [declared] if declared is not None else [ndim - 1, 1] + list(range(ndim))
    narrow = max(unit, width // 2 // unit * unit)
    layer = _narrowed(module, pruner, side, width, narrow, unit)
    for dim in dict.fromkeys(d % ndim for d in order if -ndim <= d < ndim):
        if shape[dim] != width:
            continue
        try:
            with torch.no_grad():
                layer(*_materialise(specs, dim, narrow))
            return dim
        except Exception:  # noqa: BLE001 - not this dim
            continue
    return None


def _costs(configs: list, metric: str, device: torch.device, repeat: int, warmup: int, reduce) -> list[float]:
    if metric == "params":
        return [float(count_params(layer)) for _, _, layer, _ in configs]
    if metric == "macs":
        return [float(count_ops_and_params(layer, inputs)[0]) for _, _, layer, inputs in configs]
    times: list[list[float]] = [[] for _ in configs]
    with torch.no_grad():
        for _, _, layer, _ in configs:
            layer.eval()
        for round_index in range(warmup + repeat):
            # interleaved: each round times every width once, so a slower moment hits all widths alike
            for index, (_, _, layer, inputs) in enumerate(configs):
                duration = _per_call_ms(layer, inputs, 1, device)[0]
                if round_index >= warmup:
                    times[index].append(duration)
    return [reduce(values) for values in times]


def _model_cost(model, example_inputs, metric, device, repeat, warmup, reduce) -> float:
    if metric == "params":
        return float(count_params(model))
    if metric == "macs":
        return float(count_ops_and_params(model, example_inputs)[0])
    with evaluating(model), torch.no_grad():
        _warm_up(model, example_inputs, warmup)
        return reduce(_per_call_ms(model, example_inputs, max(repeat, 5), device))


# -- the cache key --------------------------------------------------------------------------------------
def _cache_key(model, example_inputs, metric, device, units, repeat, warmup, statistic) -> str:
    structure = [(name, type(module).__qualname__,
                  [tuple(p.shape) for p in module.parameters(recurse=False)])
                 for name, module in model.named_modules()]
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else repr(type(t))
              for t in flatten_as_list(example_inputs)]
    dtype = next((str(p.dtype) for p in model.parameters()), "none")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    payload = json.dumps([type(model).__qualname__, structure, shapes, metric, str(device), name, dtype,
                          torch.get_num_threads(), sorted((list(k), v) for k, v in units.items()), repeat,
                          warmup, statistic, torch.__version__], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


