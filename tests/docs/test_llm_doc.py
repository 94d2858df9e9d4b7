"""docs/llm.md's recipe runs as written on a tiny Llama and does what the page says."""
import pytest
import torch

from blocks import python_blocks
from test_docs_run import tiny_llama


def test_the_llm_recipe_runs_and_prunes_the_mlp_with_refit(tmp_path):
    pytest.importorskip("transformers")
    model = tiny_llama()
    batches = [torch.randint(0, 64, (4, 16)) for _ in range(3)]
    namespace = {"model": model, "calibration_batches": batches}
    (block,) = python_blocks("docs/llm.md")
    exec(compile(block, "docs/llm.md", "exec"), namespace)
    assert model.config.intermediate_size == 51  # floor(0.8 * 64); the rest of the model whole
    assert model.model.layers[0].self_attn.q_proj.out_features == 32 and model.model.embed_tokens.embedding_dim == 32
    assert model.model.layers[0].mlp.down_proj.bias is None  # refit creates no parameter: the checkpoint reloads
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batches[0]).logits, model(batches[0]).logits)
