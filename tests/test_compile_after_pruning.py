"""torch.compile on pruned models: the compiled graph sees only the new shapes and attributes."""
import pytest
import torch
import torchvision

import structprune as tp


def test_pruned_llama_compiles_with_inductor_and_matches_eager():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 8))
    tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=0.4,
                         prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.lm_head]).step()
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 32 and model.config.hidden_size == 38
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor")
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        fused = compiled(input_ids=ids).logits
    assert fused.shape == (1, 8, 128)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_pruned_cnn_trains_through_a_compiled_graph(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                         ignored_layers=[m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]).step()
    model.eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    model.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters() if p.requires_grad)
