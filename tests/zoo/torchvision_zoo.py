"""Shared helpers for the torchvision zoo tests: which models, what input size."""
import torch
import torchvision

FULL_SIZE = {"vit_", "swin", "maxvit", "inception_v3"}


def classification_models():
    return sorted(torchvision.models.list_models(module=torchvision.models))


def input_size(name: str) -> int:
    if name.startswith("inception"):
        return 299 if False else 160
    if name.startswith(("vit_", "swin", "maxvit")):
        return 224
    return 64


def build(name: str):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    if name.startswith("vit_h_14"):
        kwargs["image_size"] = 224
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = input_size(name)
    return model, torch.randn(1, 3, size, size)
