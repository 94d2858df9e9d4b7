"""GrowingRegPruner penalises every parameter a declared layer holds on a group's channel axis by default:
embeddings, LayerNorm/RMSNorm, unwrapped parameters, not only Conv/Linear/BatchNorm; so a transformer's
hidden width can be regularized away. Explicit ``reg_types`` keep the old, narrower behaviour."""
import pytest
import torch
from torch import nn

import structprune as tp
from structprune.pruner.regularizer import DEFAULT_REG_TYPES


class Tiny(nn.Module):
    """Embedding -> LayerNorm -> unwrapped scale -> residual MLP -> RMSNorm -> Linear: one hidden group of 4
    (embed, norm, scale, up's inputs, down's outputs, rms, fc's inputs) and the MLP's group of 6."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.ones(4))
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 4)
        self.rms = nn.RMSNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.norm(self.embed(ids)) * self.scale
        h = h + self.down(torch.relu(self.up(h)))
        return self.fc(self.rms(h)).mean(1)


def randomise(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
            param.grad = torch.zeros_like(param)


class HiddenOnly:
    """Importance 1, 2, 3... on the group that holds an embedding (the hidden width), constant elsewhere, so
    only the hidden group's reg grows (standardized importance of a constant is 0)."""

    def __call__(self, group):
        n = len(group[0].idxs)
        if any(isinstance(item.dep.target.module, nn.Embedding) for item in group):
            return torch.arange(1, n + 1, dtype=torch.float32)
        return torch.ones(n)


def hidden_gamma(pruner):
    (gamma,) = [reg for group, reg in pruner.group_reg.items()
                if any(isinstance(item.dep.target.module, nn.Embedding) for item in group)]
    return gamma


@pytest.mark.parametrize("bias", [False, True])
def test_embedding_norms_and_unwrapped_parameters_take_the_penalty_by_hand(bias):
    model = Tiny()
    ids = torch.randint(0, 10, (1, 5))
    pruner = tp.pruner.GrowingRegPruner(model, ids, HiddenOnly(), reg=0.0, delta_reg=0.3)
    pruner.update_reg()
    gamma = torch.tensor([0.3, 0.2, 0.1, 0.0])  # 0.3 * (4 - imp) / (4 - 1), imp = 1, 2, 3, 4
    torch.testing.assert_close(hidden_gamma(pruner), gamma)
    randomise(model)
    pruner.regularize(model, bias=bias)
    torch.testing.assert_close(model.embed.weight.grad, model.embed.weight.detach() * gamma[None, :])  # dim 1
    torch.testing.assert_close(model.norm.weight.grad, model.norm.weight.detach() * gamma)
    torch.testing.assert_close(model.scale.grad, model.scale.detach() * gamma)
    torch.testing.assert_close(model.rms.weight.grad, model.rms.weight.detach() * gamma)
    torch.testing.assert_close(model.fc.weight.grad, model.fc.weight.detach() * gamma[None, :])
    torch.testing.assert_close(model.up.weight.grad, model.up.weight.detach() * gamma[None, :])
    torch.testing.assert_close(model.down.weight.grad, model.down.weight.detach() * gamma[:, None])
    for layer in (model.norm, model.down):
        expected_bias = layer.bias.detach() * gamma if bias else torch.zeros(4)
        torch.testing.assert_close(layer.bias.grad, expected_bias)
    assert torch.all(model.up.bias.grad == 0)  # the MLP group's reg stayed 0
    assert torch.all(model.fc.bias.grad == 0)  # fc's outputs are the model's output: not a group


def test_explicit_reg_types_keep_the_narrow_behaviour():
    model = Tiny()
    ids = torch.randint(0, 10, (1, 5))
    pruner = tp.pruner.GrowingRegPruner(model, ids, HiddenOnly(), reg=0.0, delta_reg=0.3,
                                        reg_types=DEFAULT_REG_TYPES)
    pruner.update_reg()
    randomise(model)
    pruner.regularize(model, bias=True)
    gamma = torch.tensor([0.3, 0.2, 0.1, 0.0])
    torch.testing.assert_close(model.fc.weight.grad, model.fc.weight.detach() * gamma[None, :])
    torch.testing.assert_close(model.down.bias.grad, model.down.bias.detach() * gamma)
    for param in (model.embed.weight, model.norm.weight, model.norm.bias, model.scale, model.rms.weight):
        assert torch.all(param.grad == 0)
    pruner = tp.pruner.GrowingRegPruner(model, ids, HiddenOnly(), reg=0.0, delta_reg=0.3, reg_types=(nn.Embedding,))
    pruner.update_reg()
    randomise(model)
    pruner.regularize(model)
    torch.testing.assert_close(model.embed.weight.grad, model.embed.weight.detach() * gamma[None, :])
    assert torch.all(model.fc.weight.grad == 0) and torch.all(model.norm.weight.grad == 0)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=16)
    model = BertForSequenceClassification(config)
    return model, {"input_ids": torch.randint(0, 40, (1, 6))}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=40)
    return LlamaForCausalLM(config), {"input_ids": torch.randint(0, 40, (1, 6))}


def _bert_hidden_slices(model):
    """(parameter, dim of the hidden channels) for every tensor holding a BERT's hidden width."""
    bert = model.bert
    embeddings = bert.embeddings
    slices = [(embeddings.word_embeddings.weight, 1), (embeddings.position_embeddings.weight, 1),
              (embeddings.token_type_embeddings.weight, 1), (embeddings.LayerNorm.weight, 0),
              (embeddings.LayerNorm.bias, 0), (bert.pooler.dense.weight, 1)]
    for layer in bert.encoder.layer:
        attention = layer.attention
        slices += [(attention.self.query.weight, 1), (attention.self.key.weight, 1), (attention.self.value.weight, 1),
                   (attention.output.dense.weight, 0), (attention.output.dense.bias, 0),
                   (attention.output.LayerNorm.weight, 0), (attention.output.LayerNorm.bias, 0),
                   (layer.intermediate.dense.weight, 1), (layer.output.dense.weight, 0), (layer.output.dense.bias, 0),
                   (layer.output.LayerNorm.weight, 0), (layer.output.LayerNorm.bias, 0)]
    return slices


def _llama_hidden_slices(model):
    slices = [(model.model.embed_tokens.weight, 1), (model.model.norm.weight, 0), (model.lm_head.weight, 1)]
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        slices += [(layer.input_layernorm.weight, 0), (layer.post_attention_layernorm.weight, 0),
                   (attention.q_proj.weight, 1), (attention.k_proj.weight, 1), (attention.v_proj.weight, 1),
                   (attention.o_proj.weight, 0), (mlp.gate_proj.weight, 1), (mlp.up_proj.weight, 1),
                   (mlp.down_proj.weight, 0)]
    return slices


FAMILIES = {"bert": (_bert, _bert_hidden_slices, lambda m: [m.classifier]),
            "llama": (_llama, _llama_hidden_slices, lambda m: [m.lm_head])}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformer_hidden_width_takes_the_penalty_on_every_slice(family):
    build, hidden_slices, ignored = FAMILIES[family]
    model, inputs = build()
    pruner = tp.pruner.GrowingRegPruner(model, inputs, HiddenOnly(), reg=0.0, delta_reg=0.5,
                                        ignored_layers=ignored(model))
    pruner.update_reg()
    gamma = hidden_gamma(pruner)
    width = len(gamma)
    torch.testing.assert_close(gamma, 0.5 * torch.arange(width - 1, -1, -1, dtype=torch.float32) / (width - 1))
    randomise(model)
    pruner.regularize(model, bias=True)
    slices = hidden_slices(model)
    assert len(slices) >= 20
    for param, dim in slices:
        shape = [1] * param.dim()
        shape[dim] = width
        torch.testing.assert_close(param.grad, param.detach() * gamma.view(shape))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformer_hidden_channel_shrinks_to_zero_under_adamw_with_decoupled_decay(family):
    build, hidden_slices, ignored = FAMILIES[family]
    model, inputs = build()
    pruner = tp.pruner.GrowingRegPruner(model, inputs, HiddenOnly(), reg=0.0, delta_reg=50.0,
                                        ignored_layers=ignored(model))
    pruner.update_reg()  # channel 0 of the hidden width: gamma 50; the last: 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    before = {id(p): p.detach().clone() for p, _ in hidden_slices(model)}
    for _ in range(100):
        optimizer.zero_grad()
        model(**inputs).logits.float().pow(2).mean().backward()
        optimizer.step()
        pruner.regularize(model, bias=True, decoupled=True, lr=1e-3)
    for param, dim in hidden_slices(model):
        first = param.detach().select(dim, 0)
        last, last_before = param.detach().select(dim, -1), before[id(param)].select(dim, -1)
        # AdamW's own steps (about lr per element) keep pushing back: the channel settles near lr / (lr * gamma)
        assert first.norm() < 0.05 * before[id(param)].select(dim, 0).norm() + 1e-3, (family, param.shape)
        assert last.norm() > 0.5 * last_before.norm(), (family, param.shape)  # unpenalised: barely moved


def test_greg1_zeroes_exactly_the_heads_and_neurons_it_chose_and_removing_them_is_lossless():
    """BERT's heads are reached from two roots (q and v); GReg-1 grows the channels it chose in one of them,
    and the other (reg 0) must not dilute that penalty: positions shared across groups take the largest."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16)
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 50, (2, 5))
    layers = model.encoder.layer
    pruner = tp.pruner.GrowingRegPruner(
        model, {"input_ids": ids}, tp.importance.MagnitudeImportance(p=2), reg=0.0, delta_reg=1.0,
        schedule="greg1", reg_ceiling=1.0, pruning_ratio=0.5, prune_num_heads=True, head_pruning_ratio=0.5,
        num_heads={layer.attention.self.query: 4 for layer in layers},
        ignored_layers=[model.embeddings.word_embeddings])  # the hidden width is the output: kept
    pruner.update_reg()
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    pruner.regularize(model, bias=True, decoupled=True, lr=1.0)  # 1 - lr * gamma = 0 on every chosen channel
    for layer in layers:
        attention = layer.attention.self
        zero_rows = attention.query.weight.norm(dim=1) == 0
        assert int(zero_rows.sum()) == 8  # two whole heads of 4 channels
        for linear in (attention.key, attention.value):
            assert torch.equal(linear.weight.norm(dim=1) == 0, zero_rows)
            assert torch.all(linear.bias[zero_rows] == 0)
        assert torch.equal(layer.attention.output.dense.weight.norm(dim=0) == 0, zero_rows)
        assert int((layer.intermediate.dense.weight.norm(dim=1) == 0).sum()) == 16
    before = model(ids).last_hidden_state
    pruner.step()
    assert layers[0].attention.self.num_attention_heads == 2 and layers[0].intermediate.dense.out_features == 16
    torch.testing.assert_close(model(ids).last_hidden_state, before)


class _RootScores:
    """Each root's group scores its channels by its own table: the value root disagrees with the query root."""

    def __init__(self, tables: dict):
        self.tables = tables

    def __call__(self, group):
        width = len(group[0].idxs)
        table = self.tables.get(group[0].dep.target.module)
        if table is None or len(table) != width:  # other roots, or a layer narrowed since
            return torch.arange(width, dtype=torch.float32)
        return table.clone()


def test_greg1_penalises_value_heads_only_through_the_query_heads_group():
    """BERT's value heads also form a head group of their own. Planned without pruning in between, it would
    pick its own lowest heads; step() re-plans it after the q/k heads group has narrowed value, so it takes
    nothing, and penalising its choice as well would zero the values of heads that stay."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=4, max_position_embeddings=16)
    model = BertModel(config, add_pooling_layer=False).eval()
    attention = model.encoder.layer[0].attention.self
    low_first = torch.arange(16, dtype=torch.float32)
    importance = _RootScores({attention.query: low_first, attention.value: low_first.flip(0)})
    ids = torch.randint(0, 50, (2, 5))
    pruner = tp.pruner.GrowingRegPruner(
        model, {"input_ids": ids}, importance, reg=0.0, delta_reg=1.0, schedule="greg1", reg_ceiling=1.0,
        pruning_ratio=0.5, prune_num_heads=True, head_pruning_ratio=0.5, num_heads={attention.query: 4},
        ignored_layers=[model.embeddings.word_embeddings])
    pruner.update_reg()
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    pruner.regularize(model, bias=True, decoupled=True, lr=1.0)
    heads_zeroed = torch.arange(16) < 8  # heads 0 and 1, the query root's choice
    assert torch.equal(attention.query.weight.norm(dim=1) == 0, heads_zeroed)
    assert torch.equal(attention.value.weight.norm(dim=1) == 0, heads_zeroed)
    before = model(ids).last_hidden_state
    pruner.step()
    assert attention.num_attention_heads == 2 and attention.value.out_features == 8
    assert bool((attention.value.weight.norm(dim=1) > 0).all())
    torch.testing.assert_close(model(ids).last_hidden_state, before)
