"""torchvision MViT v2, the video model whose attention writes its residual into a view
(``x[:, :, 1:, :] += q[:, :, 1:, :]``), pools q/k/v per head and reads ``num_heads``/``head_dim``/
``output_dim`` in its reshapes: built small (the same block layout as mvit_v2_s: pooled q, strided k/v,
relative positions, a stage change of width and heads), it prunes by half without the verified fallback,
narrowing its heads, and the attributes follow."""
import warnings

import torch
from torchvision.models.video.mvit import MSBlockConfig, MViT

import structprune as tp


def _small_mvit():
    blocks = [
        MSBlockConfig(num_heads=1, input_channels=32, output_channels=32, kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3],
                      stride_q=[1, 1, 1], stride_kv=[1, 4, 4]),
        MSBlockConfig(num_heads=1, input_channels=32, output_channels=64, kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3],
                      stride_q=[1, 2, 2], stride_kv=[1, 2, 2]),
        MSBlockConfig(num_heads=2, input_channels=64, output_channels=64, kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3],
                      stride_q=[1, 1, 1], stride_kv=[1, 2, 2]),
    ]
    return MViT(spatial_size=(32, 32), temporal_size=4, block_setting=blocks, residual_pool=True,
                residual_with_cls_embed=False, rel_pos_embed=True, proj_after_attn=True, num_classes=10)


def test_mvit_v2_prunes_by_half_narrowing_its_heads():
    torch.manual_seed(0)
    model = _small_mvit().eval()
    x = torch.randn(1, 3, 4, 32, 32)
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                  ignored_layers=[model.head[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no group refused, none left to the fallback
        pruner.step()
    assert pruner.fallback_history == []
    with torch.no_grad():
        assert model(x).shape == (1, 10)
    attn = model.blocks[2].attn
    assert (attn.num_heads, attn.head_dim, attn.output_dim) == (2, 16, 32)
    assert attn.qkv.out_features == 96 and attn.pool_k.pool.out_channels == 16 and attn.rel_pos_h.shape[1] == 16
    assert attn.scaler == 16 ** -0.5
    # 0.31: in a model this small the classifier bias and the position tables' other dim weigh more
    assert sum(p.numel() for p in model.parameters()) / before < 0.35
