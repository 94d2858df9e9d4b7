"""Utilities: MAC/parameter counting, speed and memory benchmarks, latency profiles, pruning reports."""

from . import benchmark, distill, latency, nested, op_counter, print_tool
from .benchmark import measure_fps, measure_latency, measure_memory, measure_throughput
from .cost_profile import CostProfile
from .draw import draw_computational_graph, draw_dependency_graph, draw_groups
from .latency import cost_profile, latency_profile, measure_cost
from .nested import flatten_as_list
from .op_counter import count_ops_and_params, count_params

__all__ = [
    "benchmark",
    "distill",
    "nested",
    "op_counter",
    "print_tool",
    "count_ops_and_params",
    "count_params",
    "flatten_as_list",
    "measure_latency",
    "measure_memory",
    "measure_fps",
    "measure_throughput",
    "latency",
    "latency_profile",
    "cost_profile",
    "measure_cost",
    "CostProfile",
]
