"""What an eval trace of RT-DETR's head must also see: the layers only its training forward runs.

In eval mode ``RTDETRDecoder`` scores only the last decoder layer and never embeds denoising queries, so
the auxiliary score heads (``dec_score_head[i]`` for the other layers) and ``denoising_class_embed`` reach
no traced output. Their widths are the decoder's hidden width all the same: pruned without them, training
fails on the first batch. ``training_branches`` records the decoder's inputs during the eval forward and
then runs the decoder once more as training does, with one denoising query (the class embedding of class
0 at a centred box) concatenated in front of the queries, so each of those layers reads the tensors it
reads in training. The extra outputs are boxes and class scores, whose widths the head keeps anyway.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def is_rtdetr_head(head: nn.Module) -> bool:
    return (type(head).__name__ == "RTDETRDecoder" and type(head).__module__.startswith("ultralytics")
            and isinstance(getattr(head, "decoder", None), nn.Module)
            and isinstance(getattr(head, "denoising_class_embed", None), nn.Embedding))


@contextlib.contextmanager
def training_branches(head: nn.Module) -> Iterator[list]:
    """Inside the block, run the model's eval forward; on exit the yielded list holds the outputs of the
    decoder's training-only layers (empty when the head is in training mode: its forward ran them)."""
    found: list = []
    if head.training:
        yield found
        return
    calls: list = []

    def record(module, args):
        calls.append(args)

    handle = head.decoder.register_forward_pre_hook(record)
    try:
        yield found
    finally:
        handle.remove()
    if calls:
        found.extend(_decode_as_in_training(head, calls[-1]))


def _decode_as_in_training(head: nn.Module, args: tuple) -> tuple:
    embed, refer_bbox, feats, shapes, bbox_head, score_head, pos_mlp = args[:7]
    batch = embed.shape[0]
    labels = torch.zeros(batch, 1, dtype=torch.long, device=embed.device)
    # logit 0 is a box centred in the image with half its size, a valid denoising query
    box = torch.zeros(batch, 1, refer_bbox.shape[-1], dtype=refer_bbox.dtype, device=refer_bbox.device)
    queries = torch.cat([head.denoising_class_embed(labels).to(embed.dtype), embed], 1)
    boxes = torch.cat([box, refer_bbox], 1)
    flags = {module: module.training for module in head.decoder.modules()}
    head.decoder.train()
    try:
        return head.decoder(queries, boxes, feats, shapes, bbox_head, score_head, pos_mlp)
    finally:
        for module, flag in flags.items():
            module.training = flag
