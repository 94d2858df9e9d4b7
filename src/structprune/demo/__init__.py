"""End-to-end growing-regularization demo on scikit-learn's 8x8 digits (``structprune demo``).

One job per module: ``data`` (the split), ``model`` (the CNN), ``train`` (the shared training loops),
``report`` (measurements, table, summary.json), ``plots`` (PNG figures) and ``run`` (the pipeline).
Real weights and real text for benchmarks and tests: ``sentences`` (standard-library docstrings) and
``minilm`` (all-MiniLM-L6-v2 as a sentence embedder, its quality metrics and a distillation loss).
"""
from .data import DigitsData, load_digits_split
from .model import DigitsCNN, build_model
from .run import DemoConfig, run_demo

__all__ = ["DigitsData", "load_digits_split", "DigitsCNN", "build_model", "DemoConfig", "run_demo"]
