"""Pruning an Ultralytics model: what the trace sees, which layers stay whole, and the one-call ``prune``.

Users import these through ``structprune.integrations.ultralytics`` (which also holds the trainers); the
training module builds its pruner from here, so this module never imports it.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..utils.nested import evaluating
from ._rtdetr import is_rtdetr_head, training_branches

INSTALL_HINT = "pip install 'structprune[yolo]'"

#: why each kind of layer is left whole; rendered into the summary and the warning
HEAD_REASON = "the head's prediction layer (its outputs are the model's predictions)"
ATTENTION_REASON = ("attention q/k/v projection: its forward reshapes with num_heads/key_dim/head_dim "
                    "attributes that pruning does not rewrite yet")


def require_ultralytics():
    """The ultralytics package, or an ImportError that names the extra to install."""
    try:
        import ultralytics
    except ImportError as error:
        raise ImportError(f"structprune.integrations.ultralytics needs the 'ultralytics' package ({error}): "
                          f"{INSTALL_HINT}") from None
    return ultralytics


# ---------------------------------------------------------------------------------------------------
# the model inside a YOLO object
# ---------------------------------------------------------------------------------------------------
def split_model(yolo_or_model) -> tuple[Any, nn.Module]:
    """``(yolo, model)`` for a ``YOLO``/``RTDETR`` object, ``(None, model)`` for its ``.model``."""
    require_ultralytics()
    from ultralytics.engine.model import Model
    from ultralytics.nn.tasks import BaseModel

    if isinstance(yolo_or_model, Model):
        model = yolo_or_model.model
        if not isinstance(model, BaseModel):
            raise TypeError(f"{type(yolo_or_model).__name__}.model is a {type(model).__name__}, not a PyTorch "
                            f"Ultralytics model (an exported file?); load a .pt or .yaml model to prune it")
        return yolo_or_model, model
    if isinstance(yolo_or_model, BaseModel):
        return None, yolo_or_model
    raise TypeError(f"expected an Ultralytics YOLO/RTDETR object or its .model, got {type(yolo_or_model).__name__}; "
                    f"prune other nn.Modules with tp.pruner.BasePruner")


def head_of(model: nn.Module) -> nn.Module:
    return model.model[-1]


def head_name(model: nn.Module) -> str:
    return f"model.{len(model.model) - 1}"


def is_pruned(yolo_or_model) -> bool:
    """Whether any tensor's shape differs from the model its own yaml builds (same classes, same scale)."""
    _, model = split_model(yolo_or_model)
    yaml = copy.deepcopy(model.yaml)
    rebuilt = type(model)(cfg=yaml, ch=yaml.get("channels", 3), verbose=False)
    shapes = {name: tuple(tensor.shape) for name, tensor in rebuilt.state_dict().items()}
    return shapes != {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------
# what the trace sees: the head's raw predictions only
# ---------------------------------------------------------------------------------------------------
def head_outputs(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The head's raw predictions on ``inputs`` (a ``forward_fn`` for structprune's pruners and graph).

    Every branch a loss reads is kept (boxes, scores, mask coefficients and prototypes, keypoints,
    angles, both one-to-many and one-to-one branches of end-to-end heads, RT-DETR's decoder and encoder
    outputs, class logits; in eval mode also the outputs of its training-only layers, see ``_rtdetr``);
    the decoded predictions are dropped (they derive from these) and so are the feature maps (``feats``)
    the head hands on to its loss: they are internal, so they pin no channels.
    """
    head = head_of(model)
    if is_rtdetr_head(head):
        with training_branches(head) as training_only:
            output = model(inputs)
    else:
        training_only = []
        output = model(inputs)
    # in eval mode Ultralytics heads return (decoded, raw); in training mode (and export mode) one value
    if not head.training and isinstance(output, tuple) and len(output) == 2:
        output = output[1]
    return tuple(_prediction_tensors(output, [])) + tuple(training_only)


def _prediction_tensors(value, found: list) -> list:
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "feats":
                _prediction_tensors(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _prediction_tensors(item, found)
    return found


def make_example_inputs(model: nn.Module, imgsz: int = 640, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A fixed random image batch on the model's device, ``imgsz`` rounded up to the model's stride."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    stride = int(max(getattr(model, "stride", torch.tensor([32.0])).max().item(), 32))
    size = max(stride, -(-int(imgsz) // stride) * stride)
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, channels, size, size, generator=generator)
    return image.to(device=parameter.device, dtype=parameter.dtype)


# ---------------------------------------------------------------------------------------------------
# layers left whole
# ---------------------------------------------------------------------------------------------------
def _declared(module: nn.Module) -> list[nn.Module]:
    """The Conv2d/Linear/Embedding layers inside ``module`` (an Ultralytics ``Conv`` wraps one)."""
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]


def _detect_final_layers(head: nn.Module) -> list[nn.Module]:
    """Each branch's last layer (cv2/cv3/cv4 and their one2one copies), the DFL and the prototypes' last conv."""
    final = []
    for child in head.children():
        if isinstance(child, nn.ModuleList):
            for branch in child:
                final.extend(_declared(branch[-1] if isinstance(branch, nn.Sequential) else branch))
    dfl = getattr(head, "dfl", None)
    if isinstance(dfl, nn.Module):
        final.extend(_declared(dfl))
    proto = getattr(head, "proto", None)
    if isinstance(proto, nn.Module):
        last = list(proto.children())[-1]
        final.extend(_declared(last))
    return final


def _rtdetr_final_layers(head: nn.Module) -> list[nn.Module]:
    """The encoder's and every decoder layer's class scores and last box layer (the rest of the decoder
    is pruned: self-attention, deformable cross-attention, FFN and the hidden width)."""
    final = _declared(head.enc_score_head) + _declared(head.enc_bbox_head.layers[-1])
    for scores, boxes in zip(head.dec_score_head, head.dec_bbox_head):
        final.extend(_declared(scores) + _declared(boxes.layers[-1]))
    return final


def protected_layers(model: nn.Module) -> dict[nn.Module, str]:
    """{layer: why it is left whole} for the head of a known Ultralytics model, else a ValueError that
    names the head and what to pass."""
    from ultralytics.nn.modules.head import Classify, Detect, RTDETRDecoder

    head = head_of(model)
    name = head_name(model)
    if isinstance(head, Detect):
        return {layer: HEAD_REASON for layer in _detect_final_layers(head)}
    if isinstance(head, Classify):
        return {layer: HEAD_REASON for layer in _declared(head.linear)}
    if isinstance(head, RTDETRDecoder):
        return {layer: HEAD_REASON for layer in _rtdetr_final_layers(head)}
    raise ValueError(
        f"{name} ({type(head).__name__}) is a head structprune.integrations.ultralytics does not know; pass "
        f"ignored_layers=[...] with its final prediction layers (e.g. model.model[-1].<branch>[-1]) so that "
        f"their outputs stay, and the rest is pruned"
    )


def unsupported_layers(model: nn.Module) -> dict[nn.Module, str]:
    """{layer: why} for layers the graph cannot prune exactly yet (YOLO12's area attention q/k/v; PSA's
    ``Attention`` has an adapter)."""
    from ultralytics.nn.modules import block

    attention_types = tuple(getattr(block, name) for name in ("AAttn",) if hasattr(block, name))
    found = {}
    for module in model.modules():
        if isinstance(module, attention_types):
            for layer in _declared(module.qkv):
                found[layer] = ATTENTION_REASON
    return found


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """{projection: heads} for attention whose head size no attribute names, so that ``prune_num_heads``
    finds its heads: RT-DETR's deformable cross-attention (``value_proj``, n_heads blocks of
    d_model // n_heads; its sampling offsets and attention weights go with each head)."""
    return {module.value_proj: module.n_heads for module in model.modules()
            if type(module).__name__ == "MSDeformAttn" and isinstance(getattr(module, "value_proj", None), nn.Linear)
            and isinstance(getattr(module, "n_heads", None), int)}


# ---------------------------------------------------------------------------------------------------
# pruning
# ---------------------------------------------------------------------------------------------------
@dataclass
class PruneSummary:
    """What ``prune`` did: parameters and MACs (at ``imgsz``) before and after, and the layers left whole."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    imgsz: int
    #: {layer path: reason} for layers kept on purpose (the head's predictions) or not prunable yet
    kept: dict = field(default_factory=dict)
    pruner: Any = field(default=None, repr=False)

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def __str__(self) -> str:
        lines = [f"params: {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.1%} left)",
                 f"MACs at {self.imgsz}x{self.imgsz}: {self.macs_before:,} -> {self.macs_after:,}"]
        reasons: dict = {}
        for path, reason in self.kept.items():
            reasons.setdefault(reason, []).append(path)
        for reason, paths in reasons.items():
            lines.append(f"kept whole ({reason}): {_shorten(paths)}")
        return "\n".join(lines)


def build_pruner(yolo_or_model, pruner_class=None, importance=None, *, imgsz: int = 640,
                 example_inputs: torch.Tensor | None = None, ignored_layers: list | None = None,
                 warn: bool = True, **pruner_kwargs):
    """A structprune pruner (``BasePruner`` by default; ``GrowingRegPruner``, ...) set up for an Ultralytics
    model: the head's prediction layers and not-yet-prunable layers ignored, only raw predictions traced.

    ``pruner_kwargs`` go to the pruner (``pruning_ratio``, ``round_to``, ``global_pruning``, ``reg``...).
    ``ignored_layers`` adds layers to leave whole; with a head this module does not know, they are required.
    """
    from ..importance import MagnitudeImportance
    from ..pruner import BasePruner

    _, model = split_model(yolo_or_model)
    kept = _kept_layers(model, ignored_layers)
    unsupported = unsupported_layers(model)
    if warn:
        _warn_kept(model, {**{k: v for k, v in kept.items() if v != HEAD_REASON}, **unsupported})
    inputs = example_inputs if example_inputs is not None else make_example_inputs(model, imgsz)
    pruner_class = pruner_class or BasePruner
    importance = importance if importance is not None else MagnitudeImportance(p=2)
    ignored = list(kept) + list(unsupported) + list(ignored_layers or [])
    if pruner_kwargs.get("prune_num_heads"):
        pruner_kwargs["num_heads"] = {**attention_heads(model), **(pruner_kwargs.get("num_heads") or {})}
        if warn:
            _warn_psa_heads(model)
    pruner = pruner_class(model, inputs, importance, ignored_layers=ignored, forward_fn=head_outputs,
                          **pruner_kwargs)
    pruner.structprune_kept = {**kept, **unsupported}
    return pruner


def _kept_layers(model: nn.Module, ignored_layers) -> dict:
    try:
        return protected_layers(model)
    except ValueError:
        if ignored_layers:
            return {}
        raise


def _warn_kept(model: nn.Module, kept: dict) -> None:
    if not kept:
        return
    names = {module: name for name, module in model.named_modules()}
    by_reason: dict = {}
    for layer, reason in kept.items():
        by_reason.setdefault(reason, []).append(names.get(layer, type(layer).__name__))
    head = head_name(model)
    for reason, paths in by_reason.items():
        inside = all(path.startswith(head + ".") for path in paths)
        shown = f"{head} ({type(head_of(model)).__name__}, {len(paths)} layers)" if inside and len(paths) > 6 \
            else _shorten(paths)
        warnings.warn(f"structprune.integrations.ultralytics: left unpruned: {shown} ({reason})", stacklevel=3)


def _warn_psa_heads(model: nn.Module) -> None:
    """PSA attention keeps its head count under prune_num_heads: say so instead of leaving it to the pruner's
    generic advice (passing num_heads would not help)."""
    paths = [name for name, module in model.named_modules() if type(module).__name__ == "Attention"
             and type(module).__module__.startswith("ultralytics") and hasattr(module, "key_dim")]
    if paths:
        warnings.warn(f"structprune.integrations.ultralytics: prune_num_heads keeps the heads of {_shorten(paths)} "
                      f"(PSA attention: no layer's width counts its heads, so a new head count cannot be checked); "
                      f"their heads narrow instead, see pruner.report()", stacklevel=4)


def _shorten(paths: list, limit: int = 6) -> str:
    return ", ".join(paths[:limit]) + (f", ... (+{len(paths) - limit} more)" if len(paths) > limit else "")


def prune(yolo_or_model, ratio: float = 0.5, importance=None, *, imgsz: int = 640,
          example_inputs: torch.Tensor | None = None, ignored_layers: list | None = None,
          round_to: int | None = None, global_pruning: bool = False, **pruner_kwargs):
    """Prune an Ultralytics ``YOLO``/``RTDETR`` object or its ``.model`` in place; returns ``(it, PruneSummary)``.

    ``ratio`` is the fraction of channels removed per layer (of all channels with ``global_pruning``);
    ``importance`` defaults to L2 magnitude. ``imgsz`` sizes the traced example image and the MACs count.
    The pruned model runs, saves (``yolo.save``) and reloads with ``YOLO(path)``; fine-tune it with
    ``yolo.train(..., trainer=trainer(yolo))``. Raises without changing the model if the pruned model
    would not run in training mode.
    """
    from ..utils import count_ops_and_params

    yolo, model = split_model(yolo_or_model)
    inputs = example_inputs if example_inputs is not None else make_example_inputs(model, imgsz)
    size = int(inputs.shape[-1])
    macs_before, params_before = count_ops_and_params(model, inputs)
    pruner = build_pruner(model, None, importance, example_inputs=inputs, ignored_layers=ignored_layers,
                          pruning_ratio=ratio, round_to=round_to, global_pruning=global_pruning, **pruner_kwargs)
    with evaluating(model):
        reference = [tuple(t.shape) for t in head_outputs(model, inputs)]
    checkpoint = pruner._checkpoint()
    pruner.step()
    problem = _check_pruned(model, inputs, reference)
    if problem is not None:
        checkpoint.restore()
        raise RuntimeError(f"pruning would break the model, so it was left unchanged: {problem}; pass the layers "
                           f"involved in ignored_layers=[...] or report it")
    model.zero_grad(set_to_none=True)
    if yolo is not None:
        yolo.predictor = None  # a cached predictor wraps the model as it was (possibly fused)
    macs_after, params_after = count_ops_and_params(model, inputs)
    names = {module: name for name, module in model.named_modules()}
    kept = {names.get(layer, type(layer).__name__): reason for layer, reason in pruner.structprune_kept.items()}
    summary = PruneSummary(int(params_before), int(params_after), int(macs_before), int(macs_after), size, kept,
                           pruner)
    return (yolo if yolo is not None else model), summary


@contextlib.contextmanager
def _training_without_side_effects(model: nn.Module) -> Iterator[nn.Module]:
    """Training mode with BatchNorm statistics restored afterwards."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    flags = {module: module.training for module in model.modules()}
    model.train()
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers and buffers[name].shape == buffer.shape:
                    buffer.copy_(buffers[name])


def _check_pruned(model: nn.Module, inputs: torch.Tensor, reference: list) -> str | None:
    """None if the pruned model predicts in eval mode with the same shapes and runs in training mode."""
    try:
        with evaluating(model):
            shapes = [tuple(t.shape) for t in head_outputs(model, inputs)]
    except Exception as error:  # noqa: BLE001 - any failure means the pruned model is broken
        return f"the pruned model fails in eval mode ({type(error).__name__}: {error})"
    if shapes != reference:
        return f"the head's predictions changed shape from {reference} to {shapes}"
    try:
        with torch.no_grad(), _training_without_side_effects(model):
            head_outputs(model, inputs)
    except Exception as error:  # noqa: BLE001
        return (f"the pruned model fails in training mode ({type(error).__name__}: {error}): a training-only "
                f"branch was not traced")
    return None
