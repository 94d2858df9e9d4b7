"""Hugging Face transformers: the adapters that keep attention, MLP, Mamba and config sizes in step.

Config reading, the save_pretrained check and the head-layout reading live in ``structprune.hf``; these
modules only register the syncs built on them. Nothing here imports transformers.
"""
from . import attention, mla, model  # noqa: F401  (each registers its adapters)
