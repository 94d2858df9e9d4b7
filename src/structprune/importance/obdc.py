"""OBDC: Optimal Brain Damage with a Kronecker-factored (K-FAC) curvature.

The C-OBD criterion of Wang et al., *EigenDamage: Structured Pruning in the Kronecker-Factored
Eigenbasis* (ICML 2019). A layer ``y = W x (+ b)`` has its Fisher block approximated by ``A ⊗ G`` with
``A = E[x x^T]`` (inputs augmented with a constant 1 when the layer has a bias) and ``G = E[g g^T]``
(``g = dL/dy`` per sample, labels sampled from the model's own prediction: the true Fisher).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.group import GroupItem, item_axes
from ..graph.side import Side
from .elementwise import ElementwiseImportance
from .hooks import HookedStatistics
from .slices import channel_sums, is_bias, parameter_of

#: Layers whose inputs and output gradients OBDC can turn into K-FAC factors.
OBDC_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


class OBDCImportance(HookedStatistics, ElementwiseImportance):
    """Per item and channel: the loss increase of removing it under the K-FAC curvature ``A ⊗ G``.

    With ``w_i`` row ``i`` of the weight matrix (a conv's weight flattened to ``[out, in*kh*kw]``,
    the bias appended as a last column when ``bias=True``) and ``W[:, c]`` its columns:

    - output channel ``i``: ``0.5 * G[i, i] * w_i^T A w_i``;
    - input channel ``j``: ``0.5 * sum over c, c' in cols(j) of A[c, c'] * W[:, c]^T G W[:, c']``, where
      ``cols(j)`` are the ``kh*kw`` columns of channel ``j`` (one column for a Linear). When several of
      an item's channels feed the same root channel (a conv flattened into a Linear), ``cols`` is the
      union of their columns, so the cross terms between them count.

    Grouped and depthwise convs use the diagonal of the factors instead (K-FAC across groups is not
    block-Kronecker): each weight scores ``0.5 * w**2 * A[c, c] * G[i, i]`` and channels sum their slice,
    exactly like :class:`HessianImportance`. So do layers with a factor wider than ``max_factor_size``
    (default 4096: a 4096 x 4096 float32 factor is 64 MB; full K-FAC memory grows with its square). Layers of other types in a group (BatchNorm, LayerNorm...)
    contribute nothing. Item scores are reduced and normalized as in :class:`ElementwiseImportance`.

    Statistics come from hooks; A and G are accumulated together when a layer's output gradient
    arrives, so forward passes without a backward (evaluation, tracing) add nothing::

        imp = OBDCImportance(num_classes=10)
        imp.register(model)
        for x, _ in batches:
            model.zero_grad()
            imp.sample_loss(model(x)).backward()
        imp.remove_hooks()
        scores = imp(group)

    Conventions: index 0 of a layer's input is the sample; every other position (a conv's output
    pixels, a sequence's tokens) is a location ``t``. ``A`` averages ``x_t x_t^T`` over samples and
    locations; ``G`` sums ``g_t g_t^T`` over locations and averages over samples (the KFC convention
    of Grosse & Martens 2016: the Fisher block is about ``T * E[x x^T] ⊗ E[g g^T]``, folded into G).
    ``g`` must be the gradient of a per-sample loss, so backpropagate a loss SUMMED over the batch,
    as :meth:`sample_loss` returns (a batch mean would scale G by ``1/batch**2``).

    The statistics are tied to the layer shapes (pruners score every group before pruning any); once a
    layer was pruned, scoring it raises: call :meth:`zero_grad` (alias :meth:`reset`) and accumulate
    again.
    """

    def __init__(
        self,
        group_reduction: str | None = "mean",
        normalizer: str | None = "mean",
        bias: bool = False,
        target_types: tuple = OBDC_TYPES,
        num_classes: int | None = None,
        max_factor_size: int = 4096,
    ):
        unsupported = [t for t in target_types if not (isinstance(t, type) and issubclass(t, OBDC_TYPES))]
        if unsupported:
            raise ValueError(
                f"OBDCImportance: cannot gather K-FAC statistics for target_types {unsupported}; "
                f"use subclasses of {[t.__name__ for t in OBDC_TYPES]}"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"OBDCImportance: num_classes must be a positive int (the size of the model's last "
                f"output dimension), got {num_classes!r}"
            )
        if isinstance(max_factor_size, bool) or not isinstance(max_factor_size, int) or max_factor_size < 1:
            raise ValueError(f"OBDCImportance: max_factor_size must be a positive int, got {max_factor_size!r}")
        super().__init__(group_reduction, normalizer, bias, target_types)
        self.num_classes = num_classes
        self.max_factor_size = max_factor_size
        self._init_hooks()  # self._stats: layer -> [A sum, G sum, number of locations, number of samples]

    # -- gathering statistics -------------------------------------------------------------------------
    def sample_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Cross-entropy summed over samples, against labels drawn from ``softmax(logits)``.

        Sampling the labels from the model (rather than using the data's) makes G the true Fisher.
        ``logits`` is ``[..., num_classes]``; every leading position draws its own label.
        """
        if logits.dim() == 0 or logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"OBDCImportance.sample_loss: logits have shape {tuple(logits.shape)} but num_classes="
                f"{self.num_classes}; pass the model's class scores, last dimension num_classes"
            )
        flat = logits.reshape(-1, self.num_classes)
        with torch.no_grad():
            labels = torch.multinomial(torch.softmax(flat.detach().float(), dim=-1), 1).squeeze(1)
        return F.cross_entropy(flat, labels, reduction="sum")

    def kfac_factors(self, layer: nn.Module, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The averaged ``(A, G)`` of ``layer`` (their diagonals, as vectors, for grouped convs)."""
        if layer not in self._stats:
            raise RuntimeError(
                f"OBDCImportance: no K-FAC statistics for {name or self._name(layer)} ({type(layer).__name__}); "
                f"call register(model) and run forward + backward (imp.sample_loss(model(x)).backward()) first"
            )
        a_sum, g_sum, locations, samples = self._stats[layer]
        return a_sum / locations, g_sum / samples

    def _on_forward(self, layer: nn.Module, inputs: tuple, output) -> None:
        # A tensor hook on the output (not a module backward hook) fires only if a backward reaches it,
        # tolerates an in-place op on the output (conv -> ReLU(inplace=True)) and keeps x alive no longer
        # than autograd does.
        if inputs and torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._accumulate, layer, inputs[0].detach()))

    def _accumulate(self, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            columns, samples = _input_columns(layer, x)
            rows = _output_rows(layer, grad)
            if self._diagonal(layer, columns.shape[1], rows.shape[1]):
                a_sum, g_sum = columns.pow(2).sum(0), rows.pow(2).sum(0)
            else:
                a_sum, g_sum = columns.T @ columns, rows.T @ rows
            if layer not in self._stats:
                self._stats[layer] = [a_sum, g_sum, columns.shape[0], samples]
                return
            stats = self._stats[layer]
            if not _shapes_match(layer, stats[0], stats[1]):
                raise self._stale(layer, self._name(layer), stats[0], stats[1])
            stats[0] += a_sum
            stats[1] += g_sum
            stats[2] += columns.shape[0]
            stats[3] += samples

    def _diagonal(self, layer: nn.Module, inputs: int, outputs: int) -> bool:
        # a factor is (width x width) floats: a VGG classifier's 25088 inputs would need 2.5 GB for A
        return getattr(layer, "groups", 1) > 1 or max(inputs, outputs) > self.max_factor_size

    def _stale(self, layer: nn.Module, name: str, a: torch.Tensor, g: torch.Tensor) -> RuntimeError:
        return RuntimeError(
            f"OBDCImportance: the K-FAC statistics of {name} ({type(layer).__name__}) have A {tuple(a.shape)} "
            f"and G {tuple(g.shape)} but its weight is now {tuple(layer.weight.shape)} (pruned since?); call "
            f"zero_grad() and accumulate again"
        )

    def _scored_weights(self, layer: nn.Module, name: str, a: torch.Tensor, g: torch.Tensor) -> dict:
        """``{"weight", "bias", "groups"}`` of the layer, refused once its shapes no longer match A and G."""
        if not _shapes_match(layer, a, g):
            raise self._stale(layer, name, a, g)
        return {
            "weight": layer.weight.detach().float(),
            "bias": None if layer.bias is None else layer.bias.detach().float(),
            "groups": getattr(layer, "groups", 1),
        }

    # -- scoring --------------------------------------------------------------------------------------
    def item_scores(self, item: GroupItem) -> torch.Tensor | None:
        layer = item.dep.target.module
        if not isinstance(layer, self.target_types):
            return None
        name = item.dep.target.name
        a, g = self.kfac_factors(layer, name)
        out_side = item.side is Side.OUT
        saved = self._scored_weights(layer, name, a, g)
        if a.dim() == 1:  # diagonal factors: grouped convs and layers over max_factor_size
            return self._diagonal_scores(item, layer, saved, a, g)
        weight = saved["weight"].flatten(1)
        if out_side:
            return self._out_scores(weight, saved["bias"], a, g)[torch.tensor(item.idxs, dtype=torch.long)]
        return _in_scores(item, weight, saved["weight"][0, 0].numel(), a, g)

    def _out_scores(self, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if bias is not None:
            if self.bias:
                weight = torch.cat([weight, bias[:, None]], dim=1)
            else:
                a = a[:-1, :-1]
        return 0.5 * g.diagonal() * ((weight @ a) * weight).sum(1)

    def _diagonal_scores(self, item: GroupItem, layer: nn.Module, saved: dict, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor | None:
        weight = saved["weight"]
        out, per_group = weight.shape[:2]
        kernel = weight[0, 0].numel()
        # the column of A (the unfolded input of all groups) that weight[i, c, p] multiplies
        first = (torch.arange(out, device=a.device) // (out // saved["groups"])) * per_group
        channel = first[:, None] + torch.arange(per_group, device=a.device)
        columns = channel[..., None] * kernel + torch.arange(kernel, device=a.device)
        curvature = {"weight": a[columns].reshape(weight.shape) * g.reshape(-1, *[1] * (weight.dim() - 1)),
                     "bias": a[-1] * g}
        idxs = torch.tensor(item.idxs, dtype=torch.long)
        total = None
        for axis in item_axes(item):
            if parameter_of(layer, axis) is None or (is_bias(axis) and not self.bias):
                continue
            sums = channel_sums(0.5 * saved[axis.name].pow(2) * curvature[axis.name], axis, idxs)
            total = sums if total is None else total + sums
        return total


def _in_scores(item: GroupItem, weight: torch.Tensor, kernel: int, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Input-side scores, one per ``item.idxs``; their sum over a root channel is its exact score_in."""
    width = weight.shape[1]
    pairs = a[:width, :width] * (weight.T @ g @ weight)  # A[c, c'] * W[:, c]^T G W[:, c']
    idxs = torch.tensor(item.idxs, dtype=torch.long, device=a.device)
    columns = idxs[:, None] * kernel + torch.arange(kernel, device=a.device)
    _, owner = torch.unique(torch.tensor(item.root_idxs, device=a.device), return_inverse=True)
    members = torch.zeros(int(owner.max()) + 1 if len(owner) else 0, width, device=a.device)
    members[owner[:, None].expand_as(columns), columns] = 1.0
    # each column's share of the quadratic form of its root channel's columns
    shares = pairs @ members.T
    return 0.5 * shares[columns, owner[:, None]].sum(1)


def _shapes_match(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether ``A`` and ``G`` (or their diagonals) fit the layer's current weight."""
    inputs = layer.weight[0].numel() * getattr(layer, "groups", 1) + (layer.bias is not None)
    return a.shape[0] == inputs and g.shape[0] == layer.weight.shape[0]




def _input_columns(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The layer's input as ``[locations, features (+1 for the bias)]`` rows, and the sample count."""
    x = x.float()
    if isinstance(layer, nn.Linear):
        columns = x.reshape(-1, layer.in_features)
        samples = x.shape[0] if x.dim() > 1 else 1
    else:
        if x.dim() == layer.weight.dim() - 1:  # unbatched input
            x = x.unsqueeze(0)
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)  # handles "same" and padding modes
        kernel, dilation, stride = layer.kernel_size, layer.dilation, layer.stride
        if isinstance(layer, nn.Conv1d):  # as a Conv2d over a height-1 image
            x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
        patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [N, C*kh*kw, L], channel-major
        columns = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        samples = x.shape[0]
    if layer.bias is not None:
        columns = torch.cat([columns, columns.new_ones(columns.shape[0], 1)], dim=1)
    return columns, samples


def _output_rows(layer: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """The output gradient as ``[locations, out]`` rows, in the order of :func:`_input_columns`."""
    grad = grad.float()
    if isinstance(layer, nn.Linear):
        return grad.reshape(-1, layer.out_features)
    if grad.dim() == layer.weight.dim() - 1:
        grad = grad.unsqueeze(0)
    return grad.flatten(2).transpose(1, 2).reshape(-1, grad.shape[1])
