"""A model's cost as a function of its layers' widths: the table :func:`latency_profile` measures.

Each profiled layer holds its cost at full width and, per side it can be narrowed on, a small table of
costs with only that side narrowed. A layer's cost at other widths is its full cost times the relative
cost of each side (``cost(in, out) = full * r_out(out) * r_in(in)``): exact for the MACs and parameters of
convs and linears (``out * (in * k + 1)`` separates), and what the timings of a GEMM-shaped kernel follow.

``grid`` widths are multiples of the largest width step the profile tried, so interpolating between them
never lands on a width the hardware handles badly; ``anchor`` and ``steps`` are the widths just below a
multiple of that step, which tell how fine a step still lowers the cost (``round_to="auto"``).
"""
from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass, field

#: what a profile can measure, as ``target`` keys spell it
METRICS = ("latency_ms", "macs", "params")


@dataclass
class SideCost:
    """One side (out or in) of one layer: cost with only that side narrowed to each width."""

    #: full width of the side
    width: int
    #: ascending widths on the coarse grid (the full width included)
    grid: list[int]
    grid_cost: list[float]
    #: a grid width near half the full width, and the cost at ``anchor - step`` for each step tried
    anchor: int | None = None
    steps: dict[int, float] = field(default_factory=dict)

    def at(self, width: float) -> float:
        """Cost at ``width``, linear between grid widths (and along the first two below them, at least 0:
        MACs and parameters are affine in a width, with a constant part a line through zero would drop).

        A grid width is never priced above a wider one: on the grid (multiples of the largest step) a
        narrower layer does no more work, so a timing that says otherwise is noise."""
        widths, costs = self.grid, _non_decreasing(self.grid_cost)
        if width >= widths[-1] or len(widths) == 1:
            return costs[-1] * (1.0 if width >= widths[-1] else max(width, 0.0) / widths[-1])
        if width <= widths[0]:
            slope = (costs[1] - costs[0]) / (widths[1] - widths[0])
            return max(0.0, costs[0] + slope * (width - widths[0]))
        right = bisect.bisect_left(widths, width)
        left = right - 1
        share = (width - widths[left]) / (widths[right] - widths[left])
        return costs[left] + share * (costs[right] - costs[left])

    def anchor_cost(self) -> float | None:
        return None if self.anchor is None else self.at(self.anchor)


@dataclass
class LayerCost:
    """One layer: its cost at full width (times the calls per forward) and its side tables."""

    name: str
    full: float
    #: input channels are its output channels (norms, depthwise convs): only ``out`` is measured
    coupled: bool = False
    out: SideCost | None = None
    inputs: SideCost | None = None
    calls: int = 1

    def at(self, in_width: float | None = None, out_width: float | None = None) -> float:
        """Cost with the input side at ``in_width`` and the output side at ``out_width`` (None: full)."""
        if self.full <= 0:
            return 0.0
        cost = self.full
        if out_width is not None and self.out is not None:
            cost *= self.out.at(out_width) / self.full
        if in_width is not None and self.inputs is not None and not self.coupled:
            cost *= self.inputs.at(in_width) / self.full
        return cost

    def side(self, side: str) -> SideCost | None:
        return self.out if side == "out" or self.coupled else self.inputs


@dataclass
class CostProfile:
    """What :func:`~structprune.utils.latency_profile` measured: per-layer tables and the whole model's cost.

    ``predict(widths)`` estimates the whole model's cost with some layers narrowed. Latency is the measured
    total scaled by the profiled layers' share (the layers timed alone add up to a bit more or less than
    the model, and the ops between them shrink with the channels); MACs and parameters add the unprofiled
    remainder (attention matmuls, bare parameters) unchanged.
    """

    metric: str
    device: str
    dtype: str
    threads: int
    #: the cache key: model structure, device, dtype, threads, input shapes and measurement settings
    key: str
    total: float
    layers: dict[str, LayerCost]
    #: layers that could not be measured alone (their cost stays in the total, unscaled), with why
    skipped: dict[str, str] = field(default_factory=dict)
    #: how ``total`` was timed: the reduction of ``repeat`` forwards after ``warmup``, so a pruner times the
    #: pruned model the same way (profiles cached before these were kept read as the defaults they had)
    statistic: str = "min"
    repeat: int = 5
    warmup: int = 1

    def layer_sum(self, widths: dict | None = None) -> float:
        """Sum of layer costs; ``widths`` maps a layer name to ``(in_width, out_width)`` (None: full)."""
        widths = widths or {}
        return sum(layer.at(*widths.get(name, (None, None))) * layer.calls for name, layer in self.layers.items())

    def predict(self, widths: dict | None = None) -> float:
        full = self.layer_sum()
        if not widths or full <= 0:
            return self.total
        now = self.layer_sum(widths)
        if self.metric == "latency_ms":
            return self.total * now / full
        return self.total - full + now

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CostProfile":
        data = json.loads(text)
        layers = {}
        for name, layer in data.pop("layers").items():
            for side in ("out", "inputs"):
                if layer[side] is not None:
                    table = layer[side]
                    table["steps"] = {int(step): cost for step, cost in table["steps"].items()}
                    layer[side] = SideCost(**table)
            layers[name] = LayerCost(**layer)
        return cls(layers=layers, **data)


def _non_decreasing(costs: list[float]) -> list[float]:
    result = list(costs)
    for index in range(len(result) - 2, -1, -1):
        result[index] = min(result[index], result[index + 1])
    return result


def grid_widths(width: int, unit: int = 1, max_steps: int = 6) -> tuple[list[int], int | None, list[int]]:
    """The widths to measure for a side of ``width`` channels whose width must stay a multiple of ``unit``.

    Returns ``(grid, anchor, steps)``: grid widths (multiples of the largest step, the full width
    included), a grid width near half the full width, and the steps (``unit * 2**k``) whose
    ``anchor - step`` is measured as well.
    """
    unit = max(1, int(unit))
    steps = [unit * 2 ** k for k in range(max_steps) if unit * 2 ** k * 4 <= width]
    big = steps[-1] if steps else unit
    grid = {width}
    for share in (0.75, 0.5, 0.25):
        grid.add(max(big, int(round(width * share / big)) * big))
    grid = sorted(w for w in grid if 0 < w <= width)
    if not steps:
        return grid, None, []
    anchor = max(big * 2, (width // 2) // big * big)
    if anchor > width:
        return grid, None, []
    grid = sorted(set(grid) | {anchor})
    return grid, anchor, [step for step in steps if anchor - step >= unit]
