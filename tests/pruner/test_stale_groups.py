"""Groups whose root an earlier group of the same step already narrowed (issue 14).

A layer reached several channels per root channel from another group's root keeps a group of its own;
the step lists every group before pruning any, so by the time that group is planned its root may be
narrower than listed. timm's GhostNet (a depthwise conv after the ghost module's concat) and EdgeNeXt
(the XCA projection after a chunk whose pieces are added to each other) raised IndexError there.
"""
import torch
from torch import nn

import structprune as tp


class GhostLike(nn.Module):
    """timm GhostBottleneck: a depthwise conv reads cat([x1, cheap(x1)]), two channels per x1 channel."""

    def __init__(self):
        super().__init__()
        self.primary = nn.Conv2d(3, 6, 1, bias=False)
        self.cheap = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.conv_dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn_dw = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        x1 = self.primary(x)
        return self.head(self.bn_dw(self.conv_dw(torch.cat([x1, self.cheap(x1)], 1))))


def tiny_edgenext():
    """timm EdgeNeXt at toy widths: the last stage's split-transpose block adds each chunk to the previous
    chunk's conv output, so its XCA projection is reached two channels per root channel."""
    from timm.models.edgenext import EdgeNeXt

    torch.manual_seed(0)
    return EdgeNeXt(num_classes=10, dims=(8, 16, 24, 32), depths=(1, 1, 1, 2), heads=(2, 2, 2, 2),
                    kernel_sizes=(3, 3, 3, 3), global_block_counts=(0, 0, 0, 1)).eval()


def _step(model, x, global_pruning=False):
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                  global_pruning=global_pruning, ignored_layers=[_classifier(model)])
    shape = model(x).shape
    pruner.step()
    assert model(x).shape == shape
    assert pruner.fallback_history == []
    return model


def test_ghost_module_depthwise_after_concat_prunes_once():
    model = _step(GhostLike(), torch.randn(1, 3, 8, 8))
    assert model.primary.out_channels == 3 and model.cheap.out_channels == 3
    assert model.conv_dw.out_channels == 6 and model.bn_dw.num_features == 6 and model.head.in_channels == 6


def test_edgenext_projection_after_added_chunks_prunes_once():
    model = _step(tiny_edgenext(), torch.randn(1, 3, 64, 64))
    block = model.stages[3].blocks[1]
    assert block.xca.proj.out_features == 16 and block.norm_xca.normalized_shape == (16,)
    assert [conv.out_channels for conv in block.convs] == [4, 4, 4]


def test_global_pruning_plans_on_the_narrowed_root():
    model = _step(GhostLike(), torch.randn(1, 3, 8, 8), global_pruning=True)
    assert model.conv_dw.out_channels == 2 * model.primary.out_channels < 12


def _classifier(model):
    return model.head if isinstance(model, GhostLike) else model.get_classifier()
