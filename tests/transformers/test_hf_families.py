"""Every Hugging Face family of tests/transformers/hf_families.py prunes, runs, generates, saves and reloads.

Tiny random models pruned at pruning_ratio=0.5 with whole heads (head_pruning_ratio=0.5), LM heads and
classifiers ignored. The four checks: task outputs keep their shape, parameters drop by at least 25%,
generate() gives the shape it gave before pruning, save_pretrained + AutoModel*.from_pretrained give the
same outputs (atol 1e-5). Then the pieces behind them: the config sync and its check, uniform widths,
rollback of failed steps, the scalar-parameter and BERT head regressions, Gemma's embedding scale.
"""
import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import structprune as tp
from hf_families import FAMILIES, BY_NAME, build, count, outputs, prune, run_checks
from structprune.hf import ConfigMismatchError, check_pretrained_config, config_mismatches

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


@pytest.mark.parametrize("family", FAMILIES, ids=[family.name for family in FAMILIES])
def test_family_prunes_runs_generates_and_round_trips(family, tmp_path):
    result = run_checks(family, tmp_path)
    summary = (f"{family.name}: forward {result.forward}; params {result.params} (kept {result.ratio}); "
               f"generate {result.generate}; reload {result.reload}; save_pruned {result.reload_pruned}")
    assert result.ratio is not None and result.ratio <= 0.75, summary
    assert (result.forward, result.params, result.generate) == ("ok", "ok", "ok" if family.generates else "n/a"), summary
    if family.config_limit is None:
        assert result.reload == "ok", summary
    else:
        # the config cannot describe this model: save_pretrained refuses before writing, save_pruned works
        assert result.reload.startswith("ConfigMismatchError: ") and result.reload_pruned == "ok", summary


# -- the config check in front of save_pretrained --------------------------------------------------------
def llama(**overrides):
    config = transformers.LlamaConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, max_position_embeddings=64), **overrides})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def skew_second_mlp(model):
    """Make layer 1's MLP channels far weaker than layer 0's, so a global ranking prunes it harder."""
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            getattr(model.model.layers[1].mlp, name).weight.mul_(0.01)


def test_global_pruning_without_uniform_widths_refuses_save_pretrained_before_writing(tmp_path):
    model = llama()
    skew_second_mlp(model)
    ids = torch.randint(0, 128, (1, 8))
    tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                         global_pruning=True, uniform_config_widths=False, ignored_layers=[model.lm_head]).step()
    widths = [layer.mlp.up_proj.out_features for layer in model.model.layers]
    assert widths[0] != widths[1]
    expected = model(ids).logits
    with pytest.raises(ConfigMismatchError, match=r"(?s)intermediate_size is one number but the layers hold "
                                                  r".*tp\.save_pruned"):
        model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing written
    tp.save_pruned(model, tmp_path / "sp")
    again = tp.load_pruned(llama(), tmp_path / "sp")
    torch.testing.assert_close(again(ids).logits, expected)


def test_global_pruning_keeps_one_width_per_config_field_by_default(tmp_path):
    model = llama()
    skew_second_mlp(model)
    ids = torch.randint(0, 128, (1, 8))
    # round_to=8: LlamaConfig insists on a hidden size that the head count divides
    pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                                  global_pruning=True, round_to=8, ignored_layers=[model.lm_head])
    assert pruner.uniform_config_widths
    pruner.step()
    widths = {layer.mlp.up_proj.out_features for layer in model.model.layers}
    assert len(widths) == 1 and widths.pop() < 128
    assert model.config.intermediate_size == model.model.layers[0].mlp.up_proj.out_features
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_layer_pruned_less_holds_back_the_other_layers_of_its_field_with_a_warning():
    model = llama()
    ids = torch.randint(0, 128, (1, 8))
    layer0 = model.model.layers[0].mlp
    with pytest.warns(UserWarning, match=r"uniform_config_widths: .*layers\.1\.mlp\.\w+_proj \(intermediate_size: "
                                         r"64 -> 32\)"):
        pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(),
                                      pruning_ratio=0.5, pruning_ratio_dict={layer0: 0.25},
                                      ignored_layers=[model.lm_head])
        pruner.step()
    assert [layer.mlp.up_proj.out_features for layer in model.model.layers] == [96, 96]
    [held] = [record for record in pruner.report().steps[0].short()]
    assert held.root.startswith("model.layers.1.mlp.") and (held.removed, held.target) == (32, 64)
    assert held.reason == "uniform_config_widths: held to 32 so that intermediate_size still fits every layer"
    assert model.config.intermediate_size == 96 and config_mismatches(model) == []


def test_config_check_names_a_width_the_family_ties_to_hidden_size():
    """BERT derives its attention width from hidden_size: heads pruned while the hidden size stays (the
    hidden state is BertModel's output) cannot be described, and the error says what the layers hold.
    (With uniform_config_widths, the default, the step keeps those heads instead: test_hf_config_fit.py.)"""
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 128, (1, 8))
    tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                         prune_num_heads=True, head_pruning_ratio=0.5, uniform_config_widths=False).step()
    assert model.encoder.layer[0].attention.self.num_attention_heads == 2
    with pytest.raises(ConfigMismatchError, match=r"(?s)query\.weight is \[32, 64\] but the config builds "
                                                  r"\[64, 64\].*BertConfig.num_attention_heads 2.*tied to hidden_size"):
        check_pretrained_config(model)


def test_the_checked_save_pretrained_survives_deepcopy_and_pickle():
    model = llama()
    ids = torch.randint(0, 128, (1, 8))
    prune(model, {"input_ids": ids}, BY_NAME["Llama"])
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.save_pretrained.model is clone
        torch.testing.assert_close(clone(ids).logits, model(ids).logits)


# -- a step that fails leaves model and config as they were ---------------------------------------------
def state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}, model.config.to_dict()


def test_an_adapter_failing_in_the_middle_of_a_step_leaves_model_and_config_untouched():
    from structprune import adapters

    model = llama()
    ids = torch.randint(0, 128, (1, 8))
    before_tensors, before_config = state(model)
    calls = []

    def fail_on_third_group(module):
        calls.append(module)
        if len(calls) == 3:
            raise NotImplementedError("get_input_embeddings not auto-handled")  # Swin's error, mid-step

    adapter = adapters.Adapter("fails mid-step", lambda module: module is model, fail_on_third_group)
    adapters.register_adapter(adapter)
    try:
        pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(),
                                      pruning_ratio=0.5, prune_num_heads=True, head_pruning_ratio=0.5,
                                      ignored_layers=[model.lm_head])
        with pytest.raises(NotImplementedError, match="auto-handled"):
            pruner.step()
    finally:
        adapters.ADAPTERS.remove(adapter)
    after_tensors, after_config = state(model)
    assert after_config == before_config
    assert after_tensors.keys() == before_tensors.keys()
    for name, tensor in before_tensors.items():
        assert torch.equal(after_tensors[name], tensor), name
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    assert pruner.current_step == 0
    assert model(ids).logits.shape == (1, 8, 128)


def test_groups_rolled_back_by_the_forward_check_leave_their_config_fields_too(tmp_path):
    """The BLOOM report: every group rolled back, config.hidden_size left changed. Here a forward that
    insists on the original hidden size (a size the graph cannot see) rejects the hidden-size group."""
    model = llama()
    ids = torch.randint(0, 128, (1, 8))

    def insist_on_64(module, args):
        if model.model.embed_tokens.embedding_dim != 64:
            raise RuntimeError("expected a hidden size of 64")

    model.model.register_forward_pre_hook(insist_on_64)
    with pytest.warns(UserWarning, match="left unpruned because the model stopped running"):
        tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                             ignored_layers=[model.lm_head], prune_head_dims=False).step()
    assert model.model.embed_tokens.embedding_dim == 64 and model.config.hidden_size == 64
    assert model.model.layers[0].mlp.up_proj.out_features == 64 and model.config.intermediate_size == 64
    assert config_mismatches(model) == []


# -- regressions -----------------------------------------------------------------------------------------
class ScaledLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.scale = nn.Linear(4, 8), nn.Linear(8, 4), nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.scale.exp())


def test_a_scalar_parameter_carries_no_channels():
    """CLIP's logit_scale: a 0-dim nn.Parameter crashed the graph (IndexError in get_out_channels)."""
    model = ScaledLinear()
    x = torch.randn(2, 4)
    tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(), pruning_ratio=0.5).step()
    assert model.fc1.out_features == model.fc2.in_features == 4 and model.scale.shape == ()
    assert model(x).shape == (2, 4)


def test_bert_heads_are_found_from_attention_head_size_without_num_heads():
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 128, (1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "prune_num_heads: ... Their heads stay"
        # the hidden size stays, so BertConfig (head size = hidden / heads) could not describe 2 heads: the
        # default uniform_config_widths would keep them (test_hf_config_fit.py); here only the graph is asked
        tp.pruner.BasePruner(model, {"input_ids": ids}, tp.importance.MagnitudeImportance(), pruning_ratio=0.0,
                             prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.classifier],
                             uniform_config_widths=False).step()
    attention = model.bert.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.attention_head_size, attention.query.out_features) == (2, 16, 32)


def test_gemma_embeddings_keep_their_scale_and_the_tied_head_reads_the_same_weights():
    """Gemma scales token embeddings by sqrt(hidden_size), fixed when the model is built. The pruned model
    keeps the old scale: the ratio is folded into the embedding weights, and the tied LM head, which reads
    those weights too, gets the inverse through the final norm. A model built from the config scales by
    sqrt(new hidden size) and matches it (the family test checks the reload)."""
    model, inputs = build(BY_NAME["Gemma"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    weight = model.model.embed_tokens.weight.detach().clone()
    norm_weight = model.model.norm.weight.detach().clone()
    embedded = model.model.embed_tokens(inputs["input_ids"]).detach()
    prune(model, inputs, BY_NAME["Gemma"])
    embeddings = model.model.embed_tokens
    assert embeddings.embedding_dim == 32 and embeddings.scalar_embed_scale == pytest.approx(32 ** 0.5)
    ratio = 64 ** 0.5 / 32 ** 0.5
    kept = [int((weight - column[:, None] / ratio).abs().sum(0).argmin()) for column in embeddings.weight.detach().T]
    assert len(set(kept)) == 32
    torch.testing.assert_close(embeddings.weight.detach(), weight[:, kept] * ratio)
    # the embedding output is the old one on the kept channels
    torch.testing.assert_close(embeddings(inputs["input_ids"]), embedded[..., kept], atol=1e-5, rtol=1e-5)
    # the head: RMSNorm over the kept width, then the old norm scale and the old head weights
    hidden = torch.randn(1, 3, 32)
    normalized = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    expected = (normalized * (1 + norm_weight[kept])) @ weight[:, kept].T
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model.model.norm(hidden)), expected, atol=1e-4, rtol=1e-4)


def test_bloom_heads_narrow_because_alibi_pins_their_number(tmp_path):
    """ALiBi slopes are a function of the head count: whole heads stay, every head loses the channels the
    hidden size loses (BloomConfig derives head_dim as hidden_size / n_head), and the config says so."""
    family = BY_NAME["BLOOM"]
    model, inputs = build(family)
    prune(model, inputs, family)
    attention = model.transformer.h[1].self_attention
    assert (attention.num_heads, attention.head_dim, attention.split_size) == (4, 8, 32)
    assert attention.inv_norm_factor == pytest.approx(8 ** -0.5)
    assert attention.query_key_value.out_features == 96 and attention.dense.in_features == 32
    assert (model.config.hidden_size, model.config.n_head) == (32, 4)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_a_step_syncs_the_config_once_after_its_groups():
    """Inside deferred_late_sync (what step() wraps its groups in) the config waits; it is synced once when
    the block ends, so a 32-layer model does not walk every layer after each of its 65 groups."""
    from structprune.adapters import deferred_late_sync

    model = llama()
    ids = torch.randint(0, 128, (1, 8))
    graph = tp.DependencyGraph().build_dependency(model, {"input_ids": ids})
    with deferred_late_sync(model):
        for layer in model.model.layers:
            graph.get_pruning_group(layer.mlp.up_proj, tp.prune_linear_out_channels, list(range(32))).prune()
        assert model.config.intermediate_size == 128  # not yet
    assert model.config.intermediate_size == 96
    assert config_mismatches(model) == []
    graph.get_pruning_group(model.model.layers[0].mlp.up_proj, tp.prune_linear_out_channels, list(range(16))).prune()
    graph.get_pruning_group(model.model.layers[1].mlp.up_proj, tp.prune_linear_out_channels, list(range(16))).prune()
    assert model.config.intermediate_size == 80  # outside the block: synced after each group again
