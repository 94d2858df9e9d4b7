"""Shared helpers for the torchvision zoo tests: which models, what input size."""
import torch
import torchvision


def classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build(name: str):
    """A randomly initialised model and the smallest input its architecture accepts comfortably."""
    torch.manual_seed(0)
    kwargs = {}
    size = 64
    if name in ("inception_v3", "googlenet"):
        kwargs = {"aux_logits": False, "init_weights": False}
        size = 96 if name == "inception_v3" else 64
    if name.startswith("vit_"):
        patch = int(name.split("_")[-1])
        size = patch * 4
        kwargs["image_size"] = size
    if name.startswith(("swin", "maxvit")):
        size = 224 if name.startswith("maxvit") else 96
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    return model, torch.randn(1, 3, size, size)
