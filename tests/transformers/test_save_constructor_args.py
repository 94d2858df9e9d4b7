"""save_pretrained's config check rebuilds the model from its config; constructor arguments are not in the config."""
import warnings

import pytest
import torch

import structprune as tp

transformers = pytest.importorskip("transformers")


def _vit():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=8)
    torch.manual_seed(0)
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def _prune(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.BasePruner(model, torch.randn(1, 3, 16, 16), tp.importance.MagnitudeImportance(),
                             pruning_ratio=0.5, prune_num_heads=True).step()


def test_a_module_left_out_by_a_constructor_argument_does_not_block_save_pretrained(tmp_path):
    model = _vit()
    _prune(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(pixel_values=x).last_hidden_state
    model.save_pretrained(tmp_path)
    reloaded = transformers.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    assert reloaded.config.intermediate_size == 32 and reloaded.layers[0].attention.q_proj.out_features == 16
    assert reloaded.pooler is None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).last_hidden_state, before)


def test_a_tensor_missing_from_a_module_the_model_has_still_blocks_save_pretrained(tmp_path):
    model = _vit()
    _prune(model)
    model.layers[0].attention.q_proj.bias = None  # from_pretrained would build and init one
    with pytest.raises(tp.hf.rebuild.ConfigMismatchError, match="layers.0.attention.q_proj.bias"):
        model.save_pretrained(tmp_path)
