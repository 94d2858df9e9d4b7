"""GrowingRegCallback drives regularize -> prune -> fine-tune of a tiny Llama on standard-library docstrings.

transformers' ``Trainer`` (even ``TrainingArguments``) needs the ``accelerate`` package, which the test
environment does not install, so ``run_like_trainer`` below calls the callback through transformers' own
``CallbackHandler`` in the order ``Trainer``'s inner loop does (transformers 5.x: step_begin, forward and
backward, gradient clipping, pre_optimizer_step, optimizer.step, optimizer_step, scheduler, zero_grad,
global_step += 1, step_end), with the optimizer wrapped the way accelerate wraps it.
"""
import inspect
import re
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerControl, TrainerState
from transformers.trainer_callback import CallbackHandler

import structprune as tp
from structprune.integrations.transformers import GrowingRegCallback, unwrap_optimizer

LENGTH = 32


def docstring_sentences(count: int = 320) -> list[str]:
    """Real English sentences that ship with Python: docstrings of standard-library functions."""
    import argparse
    import collections
    import functools
    import json
    import logging
    import os
    import pathlib
    import string
    import textwrap

    sentences = []
    for module in (os, json, collections, textwrap, string, functools, pathlib, argparse, logging, inspect, re):
        for _, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) else None
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join((doc or "").split())):
                if 24 <= len(sentence) and sentence.isascii() and sentence not in sentences:
                    sentences.append(sentence)
    assert len(sentences) >= count
    return sentences[:count]


def encode(sentences: list[str]) -> tuple[torch.Tensor, int]:
    """Characters as tokens (id 0 unused), every sentence cut to LENGTH characters."""
    alphabet = sorted({c for s in sentences for c in s})
    index = {c: i + 1 for i, c in enumerate(alphabet)}
    ids = torch.tensor([[index[c] for c in s[:LENGTH].ljust(LENGTH)] for s in sentences])
    return ids, len(alphabet) + 1


class AcceleratedLike:
    """What accelerate hands the Trainer: the torch optimizer kept as ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def run_like_trainer(model, ids, callbacks, epochs, batch, on_pre_step=None):
    optimizer = AcceleratedLike(torch.optim.AdamW(model.parameters(), lr=3e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda step: 1.0)
    handler = CallbackHandler(callbacks, model, None, optimizer, scheduler)
    args = types.SimpleNamespace(max_grad_norm=1.0)
    state, control = TrainerState(), TrainerControl()
    steps_per_epoch = len(ids) // batch
    losses = []
    handler.on_train_begin(args, state, control)
    for epoch in range(epochs):
        handler.on_epoch_begin(args, state, control)
        for step in range(steps_per_epoch):
            handler.on_step_begin(args, state, control)
            chunk = ids[step * batch:(step + 1) * batch]
            loss = model(input_ids=chunk, labels=chunk).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            handler.on_pre_optimizer_step(args, state, control)
            if on_pre_step is not None:
                on_pre_step(state.global_step, before)
            optimizer.step()
            handler.on_optimizer_step(args, state, control)
            scheduler.step()
            model.zero_grad()
            state.global_step += 1
            state.epoch = epoch + (step + 1) / steps_per_epoch
            handler.on_step_end(args, state, control)
            losses.append(loss.item())
        handler.on_epoch_end(args, state, control)
    handler.on_train_end(args, state, control)
    return optimizer, losses


def test_growing_reg_callback_regularizes_prunes_fine_tunes_and_saves(tmp_path):
    torch.manual_seed(0)
    ids, vocab = encode(docstring_sentences())
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                         max_position_embeddings=LENGTH))
    params_before = sum(p.numel() for p in model.parameters())
    reg, delta = 1e-3, 5e-2
    pruner = tp.pruner.GrowingRegPruner(model, {"input_ids": ids[:1]}, tp.importance.MagnitudeImportance(),
                                        reg=reg, delta_reg=delta, pruning_ratio=0.5, prune_head_dims=False,
                                        ignored_layers=[model.lm_head])
    callback = GrowingRegCallback(pruner, prune_at_step=20, save_dir=str(tmp_path / "pruned"))
    gate = model.model.layers[0].mlp.gate_proj
    penalties = []

    def check_penalty(step, before):
        # the callback has just added gamma * w to the gradient of every regularized channel
        if callback.pruned_step is None and step in (0, 10):
            added = gate.weight.grad - before["model.layers.0.mlp.gate_proj.weight"]
            penalties.append(added / gate.weight.detach())

    optimizer, losses = run_like_trainer(model, ids, [callback], epochs=3, batch=32, on_pre_step=check_penalty)

    # the penalty changed the gradients: gate_proj's output channels (its MLP group) and input channels (the
    # hidden-size group) each add their coefficient, at least reg, up to reg + delta after one update_reg
    assert len(penalties) == 2
    for gamma in penalties:
        assert torch.allclose(gamma, gamma[:, :1] + gamma[:1, :] - gamma[0, 0], rtol=1e-3, atol=1e-5)
    assert penalties[0].min() >= 2 * reg * 0.999 and penalties[0].max() <= 2 * (reg + delta) * 1.001
    assert penalties[0].max() > 2 * reg + 0.5 * delta
    assert penalties[1].max() > penalties[0].max()  # the second epoch's update_reg grew it further
    # pruned at step 20, then fine-tuned with the same (sliced) optimizer
    assert callback.pruned_step == 20 and len(losses) == 30
    params_after = sum(p.numel() for p in model.parameters())
    assert callback.params_before == params_before and callback.params_after == params_after
    assert params_after < 0.6 * params_before
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 64
    assert model.config.num_attention_heads == 4 and model.config.head_dim == 16  # heads keep their width
    inner = unwrap_optimizer(optimizer)
    for parameter in model.parameters():
        assert inner.state[parameter]["exp_avg"].shape == parameter.shape
    assert all(torch.isfinite(torch.tensor(losses[20:])))
    # the checkpoint written at on_train_end reloads with the same logits
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "pruned")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids[:4]).logits, model(input_ids=ids[:4]).logits)


def test_callback_checks_its_arguments_and_warns_when_training_ends_unpruned(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
    ids = torch.randint(1, 50, (8, 8))
    pruner = tp.pruner.GrowingRegPruner(model, {"input_ids": ids[:1]}, tp.importance.MagnitudeImportance(),
                                        pruning_ratio=0.5, ignored_layers=[model.lm_head])
    with pytest.raises(ValueError, match="say when to prune"):
        GrowingRegCallback(pruner)
    with pytest.raises(TypeError, match="GrowingRegPruner"):
        GrowingRegCallback(tp.pruner.BasePruner(model, {"input_ids": ids[:1]}, tp.importance.MagnitudeImportance()),
                           prune_at_step=1)
    callback = GrowingRegCallback(pruner, prune_at_step=100)
    with pytest.warns(UserWarning, match="training ended at step 2 before pruning"):
        run_like_trainer(model, ids, [callback], epochs=1, batch=4)
    assert callback.pruned_step is None
    other = LlamaForCausalLM(model.config)
    with pytest.raises(ValueError, match="not the Trainer's model"):
        run_like_trainer(other, ids, [GrowingRegCallback(pruner, prune_at_step=1)], epochs=1, batch=4)
