"""Hugging Face transformers as a model family: what the pruner asks about a whole transformers model.

Registered at import (``adapters/hf/__init__.py``, so at ``import structprune``): the task outputs keep
their shape, narrow embeddings root groups, a rolled-back step puts every config back, and widths follow
the config (``uniform_config_widths``, the config fit) through ``structprune.hf``'s config reading, fit
search and rebuild check. The pruner core reaches all of it through ``adapters.families`` only.
"""
from __future__ import annotations

from functools import partial

from torch import nn

from ...hf.attention import HEAD_SIZE_NAMES, head_count, head_size
from ...hf.config import (
    HEAD_SIZE_FIELDS,
    head_size_ties,
    layer_fields,
    restore_configs,
    snapshot_configs,
    sync_config,
    task_outputs,
    uses_transformers,
)
from ...hf.fit import (
    HEAD_COUNT_FIELDS,
    candidates,
    dependencies,
    field_values,
    heads_fit,
    heads_stayed_wide,
    width_fields,
)
from ...hf.rebuild import config_mismatches
from ..families import ConfigWidths, ModelFamily, register_family


def _snapshot(model: nn.Module):
    """Every config the model's modules hold; the adapters rewrite them after each group."""
    return partial(restore_configs, snapshot_configs(model))


CONFIG_WIDTHS = ConfigWidths(
    layer_fields=layer_fields,
    head_size_ties=head_size_ties,
    sync=sync_config,
    mismatches=config_mismatches,
    width_fields=width_fields,
    field_values=field_values,
    dependencies=dependencies,
    candidates=candidates,
    head_count_fields=HEAD_COUNT_FIELDS,
    head_size_fields=frozenset(HEAD_SIZE_FIELDS),
    head_count=head_count,
    head_size=head_size,
    heads_fit=heads_fit,
    heads_stayed_wide=heads_stayed_wide,
)

TRANSFORMERS = register_family(ModelFamily(
    "Hugging Face transformers",
    uses_transformers,
    # ALBERT/ELECTRA embeddings narrower than the hidden size form a group of their own
    extra_root_types=(nn.Embedding,),
    # logits keep their shape; hidden states may shrink
    task_outputs=task_outputs,
    activation_outliers=True,
    config=CONFIG_WIDTHS,
    snapshot=_snapshot,
    # BERT names it attention_head_size, T5 key_value_proj_dim
    head_size_names=HEAD_SIZE_NAMES,
))
