"""One declaration per layer type: which dimensions carry its output and input channels.

Pruning, importance, regularization and MAC counting all read these; nothing else in the library
special-cases layer types.
"""
from __future__ import annotations

import torch
from torch import nn

from .axes import Axis, swap_data
from .slicing_log import record_slice
from .base import BasePruningFunc, as_index_tensor
from .moe import INNER, MATCHED, ExpertCount, ExpertWidth


def _is_depthwise(layer) -> bool:
    # decided once per layer: a grouped conv pruned down to one channel per group keeps the meaning it was
    # traced with, or the graph's view of its input and output sides would flip halfway through pruning
    flag = layer.__dict__.get("_structprune_depthwise")
    if flag is None:
        flag = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
        layer.__dict__["_structprune_depthwise"] = flag
    return flag


def _check_grouped(layer, idxs, side: str, symmetric: bool) -> None:
    """Grouped convs lose channels evenly: the same positions in every group (``symmetric``) or at least the
    same number from each group, so every group keeps the same width."""
    groups = layer.groups
    total = layer.out_channels if side == "output" else layer.in_channels
    if groups == 1 or _is_depthwise(layer) or total % groups:
        return
    idxs = as_index_tensor(idxs)
    if len(idxs) == 0:
        return
    width = total // groups
    block, local = idxs // width, idxs % width
    counts = torch.bincount(block, minlength=groups)
    even = bool((counts == counts[0]).all())
    same = even and all(set(local[block == g].tolist()) == set(local[block == 0].tolist()) for g in range(groups))
    if not (same if symmetric else even):
        rule = "the same positions in every group" if symmetric else "the same number from every group"
        raise ValueError(
            f"{type(layer).__name__}({layer.in_channels}, {layer.out_channels}, groups={groups}): removing {side} "
            f"channels {idxs.tolist()[:8]}... unevenly across its {groups} groups; remove {rule}"
        )


def _per_output_extras(layer, count: int) -> list:
    """Axes of a conv subclass's own extra per-output-channel parameters, shaped [out, 1, ...]: timm's
    ScaledStdConv2d (NFNet) scales its standardized weight by a ``gain`` its forward reads inside the
    layer, so it must lose the same rows as the weight."""
    return [Axis(name, 0) for name, param in layer.named_parameters(recurse=False)
            if name not in ("weight", "bias") and param.dim() >= 1 and param.shape[0] == count
            and all(size == 1 for size in param.shape[1:])]


class ConvPruner(BasePruningFunc):
    out_tensor_dim = 1
    in_tensor_dim = 1
    channel_inputs = (0,)
    #: which side of a grouped layer needs identical positions in every group (the other: equal counts)
    symmetric_side = "input"
    #: the weight layout this declaration describes ([out, in/groups, ...]; transposed: [in, out/groups, ...])
    transposed = False

    def _layout(self, layer) -> "ConvPruner":
        """The declaration of the layer's own weight layout. torch_pruning's ConvPruner prunes transposed convs
        too, so ``tp.prune_conv_out_channels(conv_transpose, idxs)`` must slice dim 1, not the input dim 0."""
        if bool(getattr(layer, "transposed", False)) is self.transposed:
            return self
        return _CONV_T if layer.transposed else _CONV

    def check_structure(self, layer, idxs, side: str) -> None:
        _check_grouped(layer, idxs, side, symmetric=side == self._layout(layer).symmetric_side)

    def prune_out_channels(self, layer, idxs):
        self.check_structure(layer, idxs, "output")
        return super().prune_out_channels(layer, idxs)

    def prune_in_channels(self, layer, idxs):
        if not self.is_coupled(layer):
            self.check_structure(layer, idxs, "input")
        return super().prune_in_channels(layer, idxs)

    def is_coupled(self, layer):
        return _is_depthwise(layer)

    def out_axes(self, layer):
        if self._layout(layer) is not self:
            return self._layout(layer).out_axes(layer)
        return [Axis("weight", 0), Axis("bias", 0)] + _per_output_extras(layer, layer.out_channels)

    def in_axes(self, layer):
        if self._layout(layer) is not self:
            return self._layout(layer).in_axes(layer)
        if self.is_coupled(layer):
            return self.out_axes(layer)
        return [Axis("weight", 1)]

    def get_out_channels(self, layer):
        return layer.out_channels

    def get_in_channels(self, layer):
        return layer.in_channels

    def get_out_channel_groups(self, layer):
        return 1 if self.is_coupled(layer) else layer.groups

    def get_in_channel_groups(self, layer):
        return 1 if self.is_coupled(layer) else layer.groups

    def update_attrs(self, layer):
        if self._layout(layer) is not self:
            return self._layout(layer).update_attrs(layer)
        # attributes still describe the layer before pruning here, so is_coupled sees the old layout
        depthwise = self.is_coupled(layer)
        layer.out_channels = layer.weight.shape[0]
        if depthwise:
            layer.groups = layer.in_channels = layer.out_channels
        else:
            layer.in_channels = layer.weight.shape[1] * layer.groups


class DepthwiseConvPruner(ConvPruner):
    """Kept as a name for torch_pruning users; depthwise convs are detected by ConvPruner itself."""


class ConvTransposePruner(ConvPruner):
    """ConvTranspose stores weight as [in, out/groups, ...]: its output channels are dim 1."""

    symmetric_side = "output"
    transposed = True

    def out_axes(self, layer):
        if self._layout(layer) is not self:
            return self._layout(layer).out_axes(layer)
        if self.is_coupled(layer):
            return [Axis("weight", 0), Axis("bias", 0)]
        return [Axis("weight", 1), Axis("bias", 0)]

    def in_axes(self, layer):
        if self._layout(layer) is not self:
            return self._layout(layer).in_axes(layer)
        if self.is_coupled(layer):
            return self.out_axes(layer)
        return [Axis("weight", 0)]

    def update_attrs(self, layer):
        if self._layout(layer) is not self:
            return self._layout(layer).update_attrs(layer)
        depthwise = self.is_coupled(layer)
        layer.in_channels = layer.weight.shape[0]
        if depthwise:
            layer.groups = layer.out_channels = layer.in_channels
        else:
            layer.out_channels = layer.weight.shape[1] * layer.groups


class LinearPruner(BasePruningFunc):
    out_tensor_dim = -1
    in_tensor_dim = -1
    channel_inputs = (0,)

    def out_axes(self, layer):
        return [Axis("weight", 0), Axis("bias", 0)]

    def in_axes(self, layer):
        return [Axis("weight", 1)]

    def get_out_channels(self, layer):
        return layer.out_features

    def get_in_channels(self, layer):
        return layer.in_features

    def update_attrs(self, layer):
        layer.out_features, layer.in_features = layer.weight.shape


class BatchnormPruner(BasePruningFunc):
    out_tensor_dim = 1
    in_tensor_dim = 1
    coupled = True
    channel_inputs = (0,)

    def out_axes(self, layer):
        return [Axis("weight", 0), Axis("bias", 0), Axis("running_mean", 0), Axis("running_var", 0)]

    def get_out_channels(self, layer):
        return layer.num_features

    get_in_channels = get_out_channels

    def shrink_attrs(self, layer, removed):
        layer.num_features -= removed  # InstanceNorm without affine or running stats

    def update_attrs(self, layer):
        for name in ("weight", "running_mean"):
            tensor = getattr(layer, name, None)
            if tensor is not None:
                layer.num_features = tensor.shape[0]
                return


InstanceNormPruner = BatchnormPruner


class GroupNormPruner(BasePruningFunc):
    out_tensor_dim = 1
    in_tensor_dim = 1
    coupled = True
    channel_inputs = (0,)

    def out_axes(self, layer):
        return [Axis("weight", 0), Axis("bias", 0)]

    def get_out_channels(self, layer):
        return layer.num_channels

    get_in_channels = get_out_channels

    def get_out_channel_groups(self, layer):
        return layer.num_groups

    get_in_channel_groups = get_out_channel_groups

    def _prune(self, layer, axes, idxs, total, side):
        removed = len(as_index_tensor(idxs))
        if (layer.num_channels - removed) % layer.num_groups:
            raise ValueError(
                f"GroupNorm({layer.num_groups} groups, {layer.num_channels} channels): removing {removed} channels "
                f"leaves a count not divisible by num_groups; remove the same number from each group"
            )
        return super()._prune(layer, axes, idxs, total, side)

    def shrink_attrs(self, layer, removed):
        layer.num_channels -= removed

    def update_attrs(self, layer):
        if layer.affine:
            layer.num_channels = layer.weight.shape[0]


class LayernormPruner(BasePruningFunc):
    """LayerNorm/RMSNorm over the last dims; channels are the first normalized dim."""

    coupled = True
    channel_inputs = (0,)

    def __init__(self, pruning_dim: int = -1):
        super().__init__(pruning_dim)

    def out_axes(self, layer):
        return [Axis("weight", 0), Axis("bias", 0)]

    def get_out_channels(self, layer):
        return layer.normalized_shape[0]

    get_in_channels = get_out_channels

    def shrink_attrs(self, layer, removed):
        shape = tuple(layer.normalized_shape)
        layer.normalized_shape = (shape[0] - removed,) + shape[1:]

    def update_attrs(self, layer):
        weight = getattr(layer, "weight", None)
        if weight is not None:
            layer.normalized_shape = tuple(weight.shape)


def _layernorm_tensor_dim(layer) -> int:
    return -len(layer.normalized_shape)


class PReLUPruner(BasePruningFunc):
    out_tensor_dim = 1
    in_tensor_dim = 1
    coupled = True
    channel_inputs = (0,)

    def out_axes(self, layer):
        return [] if layer.num_parameters == 1 else [Axis("weight", 0)]

    def get_out_channels(self, layer):
        return None if layer.num_parameters == 1 else layer.num_parameters

    get_in_channels = get_out_channels

    def update_attrs(self, layer):
        layer.num_parameters = layer.weight.shape[0]


class EmbeddingPruner(BasePruningFunc):
    out_tensor_dim = -1
    channel_inputs = ()

    def out_axes(self, layer):
        return [Axis("weight", 1)]

    def get_out_channels(self, layer):
        return layer.embedding_dim

    def get_in_channels(self, layer):
        return None

    def update_attrs(self, layer):
        layer.embedding_dim = layer.weight.shape[1]


class MultiheadAttentionPruner(BasePruningFunc):
    """Embedding-dim pruning of nn.MultiheadAttention; every head must keep the same size."""

    out_tensor_dim = -1
    in_tensor_dim = -1
    coupled = True
    channel_inputs = (0, 1, 2)

    def out_axes(self, layer):
        if not layer._qkv_same_embed_dim:
            axes = [Axis("q_proj_weight", 0), Axis("q_proj_weight", 1), Axis("k_proj_weight", 0),
                    Axis("v_proj_weight", 0)]
        else:
            axes = [Axis("in_proj_weight", 0, blocks=3), Axis("in_proj_weight", 1)]
        return axes + [
            Axis("in_proj_bias", 0, blocks=3),
            Axis("bias_k", 2),
            Axis("bias_v", 2),
            Axis("out_proj.weight", 0),
            Axis("out_proj.weight", 1),
            Axis("out_proj.bias", 0),
        ]

    def get_out_channels(self, layer):
        return layer.embed_dim

    get_in_channels = get_out_channels

    def get_out_channel_groups(self, layer):
        return layer.num_heads

    get_in_channel_groups = get_out_channel_groups

    def prune_out_channels(self, layer, idxs):
        # whole heads may go too: the kept (head, dim) grid gives the new head count
        from .base import as_index_tensor

        removed = as_index_tensor(idxs)
        if len(removed) and int(removed.max()) < layer.embed_dim and layer.embed_dim % layer.num_heads == 0:
            kept = torch.ones(layer.embed_dim, dtype=torch.bool)
            kept[removed] = False
            grid = kept.view(layer.num_heads, -1)
            heads, dims = grid.any(1), grid.any(0)
            if bool(heads.any()) and torch.equal(grid, heads[:, None] & dims[None, :]):
                layer.num_heads = int(heads.sum())
        return super().prune_out_channels(layer, idxs)

    prune_in_channels = prune_out_channels

    def update_attrs(self, layer):
        embed_dim = layer.out_proj.weight.shape[0]
        if embed_dim % layer.num_heads:
            raise ValueError(
                f"MultiheadAttention: embed_dim {embed_dim} is not divisible by num_heads {layer.num_heads}; "
                f"prune the same number of dims from every head (out_channel_groups=num_heads)"
            )
        layer.embed_dim = embed_dim
        if layer._qkv_same_embed_dim:
            layer.kdim = layer.vdim = embed_dim
        layer.head_dim = embed_dim // layer.num_heads
        layer.out_proj.in_features = layer.out_proj.out_features = embed_dim


class LSTMPruner(BasePruningFunc):
    """Hidden-size pruning of every layer of an LSTM (input size on the input side)."""

    out_tensor_dim = -1
    in_tensor_dim = -1
    channel_inputs = (0,)

    def _suffixes(self, layer):
        return ["", "_reverse"] if layer.bidirectional else [""]

    def out_axes(self, layer):
        if layer.proj_size:
            raise NotImplementedError("LSTM with proj_size is not supported; register a customized pruner")
        axes = []
        directions = len(self._suffixes(layer))
        for index in range(layer.num_layers):
            for suffix in self._suffixes(layer):
                tag = f"_l{index}{suffix}"
                axes += [Axis("weight_ih" + tag, 0, blocks=4), Axis("weight_hh" + tag, 0, blocks=4),
                         Axis("weight_hh" + tag, 1), Axis("bias_ih" + tag, 0, blocks=4),
                         Axis("bias_hh" + tag, 0, blocks=4)]
                if index > 0:
                    axes.append(Axis("weight_ih" + tag, 1, blocks=directions))
        return axes

    def in_axes(self, layer):
        return [Axis("weight_ih_l0" + suffix, 1) for suffix in self._suffixes(layer)]

    def get_out_channels(self, layer):
        return layer.hidden_size * (2 if layer.bidirectional else 1)

    def get_in_channels(self, layer):
        return layer.input_size

    def get_out_channel_groups(self, layer):
        return 2 if layer.bidirectional else 1

    def update_attrs(self, layer):
        layer.hidden_size = layer.weight_hh_l0.shape[1]
        layer.input_size = layer.weight_ih_l0.shape[1]
        layer._flat_weights = [getattr(layer, name) for name in layer._flat_weights_names]
        layer.flatten_parameters() if hasattr(layer, "flatten_parameters") else None


class Conv1DPruner(BasePruningFunc):
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2 and friends): a Linear whose weight is
    stored transposed, ``[in_features (nx), out_features (nf)]``."""

    out_tensor_dim = -1
    in_tensor_dim = -1
    channel_inputs = (0,)

    def out_axes(self, layer):
        return [Axis("weight", 1), Axis("bias", 0)]

    def in_axes(self, layer):
        return [Axis("weight", 0)]

    def get_out_channels(self, layer):
        return layer.nf

    def get_in_channels(self, layer):
        return layer.nx

    def update_attrs(self, layer):
        layer.nx, layer.nf = layer.weight.shape


class _TiedWidthAttentionPruner(BasePruningFunc):
    """Attention whose forward ties its width to its input's: declared whole, input channel ``c`` is
    channel ``c`` of q, k and v (one fused projection, ``blocks=3``) and of the output projection, and
    every head keeps the same size (``out_channel_groups`` = heads), as for nn.MultiheadAttention."""

    out_tensor_dim = -1
    in_tensor_dim = -1
    coupled = True
    channel_inputs = (0,)
    qkv = "qkv"
    proj = "proj"
    heads = "num_heads"

    def out_axes(self, layer):
        qkv, proj = self.qkv, self.proj
        return [Axis(f"{qkv}.weight", 0, blocks=3), Axis(f"{qkv}.weight", 1), Axis(f"{qkv}.bias", 0, blocks=3),
                Axis(f"{proj}.weight", 0), Axis(f"{proj}.weight", 1), Axis(f"{proj}.bias", 0)]

    def get_out_channels(self, layer):
        return getattr(layer, self.proj).weight.shape[0]

    get_in_channels = get_out_channels

    def get_out_channel_groups(self, layer):
        return getattr(layer, self.heads)

    get_in_channel_groups = get_out_channel_groups

    def update_attrs(self, layer):
        for name in (self.qkv, self.proj):
            linear = getattr(layer, name)
            linear.out_features, linear.in_features = linear.weight.shape


class TorchvisionSwinAttentionPruner(_TiedWidthAttentionPruner):
    """torchvision ``ShiftedWindowAttention`` (and V2): the forward calls F.linear on ``qkv`` / ``proj``
    weights itself and splits heads as ``C // num_heads`` of the input width C."""


class TorchvisionMaxVitAttentionPruner(_TiedWidthAttentionPruner):
    """torchvision MaxViT ``RelativePositionalMultiHeadAttention``: reshapes its output back to the input
    width ``D``, so heads narrow with the hidden size (``head_dim`` follows)."""

    qkv = "to_qkv"
    proj = "merge"
    heads = "n_heads"

    def update_attrs(self, layer):
        super().update_attrs(layer)
        layer.head_dim = layer.merge.in_features // layer.n_heads


class ParameterPruner(BasePruningFunc):
    """A bare nn.Parameter used directly in forward (class tokens, position embeddings, layer scales)."""

    coupled = True

    def __init__(self, pruning_dim: int = -1):
        super().__init__(pruning_dim)

    def out_axes(self, layer):
        return [Axis("data", self.pruning_dim)]

    def prune_out_channels(self, tensor, idxs):
        from .base import as_index_tensor, _complement, validate_idxs

        idxs = as_index_tensor(idxs)
        validate_idxs(tensor, idxs, tensor.shape[self.pruning_dim], "output", name="parameter")
        keep = _complement(idxs, tensor.shape[self.pruning_dim], tensor.device)
        grad = tensor.grad
        record_slice(tensor, self.pruning_dim, keep, tensor.shape)
        swap_data(tensor, tensor.data.index_select(self.pruning_dim, keep).contiguous())
        if grad is not None:
            tensor.grad = grad.index_select(self.pruning_dim, keep).contiguous()
        return tensor

    prune_in_channels = prune_out_channels

    def get_out_channels(self, tensor):
        return tensor.shape[self.pruning_dim]

    get_in_channels = get_out_channels


class ActivationPruner(BasePruningFunc):
    """Layers with no channel parameters (kept for torch_pruning users writing custom tables)."""

    coupled = True

    def prune_out_channels(self, layer, idxs):
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return None

    get_in_channels = get_out_channels


def tensor_dims(pruner: BasePruningFunc, layer: nn.Module) -> tuple[int | None, int | None]:
    """Activation dims of (output, input) channels for a layer, resolving LayerNorm-like shapes."""
    if isinstance(pruner, LayernormPruner):
        dim = _layernorm_tensor_dim(layer)
        return dim, dim
    return pruner.out_tensor_dim, pruner.in_tensor_dim


_CONV = ConvPruner()
_CONV_T = ConvTransposePruner()
_LINEAR = LinearPruner()
_BN = BatchnormPruner()
_GN = GroupNormPruner()
_LN = LayernormPruner()
_PRELU = PReLUPruner()
_EMBED = EmbeddingPruner()
_MHA = MultiheadAttentionPruner()
_LSTM = LSTMPruner()
_CONV1D = Conv1DPruner()

#: Layer type -> pruning function. Lookup walks the MRO, so subclasses (timm's LayerNorm2d...) match.
#: The torch layers and the proxies of MoE experts' inner layers are declared here, at once; the layers
#: of optional libraries join in ``register_optional_layers`` (called when a graph is built).
DEFAULT_PRUNERS: dict[type, BasePruningFunc] = {
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: _CONV,
    nn.ConvTranspose1d: _CONV_T,
    nn.ConvTranspose2d: _CONV_T,
    nn.ConvTranspose3d: _CONV_T,
    nn.Linear: _LINEAR,
    nn.modules.batchnorm._BatchNorm: _BN,
    nn.modules.instancenorm._InstanceNorm: _BN,
    nn.GroupNorm: _GN,
    nn.LayerNorm: _LN,
    nn.RMSNorm: _LN,
    nn.PReLU: _PRELU,
    nn.Embedding: _EMBED,
    nn.MultiheadAttention: _MHA,
    nn.LSTM: _LSTM,
    **INNER,  # the proxies' own declarations (our types: registered like nn.Linear's)
}


def find_pruner(module: nn.Module, table: dict) -> BasePruningFunc | None:
    """Most specific registered pruner for a module: instance first, then its class MRO."""
    if module in table if not isinstance(module, type) else False:
        return table[module]
    for klass in type(module).__mro__:
        if klass in table:
            return table[klass]
    return None


#: Layer types of optional libraries: (module path, class name) -> pruning function. They are declared
#: only once their library has been imported by the user (a model built from it holds such layers), so
#: importing structprune never imports transformers or torchvision. Subclasses (ShiftedWindowAttentionV2)
#: match through the MRO.
OPTIONAL_PRUNERS: dict[tuple[str, str], BasePruningFunc] = {
    ("transformers.pytorch_utils", "Conv1D"): _CONV1D,
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"): TorchvisionSwinAttentionPruner(),
    ("torchvision.models.maxvit", "RelativePositionalMultiHeadAttention"): TorchvisionMaxVitAttentionPruner(),
}

#: Optional types that behave like Linear: they root channel groups and importance scores their weights.
OPTIONAL_LINEAR_LIKE: set[tuple[str, str]] = {("transformers.pytorch_utils", "Conv1D")}

#: Layers recognised by what they hold rather than by class name (transformers builds 60+ fused MoE experts
#: classes with one decorator): (predicate, pruning function), tried on the modules of a traced model whose
#: type nothing declares. Matched types act like Linear (importance scores them).
MATCHED_PRUNERS: list = list(MATCHED)
_MATCHED_TYPES: set = set()

#: Types of our own scored and regularized like Linear weights: the inner layers of MoE experts (the
#: expert count roots no group by default: experts go only with ``prune_num_experts``).
SCORED_TYPES: tuple[type, ...] = (ExpertWidth, ExpertCount)


def register_optional_layers(model: nn.Module | None = None) -> tuple[type, ...]:
    """Declare the ``OPTIONAL_PRUNERS`` types whose library is already imported, and the types of ``model``'s
    modules that a ``MATCHED_PRUNERS`` predicate recognises; returns those types.

    Cheap and idempotent: it looks only in ``sys.modules`` (and at ``model``) and imports nothing, so call
    it whenever a graph is built. A pruner already registered for such a type in ``DEFAULT_PRUNERS`` is kept.
    """
    import sys

    found = []
    for (module_name, class_name), pruner in OPTIONAL_PRUNERS.items():
        module = sys.modules.get(module_name)
        layer_type = getattr(module, class_name, None) if module is not None else None
        if isinstance(layer_type, type):
            DEFAULT_PRUNERS.setdefault(layer_type, pruner)
            found.append(layer_type)
    seen = set()
    for module in model.modules() if model is not None else ():
        layer_type = type(module)
        # a type registered by name keeps its pruner; a subclass of a generic layer may still be recognised
        # (Phi-MoE's router is an nn.Linear whose rows are experts)
        if layer_type in seen or layer_type in _MATCHED_TYPES or layer_type in DEFAULT_PRUNERS:
            continue
        seen.add(layer_type)
        for predicate, pruner in MATCHED_PRUNERS:
            if predicate(module):
                DEFAULT_PRUNERS[layer_type] = pruner
                _MATCHED_TYPES.add(layer_type)
                break
    return tuple(found) + tuple(sorted(_MATCHED_TYPES, key=lambda t: (t.__module__, t.__qualname__)))


def optional_linear_types() -> tuple[type, ...]:
    """The imported optional types that act like Linear (transformers Conv1D, fused MoE experts and
    routers met so far). Reads only: ``register_optional_layers`` declares them."""
    import sys

    found = []
    for module_name, class_name in sorted(OPTIONAL_LINEAR_LIKE):
        layer_type = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(layer_type, type):
            found.append(layer_type)
    return tuple(found) + tuple(sorted(_MATCHED_TYPES, key=lambda t: (t.__module__, t.__qualname__)))


def scored_types() -> tuple[type, ...]:
    """Types whose weights default importance criteria and regularizers read beyond the built-in ones."""
    return optional_linear_types() + SCORED_TYPES
