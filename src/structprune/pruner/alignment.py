"""Widths that kernels need aligned: fused experts run through grouped matrix multiplications whose rows must
start on 16-byte boundaries, so their hidden and inner widths stay multiples of 4 (float32) or 8 (bfloat16).

Without it a step that leaves, say, 23 hidden channels breaks the forward ("strides should be multiple of 16
bytes"), the verified fallback rolls those groups back and the step removes almost nothing. Every group that
reaches such a layer keeps a multiple of its alignment, read from the dtype when the step is planned;
``round_to`` composes with it (the least common multiple of both).
"""
from __future__ import annotations

import math

from torch import nn

from ..layers.moe import row_alignment


class KernelAlignment:
    """Mixin of BasePruner: the alignment each group root's width keeps."""

    def _init_alignment(self) -> None:
        #: {root module: layers of its group whose kernels need aligned widths}, found on first use
        self._aligned_layers: dict | None = None

    def _alignment(self, root) -> int:
        """The multiple a width of ``root``'s group must stay (1: none needed)."""
        if self._aligned_layers is None:
            self._aligned_layers = {}
            for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                                root_module_types=self.root_module_types, include_blocked=True):
                layers = [item.dep.target.module for item in group
                          if not isinstance(item.dep.target.module, nn.Parameter)
                          and row_alignment(item.dep.target.module) is not None]
                if layers:
                    self._aligned_layers.setdefault(group[0].dep.target.module, layers)
        unit = 1
        for layer in self._aligned_layers.get(root, ()):
            unit = math.lcm(unit, row_alignment(layer) or 1)
        return unit
