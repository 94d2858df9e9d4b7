"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3; tiny configs, random init).

transformers stores each block's experts as fused 3-D tensors. The graph declares them (hidden channels in
and out), their router (hidden channels in) and two inner layers: the intermediate width every expert
shares, pruned like an MLP's, and the expert count, pruned with ``prune_num_experts``. Removals of channels
or experts that contribute nothing must leave the outputs unchanged.
"""
import pytest
import torch

import structprune as tp
from hf_helpers import count, logits, magnitude, no_group_left_unpruned
from structprune.layers import ExpertCount, ExpertWidth

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, num_experts_per_tok=2)


def build(family: str, **overrides):
    import transformers as hf

    if family == "mixtral":
        settings = dict(COMMON, intermediate_size=32, num_local_experts=4)
        model_type, config_type = hf.MixtralForCausalLM, hf.MixtralConfig
    elif family == "qwen2_moe":
        settings = dict(COMMON, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                        num_experts=8, norm_topk_prob=True)
        model_type, config_type = hf.Qwen2MoeForCausalLM, hf.Qwen2MoeConfig
    elif family == "qwen3_moe":
        settings = dict(COMMON, intermediate_size=64, moe_intermediate_size=32, num_experts=8, head_dim=16,
                        norm_topk_prob=True)
        model_type, config_type = hf.Qwen3MoeForCausalLM, hf.Qwen3MoeConfig
    else:  # layer 0 dense, layer 1 MoE with one shared expert and group-limited routing (2 groups of 4)
        settings = dict(COMMON, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8,
                        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
        model_type, config_type = hf.DeepseekV3ForCausalLM, hf.DeepseekV3Config
    settings.update(overrides)
    torch.manual_seed(0)
    return model_type(config_type(**settings)).eval()


def moe_blocks(model):
    return [module for module in model.modules() if hasattr(module, "experts") and hasattr(module, "gate")]


def ignored(model):
    """The LM head, and DeepSeek's low-rank attention projections: the MLA ranks (q_lora_rank, kv_lora_rank)
    belong to the general config sync, not to the MoE declarations tested here."""
    return [model.lm_head] + [module for name, module in model.named_modules()
                              if name.endswith(("q_a_proj", "kv_a_proj_with_mqa"))]


def reload(model, tmp_path):
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path).eval()


def assert_config_rebuilds(model):
    """A model built from the pruned config has exactly the pruned shapes (what from_pretrained relies on)."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    shapes = {name: tuple(p.shape) for name, p in fresh.state_dict().items()}
    assert shapes == {name: tuple(p.shape) for name, p in model.state_dict().items()}


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_family_loses_hidden_and_expert_width_then_generates_and_reloads(family, tmp_path):
    model = build(family)
    ids = torch.randint(0, 128, (1, 8))
    before = count(model)
    with no_group_left_unpruned():
        tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.5,
                             ignored_layers=ignored(model)).step()
    assert count(model) <= 0.75 * before
    for block in moe_blocks(model):
        experts = block.experts
        assert experts.gate_up_proj.shape == (experts.num_experts, 32, 32)  # 2 x 16 intermediate, hidden 32
        assert experts.down_proj.shape == (experts.num_experts, 32, 16)
        assert (experts.hidden_dim, experts.intermediate_dim, block.gate.hidden_dim) == (32, 16, 32)
        assert block.gate.weight.shape == (experts.num_experts, 32)
        shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
        if shared is not None:  # an ordinary gated MLP: it loses half its width like any other
            assert shared.up_proj.out_features == shared.gate_proj.out_features == shared.down_proj.in_features
            assert shared.up_proj.out_features == {"qwen2_moe": 32, "deepseek_v3": 16}[family]
    config = model.config
    assert config.hidden_size == 32
    assert getattr(config, "moe_intermediate_size", None) == 16 or (family == "mixtral" and config.intermediate_size == 16)
    out = logits(model, input_ids=ids)
    assert out.shape == (1, 8, 128)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
    assert_config_rebuilds(model)
    torch.testing.assert_close(logits(reload(model, tmp_path), input_ids=ids), out)


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_family_with_whole_heads_passes_the_four_checks(family, tmp_path):
    """Issue 12's setup (ratio 0.5, prune_num_heads with head_pruning_ratio 0.5): outputs keep their shape,
    a quarter of the parameters go, generate() runs and save_pretrained -> from_pretrained gives the same
    logits (every layer keeps the same head counts, so the config describes them)."""
    model = build(family)
    ids = torch.randint(0, 128, (1, 8))
    before = count(model)
    tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.5, prune_num_heads=True,
                         head_pruning_ratio=0.5, ignored_layers=ignored(model)).step()
    assert count(model) <= 0.75 * before
    out = logits(model, input_ids=ids)
    assert out.shape == (1, 8, 128)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
    assert_config_rebuilds(model)
    torch.testing.assert_close(logits(reload(model, tmp_path), input_ids=ids), out)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_num_experts_removes_experts_with_their_router_rows_and_reloads(family, tmp_path):
    model = build(family)
    ids = torch.randint(0, 128, (1, 8))
    blocks = moe_blocks(model)
    original = blocks[0].experts.num_experts
    with no_group_left_unpruned():
        tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.5, prune_num_experts=True,
                             expert_pruning_ratio=0.5, ignored_layers=ignored(model)).step()
    for block in blocks:
        left = original // 2
        assert block.experts.gate_up_proj.shape[0] == block.experts.down_proj.shape[0] == left
        assert block.gate.weight.shape == (left, 32)
        assert block.experts.num_experts == block.gate.num_experts == left
        if hasattr(block.gate, "e_score_correction_bias"):
            assert block.gate.e_score_correction_bias.shape == (left,)
    assert model.config.num_experts_per_tok == 2
    names = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts",
             "deepseek_v3": "n_routed_experts"}
    assert getattr(model.config, names[family]) == original // 2
    if hasattr(model, "num_experts"):  # the auxiliary-loss size of the CausalLM
        assert model.num_experts == original // 2
    out = logits(model, input_ids=ids)
    assert out.shape == (1, 8, 128)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
    assert_config_rebuilds(model)
    torch.testing.assert_close(logits(reload(model, tmp_path), input_ids=ids), out)


# -- lossless removals ----------------------------------------------------------------------------------------
def inner_layer(graph, experts, kind):
    return next(module for module in graph.module2node if isinstance(module, kind) and module.experts is experts)


def test_intermediate_channels_zeroed_in_every_expert_go_without_changing_outputs():
    model = build("mixtral")
    ids = torch.randint(0, 128, (2, 8))
    dead = torch.tensor([1, 4, 5, 9, 13, 20, 27, 30, 2, 6, 11, 15, 17, 22, 25, 31])  # half of the 32 channels
    with torch.no_grad():
        for block in moe_blocks(model):
            block.experts.gate_up_proj[:, dead] = 0  # gate rows
            block.experts.gate_up_proj[:, dead + 32] = 0  # up rows
            block.experts.down_proj[:, :, dead] = 0
    kept = [block.experts.down_proj[:, :, [j for j in range(32) if j not in dead]].clone() for block in moe_blocks(model)]
    reference = logits(model, input_ids=ids)
    # only the experts' intermediate widths root groups here; magnitude picks the zeroed channels
    tp.pruner.BasePruner(model, {"input_ids": ids[:1]}, magnitude(), pruning_ratio=0.5,
                         root_module_types=(ExpertWidth,)).step()
    for block, expected in zip(moe_blocks(model), kept):
        assert block.experts.intermediate_dim == 16 and block.experts.gate_up_proj.shape == (4, 32, 64)
        torch.testing.assert_close(block.experts.down_proj.data, expected)
    torch.testing.assert_close(logits(model, input_ids=ids), reference)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_an_expert_the_router_never_picks_goes_without_changing_outputs(family):
    """Top-k weights are renormalized softmax scores, so an expert outside every token's top-k changes nothing."""
    model = build(family, **({"num_local_experts": 8} if family == "mixtral" else {}))
    ids = torch.randint(0, 128, (1, 3))  # 3 tokens pick at most 6 of the 8 experts
    block = moe_blocks(model)[0]
    picked = []
    handle = block.gate.register_forward_hook(lambda module, args, output: picked.append(output[2].unique()))
    reference = logits(model, input_ids=ids)
    handle.remove()
    unused = sorted(set(range(block.experts.num_experts)) - set(picked[0].tolist()))
    assert unused, "the test input must leave some expert unpicked"
    expert = unused[0]
    rows = [e for e in range(block.experts.num_experts) if e != expert]
    router_rows = block.gate.weight.data[rows].clone()
    down = block.experts.down_proj.data[rows].clone()
    graph = tp.DependencyGraph().build_dependency(model, {"input_ids": ids})
    experts = inner_layer(graph, block.experts, ExpertCount)
    graph.get_pruning_group(experts, graph.get_pruner_of_module(experts).prune_out_channels, [expert]).prune()
    torch.testing.assert_close(block.gate.weight.data, router_rows)
    torch.testing.assert_close(block.experts.down_proj.data, down)
    assert block.experts.num_experts == block.gate.num_experts == len(rows)
    torch.testing.assert_close(logits(model, input_ids=ids), reference)


def test_prune_num_experts_keeps_the_strongest_experts():
    model = build("mixtral")
    ids = torch.randint(0, 128, (1, 8))
    block = moe_blocks(model)[0]
    with torch.no_grad():
        for expert, scale in enumerate([1.0, 0.1, 2.0, 0.2]):  # experts 1 and 3 are the weakest
            block.experts.gate_up_proj[expert] *= scale
            block.experts.down_proj[expert] *= scale
    strong = block.experts.gate_up_proj.data[[0, 2]].clone(), block.gate.weight.data[[0, 2]].clone()
    tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.0, prune_num_experts=True,
                         expert_pruning_ratio=0.5).step()
    torch.testing.assert_close(block.experts.gate_up_proj.data, strong[0])
    torch.testing.assert_close(block.gate.weight.data, strong[1])


# -- what the router needs ----------------------------------------------------------------------------------
def test_experts_never_drop_below_top_k_and_a_direct_removal_below_it_is_refused():
    model = build("mixtral")
    ids = torch.randint(0, 128, (1, 8))
    pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.0, prune_num_experts=True,
                                  expert_pruning_ratio=0.9)
    pruner.step()
    assert all(block.experts.num_experts == 2 for block in moe_blocks(model))  # 4 experts, top-2
    block = moe_blocks(model)[0]
    experts = inner_layer(pruner.DG, block.experts, ExpertCount)
    weights = block.experts.gate_up_proj.detach().clone()
    group = pruner.DG.get_pruning_group(experts, pruner.DG.get_pruner_of_module(experts).prune_out_channels, [0])
    assert not pruner.DG.check_pruning_group(group)
    with pytest.raises(ValueError, match="top_k=2 experts; removing 1 of 2 leaves 1"):
        group.prune()
    assert torch.equal(block.experts.gate_up_proj.data, weights) and block.experts.num_experts == 2


def test_group_limited_routing_loses_the_same_number_of_experts_in_every_group():
    model = build("deepseek_v3")  # 8 experts in 2 routing groups of 4
    ids = torch.randint(0, 128, (1, 8))
    block = moe_blocks(model)[0]
    graph = tp.DependencyGraph().build_dependency(model, {"input_ids": ids})
    experts = inner_layer(graph, block.experts, ExpertCount)
    prune = graph.get_pruner_of_module(experts).prune_out_channels
    with pytest.raises(ValueError, match=r"2 routing groups; removing \[2, 0\] per group"):
        graph.get_pruning_group(experts, prune, [0, 1]).prune()
    assert block.experts.num_experts == 8
    scores = torch.tensor([5.0, 1.0, 6.0, 7.0, 0.5, 0.6, 8.0, 9.0])  # the two weakest are both in group 1
    with torch.no_grad():
        block.experts.gate_up_proj.mul_(scores[:, None, None])
    kept = block.experts.gate_up_proj.detach()[[0, 2, 3, 5, 6, 7]].clone()  # expert 1 and expert 4 go
    tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.0, prune_num_experts=True,
                         expert_pruning_ratio=0.25).step()
    assert block.experts.num_experts == block.gate.num_experts == 6
    torch.testing.assert_close(block.experts.gate_up_proj.data, kept)
    assert model(ids).logits.shape == (1, 8, 128)


# -- bookkeeping ------------------------------------------------------------------------------------------
def test_pruned_moe_round_trips_through_save_pruned_and_history_replays(tmp_path):
    model = build("qwen3_moe")
    ids = torch.randint(0, 128, (1, 8))
    pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.5, prune_num_experts=True,
                                  expert_pruning_ratio=0.5, ignored_layers=[model.lm_head])
    pruner.step()
    out = logits(model, input_ids=ids)
    tp.save_pruned(model, tmp_path)
    loaded = tp.load_pruned(build("qwen3_moe"), tmp_path)
    for block in moe_blocks(loaded):
        assert block.experts.num_experts == block.gate.num_experts == 4
        assert (block.experts.intermediate_dim, block.gate.hidden_dim) == (16, 32)
    torch.testing.assert_close(logits(loaded, input_ids=ids), out)
    # the inner layers are named after their experts module, so a history replays on a fresh model
    replayed = build("qwen3_moe")
    graph = tp.DependencyGraph().build_dependency(replayed, {"input_ids": ids})
    graph.load_pruning_history(pruner.pruning_history())
    shapes = {name: tuple(p.shape) for name, p in replayed.state_dict().items()}
    assert shapes == {name: tuple(p.shape) for name, p in model.state_dict().items()}


def test_prune_num_experts_on_a_model_without_experts_warns():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (1, 4))
    pruner = tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.0, prune_num_experts=True)
    with pytest.warns(UserWarning, match="no mixture-of-experts block"):
        pruner.step()


def test_growing_regularization_reaches_the_fused_expert_tensors():
    """Expert tensors sit in two groups (their intermediate width and the hidden width), the router in one:
    with every reg at ``reg``, regularize() adds 2 * reg * weight to the experts' gradients, reg * weight to
    the router's."""
    model = build("mixtral")
    ids = torch.randint(0, 128, (1, 8))
    pruner = tp.pruner.GrowingRegPruner(model, {"input_ids": ids}, magnitude(), reg=1e-3, pruning_ratio=0.5,
                                        ignored_layers=[model.lm_head])
    model(ids, labels=ids).loss.backward()
    block = moe_blocks(model)[0]
    tensors = [block.experts.gate_up_proj, block.experts.down_proj, block.gate.weight]
    grads = [tensor.grad.clone() for tensor in tensors]
    pruner.regularize(model)
    for tensor, grad, times in zip(tensors, grads, (2, 2, 1)):
        torch.testing.assert_close(tensor.grad, grad + times * 1e-3 * tensor.data)


def test_macs_count_each_routed_token_once_per_expert_in_every_experts_implementation():
    """Top-2 routing runs one more expert per token than top-1 and changes nothing else: 2 layers x 8 tokens,
    each through one more gate/up (64 x 64) and down (64 x 32)."""
    ids = torch.randint(0, 128, (1, 8))
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        macs = []
        for top_k in (1, 2):
            model = build("mixtral", num_experts_per_tok=top_k)
            model.config._experts_implementation = implementation
            macs.append(tp.utils.count_ops_and_params(model, {"input_ids": ids})[0])
        assert macs[1] - macs[0] == 2 * 8 * (64 * 64 + 64 * 32)


def other_family(family: str):
    import transformers as hf

    settings = dict(COMMON, intermediate_size=32, num_local_experts=4)
    if family == "phimoe":  # its router is an nn.Linear whose rows are experts
        model_type, config = hf.PhimoeForCausalLM, hf.PhimoeConfig(**settings)
    elif family == "granitemoe":  # its MoE block views its output with self.input_size
        model_type, config = hf.GraniteMoeForCausalLM, hf.GraniteMoeConfig(**settings)
    else:  # gpt-oss: experts stored [experts, hidden, 2 x inner] with gate and up rows interleaved, and biases
        model_type, config = hf.GptOssForCausalLM, hf.GptOssConfig(**settings, head_dim=16,
                                                                    layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    return model_type(config).eval()


@pytest.mark.parametrize("family", ["phimoe", "granitemoe", "gpt_oss"])
def test_other_layouts_of_fused_experts_prune_and_reload(family, tmp_path):
    model = other_family(family)
    ids = torch.randint(0, 128, (1, 8))
    before = count(model)
    with no_group_left_unpruned() as caught:
        tp.pruner.BasePruner(model, {"input_ids": ids}, magnitude(), pruning_ratio=0.5, prune_num_experts=True,
                             expert_pruning_ratio=0.5, ignored_layers=[model.lm_head]).step()
    interleaved = {str(w.message) for w in caught if "interleaved" in str(w.message)}
    assert interleaved == ({"GptOssExperts stores gate and up rows interleaved; structprune keeps its intermediate "
                            "width (its hidden width and, with prune_num_experts, its experts still prune)"}
                           if family == "gpt_oss" else set())
    assert count(model) <= 0.45 * before
    blocks = [module for module in model.modules() if hasattr(module, "experts")]
    assert len(blocks) == 2
    for block in blocks:
        experts, router = block.experts, getattr(block, "router", None) or block.gate
        assert experts.num_experts == router.num_experts == router.weight.shape[0] == 2
        assert router.weight.shape[1] == 32
        if family == "gpt_oss":  # interleaved gate/up rows keep their width; hidden and experts still go
            assert experts.gate_up_proj.shape == (2, 32, 64) and experts.down_proj_bias.shape == (2, 32)
        else:
            assert experts.gate_up_proj.shape == (2, 32, 32) and experts.down_proj.shape == (2, 32, 16)
    out = logits(model, input_ids=ids)
    assert out.shape == (1, 8, 128)
    assert_config_rebuilds(model)
    torch.testing.assert_close(logits(reload(model, tmp_path), input_ids=ids), out)

