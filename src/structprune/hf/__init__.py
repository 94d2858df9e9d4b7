"""Hugging Face transformers support: configs that follow the layers, and the save_pretrained check.

After a pruning step the config of a transformers model describes every pruned layer (``sync_config``),
so ``model.save_pretrained(path)`` / ``AutoModel*.from_pretrained(path)`` round-trip. The pruners put
``check_pretrained_config`` in front of ``model.save_pretrained``: a config that cannot describe the model
(layers pruned to different widths, a width the family derives from another) raises
``ConfigMismatchError`` before anything is written. Nothing here imports transformers.
"""
from .config import sync_config
from .rebuild import ConfigMismatchError, check_pretrained_config, config_mismatches, install_save_check


def save_pretrained(model, save_directory, **kwargs):
    """``model.save_pretrained(save_directory, **kwargs)`` after ``check_pretrained_config(model)``."""
    check_pretrained_config(model)
    return type(model).save_pretrained(model, save_directory, **kwargs)


__all__ = ["ConfigMismatchError", "check_pretrained_config", "config_mismatches", "install_save_check",
           "save_pretrained", "sync_config"]
