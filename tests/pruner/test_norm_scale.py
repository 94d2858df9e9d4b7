"""GrowingRegPruner(rescale_norms=True): LayerNorm/RMSNorm layers keep their output scale when channels
regularized to zero leave them, so removing them stays (nearly) lossless for a transformer's hidden width."""
import pytest
import torch
from torch import nn

import structprune as tp


class Block(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.up = nn.Linear(8, 64)
        self.norm = norm
        self.out = nn.Linear(64, 3)

    def forward(self, x):
        return self.out(self.norm(self.up(x)))


class Lowest:
    """The first channels are the least important in every group."""

    def __call__(self, group):
        return torch.arange(len(group[0].idxs), dtype=torch.float32)


def _zeroed_block(norm):
    torch.manual_seed(0)
    model = Block(norm).eval()
    with torch.no_grad():
        model.up.weight[:16] = 0  # what growing regularization leaves behind: channels 0-15 feed zeros
        model.up.bias[:16] = 0
        model.norm.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("norm", [lambda: nn.RMSNorm(64, eps=1e-8), lambda: nn.LayerNorm(64, eps=1e-8)])
def test_narrowed_norm_keeps_its_output_when_the_removed_inputs_were_zero(norm):
    x = torch.randn(32, 8)
    model = _zeroed_block(norm())
    before = model(x).detach()
    pruner = tp.pruner.GrowingRegPruner(model, x, Lowest(), pruning_ratio=0.25)
    pruner.step()
    assert model.norm.weight.shape == (48,) and model.up.out_features == 48
    error = (model(x) - before).abs().mean()
    if isinstance(model.norm, nn.RMSNorm):
        torch.testing.assert_close(model(x), before)  # sqrt(64 / 48) exactly
    else:
        assert error < 0.02 * before.abs().mean()  # the mean is over 48 channels now: close, not exact
    plain = _zeroed_block(norm())
    tp.pruner.GrowingRegPruner(plain, x, Lowest(), pruning_ratio=0.25, rescale_norms=False).step()
    assert (plain(x) - before).abs().mean() > 5 * error


def test_greg1_on_a_llama_hidden_width_then_step_is_lossless():
    """Hugging Face RMSNorm weights are traced as bare parameters; their owners are rescaled as well."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=40, rms_norm_eps=1e-8)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 40, (1, 6))
    pruner = tp.pruner.GrowingRegPruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(p=2), reg=0.0,
                                        delta_reg=1.0, schedule="greg1", reg_ceiling=1.0, pruning_ratio=0.25,
                                        ignored_layers=[model.lm_head])
    pruner.update_reg()
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    pruner.regularize(model, decoupled=True, lr=1.0)  # every chosen channel exactly zero
    before = model(ids).logits
    pruner.step()
    assert model.model.embed_tokens.embedding_dim == 12 and model.model.norm.weight.shape == (12,)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-4)
