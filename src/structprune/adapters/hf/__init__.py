"""Hugging Face transformers: the adapters that keep attention, MLP, Mamba and config sizes in step, and
the model family the pruner asks about whole transformers models (``family.py``).

Config reading, the save_pretrained check and the head-layout reading live in ``structprune.hf``; these
modules only register what is built on them. Nothing here imports transformers.
"""
from . import attention, family, mla, model  # noqa: F401  (each registers its adapters or its family)
