"""Activation-aware criteria (Activation, Wanda, Fluctuation) and compensation at removal."""
import copy

import pytest
import torch
from torch import nn

import structprune as tp
from structprune.graph.snapshot import Snapshot

from importance_models import only_group

CRITERIA = (tp.importance.ActivationImportance, tp.importance.WandaImportance, tp.importance.FluctuationImportance)


class MLP(nn.Module):
    def __init__(self, width=6, act=None):
        super().__init__()
        self.fc1 = nn.Linear(4, width)
        self.act = act if act is not None else nn.ReLU()
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def calibrated(cls, model, batches, **kwargs):
    imp = cls(**kwargs)
    with imp.calibrating(model):
        for batch in batches:
            model(batch)
    return imp


def hidden_of(model, x):
    return model.act(model.fc1(x))


@pytest.mark.parametrize("cls", CRITERIA, ids=lambda c: c.__name__)
def test_scores_are_the_documented_formulas(cls):
    torch.manual_seed(0)
    model = MLP()
    batches = [torch.randn(16, 4), torch.randn(3, 5, 4)]  # token dims of any rank are positions
    imp = calibrated(cls, model, batches, normalizer=None)
    hidden = torch.cat([hidden_of(model, b).reshape(-1, 6) for b in batches]).double()
    weight = model.fc2.weight.detach().double()
    expected = {
        tp.importance.ActivationImportance: hidden.square().mean(0),
        tp.importance.WandaImportance: hidden.square().mean(0).sqrt() * weight.abs().sum(0),
        tp.importance.FluctuationImportance: hidden.var(0, unbiased=False) * weight.square().sum(0),
    }[cls]
    group = only_group(model, torch.randn(1, 4), root=model.fc1)
    torch.testing.assert_close(imp(group).double(), expected, rtol=1e-5, atol=1e-7)


def test_output_side_scores_and_fallback():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(32, 4)
    imp = calibrated(tp.importance.ActivationImportance, model, [x], side="out", normalizer=None)
    group = only_group(model, torch.randn(1, 4), root=model.fc1)
    torch.testing.assert_close(imp(group).double(), model.fc1(x).double().square().mean(0), rtol=1e-5, atol=1e-7)
    # a Wanda row score: each output row's |W| weighted by its inputs' norms
    wanda = calibrated(tp.importance.WandaImportance, model, [x], side="out", normalizer=None)
    norms = x.double().square().mean(0).sqrt()
    torch.testing.assert_close(wanda(group).double(), (model.fc1.weight.double().abs() * norms).sum(1),
                               rtol=1e-5, atol=1e-7)


def test_channels_read_by_no_hooked_layer_fall_back_to_the_output_side():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return self.fc(x).relu().sum(-1)  # no hooked layer reads fc's outputs

    torch.manual_seed(0)
    model = Head()
    x = torch.randn(8, 4)
    imp = calibrated(tp.importance.ActivationImportance, model, [x], normalizer=None)
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 4))
    group = graph.get_pruning_group(model.fc, tp.prune_linear_out_channels, [0, 1, 2, 3, 4, 5])
    torch.testing.assert_close(imp(group).double(), model.fc(x).double().square().mean(0), rtol=1e-5, atol=1e-7)


def test_conv_statistics_count_every_pixel_and_grouped_convs_map_columns_to_their_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=2))
    x = torch.randn(2, 2, 5, 5)
    imp = calibrated(tp.importance.WandaImportance, model, [x], normalizer=None)
    hidden = model[1](model[0](x)).double()
    norms = hidden.transpose(0, 1).reshape(4, -1).square().mean(1).sqrt()
    weight = model[2].weight.detach().double().abs()  # [4 out, 2 per group, 3, 3]
    columns = torch.stack([weight[0:2, 0].sum(), weight[0:2, 1].sum(), weight[2:4, 0].sum(), weight[2:4, 1].sum()])
    record = imp.statistics(model[2])
    torch.testing.assert_close(imp.input_scores(model[2], record), norms * columns)


def test_scoring_without_calibration_says_what_to_do():
    model = MLP()
    group = only_group(model, torch.randn(1, 4), root=model.fc1)
    with pytest.raises(RuntimeError, match="no calibration statistics: call imp.register"):
        tp.importance.WandaImportance()(group)


def test_bad_options_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="side must be one of"):
        tp.importance.ActivationImportance(side="inputs")
    with pytest.raises(ValueError, match="cannot gather activation statistics"):
        tp.importance.WandaImportance(target_types=(nn.LayerNorm,))
    model = MLP()
    with pytest.raises(ValueError, match="needs calibration statistics, which MagnitudeImportance"):
        tp.pruner.BasePruner(model, torch.randn(1, 4), tp.importance.MagnitudeImportance(), compensation="bias")
    with pytest.raises(ValueError, match="build the importance with gram=True"):
        tp.pruner.BasePruner(model, torch.randn(1, 4), tp.importance.WandaImportance(), compensation="refit")
    with pytest.raises(ValueError, match="compensation must be one of"):
        tp.pruner.BasePruner(model, torch.randn(1, 4), tp.importance.WandaImportance(), compensation="mean")


def constant_channel_mlp():
    """fc1's channel 2 is relu(0 * x + 3) = 3 on every input: removing it loses nothing its mean cannot restore."""
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[2] = 0.0
        model.fc1.bias[2] = 3.0
    return model


@pytest.mark.parametrize("bias", [True, False], ids=["with_bias", "bias_created"])
def test_bias_compensation_of_a_constant_channel_changes_no_output(bias):
    model = constant_channel_mlp()
    if not bias:
        model.fc2.bias = None
    x = torch.randn(64, 4)
    before = model(x)
    imp = calibrated(tp.importance.FluctuationImportance, model, [x])  # variance 0: the channel removed first
    pruner = tp.pruner.BasePruner(model, x[:1], imp, pruning_ratio=1 / 6, compensation="bias",
                                  ignored_layers=[model.fc2])
    with pytest.warns(UserWarning) if not bias else _no_warning():
        pruner.step()
    assert model.fc1.out_features == 5 and model.fc2.in_features == 5
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    if not bias:
        assert isinstance(model.fc2.bias, nn.Parameter) and model.fc2.bias.shape == (3,)
        assert any("created a bias on fc2" in note for note in pruner.report().steps[0].notes)


class _no_warning:
    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        return False


def test_without_compensation_the_same_removal_changes_the_output():
    model = constant_channel_mlp()
    x = torch.randn(64, 4)
    before = model(x)
    imp = calibrated(tp.importance.FluctuationImportance, model, [x])
    tp.pruner.BasePruner(model, x[:1], imp, pruning_ratio=1 / 6, ignored_layers=[model.fc2]).step()
    assert (model(x) - before).abs().max() > 0.1


def linear_combination_mlp():
    """No activation; fc1's channel 5 is 0.01 * (channel 0 + channel 1), so the others span it."""
    torch.manual_seed(0)
    model = MLP(act=nn.Identity())
    with torch.no_grad():
        model.fc1.weight[5] = 0.01 * (model.fc1.weight[0] + model.fc1.weight[1])
        model.fc1.bias[5] = 0.01 * (model.fc1.bias[0] + model.fc1.bias[1])
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_refit_of_a_channel_the_others_span_changes_no_output(bias):
    model = linear_combination_mlp()
    if not bias:
        model.fc2.bias = None
    x = torch.randn(256, 4)
    before = model(x)
    imp = calibrated(tp.importance.ActivationImportance, model, [x], gram=True)
    pruner = tp.pruner.BasePruner(model, x[:1], imp, pruning_ratio=1 / 6, ignored_layers=[model.fc2],
                                  compensation=tp.pruner.Compensation("refit", damping=1e-9))
    pruner.step()
    assert model.fc2.in_features == 5 and (model.fc2.bias is None) == (not bias)  # refit creates no bias
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-4)


def test_refit_beats_bias_beats_nothing_on_calibration_data():
    errors = {}
    torch.manual_seed(1)
    reference = MLP(width=32)
    x = torch.randn(512, 4) @ torch.randn(4, 4)  # correlated inputs: the kept channels can stand in
    for mode in (None, "bias", "refit"):
        model = copy.deepcopy(reference)
        imp = calibrated(tp.importance.WandaImportance, model, [x], gram=True)
        tp.pruner.BasePruner(model, x[:1], imp, pruning_ratio=0.5, ignored_layers=[model.fc2],
                             compensation=mode).step()
        errors[mode] = (model(x) - reference(x)).square().mean().item()
    assert errors["refit"] < errors["bias"] < errors[None], errors


def test_statistics_follow_the_pruning_over_iterative_steps():
    torch.manual_seed(0)
    model = MLP(width=12)
    x = torch.randn(64, 4)
    imp = calibrated(tp.importance.ActivationImportance, model, [x], gram=True)
    pruner = tp.pruner.BasePruner(model, x[:1], imp, pruning_ratio=0.5, iterative_steps=2,
                                  ignored_layers=[model.fc2], compensation="refit")
    widths = []
    for _ in range(2):
        pruner.step()
        record = imp.statistics(model.fc2)
        assert len(record.in_sum) == model.fc2.in_features and record.gram.shape == (model.fc2.in_features,) * 2
        assert len(imp.statistics(model.fc1).out_sum) == model.fc1.out_features
        widths.append(model.fc1.out_features)
    assert widths == [9, 6]


def test_a_snapshot_undoes_a_parameter_created_since():
    layer = nn.Linear(3, 2, bias=False)
    snapshot = Snapshot([layer])
    layer.bias = nn.Parameter(torch.ones(2))
    snapshot.restore()
    assert layer.bias is None and "bias" in layer._parameters


def test_a_failed_step_restores_the_statistics():
    torch.manual_seed(0)
    model = MLP(width=8)
    x = torch.randn(32, 4)
    imp = calibrated(tp.importance.ActivationImportance, model, [x])
    pruner = tp.pruner.BasePruner(model, x[:1], imp, pruning_ratio=0.5, ignored_layers=[model.fc2],
                                  compensation="bias")
    before = imp.snapshot_statistics()

    original = pruner._prune_group

    def prune_then_fail(group, optimizer=None):
        original(group, optimizer)
        raise RuntimeError("boom after pruning")

    pruner._prune_group = prune_then_fail
    with pytest.raises(RuntimeError, match="boom after pruning"):
        pruner.step()
    assert model.fc1.out_features == 8 and model.fc2.in_features == 8
    assert imp.snapshot_statistics() == before  # the same records, not sliced ones


def test_interactive_steps_say_compensation_is_not_applied():
    model = constant_channel_mlp()
    x = torch.randn(16, 4)
    imp = calibrated(tp.importance.FluctuationImportance, model, [x])
    pruner = tp.pruner.BasePruner(model, x[:1], imp, pruning_ratio=1 / 6, compensation="bias",
                                  ignored_layers=[model.fc2])
    with pytest.warns(UserWarning, match="compensation is applied by step\\(\\) only"):
        for group in pruner.step(interactive=True):
            group.prune()
    assert model.fc2.in_features == 5


def test_torch_pruning_calibration_call_forms():
    model = MLP()
    imp = tp.importance.ActivationImportance()
    imp._prepare_model(model)
    imp.step()
    with torch.no_grad():
        model(torch.randn(4, 4))
    imp._rm_hooks(model)
    assert imp.calibrated_layers == 2
    with pytest.raises(RuntimeError, match="no hooks are attached"):
        imp.step()
    imp._clear_buffer()
    assert imp.calibrated_layers == 0


def tiny_llama(layers: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_a_pruned_llama_with_refit_compensation_round_trips(tmp_path):
    model = tiny_llama(layers=2)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (8, 16))
    errors = {}
    for mode in (None, "refit"):
        model = copy.deepcopy(reference)
        imp = calibrated(tp.importance.ActivationImportance, model, [ids], gram=True)
        mlp = [layer.mlp.gate_proj for layer in model.model.layers] + [layer.mlp.up_proj for layer in model.model.layers]
        scope = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in mlp]
        pruner = tp.pruner.BasePruner(model, {"input_ids": ids[:1]}, imp, pruning_ratio=0.5,
                                      ignored_layers=scope + [model.model.embed_tokens], compensation=mode)
        pruner.step()
        assert model.config.intermediate_size == 32
        with torch.no_grad():
            errors[mode] = (model(ids).logits - reference(ids).logits).square().mean().item()
    assert errors["refit"] < errors[None], errors
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_magnitude_on_a_trained_transformers_model_warns_and_names_the_criterion_that_works():
    import warnings

    model = tiny_llama(layers=1)
    ids = {"input_ids": torch.randint(0, 64, (1, 8))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # random init: norms all ones, nothing to warn about
        tp.pruner.BasePruner(model, ids, tp.importance.MagnitudeImportance(), pruning_ratio=0.25)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)  # what training leaves
    with pytest.warns(UserWarning, match="WandaImportance.*compensation='refit'"):
        tp.pruner.BasePruner(model, ids, tp.importance.MagnitudeImportance(), pruning_ratio=0.25)
    imp = calibrated(tp.importance.WandaImportance, model, [ids["input_ids"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tp.pruner.BasePruner(model, ids, imp, pruning_ratio=0.25)
