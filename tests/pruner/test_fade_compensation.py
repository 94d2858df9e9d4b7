"""GrowingRegPruner(schedule="greg1", compensation=...): compensation given during the fade (pruner/fading.py)."""
import copy

import pytest
import torch
from torch import nn

import structprune as tp


class EmbeddingNet(nn.Module):
    """Tokens -> embedding (6 channels) -> Linear: with reg_types=(nn.Linear,) only the reader's columns take
    the penalty, so the removed channel keeps its calibration statistics through the whole fade."""

    def __init__(self, bias=True):
        super().__init__()
        self.emb = nn.Embedding(32, 6)
        self.fc = nn.Linear(6, 3, bias=bias)

    def forward(self, x):
        return self.fc(self.emb(x))


TOKENS = torch.arange(32).reshape(4, 8)


def spanned_channel_net(bias=True):
    """Channel 5 is 0.3 * (channel 0 + channel 1) on every token: the kept channels span it exactly."""
    torch.manual_seed(0)
    model = EmbeddingNet(bias)
    with torch.no_grad():
        model.emb.weight[:, 5] = 0.3 * (model.emb.weight[:, 0] + model.emb.weight[:, 1])
    return model


def constant_channel_net():
    torch.manual_seed(0)
    model = EmbeddingNet()
    with torch.no_grad():
        model.emb.weight[:, 5] = 0.4  # the same value on every token: its mean is all it holds
    return model


def fading_pruner(model, compensation, importance=tp.importance.ActivationImportance, **kwargs):
    imp = importance(gram=True)
    with imp.calibrating(model):
        model(TOKENS)
    return tp.pruner.GrowingRegPruner(model, TOKENS[:1], imp, reg=0.0, delta_reg=0.1, schedule="greg1",
                                      reg_ceiling=1.0, reg_types=(nn.Linear,), pruning_ratio=1 / 6,
                                      root_module_types=[nn.Embedding], compensation=compensation, **kwargs)


def fade(model, pruner, steps=12, decoupled=True, optimizer=None, output=None):
    """A training loop's calls, with a zero loss: only the penalty moves the weights. ``output()`` runs the
    model (default: on TOKENS). Returns the largest output change seen after each regularize()."""
    output = output or (lambda: model(TOKENS))
    reference = output().detach()
    seen = 0.0
    for _ in range(steps):
        model.zero_grad()
        (output().sum() * 0).backward()
        pruner.update_reg()
        if decoupled:
            pruner.regularize(model, decoupled=True, lr=1.0)
        else:
            pruner.regularize(model)
            optimizer.step()
        with torch.no_grad():
            seen = max(seen, (output() - reference).abs().max().item())
    return seen


@pytest.mark.parametrize("bias", [True, False], ids=["with_bias", "no_bias"])
def test_refit_during_the_fade_keeps_every_output_of_a_channel_the_others_span(bias):
    model = spanned_channel_net(bias)
    before = model(TOKENS).detach()
    kept_columns = model.emb.weight[:, :5].detach().clone()
    pruner = fading_pruner(model, tp.pruner.Compensation("refit", damping=1e-9))
    assert fade(model, pruner) < 1e-5
    assert model.fc.weight[:, 5].abs().max() < 1e-6  # the penalty did fade it: the kept columns took it over
    pruner.step()
    assert model.fc.in_features == 5
    torch.testing.assert_close(model.emb.weight, kept_columns)  # channel 5 went, as chosen
    torch.testing.assert_close(model(TOKENS), before, rtol=0, atol=1e-5)
    assert any("during the fade" in note and "fc" in note for note in pruner.report().steps[0].notes)


def test_without_compensation_the_same_fade_changes_the_output():
    model = spanned_channel_net()
    pruner = fading_pruner(model, None)
    assert fade(model, pruner) > 0.05


def test_compensate_fade_false_leaves_the_compensation_to_removal_where_little_is_left():
    model = spanned_channel_net()
    before = model(TOKENS).detach()
    pruner = fading_pruner(model, tp.pruner.Compensation("refit", damping=1e-9), compensate_fade=False)
    assert fade(model, pruner) > 0.05
    pruner.step()
    assert (model(TOKENS) - before).abs().max() > 0.05


def test_bias_compensation_during_the_fade_keeps_the_outputs_of_a_constant_channel():
    model = constant_channel_net()
    before = model(TOKENS).detach()
    pruner = fading_pruner(model, "bias", importance=tp.importance.FluctuationImportance)
    assert fade(model, pruner) < 1e-5
    pruner.step()
    assert model.fc.in_features == 5
    torch.testing.assert_close(model(TOKENS), before, rtol=0, atol=1e-5)


def test_a_reader_with_nothing_to_hold_the_mean_is_compensated_at_removal_and_the_report_says_so():
    model = constant_channel_net()
    model.fc.bias = None
    pruner = fading_pruner(model, "bias", importance=tp.importance.FluctuationImportance)
    fade(model, pruner, steps=3)
    with pytest.warns(UserWarning, match="created a bias"):
        pruner.step()
    notes = pruner.report().steps[0].notes
    assert any("during the fade left out fc" in note and "no bias" in note for note in notes)


def test_the_gradient_penalty_and_an_optimizer_step_are_handed_over_at_the_next_regularize_and_at_step():
    model = spanned_channel_net()
    before = model(TOKENS).detach()
    pruner = fading_pruner(model, tp.pruner.Compensation("refit", damping=1e-9))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    fade(model, pruner, steps=12, decoupled=False, optimizer=optimizer)
    assert model.fc.weight[:, 5].abs().max() < 0.5 * spanned_channel_net().fc.weight[:, 5].abs().max()
    pruner.step()  # hands over the last optimizer step's change before removing
    torch.testing.assert_close(model(TOKENS), before, rtol=0, atol=1e-5)


def test_step_does_not_refit_a_reader_the_fade_compensated():
    model = spanned_channel_net()
    pruner = fading_pruner(model, "refit")  # default damping: a second refit would shrink the kept columns
    fade(model, pruner)
    kept = model.fc.weight[:, :5].detach().clone()
    pruner.step()
    torch.testing.assert_close(model.fc.weight, kept)


def test_a_checkpoint_loaded_mid_fade_goes_on_compensating():
    model = spanned_channel_net()
    before = model(TOKENS).detach()
    pruner = fading_pruner(model, tp.pruner.Compensation("refit", damping=1e-9))
    fade(model, pruner, steps=4)
    state, weights = pruner.state_dict(), copy.deepcopy(model.state_dict())
    resumed = spanned_channel_net()
    resumed.load_state_dict(weights)
    again = fading_pruner(resumed, tp.pruner.Compensation("refit", damping=1e-9))
    again.load_state_dict(state)
    fade(resumed, again, steps=8)
    assert resumed.fc.weight[:, 5].abs().max() < 1e-6
    again.step()
    torch.testing.assert_close(resumed(TOKENS), before, rtol=0, atol=1e-5)


class ReluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_with_the_producer_penalised_too_the_fade_loses_less_than_compensating_at_removal():
    torch.manual_seed(3)
    reference = ReluMLP()
    x = torch.randn(512, 8) @ torch.randn(8, 8)  # correlated inputs: the kept neurons can stand in
    errors = {}
    for name, options in {"none": dict(compensation=None), "at removal": dict(compensation="refit",
                          compensate_fade=False), "during the fade": dict(compensation="refit")}.items():
        model = copy.deepcopy(reference)
        imp = tp.importance.ActivationImportance(gram=True)
        with imp.calibrating(model):
            model(x)
        pruner = tp.pruner.GrowingRegPruner(model, x[:1], imp, reg=0.0, delta_reg=0.1, schedule="greg1",
                                            reg_ceiling=1.0, pruning_ratio=0.5, ignored_layers=[model.fc2],
                                            **options)
        fade(model, pruner, output=lambda: model(x))
        pruner.step()
        assert model.fc2.in_features == 16
        errors[name] = (model(x) - reference(x)).square().mean().item()
    assert errors["during the fade"] < 0.5 * errors["at removal"], errors
    assert errors["at removal"] <= errors["none"] * 1.01, errors


def test_a_llama_losing_mlp_neurons_and_query_heads_is_compensated_during_the_fade_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (8, 16))
    errors = {}
    for fade_it in (False, True):
        model = copy.deepcopy(reference)
        imp = tp.importance.ActivationImportance(gram=True)
        with imp.calibrating(model):
            model(input_ids=ids)
        pruner = tp.pruner.GrowingRegPruner(
            model, {"input_ids": ids[:1]}, imp, reg=0.0, delta_reg=0.1, schedule="greg1", reg_ceiling=1.0,
            pruning_ratio=0.5, ignored_layers=[model.lm_head, model.model.embed_tokens], prune_num_heads=True,
            head_pruning_ratio=0.5, prune_head_dims=False, compensation="refit", compensate_fade=fade_it)
        fade(model, pruner, output=lambda: model(input_ids=ids).logits)
        with torch.no_grad():
            faded = model(input_ids=ids).logits
        pruner.step()
        assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 32
        with torch.no_grad():
            pruned = model(input_ids=ids).logits
        if fade_it:  # the fade left nothing to remove (at removal, a refit would shrink the kept columns)
            torch.testing.assert_close(pruned, faded, rtol=0, atol=1e-4)
        errors[fade_it] = (pruned - reference(input_ids=ids).logits).square().mean().item()
    notes = " ".join(pruner.report().steps[0].notes)
    assert "during the fade" in notes and "o_proj" in notes and "down_proj" in notes
    assert errors[True] < 0.5 * errors[False], errors
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned)
