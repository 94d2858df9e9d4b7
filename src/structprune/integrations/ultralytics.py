"""Prune Ultralytics models (YOLOv8/YOLO11/YOLOv10 detect, segment, pose, OBB, classify; RT-DETR) in one call.

``prune(yolo, ratio=0.5)`` knows which layers of the head must keep their outputs (each branch's final
prediction conv, the DFL, the mask prototypes' last conv, the classifier), traces only the head's raw
predictions (the feature maps the head also returns for its loss are internal, so they pin nothing),
and names in a warning what it had to leave whole. The pruned model is an ordinary Ultralytics model:
``yolo.save(path)``, then ``YOLO(path)`` predicts, validates and exports it. Ultralytics' own ``train()``
rebuilds the model from its yaml (undoing the pruning), so fine-tune with ``trainer(yolo)``; growing
regularization inside Ultralytics training is ``growing_reg_trainer(yolo, ...)``.

ultralytics is imported on first use (extra ``yolo``: ``pip install 'structprune[yolo]'``).
"""

from __future__ import annotations

from ._ultralytics_prune import (
    ATTENTION_REASON,
    HEAD_REASON,
    INSTALL_HINT,
    PruneSummary,
    attention_heads,
    build_pruner,
    head_name,
    head_of,
    head_outputs,
    is_pruned,
    make_example_inputs,
    protected_layers,
    prune,
    require_ultralytics,
    split_model,
    unsupported_layers,
)
from ._ultralytics_train import UPDATE_EVERY, growing_reg_trainer, trainer

__all__ = ["ATTENTION_REASON", "HEAD_REASON", "INSTALL_HINT", "UPDATE_EVERY", "PruneSummary", "attention_heads",
           "build_pruner", "growing_reg_trainer", "head_name", "head_of", "head_outputs", "is_pruned",
           "make_example_inputs", "protected_layers", "prune", "require_ultralytics", "split_model", "trainer",
           "unsupported_layers"]
