"""Shared helpers for the transformer-family tests: parameter counts and strict warning capture."""
import contextlib
import warnings

import torch


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def no_group_left_unpruned(allowed=()):
    """Fail if step() had to leave a group unpruned (a broken family hides behind that warning).

    ``allowed``: substrings of group root names that may legitimately be left (each caller says why).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    for warning in caught:
        message = str(warning.message)
        assert not message.startswith("prune_num_heads:"), message
        if "left unpruned" not in message:
            continue
        entries = message.split(": ", 1)[1].split("; ")
        bad = [entry for entry in entries if not any(name in entry.split(" (", 1)[0] for name in allowed)]
        assert not bad, "groups left unpruned: " + "; ".join(bad)


def magnitude():
    import structprune as tp

    return tp.importance.MagnitudeImportance()


@torch.no_grad()
def logits(model, **inputs):
    output = model(**inputs)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def tiny_gemma(attn: str = "eager", heads: int = 4, kv_heads: int = 1):
    """Gemma 3 with Gemma 3 270M's attention layout in miniature: 4 query heads over 1 kv head, head_dim 16,
    q_norm / k_norm per head, sliding-window layers; ``attn`` picks the attention implementation."""
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=64, sliding_window=8)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(config).eval()
