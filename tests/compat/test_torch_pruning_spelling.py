"""torch_pruning user code, written the way its users write it, runs unchanged with ``import structprune as tp``.

Each test follows a call form seen in torch_pruning's own tests and examples (import line swapped,
random weights) and asserts what that code relies on: shapes, counts, values.
"""
from typing import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

import structprune as tp
from structprune.graph.refusal import RefusalKind


# -- custom layers: BasePruningFunc ----------------------------------------------------------------------
class CustomizedLayer(nn.Module):
    def __init__(self, in_dim):
        super().__init__()
        self.in_dim = in_dim
        self.scale = nn.Parameter(torch.rand(in_dim))
        self.bias = nn.Parameter(torch.rand(in_dim))

    def forward(self, x):
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt()
        return torch.div(x, norm) * self.scale + self.bias


class FullyConnectedNet(nn.Module):
    def __init__(self, input_size, num_classes, hidden_units):
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_units)
        self.customized_layer = CustomizedLayer(hidden_units)
        self.fc2 = nn.Linear(hidden_units, num_classes)

    def forward(self, x):
        return self.fc2(self.customized_layer(F.relu(self.fc1(x))))


class MyPruner(tp.pruner.BasePruningFunc):
    def prune_out_channels(self, layer: CustomizedLayer, idxs: Sequence[int]) -> nn.Module:
        keep_idxs = sorted(set(range(layer.in_dim)) - set(idxs))
        layer.in_dim = layer.in_dim - len(idxs)
        layer.scale = self._prune_parameter_and_grad(layer.scale, keep_idxs, pruning_dim=0)
        layer.bias = self._prune_parameter_and_grad(layer.bias, keep_idxs, pruning_dim=0)
        return layer

    def get_out_channels(self, layer):
        return layer.in_dim

    def get_in_channels(self, layer):
        return layer.in_dim

    prune_in_channels = prune_out_channels


def test_custom_layer_subclassing_base_pruning_func():
    assert tp.pruner.function.BasePruningFunc is tp.pruner.BasePruningFunc is tp.BasePruningFunc
    model = FullyConnectedNet(128, 10, 256)
    x = torch.randn(1, 128)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x, customized_pruners={CustomizedLayer: MyPruner()})
    group = DG.get_pruning_group(model.fc1, tp.prune_linear_out_channels, idxs=[0, 1, 6])
    assert {dep.target.module for dep, _ in group} == {model.fc1, model.customized_layer, model.fc2}
    scale = model.customized_layer.scale
    kept = torch.tensor(sorted(set(range(256)) - {0, 1, 6}))
    expected = scale.detach()[kept].clone()
    group.prune()
    assert model.customized_layer.scale is scale  # the same Parameter, sliced in place
    assert torch.equal(scale.detach(), expected)
    assert model.fc1.out_features == model.customized_layer.in_dim == model.fc2.in_features == 253
    assert model(x).shape == (1, 10)


def test_custom_layer_with_a_pruner_and_its_gradients():
    model = FullyConnectedNet(32, 10, 64)
    x = torch.randn(4, 32)
    model(x).sum().backward()
    pruner = tp.pruner.MagnitudePruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                       ignored_layers=[model.fc2], customized_pruners={CustomizedLayer: MyPruner()})
    pruner.step()
    layer = model.customized_layer
    assert layer.in_dim == model.fc1.out_features == 32
    assert layer.scale.grad.shape == layer.scale.shape == (32,)  # the gradient followed the data
    model(x).sum().backward()


# -- groups: (dep, idxs) items -------------------------------------------------------------------------
def test_group_items_unpack_as_dep_and_idxs():
    model = resnet18()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 64, 64))
    group = DG.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[2, 6, 9])
    layers = []
    for dep, idxs in group:
        layers.append(dep.target.module)
        assert sorted(idxs) == [2, 6, 9]
    for i, (dep, idxs) in enumerate(group):
        assert group[i].dep is dep and group[i].idxs == idxs and group[i].root_idxs == [2, 6, 9]
    dep, idxs = group[0]
    assert dep.target.module is model.conv1 and dep.handler == tp.prune_conv_out_channels
    assert model.bn1 in layers and model.layer1[0].conv1 in layers
    if DG.check_pruning_group(group):
        group.prune()
    assert model.conv1.out_channels == 61


def test_interactive_loop_as_torch_pruning_writes_it():
    model = resnet18()
    x = torch.randn(1, 3, 64, 64)
    pruner = tp.pruner.MetaPruner(model, x, tp.importance.MagnitudeImportance(p=2), iterative_steps=2,
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    for _ in range(2):
        for group in pruner.step(interactive=True):
            dep, idxs = group[0]
            assert isinstance(dep.target.module, nn.Conv2d) and len(idxs) > 0
            group.prune()
    assert model.conv1.out_channels == 32 and model(x).shape == (1, 1000)


def test_get_all_groups_then_prune_each_by_index():
    model = resnet18()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 64, 64))
    count = 0
    for group in DG.get_all_groups(ignored_layers=[model.conv1], root_module_types=[nn.Conv2d, nn.Linear]):
        group.prune(idxs=[2, 4, 6])
        count += 1
    assert count > 5
    assert model.conv1.out_channels == 64  # ignored
    assert model.layer1[0].conv1.out_channels == 61
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_group_exec_is_prune():
    model = resnet18()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 64, 64))
    DG.get_pruning_group(model.layer1[0].conv1, tp.prune_conv_out_channels, idxs=[0, 1]).exec()
    assert model.layer1[0].conv1.out_channels == 62


# -- utils ---------------------------------------------------------------------------------------------
def test_count_ops_and_params_layer_wise_returns_four_values():
    model = resnet18()
    x = torch.randn(1, 3, 64, 64)
    macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(model, x, layer_wise=True)
    assert (macs, params) == tp.utils.count_ops_and_params(model, x)
    assert layer_macs[model] == macs and layer_params[model] == params
    assert layer_macs[model.conv1] == 64 * 32 * 32 * 3 * 7 * 7
    assert layer_params[model.layer1[0].conv1] == 64 * 64 * 9


def test_print_tool_before_and_after_pruning(capsys):
    model = resnet18()
    tp.utils.print_tool.before_pruning(model)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 64, 64))
    DG.get_pruning_group(model.layer1[0].conv1, tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    report = tp.utils.print_tool.after_pruning(model, do_print=True)
    assert "layer1.0.conv1: (64, 64, 3, 3) -> (62, 64, 3, 3)" in capsys.readouterr().out
    assert tp.utils.print_tool.after_pruning(model, do_print=False) == report
    assert capsys.readouterr().out == ""


# -- output_transform ----------------------------------------------------------------------------------
@pytest.fixture
def bert_classifier():
    import transformers

    # a fresh config per model: pruning rewrites the config the model holds
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    torch.manual_seed(0)
    return transformers, config


def _group_roots(model, inputs, output_transform):
    DG = tp.DependencyGraph().build_dependency(model, inputs, output_transform=output_transform)
    return sorted((group[0].dep.target.name, len(group)) for group in DG.get_all_groups())


def test_output_transform_ending_in_a_reduction_finds_the_same_groups(bert_classifier):
    transformers, config = bert_classifier
    model = transformers.BertForSequenceClassification(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (1, 8))}
    by_logits = _group_roots(model, inputs, lambda out: out.logits)
    assert len(by_logits) >= 3
    assert _group_roots(model, inputs, lambda out: out.logits.sum()) == by_logits
    assert _group_roots(model, inputs, None) == by_logits


def test_pooler_output_sum_prunes_as_the_torch_pruning_bert_example(bert_classifier):
    transformers, config = bert_classifier
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (1, 8))}
    num_heads = {}
    for m in model.modules():
        if isinstance(m, transformers.models.bert.modeling_bert.BertSelfAttention):
            num_heads[m.query] = num_heads[m.key] = num_heads[m.value] = m.num_attention_heads
    params = tp.utils.count_params(model)
    pruner = tp.pruner.MetaPruner(model, inputs, global_pruning=False, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[model.pooler],
                                  output_transform=lambda out: out.pooler_output.sum(), num_heads=num_heads,
                                  prune_head_dims=True, prune_num_heads=False, head_pruning_ratio=0.5)
    for g in pruner.step(interactive=True):
        g.prune()
    for m in model.modules():
        if isinstance(m, transformers.models.bert.modeling_bert.BertSelfAttention):
            # every head narrows alike (16 -> 8 channels), as torch_pruning's prune_head_dims does; the
            # adapter already rewrote the attributes BERT's view and scaling read
            assert m.query.out_features == m.key.out_features == m.value.out_features == 32
            assert pruner.num_heads[m.query] == 4
            assert (m.num_attention_heads, m.attention_head_size, m.all_head_size) == (4, 8, 32)
            assert m.scaling == pytest.approx(8 ** -0.5)
            m.num_attention_heads = pruner.num_heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
    assert tp.utils.count_params(model) < 0.6 * params
    assert model.config.hidden_size == model.embeddings.word_embeddings.embedding_dim < 64
    out = model(**inputs)
    assert out.pooler_output.shape == (1, 64)  # the ignored pooler keeps its width


def test_bert_head_dims_narrow_with_the_hidden_size_and_round_trip(bert_classifier, tmp_path):
    """BertConfig derives the head size as hidden_size / heads: heads narrow as far as the hidden size goes
    (4 heads of 8 = hidden 32), so save_pretrained -> from_pretrained rebuilds the same model."""
    transformers, config = bert_classifier
    model = transformers.BertForSequenceClassification(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (1, 8))}
    tp.pruner.BasePruner(model, inputs, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                         ignored_layers=[model.classifier]).step()
    attention = model.bert.encoder.layer[1].attention.self
    assert (attention.num_attention_heads, attention.attention_head_size, attention.query.out_features) == (4, 8, 32)
    assert (model.config.hidden_size, model.config.num_attention_heads) == (32, 4)
    model.save_pretrained(tmp_path)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.allclose(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-5)


def test_bert_heads_keep_their_size_when_the_hidden_size_cannot_shrink(bert_classifier, tmp_path):
    """BertModel returns the hidden states, so the hidden width stays; narrower heads would leave a model
    BertConfig cannot describe, and the pruner says it held them back."""
    transformers, config = bert_classifier
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (1, 8))}
    pruner = tp.pruner.BasePruner(model, inputs, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5)
    with pytest.warns(UserWarning, match=r"uniform_config_widths: .*attention\.self\.query \(head size = hidden_size"):
        pruner.step()
    attention = model.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.attention_head_size, attention.query.out_features) == (4, 16, 64)
    assert model.encoder.layer[0].intermediate.dense.out_features == 64
    model.save_pretrained(tmp_path)
    reloaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    assert torch.allclose(reloaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state, atol=1e-5)


def test_num_heads_follows_whole_head_pruning(bert_classifier):
    transformers, config = bert_classifier
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (1, 8))}
    attention = [m for m in model.modules() if isinstance(m, transformers.models.bert.modeling_bert.BertSelfAttention)]
    num_heads = {layer: m.num_attention_heads for m in attention for layer in (m.query, m.key, m.value)}
    pruner = tp.pruner.MetaPruner(model, inputs, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.0,
                                  ignored_layers=[model.pooler], num_heads=num_heads, prune_num_heads=True,
                                  prune_head_dims=False, head_pruning_ratio=0.5)
    pruner.step()
    for m in attention:
        # the torch_pruning BERT example sets these from pruner.num_heads after the step
        m.num_attention_heads = pruner.num_heads[m.query]
        m.attention_head_size = m.query.out_features // m.num_attention_heads
        m.all_head_size = m.query.out_features
        assert pruner.num_heads[m.query] == pruner.num_heads[m.key] == pruner.num_heads[m.value] == 2
        assert m.attention_head_size == 16
    assert model(**inputs).last_hidden_state.shape == (1, 8, 64)


# -- gradients and optimizers after pruning ------------------------------------------------------------
class TransposedNet(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.up = nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn2(self.up(F.relu(self.bn(self.conv(x)))))))


def test_iterative_taylor_with_backward_before_each_step_and_an_optimizer():
    torch.manual_seed(0)
    model = TransposedNet()
    x = torch.randn(2, 3, 8, 8)
    imp = tp.importance.TaylorImportance()
    pruner = tp.pruner.MetaPruner(model, x, imp, iterative_steps=5, pruning_ratio=0.5, ignored_layers=[model.head])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(5):
        loss = model(x).sum()  # still in scope during step(): its graph holds every gradient accumulator
        loss.backward()
        pruner.step()
        # ConvTranspose keeps its output channels on weight dim 1: its gradient must follow there
        assert model.up.weight.grad.shape == model.up.weight.shape
        optimizer.step()  # its momentum, made before this step, follows the pruned shapes
        optimizer.zero_grad()
    assert model.conv.out_channels == model.up.out_channels == 32
    assert optimizer.state[model.up.weight]["momentum_buffer"].shape == model.up.weight.shape == (32, 32, 3, 3)
    loss = model(x).sum()
    loss.backward()
    assert model.up.weight.grad.shape == (32, 32, 3, 3)


def test_optimizer_state_follows_channels_it_was_made_for():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(x).sum().backward()
    optimizer.step()
    exp_avg = optimizer.state[model[0].weight]["exp_avg"].clone()
    DG = tp.DependencyGraph().build_dependency(model, x)
    DG.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=[1, 5]).prune()
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()  # no step(optimizer=...) was called: the state is sliced on its way in
    kept = torch.tensor([0, 2, 3, 4, 6, 7])
    assert optimizer.state[model[0].weight]["exp_avg"].shape == (6, 4)
    grad = model[0].weight.grad
    torch.testing.assert_close(optimizer.state[model[0].weight]["exp_avg"], 0.9 * exp_avg[kept] + 0.1 * grad)


@pytest.mark.parametrize("pruner_cls", [tp.pruner.MetaPruner, tp.pruner.GrowingRegPruner])
def test_batchnorm1d_with_a_batch_of_one(pruner_cls):
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32),
                          nn.ReLU(), nn.Linear(32, 4))
    model.train()
    pruner = pruner_cls(model, torch.randn(1, 16), tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                        iterative_steps=2, ignored_layers=[model[6]])
    pruner.step()
    for group in pruner.step(interactive=True):
        group.prune()
    assert model[0].out_features == model[3].out_features == 16
    assert model.training and all(m.training for m in model.modules())
    model(torch.randn(2, 16)).sum().backward()


# -- serialization -------------------------------------------------------------------------------------
def test_state_dict_carries_attributes_set_on_modules(tmp_path):
    model = resnet18()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 64, 64))
    DG.get_pruning_group(model.layer1[0].conv1, tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    model.customized_value = 8
    model.layer2.note = ("pruned", [1, 2])
    torch.save(tp.state_dict(model), tmp_path / "pruned.pth")
    new_model = resnet18()
    tp.load_state_dict(new_model, state_dict=torch.load(tmp_path / "pruned.pth", weights_only=True))
    assert new_model.customized_value == 8
    assert new_model.layer2.note == ("pruned", [1, 2])
    assert new_model.layer1[0].conv1.out_channels == 62


# -- importance helpers and pruners at the top level ---------------------------------------------------
def test_obdc_as_torch_pruning_drives_it():
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    x = torch.randn(8, 3, 32, 32)
    imp = tp.importance.OBDCImportance(group_reduction="mean", num_classes=10)
    pruner = tp.pruner.MetaPruner(model, x[:1], imp, pruning_ratio=0.25, ignored_layers=[model.fc])
    model.zero_grad()
    imp._prepare_model(model, pruner)
    for k in range(2):
        out = model(x[k * 4:(k + 1) * 4])
        sampled_y = torch.multinomial(F.softmax(out.detach(), dim=1), 1).squeeze()
        F.cross_entropy(out, sampled_y).backward()
        imp.step()
    pruner.step()
    imp._rm_hooks(model)
    imp._clear_buffer()
    assert model.conv1.out_channels == 48 and not imp._hooks and not imp._stats
    with pytest.raises(RuntimeError, match="no hooks are attached"):
        imp.step()


def test_pruners_at_the_top_level_and_manual_prune():
    assert tp.MetaPruner is tp.pruner.MetaPruner and tp.GroupNormPruner is tp.pruner.GroupNormPruner
    assert tp.MagnitudePruner is tp.pruner.MagnitudePruner and tp.GrowingRegPruner is tp.pruner.GrowingRegPruner
    model = resnet18()
    pruner = tp.MetaPruner(model, torch.randn(1, 3, 64, 64), tp.importance.MagnitudeImportance(), ignored_layers=[model.fc])
    pruner.manual_prune(model.layer1[0].conv1, tp.prune_conv_out_channels, 0.25)
    assert model.layer1[0].conv1.out_channels == 48


class ThreeLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_an_explicit_request_to_narrow_a_model_output_is_honoured_with_a_warning():
    """torch_pruning prunes ``DG.get_pruning_group(model.fc3, prune_linear_out_channels, idxs).prune()`` even
    though fc3 is the model output: the user asked for exactly that. The pruners still never plan it."""
    torch.manual_seed(0)
    model, x = ThreeLinear(), torch.randn(4, 6)
    before = model(x).detach()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = DG.get_pruning_group(model.fc3, tp.prune_linear_out_channels, idxs=[0, 2, 5])
    assert [reason.kind for reason in group.blocked] == [RefusalKind.MODEL_OUTPUT]
    assert not DG.check_pruning_group(group)  # it does change what the model returns
    with pytest.warns(UserWarning, match=r"pruning fc3 changes the shape of model output\(s\) \(4, 10\)"):
        group.prune()
    assert model.fc3.out_features == 7 and model.fc3.weight.shape == (7, 12)
    kept = [i for i in range(10) if i not in (0, 2, 5)]
    torch.testing.assert_close(model(x), before[:, kept])  # the other outputs are untouched

    # automatic planning keeps refusing it: a pruner never narrows an output
    model = ThreeLinear()
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(), pruning_ratio=0.5)
    with pytest.warns(UserWarning, match="reaches a model output"):
        pruner.step()
    assert model.fc3.out_features == 10 and model.fc1.out_features == 8


def test_an_explicit_request_refused_for_another_reason_still_raises():
    class Buffered(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.register_buffer("scale", torch.ones(6))
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.fc(x) * self.scale)

    model = Buffered()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(2, 4))
    with pytest.raises(RuntimeError, match=r"cannot prune group rooted at fc: channels reach a buffer"):
        DG.get_pruning_group(model.fc, tp.prune_linear_out_channels, [0]).prune()
    assert model.fc.out_features == 6


def test_node_dependencies_and_update_index_mapping():
    model = resnet18().eval()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    node = DG.module2node[model.conv1]
    deps = {(dep.target.module, dep.handler.__name__) for dep in node.dependencies}
    assert (model.bn1, "prune_out_channels") in deps  # conv1 feeds bn1 (coupled: its one set of channels)
    assert all(dep.source is node and dep.trigger == node.pruner.prune_out_channels for dep in node.dependencies)
    bn = DG.module2node[model.bn1]
    assert {dep.target.module for dep in bn.dependencies} >= {model.conv1}
    DG.get_pruning_group(model.layer1[0].conv1, tp.prune_conv_out_channels, [0, 1]).prune()
    DG.update_index_mapping()
    group = DG.get_pruning_group(model.layer1[0].conv1, tp.prune_conv_out_channels, [61])
    assert [item.idxs for item in group][0] == [61] and model.layer1[0].conv1.out_channels == 62
    group.prune()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000) and model.layer1[0].conv1.out_channels == 61


def test_ignoring_a_container_ignores_every_layer_in_it():
    model = resnet18().eval()
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[model.layer4, model.fc])
    pruner.step()
    assert [m.out_channels for m in model.layer4.modules() if isinstance(m, nn.Conv2d)] == [512] * 5
    assert model.layer3[1].conv1.out_channels == 128 and model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
