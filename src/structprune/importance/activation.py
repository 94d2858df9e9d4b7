"""Activation-aware criteria: scores from what a layer's inputs and outputs carry on calibration data.

Weight magnitude alone does not know which channels a pretrained model uses: in an LLM a few hidden units
carry activations hundreds of times larger than the rest, and the weights reading them are small. These
criteria gather per-channel statistics of every Linear/Conv layer's input and output with forward hooks
(no backward needed), the way structured LLM pruning does:

- :class:`ActivationImportance`: mean squared activation of the channel (Minitron's activation norm; for
  an MLP neuron the input of the down projection, for a head the input of the output projection, for the
  hidden width the normalised input of every projection reading it).
- :class:`WandaImportance`: ``||x_j|| * sum_i |W_ij|``, the weight column scaled by its input's norm
  (Wanda, Sun et al. 2024, in the structured form that scores a whole input column).
- :class:`FluctuationImportance`: ``Var[x_j] * ||W_:j||^2``, how much the output moves when the channel is
  replaced by its mean (FLAP, An et al. AAAI 2024); pairs with ``compensation="bias"``, which adds that mean
  back.

Calibrate once, like :class:`~structprune.importance.OBDCImportance`::

    imp = tp.importance.WandaImportance()
    imp.register(model)
    with torch.no_grad():
        for batch in calibration_batches:
            model(batch)
    imp.remove_hooks()
    pruner = tp.pruner.BasePruner(model, example_inputs, imp, pruning_ratio=0.2, compensation="bias")
    pruner.step()

A group's score of a channel comes from the input side of the layers that read it (``side="in"``, the
default): that is the activation the removal takes away. A group no layer reads with hooks (channels only
produced, e.g. a layer whose outputs feed untracked ops) falls back to the output side. ``side="both"``
adds the output side of the producing layers too.

The statistics follow the pruning: a step slices them with the channels it removes, so a schedule of
several steps scores later steps without recalibrating (they then describe the unpruned model's
activations; recalibrate for the pruned model's own). The pruner's ``compensation`` option reads them too
(``pruner/compensation.py``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..graph.group import Group, GroupItem
from ..graph.side import Side
from .elementwise import ElementwiseImportance
from .hooks import HookedStatistics

#: Layers whose input/output channels the hooks can tell apart (channels on dim 1 for convs, last for Linear).
CALIBRATED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

SIDES = ("in", "out", "both")


@dataclass
class LayerStatistics:
    """Sums over every calibration position (token, pixel) of one layer's input and output channels.

    Float64 sums, so millions of tokens add up without losing the small channels. ``gram`` is the
    input's second-moment matrix sum ``X^T X`` (Linear layers, when asked for: compensation="refit").
    """

    count: int
    in_sum: torch.Tensor
    in_square: torch.Tensor
    out_sum: torch.Tensor
    out_square: torch.Tensor
    gram: torch.Tensor | None = None

    def in_mean(self) -> torch.Tensor:
        return self.in_sum / self.count

    def in_mean_square(self) -> torch.Tensor:
        return self.in_square / self.count

    def in_variance(self) -> torch.Tensor:
        mean = self.in_mean()
        return (self.in_mean_square() - mean * mean).clamp(min=0)

    def out_mean_square(self) -> torch.Tensor:
        return self.out_square / self.count

    def out_variance(self) -> torch.Tensor:
        mean = self.out_sum / self.count
        return (self.out_mean_square() - mean * mean).clamp(min=0)

    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]`` of the input (needs ``gram``)."""
        return self.gram / self.count

    def without(self, side: Side, removed: torch.Tensor) -> "LayerStatistics":
        """A new record without the ``removed`` channels of one side (the old record stays, for rollback)."""
        if side is Side.IN:
            keep = _complement(removed, len(self.in_sum))
            gram = None if self.gram is None else self.gram[keep][:, keep]
            return LayerStatistics(self.count, self.in_sum[keep], self.in_square[keep], self.out_sum,
                                   self.out_square, gram)
        keep = _complement(removed, len(self.out_sum))
        return LayerStatistics(self.count, self.in_sum, self.in_square, self.out_sum[keep],
                               self.out_square[keep], self.gram)


def _complement(removed: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[removed.cpu()] = False
    return keep


def _channels_last(tensor: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``[positions, channels]`` rows of a layer's input or output."""
    if isinstance(layer, nn.Linear):
        return tensor.reshape(-1, tensor.shape[-1])
    if tensor.dim() == layer.weight.dim() - 1:  # unbatched conv input
        tensor = tensor.unsqueeze(0)
    return tensor.transpose(0, 1).reshape(tensor.shape[1], -1).T


def _input_widths(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


class CalibratedImportance(HookedStatistics, ElementwiseImportance):
    """Base of the activation-aware criteria: hooks, statistics, and the group pipeline of
    :class:`ElementwiseImportance` (``group_reduction`` over the coupled layers, then ``normalizer``).

    ``gram=True`` also accumulates each Linear layer's input Gram matrix (``in_features ** 2`` floats per
    layer, skipped above ``max_gram_size``), which ``compensation="refit"`` needs.
    """

    def __init__(
        self,
        group_reduction: str | None = "mean",
        normalizer: str | None = "mean",
        side: str = "in",
        target_types: tuple = CALIBRATED_TYPES,
        gram: bool = False,
        max_gram_size: int = 8192,
    ):
        if side not in SIDES:
            raise ValueError(f"{type(self).__name__}: side must be one of {SIDES}, got {side!r}")
        unsupported = [t for t in target_types if not (isinstance(t, type) and issubclass(t, CALIBRATED_TYPES))]
        if unsupported:
            raise ValueError(
                f"{type(self).__name__}: cannot gather activation statistics for target_types {unsupported}; "
                f"use subclasses of {[t.__name__ for t in CALIBRATED_TYPES]}"
            )
        super().__init__(group_reduction, normalizer, False, target_types)
        self.side = side
        self.gram = gram
        self.max_gram_size = max_gram_size
        self._init_hooks()  # self._stats: layer -> LayerStatistics
        self._fallback_to_out = False

    # -- gathering statistics (register, remove_hooks, zero_grad and torch_pruning's forms: hooks.py) -----
    @contextlib.contextmanager
    def calibrating(self, model: nn.Module):
        """``with imp.calibrating(model): model(batch)...``: hooks on inside, no autograd graph kept."""
        self.register(model)
        try:
            with torch.no_grad():
                yield self
        finally:
            self.remove_hooks()

    @property
    def calibrated_layers(self) -> int:
        return len(self._stats)

    def statistics(self, layer: nn.Module) -> LayerStatistics | None:
        """The statistics of ``layer`` (None if it was never run while hooked)."""
        return self._stats.get(layer)

    def _on_forward(self, layer: nn.Module, inputs: tuple, output) -> None:
        if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        with torch.no_grad():
            x = _channels_last(inputs[0].detach(), layer).double()
            y = _channels_last(output.detach(), layer).double()
            in_width, out_width = _input_widths(layer)
            if x.shape[1] != in_width or y.shape[1] != out_width:
                return  # not the layer's channel layout (a Linear called on an unexpected shape)
            want_gram = self.gram and isinstance(layer, nn.Linear) and in_width <= self.max_gram_size
            gram = x.float().T @ x.float() if want_gram else None
            record = self._stats.get(layer)
            if record is None:
                self._stats[layer] = LayerStatistics(x.shape[0], x.sum(0), x.square().sum(0), y.sum(0),
                                                     y.square().sum(0), gram)
                return
            if len(record.in_sum) != in_width or len(record.out_sum) != out_width:
                raise RuntimeError(
                    f"{type(self).__name__}: statistics of {self._name(layer)} have "
                    f"{len(record.in_sum)} inputs / {len(record.out_sum)} outputs but the layer now has "
                    f"{in_width} / {out_width} (pruned outside a pruner's step?); call zero_grad() and calibrate again"
                )
            record.count += x.shape[0]
            record.in_sum += x.sum(0)
            record.in_square += x.square().sum(0)
            record.out_sum += y.sum(0)
            record.out_square += y.square().sum(0)
            if gram is not None and record.gram is not None:
                record.gram += gram

    # -- following the pruning ------------------------------------------------------------------------
    def snapshot_statistics(self) -> dict:
        """A copy of the table of records (records are replaced, never changed, by :meth:`on_pruned`)."""
        return dict(self._stats)

    def restore_statistics(self, snapshot: dict) -> None:
        self._stats = dict(snapshot)

    def on_pruned(self, group: Group) -> None:
        """Drop the removed channels from the statistics of every layer the group cut."""
        for item in group:
            layer = item.dep.target.module
            record = self._stats.get(layer)
            if record is None:
                continue
            self._stats[layer] = record.without(item.side, torch.as_tensor(item.idxs, dtype=torch.long))

    # -- scoring --------------------------------------------------------------------------------------
    def __call__(self, group: Group) -> torch.Tensor | None:
        if not self._stats:
            raise RuntimeError(
                f"{type(self).__name__} has no calibration statistics: call imp.register(model), run the model on a "
                f"few calibration batches, then imp.remove_hooks() (or use `with imp.calibrating(model): ...`) "
                f"before pruning"
            )
        scores = super().__call__(group)
        if scores is None and self.side == "in":
            self._fallback_to_out = True
            try:
                scores = super().__call__(group)
            finally:
                self._fallback_to_out = False
        return scores

    def item_scores(self, item: GroupItem) -> torch.Tensor | None:
        layer = item.dep.target.module
        if not isinstance(layer, self.target_types):
            return None
        record = self._stats.get(layer)
        if record is None:
            return None
        in_width, out_width = _input_widths(layer)
        if len(record.in_sum) != in_width or len(record.out_sum) != out_width:
            raise RuntimeError(
                f"{type(self).__name__}: statistics of {item.dep.target.name} describe {len(record.in_sum)} "
                f"inputs / {len(record.out_sum)} outputs but the layer has {in_width} / {out_width}; call "
                f"zero_grad() and calibrate again"
            )
        idxs = torch.as_tensor(item.idxs, dtype=torch.long)
        if item.side is Side.IN:
            if self.side == "out" or self._fallback_to_out:
                return None
            return self.input_scores(layer, record)[idxs].float()
        if self.side == "in" and not self._fallback_to_out:
            return None
        return self.output_scores(layer, record)[idxs].float()

    def input_scores(self, layer: nn.Module, record: LayerStatistics) -> torch.Tensor:
        """One score per input channel of ``layer``."""
        raise NotImplementedError

    def output_scores(self, layer: nn.Module, record: LayerStatistics) -> torch.Tensor:
        """One score per output channel of ``layer``."""
        raise NotImplementedError


def column_sums(layer: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` (shaped like the weight) over everything one input channel multiplies, per input
    channel; grouped convs map each group's columns to that group's input channels."""
    weight_shape = values.shape
    if isinstance(layer, nn.Linear):
        return values.sum(0)
    groups = layer.groups
    per_group = values.reshape(groups, weight_shape[0] // groups, weight_shape[1], -1)
    return per_group.sum(dim=(1, 3)).reshape(-1)


def row_sums(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(1).sum(1)


def input_norms_for_weight(layer: nn.Module, per_input: torch.Tensor) -> torch.Tensor:
    """A per-input-channel vector broadcast onto the weight's elements (grouped convs: each group's slice)."""
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        return per_input[None, :]
    groups = layer.groups
    out, per_group = weight.shape[:2]
    blocks = per_input.reshape(groups, per_group)
    expanded = blocks.repeat_interleave(out // groups, dim=0)  # [out, per_group]
    return expanded.reshape(out, per_group, *[1] * (weight.dim() - 2))


class ActivationImportance(CalibratedImportance):
    """Mean squared activation of each channel on the calibration data (Minitron-style activation norm).

    Input side: ``E[x_j^2]`` of the channel as the reading layer sees it. Output side: ``E[y_j^2]`` of the
    layer's output channel.
    """

    def input_scores(self, layer, record):
        return record.in_mean_square()

    def output_scores(self, layer, record):
        return record.out_mean_square()


class WandaImportance(CalibratedImportance):
    """Structured Wanda: ``sqrt(E[x_j^2]) * sum_i |W_ij|`` per input channel ``j`` (the whole column).

    Output side: ``sum_k |W_ik| * sqrt(E[x_k^2])``, row ``i``'s Wanda scores summed.
    """

    def input_scores(self, layer, record):
        weight = layer.weight.detach().double().abs()
        return record.in_mean_square().sqrt().to(weight.device) * column_sums(layer, weight)

    def output_scores(self, layer, record):
        weight = layer.weight.detach().double().abs()
        norms = input_norms_for_weight(layer, record.in_mean_square().sqrt().to(weight.device))
        return row_sums(weight * norms)


class FluctuationImportance(CalibratedImportance):
    """FLAP's fluctuation: ``Var[x_j] * ||W_:j||^2`` per input channel ``j``, the output energy lost when
    the channel is replaced by its calibration mean (which ``compensation="bias"`` then adds back).

    Output side: the variance of the output channel, ``Var[y_i]``.
    """

    def input_scores(self, layer, record):
        weight = layer.weight.detach().double()
        return record.in_variance().to(weight.device) * column_sums(layer, weight.square())

    def output_scores(self, layer, record):
        return record.out_variance()
