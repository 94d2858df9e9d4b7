"""BasePruner options, each shown by its effect on channel counts."""
import re
import warnings

import pytest
import torch
from torch import nn

import structprune as tp
from nets import SmallCNN, example, magnitude


def counts(model):
    return model.conv1.out_channels, model.conv2.out_channels, model.conv3.out_channels


def test_local_pruning_removes_ratio_of_every_group_and_keeps_classifier():
    model, x = example()
    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5)
    pruner.step()
    assert counts(model) == (8, 16, 32)
    assert model.fc.out_features == 10 and model.fc.in_features == 32
    assert model(x).shape == (2, 10)


def test_local_pruning_drops_the_lowest_scores():
    model, x = example()
    with torch.no_grad():
        model.conv1.weight[[3, 7]] *= 1e-3
    keep = [i for i in range(16) if i not in (3, 7)]
    expected = model.conv1.weight.detach()[keep].clone()
    tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.125, ignored_layers=[model.conv2, model.conv3]).step()
    torch.testing.assert_close(model.conv1.weight.detach(), expected)


def test_ratio_rounds_down_kept_channels_and_never_empties_a_layer():
    model, x = example()
    tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.99).step()
    assert counts(model) == (1, 1, 1)
    model, x = example()
    tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.3).step()
    assert counts(model) == (11, 22, 44)  # floor(16 * 0.7) = 11


def test_global_pruning_takes_more_from_a_weak_layer_and_respects_max_ratio():
    model, x = example()
    with torch.no_grad():
        model.conv2.weight *= 1e-3
    # the test criterion is not normalised per group, so the scaled layer ranks lowest everywhere
    tp.pruner.BasePruner(model, x, magnitude, global_pruning=True, pruning_ratio=0.3).step()
    c1, c2, c3 = counts(model)
    # 34 channels fall under the global threshold; conv2 must keep one, which is not taken elsewhere
    assert c1 + c2 + c3 == int(112 * 0.7) + 1
    assert 32 - c2 > 16 - c1 and 32 - c2 > 64 - c3 and c2 >= 1
    model, x = example()
    with torch.no_grad():
        model.conv2.weight *= 1e-3
    tp.pruner.BasePruner(model, x, magnitude, global_pruning=True, pruning_ratio=0.3, max_pruning_ratio=0.5).step()
    assert model.conv2.out_channels == 16


def test_pruning_ratio_dict_single_module_and_shared_scope():
    model, x = example()
    tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, pruning_ratio_dict={model.conv2: 0.25}).step()
    assert counts(model) == (8, 24, 32)
    model, x = example()
    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.0,
                                  pruning_ratio_dict={(model.conv1, model.conv3): 0.75})
    assert pruner.get_target_pruning_ratio(model.conv2) == 0.0
    pruner.step()
    assert counts(model) == (4, 32, 16)


def test_iterative_steps_follow_the_linear_schedule_and_reset():
    model, x = example()
    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, iterative_steps=4)
    seen = []
    for _ in range(4):
        pruner.step()
        seen.append(model.conv3.out_channels)
    assert seen == [56, 48, 40, 32] and pruner.current_step == 4
    pruner.reset()
    assert pruner.current_step == 0


def test_custom_scheduler_is_honoured():
    model, x = example()

    def front_loaded(ratio, steps):
        return [0.0] + [ratio] * steps

    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, iterative_steps=2,
                                  iterative_pruning_ratio_scheduler=front_loaded)
    pruner.step()
    assert model.conv3.out_channels == 32
    pruner.step()
    assert model.conv3.out_channels == 32


def test_ignored_layers_by_module_type_and_parameter():
    model, x = example()
    tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, ignored_layers=[model.conv2]).step()
    assert counts(model) == (8, 32, 32)
    model, x = example()
    tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, ignored_layers=[nn.Conv2d]).step()
    assert counts(model) == (16, 32, 64)
    model, x = example()
    tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, ignored_layers=[model.bn3.weight]).step()
    assert counts(model) == (8, 16, 64)


def test_ignored_layers_rejects_other_things():
    model, x = example()
    with pytest.raises(TypeError, match="ignored_layers accepts modules"):
        tp.pruner.BasePruner(model, x, magnitude, ignored_layers=["conv1"])


def test_round_to_leaves_multiples():
    model, x = example()
    tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.3, round_to=8).step()
    assert all(c % 8 == 0 for c in counts(model))
    assert counts(model) == (16, 24, 48)


def test_round_to_with_global_pruning():
    model, x = example()
    with torch.no_grad():
        model.conv2.weight *= 1e-2
    tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, global_pruning=True, round_to=4).step()
    assert all(c % 4 == 0 for c in counts(model)) and counts(model) != (16, 32, 64)


def test_grouped_convolution_and_groupnorm_keep_groups_even():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 1)
            self.gn = nn.GroupNorm(4, 16)
            self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            return self.head(self.grouped(self.gn(self.stem(x))))

    model = Grouped()
    x = torch.randn(1, 3, 6, 6)
    tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5).step()
    assert model.stem.out_channels == 8 and model.gn.num_channels == 8 and model.gn.num_groups == 4
    assert model.grouped.in_channels == 8 and model.grouped.out_channels == 8 and model.grouped.groups == 4
    assert model(x).shape == (1, 2, 6, 6)


def test_multihead_attention_head_dims_shrink_equally():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.attn(h, h, h)[0] + h)

    model = Block()
    x = torch.randn(2, 5, 8)
    tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(), pruning_ratio=0.5).step()
    assert model.attn.embed_dim == 8 and model.attn.head_dim == 2 and model.attn.num_heads == 4
    assert model(x).shape == (2, 5, 3)


def test_isomorphic_global_ranks_within_same_structure():
    model, x = example()
    with torch.no_grad():
        model.conv1.weight *= 1e-3
    # conv1 and conv2 groups share a structure (conv, bn, conv-in); conv3's ends in the Linear
    tp.pruner.BasePruner(model, x, magnitude, global_pruning=True, isomorphic=True, pruning_ratio=0.5).step()
    assert model.conv3.out_channels == 32  # alone in its bucket: exactly its own half
    # half of 48 goes from that bucket: all but one channel of the weak conv1, the rest from conv2
    assert (model.conv1.out_channels, model.conv2.out_channels) == (1, 24)
    model, x = example()
    with torch.no_grad():
        model.conv1.weight *= 1e-3
    tp.pruner.BasePruner(model, x, magnitude, global_pruning=True, pruning_ratio=0.5).step()
    assert model.conv3.out_channels != 32


def test_root_module_types_choose_roots():
    model, x = example()
    tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, root_module_types=[nn.Linear]).step()
    assert counts(model) == (16, 32, 64)  # fc's outputs are the model output: nothing to prune


def test_forward_fn_and_output_transform():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = SmallCNN()

        def forward(self, batch):
            return {"logits": self.net(batch["image"]), "meta": "text"}

    model = Wrapped()
    batch = {"image": torch.randn(2, 3, 8, 8)}
    pruner = tp.pruner.BasePruner(
        model, batch, magnitude, pruning_ratio=0.5,
        forward_fn=lambda m, inputs: m(inputs), output_transform=lambda out: out["logits"],
    )
    pruner.step()
    assert model.net.conv1.out_channels == 8 and model(batch)["logits"].shape == (2, 10)


def test_interactive_step_yields_groups_to_prune_by_hand():
    model, x = example()
    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5)
    groups = list(pruner.step(interactive=True))
    assert len(groups) == 3
    for group in groups:
        group.prune()
    assert counts(model) == (8, 16, 32)


def test_manual_prune_width_and_history_replay():
    model, x = example()
    pruner = tp.pruner.BasePruner(model, x, magnitude)
    pruner.manual_prune_width(model.conv2, tp.prune_conv_out_channels, [0, 1, 2])
    pruner.manual_prune_width(model.conv1, tp.prune_conv_out_channels, 0.25)
    assert counts(model)[:2] == (12, 29)
    history = pruner.pruning_history()
    fresh, _ = example()
    replay = tp.pruner.BasePruner(fresh, x, magnitude)
    replay.load_pruning_history(history)
    assert counts(fresh) == counts(model)
    torch.testing.assert_close(fresh.conv2.weight, model.conv2.weight)


def test_deprecated_arguments_warn():
    model, x = example()
    with pytest.warns(DeprecationWarning, match="ch_sparsity"):
        pruner = tp.pruner.BasePruner(model, x, magnitude, ch_sparsity=0.25)
    pruner.step()
    assert model.conv1.out_channels == 12


@pytest.mark.parametrize("kwargs, message", [
    ({"pruning_ratio": 1.0}, "pruning_ratio must lie in"),
    ({"pruning_ratio": -0.1}, "pruning_ratio must lie in"),
    ({"iterative_steps": 0}, "iterative_steps must be a positive integer"),
    ({"round_to": 0}, "round_to must be a positive integer"),
])
def test_bad_options_raise_before_touching_the_model(kwargs, message):
    model, x = example()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        tp.pruner.BasePruner(model, x, magnitude, **kwargs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_step_slices_optimizer_state():
    model, x = example()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    optimizer.step()
    momentum = optimizer.state[model.conv2.weight]["momentum_buffer"].clone()
    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5)
    pruner.step(optimizer=optimizer)
    removed = {name: idxs for name, _, idxs in pruner.pruning_history()}
    kept_in = [i for i in range(16) if i not in removed["conv1"]]
    kept_out = [i for i in range(32) if i not in removed["conv2"]]
    sliced = optimizer.state[model.conv2.weight]["momentum_buffer"]
    assert sliced.shape == model.conv2.weight.shape
    torch.testing.assert_close(sliced, momentum[kept_out][:, kept_in])
    model.zero_grad()
    model(x).sum().backward()
    optimizer.step()  # training continues with the same optimizer


def test_optimizer_state_follows_two_groups_of_one_step_that_prune_the_same_axis():
    """Plans are made before any is applied (so a failed step can roll back): the second group sees the
    weight already narrowed by the first while the state is not yet (GQA: whole q heads, then the q heads
    of a removed kv head). Each plan must still slice the state, composed in order."""
    model, x = example()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(x).sum().backward()
    optimizer.step()
    moment = optimizer.state[model.conv2.weight]["exp_avg"].clone()
    graph = tp.DependencyGraph().build_dependency(model, x)
    plans = []
    for idxs in ([0, 1, 2, 3], [0, 5]):  # the second in the numbering left by the first
        group = graph.get_pruning_group(model.conv2, tp.prune_conv_out_channels, idxs)
        plans.append(tp.pruner.optim_state.plan_optimizer_state(optimizer, group))
        group.prune()
    for plan in plans:
        tp.pruner.optim_state.apply_optimizer_plan(plan)
    kept = [i for i in range(4, 32) if i not in (4, 9)]
    sliced = optimizer.state[model.conv2.weight]["exp_avg"]
    assert sliced.shape == model.conv2.weight.shape
    torch.testing.assert_close(sliced, moment[kept])
    model.zero_grad()
    model(x).sum().backward()
    optimizer.step()


def test_magnitude_pruner_alias_and_meta_pruner():
    assert tp.pruner.MagnitudePruner is tp.pruner.BasePruner
    assert tp.pruner.MetaPruner is tp.pruner.BasePruner


class FusedHeads(nn.Module):
    """q and k rows of 4 heads of 2 in one Linear, split and read per head (GPT-2's fused c_attn layout)."""

    head_dim = 2

    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(6, 16)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        q, k = self.qk(x).split(self.qk.out_features // 2, dim=-1)
        q = q.view(*q.shape[:-1], -1, self.head_dim)
        k = k.view(*k.shape[:-1], -1, self.head_dim)
        return self.out((q * k).sum(-1))


def test_whole_heads_of_a_fused_projection_go_from_every_block():
    torch.manual_seed(0)
    model = FusedHeads()
    with torch.no_grad():
        for head, scale in enumerate([1.0, 1e-3, 2.0, 1e-2]):  # heads 1 and 3 are the weakest
            model.qk.weight[[2 * head, 2 * head + 1, 8 + 2 * head, 9 + 2 * head]] *= scale
    expected = model.qk.weight.detach()[[0, 1, 4, 5, 8, 9, 12, 13]].clone()
    x = torch.randn(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.0, prune_num_heads=True, head_pruning_ratio=0.5,
                             ignored_layers=[model.out]).step()
    torch.testing.assert_close(model.qk.weight.detach(), expected)
    assert model.out.in_features == 2 and model(x).shape == (2, 3)


class PinnedHeads(nn.Module):
    """Heads scaled by a fixed (4, 2) buffer: no head can go and none can narrow."""

    head_dim = 2

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)
        self.register_buffer("mask", torch.ones(4, 2))

    def forward(self, x):
        heads = self.proj(x).view(x.shape[0], 4, 2) * self.mask
        return self.out(heads.flatten(1))


def test_prune_num_heads_names_attention_it_could_not_touch():
    model = PinnedHeads()
    x = torch.randn(2, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, prune_num_heads=True, head_pruning_ratio=0.5,
                             ignored_layers=[model.out]).step()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages  # refused up front, not by a failed forward
    assert re.search(r"prune_num_heads: .*proj \(4 blocks of 2 channels\).*register an adapter", messages[0])
    assert model.proj.out_features == 8


def test_every_group_is_scored_before_any_is_pruned():
    model, x = example()
    seen = []

    class Recording(tp.importance.MagnitudeImportance):
        def __call__(self, group):
            seen.append(tuple(layer.weight.shape for layer in (model.conv1, model.conv2, model.conv3)))
            return super().__call__(group)

    tp.pruner.BasePruner(model, x, Recording(), pruning_ratio=0.5).step()
    assert len(seen) >= 3 and len(set(seen)) == 1  # every score saw the unpruned model
    assert counts(model) == (8, 16, 32)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_hessian_statistics_of_the_unpruned_model_serve_the_whole_step(global_pruning):
    model, x = example()
    hessian = tp.importance.HessianImportance()
    for sample in torch.randn(4, 1, *x.shape[1:]):
        model.zero_grad()
        model(sample).sum().backward()
        hessian.accumulate_grad(model)
    tp.pruner.BasePruner(model, x, hessian, pruning_ratio=0.5, global_pruning=global_pruning).step()
    assert sum(counts(model)) == 56 if not global_pruning else sum(counts(model)) < 112
    assert model(x).shape == (2, 10)


class TwoAttentions(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = FusedHeads(), FusedHeads()

    def forward(self, x):
        return self.first(x) + self.second(x)


def test_head_pruning_ratio_dict_overrides_the_default_per_layer_and_follows_the_schedule():
    torch.manual_seed(0)
    model = TwoAttentions()
    x = torch.randn(2, 6)
    first, second = model.first.qk, model.second.qk
    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.0, prune_num_heads=True, head_pruning_ratio=0.25,
                                  head_pruning_ratio_dict={first: 0.5}, iterative_steps=2,
                                  ignored_layers=[model.first.out, model.second.out])
    assert pruner.get_target_head_pruning_ratio(first) == 0.0
    pruner.step()
    assert pruner.get_target_head_pruning_ratio(first) == 0.25 and pruner.get_target_head_pruning_ratio(second) == 0.125
    # 4 heads of 2 channels in each of q and k; a quarter of 4 heads and an eighth both round to one head
    assert (first.out_features, second.out_features) == (12, 12)
    pruner.step()
    assert pruner.get_target_head_pruning_ratio(first) == 0.5 and pruner.get_target_head_pruning_ratio(second) == 0.25
    assert (first.out_features, second.out_features) == (8, 12)  # half of 4 heads; a quarter is still one
    assert model(x).shape == (2, 3)


def test_deprecated_ch_sparsity_dict_and_channel_groups_warn_and_still_apply():
    model, x = example()
    with pytest.warns(DeprecationWarning) as caught:
        pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.25, ch_sparsity_dict={model.conv2: 0.5},
                                      channel_groups={model.conv3: 4})
    names = " ".join(str(w.message) for w in caught)
    assert "ch_sparsity_dict" in names and "channel_groups" in names
    assert pruner.get_target_pruning_ratio(model.conv2) == 0.0  # before the first step
    pruner.step()
    assert pruner.get_target_pruning_ratio(model.conv2) == 0.5
    assert counts(model) == (12, 16, 48)


def test_estimate_importance_uses_the_pruner_criterion():
    model, x = example()
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(p=1, normalizer=None), pruning_ratio=0.5)
    group = pruner.DG.get_pruning_group(model.conv1, tp.prune_conv_out_channels, list(range(16)))
    scores = pruner.estimate_importance(group)
    assert scores.shape == (16,)
    # mean over the group's items of each channel's L1 norm: conv1 rows, bn1 weights, conv2 input slices
    by_hand = (model.conv1.weight.abs().sum((1, 2, 3)) + model.bn1.weight.abs()
               + model.conv2.weight.abs().sum((0, 2, 3))) / 3
    torch.testing.assert_close(scores, by_hand.detach())
    assert tp.pruner.BasePruner(model, x, None).estimate_importance is not None
    with pytest.raises(ValueError, match="no importance criterion"):
        tp.pruner.BasePruner(model, x, None).estimate_importance(group)


class ReadsItsWidth(nn.Module):
    """Forward hands a width from an attribute no adapter knows to a function whose size arguments the
    graph does not read (F.layer_norm's normalized_shape): pruning fc1 breaks the model at run time."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.hidden_size = 8
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.nn.functional.layer_norm(self.fc1(x), (self.hidden_size,)))


class ReshapesWithItsWidth(ReadsItsWidth):
    """The same attribute spelled out in a view: the graph evaluates it and refuses the removal up front."""

    def forward(self, x):
        return self.fc2(self.fc1(x).view(-1, 2, self.hidden_size // 2).flatten(1))


def test_a_view_spelling_out_a_stale_width_is_refused_by_the_graph():
    model = ReshapesWithItsWidth()
    x = torch.randn(3, 4)
    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, ignored_layers=[model.fc2])
    group = pruner.DG.get_pruning_group(model.fc1, tp.prune_linear_out_channels, [0, 4])  # one per row
    assert not pruner.DG.check_pruning_group(group)
    assert any(re.search(r"'view' to \[3, 2, 4\] spells out the size of dim 2 \(4: a number", reason)
               for reason in group.blocked), group.blocked
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.step()
    # refused by the graph up front: nothing left to the fallback; the one warning is the report's pointer
    assert [str(w.message) for w in caught] == [
        "step() removed 0 of the 4 channels its schedule asked for: fc1 (0 of 4: a reshape spells out a size). "
        "pruner.report() lists every group and why it kept channels"]
    assert pruner.fallback_history == [] and model.fc1.out_features == 8 and model(x).shape == (3, 2)


def test_a_step_that_breaks_the_model_names_the_stale_attribute():
    model = ReadsItsWidth()
    x = torch.randn(3, 4)
    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, ignored_layers=[model.fc2])
    with pytest.warns(UserWarning, match=r"left unpruned .*fc1 .*attributes still holding a pruned width: hidden_size=8"):
        pruner.step()
    assert model.fc1.out_features == 8 and model(x).shape == (3, 2)  # the group was put back
    [record] = pruner.fallback_history
    assert record.step == 1 and "normalized_shape=[8]" in record.error and record.kept == []
    assert [root for root, _ in record.skipped] == ["fc1"] and record.handled == 1


def test_interactive_step_that_breaks_the_model_names_the_stale_attribute():
    model = ReadsItsWidth()
    x = torch.randn(3, 4)
    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.5, ignored_layers=[model.fc2])
    with pytest.raises(RuntimeError, match=r"no longer runs.*hidden_size=8"):
        for group in pruner.step(interactive=True):
            group.prune()


def test_every_keyword_is_documented_once_on_pruner_options():
    """BasePruner's keywords and PrunerOptions' fields are the same names with the same defaults, in
    torch_pruning's order, and each field carries a comment (the one place they are documented)."""
    import inspect

    from structprune.pruner.options import PrunerOptions

    parameters = list(inspect.signature(tp.pruner.BasePruner.__init__).parameters.values())[3:]
    fields = PrunerOptions.__dataclass_fields__
    assert [p.name for p in parameters] == list(fields)
    assert all(p.default == fields[p.name].default for p in parameters)
    source = inspect.getsource(PrunerOptions)
    assert all(f"#: " in source.split(f"    {name}:")[0].rsplit("\n", 2)[-2] for name in fields)
    model, x = example()
    pruner = tp.pruner.BasePruner(model, x, magnitude, pruning_ratio=0.25, round_to=2)
    assert pruner.options.pruning_ratio == 0.25 and pruner.options.round_to == 2 and pruner.round_to == 2
