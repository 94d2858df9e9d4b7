"""GReg-1 with prune_num_heads: the whole query heads it chooses get the growing penalty, and step() removes
exactly them, so the removal costs nothing (Gemma-style attention: 4 query heads share 1 kv head)."""
import warnings

import pytest
import torch

import structprune as tp
from hf_helpers import tiny_gemma

transformers = pytest.importorskip("transformers")


def _pruner(model, ids, imp):
    mlp = [m for layer in model.model.layers for m in layer.mlp.modules() if isinstance(m, torch.nn.Linear)]
    return tp.pruner.GrowingRegPruner(
        model, {"input_ids": ids}, imp, reg=0.0, delta_reg=0.5, reg_ceiling=0.5, schedule="greg1",
        pruning_ratio=0.5, ignored_layers=[model.lm_head, model.model.embed_tokens] + mlp,
        prune_num_heads=True, head_pruning_ratio=0.5, prune_head_dims=False)


def _head_norms(model):
    return [layer.self_attn.o_proj.weight.view(32, 4, 16).norm(dim=(0, 2)) for layer in model.model.layers]


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_chosen_heads_shrink_and_their_removal_is_lossless(criterion):
    model = tiny_gemma()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    if criterion == "taylor":
        model(input_ids=ids, labels=ids).loss.backward()
        imp = tp.importance.TaylorImportance()
    else:
        imp = tp.importance.MagnitudeImportance()
    before = _head_norms(model)
    pruner = _pruner(model, ids, imp)
    pruner.update_reg()  # chooses two heads per layer, once
    for _ in range(40):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()  # the decay acts on parameters that train
        pruner.regularize(model, decoupled=True, lr=1.0)  # w *= 0.5 on the chosen heads' parameters
        pruner.update_reg()
    # step() scores with the gradients of now, on the shrunk heads; it must still remove the chosen ones
    after = _head_norms(model)
    shrunk = [(a < 1e-6 * b).nonzero().flatten().tolist() for a, b in zip(after, before)]
    untouched = [torch.isclose(a, b).nonzero().flatten().tolist() for a, b in zip(after, before)]
    assert all(len(s) == 2 for s in shrunk), shrunk
    assert [sorted(s + u) for s, u in zip(shrunk, untouched)] == [[0, 1, 2, 3]] * 2  # the others kept as they were
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    kept = [[h for h in range(4) if h not in s] for s in shrunk]
    marks = [layer.self_attn.o_proj.weight.view(32, 4, 16)[:, keep].clone() for layer, keep in
             zip(model.model.layers, kept)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()
    assert model.config.num_attention_heads == 2
    for layer, mark in zip(model.model.layers, marks):
        assert torch.equal(layer.self_attn.o_proj.weight.view(32, 2, 16), mark)  # exactly the chosen heads went
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_a_greg1_checkpoint_restores_the_head_penalty():
    model = tiny_gemma()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    pruner = _pruner(model, ids, tp.importance.MagnitudeImportance())
    pruner.update_reg()
    pruner.update_reg()
    state = pruner.state_dict()
    assert [k for k in state["group_reg"] if k.startswith("heads:")], list(state["group_reg"])
    fresh = _pruner(model, ids, tp.importance.MagnitudeImportance())
    fresh.load_state_dict(state)
    reloaded = {fresh._reg_key(g): v for g, v in fresh.group_reg.items()}
    for key, value in state["group_reg"].items():
        torch.testing.assert_close(reloaded[key], value)
