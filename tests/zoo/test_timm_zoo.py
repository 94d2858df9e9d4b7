"""timm architectures, randomly initialised at small input sizes: every one prunes at ratio 0.5 (classifier
ignored), keeps its output shape, loses at least a third of its parameters, and never needs the verified
fallback (a fallback means the graph missed a size it could have known: issue 14).

Inputs are the smallest each family accepts (ViTs and Swin take ``img_size``; others run at 64-96 px), so
the 50+ models stay within the suite's time budget.
"""
import warnings

import pytest
import torch

import structprune as tp

timm = pytest.importorskip("timm")

#: name -> (input side, create_model kwargs)
MODELS = {
    # convolutional
    "resnet18": (64, {}), "resnet26d": (64, {}), "resnext26ts": (64, {}), "seresnext26d_32x4d": (64, {}),
    "regnetx_002": (64, {}), "regnety_002": (64, {}), "densenet121": (64, {}), "dla34": (64, {}),
    "efficientnet_b0": (64, {}), "efficientnetv2_rw_t": (64, {}), "mobilenetv2_050": (64, {}),
    "mobilenetv3_small_050": (64, {}), "mnasnet_small": (64, {}), "ghostnet_100": (64, {}),
    "ghostnetv2_100": (64, {}), "rexnet_100": (64, {}), "lcnet_050": (64, {}), "tinynet_e": (64, {}),
    "hardcorenas_a": (64, {}), "cspresnet50": (64, {}), "ese_vovnet19b_dw": (64, {}), "dpn48b": (64, {}),
    "hrnet_w18_small": (64, {}), "nf_resnet26": (64, {}), "nfnet_l0": (64, {}), "repvgg_a0": (64, {}),
    "res2net50_14w_8s": (64, {}), "skresnet18": (64, {}),
    "convnext_atto": (64, {}), "convnextv2_atto": (64, {}), "inception_next_tiny": (64, {}),
    "edgenext_xx_small": (64, {}), "mobilevit_xxs": (64, {}), "mobilevitv2_050": (64, {}),
    "fastvit_t8": (64, {}), "repvit_m0_9": (64, {}), "poolformer_s12": (64, {}), "caformer_s18": (64, {}),
    "convformer_s18": (64, {}), "efficientformerv2_s0": (224, {}), "ghostnet_050": (64, {}),
    # attention
    "vit_tiny_patch16_224": (64, {"img_size": 64}), "deit_tiny_patch16_224": (64, {"img_size": 64}),
    "deit3_small_patch16_224": (64, {"img_size": 64}), "cait_xxs24_224": (64, {"img_size": 64}),
    "xcit_nano_12_p16_224": (64, {"img_size": 64}), "beit_base_patch16_224": (64, {"img_size": 64}),
    "eva02_tiny_patch14_224": (56, {"img_size": 56}), "pvt_v2_b0": (64, {}), "levit_128s": (224, {}),
    "swin_tiny_patch4_window7_224": (112, {"img_size": 112}),
    "tiny_vit_5m_224": (224, {}), "twins_pcpvt_small": (64, {}), "mixer_s32_224": (64, {"img_size": 64}),
    "resmlp_12_224": (64, {"img_size": 64}), "gmlp_ti16_224": (64, {"img_size": 64}),
    # global attention: a fused projection of k and v only (queries from the stage's global context)
    "gcvit_xxtiny": (224, {}),
    # (1, C, H, W) position embeddings added to conv outputs, used bare
    "visformer_tiny": (224, {}),
    # BottleneckAttn: a qkv conv split into q, k, v, each reshaped to (batch x heads, head dims)
    "botnet26t_256": (256, {}),
    "mambaout_femto": (64, {}),
}


#: the parameters a model may keep at ratio 0.5 when one structural reason pins a width (named by step()'s
#: warning and pruner.report()): EVA-02's rotary table (a buffer) pins the q/k/v head width, and its attention
#: reshapes its output to the width of its input, so the hidden width cannot shrink alone
MAX_KEPT = {"eva02_tiny_patch14_224": 0.70}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_timm_architecture_prunes_by_half_without_the_fallback(name):
    side, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, side, side)
    before = sum(p.numel() for p in model.parameters())
    out_shape = model(x).shape
    classifier = model.get_classifier()
    ignored = list(classifier) if isinstance(classifier, tuple) else [classifier]  # LeViT: head and head_dist
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                  ignored_layers=ignored)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.step()
    fallback = [str(w.message) for w in caught if "stopped running after pruning them" in str(w.message)]
    assert not fallback, fallback
    with torch.no_grad():
        assert model(x).shape == out_shape
    kept = sum(p.numel() for p in model.parameters()) / before
    assert kept < MAX_KEPT.get(name, 0.67), (name, round(kept, 3), str(pruner.report())[:2000])


def _botnet_widths(attn):
    return attn.qkv.out_channels, attn.num_heads * (2 * attn.dim_head_qk + attn.dim_head_v)


def _halonet_widths(attn):
    return (attn.q.out_channels + attn.kv.out_channels,
            attn.num_heads * attn.dim_head_qk + attn.num_heads * (attn.dim_head_qk + attn.dim_head_v))


@pytest.mark.parametrize("name, attention, widths", [("botnet26t_256", "BottleneckAttn", _botnet_widths),
                                                      ("halonet26t", "HaloAttn", _halonet_widths)])
def test_conv_attention_narrows_with_its_head_layout(name, attention, widths):
    """BoTNet's and HaloNet's q/k/v come from convs split by sizes they store (dim_out_qk, dim_out_v) and
    reshaped by others (num_heads, dim_head_qk, dim_head_v; HaloNet's position embedding its dim_head): the
    adapters follow them, so the attention prunes like the convs around it instead of keeping its width."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 256, 256)
    before = {path: widths(m)[0] for path, m in model.named_modules() if type(m).__name__ == attention}
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                  ignored_layers=[model.get_classifier()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.step()
    assert before
    for path, width in before.items():
        attn = model.get_submodule(path)
        layers, described = widths(attn)
        # half of the attention's channels go (HaloNet's kv conv ranks its k and v parts together, so q/k
        # and v lose different shares); the stored layout must describe what is left
        assert described == layers and layers <= 0.6 * width, (path, layers, width)
        assert (attn.dim_out_qk, attn.dim_out_v) == (attn.num_heads * attn.dim_head_qk, attn.num_heads * attn.dim_head_v)
        assert attn.scale == attn.dim_head_qk ** -0.5
    with torch.no_grad():
        assert model(x).shape == (1, 10)


def test_mambaout_splits_follow_the_pruned_widths():
    """MambaOut splits fc1's output by sizes it stores (gate, identity part, depthwise conv channels): the
    adapter rewrites them, so the blocks prune by half instead of keeping their width ('a split spells out
    its pieces')."""
    torch.manual_seed(0)
    model = timm.create_model("mambaout_femto", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                  ignored_layers=[model.get_classifier()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.step()
    blocks = [m for m in model.modules() if type(m).__name__ == "GatedConvBlock"]
    assert blocks
    for block in blocks:
        gate, identity, conv = block.split_indices
        assert gate + identity + conv == block.fc1.out_features and conv == block.conv.in_channels
        assert gate == identity + conv == block.fc2.in_features
    with torch.no_grad():
        assert model(x).shape == (1, 10)
    assert sum(p.numel() for p in model.parameters()) / before < 0.3
