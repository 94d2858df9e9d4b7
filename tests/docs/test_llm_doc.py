"""docs/llm.md's recipe runs as written on a tiny Llama and does what the page says."""
import pytest
import torch

import structprune as tp

from blocks import python_blocks
from test_docs_run import tiny_llama


def test_the_llm_recipe_runs_and_prunes_the_mlp_with_refit(tmp_path):
    pytest.importorskip("transformers")
    model = tiny_llama()
    batches = [torch.randint(0, 64, (4, 16)) for _ in range(3)]
    namespace = {"model": model, "calibration_batches": batches}
    block = python_blocks("docs/llm.md")[0]
    exec(compile(block, "docs/llm.md", "exec"), namespace)
    assert model.config.intermediate_size == 51  # floor(0.8 * 64); the rest of the model whole
    assert model.model.layers[0].self_attn.q_proj.out_features == 32 and model.model.embed_tokens.embedding_dim == 32
    assert model.model.layers[0].mlp.down_proj.bias is None  # refit creates no parameter: the checkpoint reloads
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batches[0]).logits, model(batches[0]).logits)


def test_the_llm_greg_recipe_removes_exactly_the_penalised_channels_with_adamw_state():
    pytest.importorskip("transformers")
    model = tiny_llama()
    batches = [torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    train = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(9))
    namespace = {"torch": torch, "tp": tp, "model": model, "calibration_batches": batches, "train_sequences": train}
    chosen = {}

    def record_choice(ns):
        original = tp.pruner.GrowingRegPruner.step

        def step(self, *args, **kwargs):
            # the channels GReg-1 penalised, as their down_proj input columns, right before removal
            chosen["norms"] = [layer.mlp.down_proj.weight.norm(dim=0) for layer in model.model.layers]
            return original(self, *args, **kwargs)

        ns["_restore"] = original
        tp.pruner.GrowingRegPruner.step = step

    record_choice(namespace)
    try:
        block = python_blocks("docs/llm.md")[1]
        exec(compile(block, "docs/llm.md block 2", "exec"), namespace)
    finally:
        tp.pruner.GrowingRegPruner.step = namespace["_restore"]
    assert model.config.intermediate_size == 51 and not model.training
    optimizer = namespace["optimizer"]
    for layer, norms in zip(model.model.layers, chosen["norms"]):
        kept = layer.mlp.down_proj.weight.norm(dim=0)
        assert kept.shape == (51,)
        # the 13 removed columns were the ones the penalty had shrunk: all below every kept one at step()
        assert norms.sort().values[12] < norms.sort().values[13] * 0.2
        state = optimizer.state[layer.mlp.down_proj.weight]
        assert state["exp_avg"].shape == layer.mlp.down_proj.weight.shape
