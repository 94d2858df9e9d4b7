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
