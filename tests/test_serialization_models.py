"""save_pruned / load_pruned round trips of models pruned by the pruner: a CNN, a ViT and a Llama."""
import torch
import torchvision

import structprune as tp


def prune(model, example, **kwargs):
    tp.pruner.BasePruner(model, example, tp.importance.MagnitudeImportance(), pruning_ratio=0.5, **kwargs).step()
    return model


def test_cnn_round_trip(tmp_path):
    torch.manual_seed(0)
    model = prune(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    tp.save_pruned(model, tmp_path)
    fresh = tp.load_pruned(torchvision.models.resnet18().eval(), tmp_path)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(fresh(x), model(x))


def test_vit_round_trip(tmp_path):
    torch.manual_seed(0)
    build = lambda: torchvision.models.vit_b_32(image_size=64).eval()  # noqa: E731
    model = build()
    prune(model, torch.randn(1, 3, 64, 64), ignored_layers=[model.heads.head])
    assert model.hidden_dim == model.conv_proj.out_channels < 768
    tp.save_pruned(model, tmp_path)
    fresh = tp.load_pruned(build(), tmp_path)
    assert fresh.hidden_dim == model.hidden_dim
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(fresh(x), model(x))


def test_llama_round_trip(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 8))
    prune(model, {"input_ids": ids}, prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.lm_head])
    tp.save_pruned(model, tmp_path)
    fresh = tp.load_pruned(LlamaForCausalLM(config).eval(), tmp_path)
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert fresh.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
