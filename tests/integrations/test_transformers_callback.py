"""GrowingRegCallback inside the real ``transformers.Trainer``: a tiny Llama trained on standard-library
docstrings through regularize -> prune -> fine-tune, with the Trainer's own accelerate-wrapped optimizer,
its LR scheduler, gradient clipping and gradient accumulation."""
import inspect
import math
import re
import types

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import structprune as tp
from structprune.layers.slicing_log import replay
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


def llama(vocab: int, hidden: int = 64, intermediate: int = 128, layers: int = 2, head_dim: int | None = None):
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                        head_dim=head_dim, max_position_embeddings=LENGTH))


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def trainer_for(model, ids, callbacks, tmp_path, epochs: int, batch: int, accumulation: int = 1) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                             per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                             num_train_epochs=epochs, learning_rate=3e-3, max_grad_norm=1.0,
                             dataloader_num_workers=0, seed=0, logging_steps=1, logging_nan_inf_filter=False,
                             disable_tqdm=True)
    data = [{"input_ids": row, "labels": row} for row in ids]
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


class GradProbe(TrainerCallback):
    """Copies a parameter's gradient in ``on_pre_optimizer_step``: one probe before GrowingRegCallback and
    one after it see the gradient without and with the penalty, the latter being what optimizer.step() uses."""

    def __init__(self, parameter, steps):
        self.parameter, self.steps, self.grads = parameter, steps, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self.grads[state.global_step] = self.parameter.grad.detach().clone()


class BeforeReg(GradProbe):
    pass


class AfterReg(GradProbe):
    pass  # a second class: Trainer warns when a callback class is added twice


class Snapshot(TrainerCallback):
    """Weights and Adam moments in ``on_step_end`` of one step: one instance before GrowingRegCallback and one
    after it see them as pruning found and left them, before the next optimizer step."""

    def __init__(self, step):
        self.step, self.taken = step, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.step:
            inner = unwrap_optimizer(optimizer)
            self.taken = {name: (p.detach().clone(), inner.state[p]["exp_avg"].clone(),
                                 inner.state[p]["exp_avg_sq"].clone()) for name, p in model.named_parameters()}


class BeforePruning(Snapshot):
    pass


class AfterPruning(Snapshot):
    pass


def test_trainer_regularizes_prunes_fine_tunes_and_saves(tmp_path):
    torch.manual_seed(0)
    ids, vocab = encode(docstring_sentences())
    model = llama(vocab)
    params_before = count(model)
    reg, delta = 1e-3, 5e-2
    pruner = tp.pruner.GrowingRegPruner(model, {"input_ids": ids[:1]}, tp.importance.MagnitudeImportance(),
                                        reg=reg, delta_reg=delta, pruning_ratio=0.5, prune_head_dims=False,
                                        ignored_layers=[model.lm_head], rescale_norms=False)
    # rescale_norms=False: the weights after pruning are then exactly the kept slices of the weights before,
    # which is what the optimizer-state checks below compare (norm rescaling: tests/pruner/test_norm_scale.py)
    callback = GrowingRegCallback(pruner, prune_at_step=20, save_dir=str(tmp_path / "pruned"))
    gate = model.model.layers[0].mlp.gate_proj
    before, after = BeforeReg(gate.weight, (0, 10)), AfterReg(gate.weight, (0, 10))
    before_pruning, after_pruning = BeforePruning(20), AfterPruning(20)
    weights_at = {}

    class Weights(TrainerCallback):  # gate_proj's weight when the penalty is added at steps 0 and 10
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            weights_at[state.global_step] = gate.weight.detach().clone()

    stepped = {}

    class OptimizerSees(TrainerCallback):  # the gradient the torch optimizer inside accelerate's wrapper steps with
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            def record(inner, *_):
                stepped.setdefault(len(stepped), gate.weight.grad.detach().clone())
            unwrap_optimizer(optimizer).register_step_pre_hook(record)

    trainer = trainer_for(model, ids, [before, before_pruning, callback, after, Weights(), after_pruning,
                                         OptimizerSees()],
                          tmp_path, epochs=3, batch=32)
    trainer.train()

    # the gradient optimizer.step() used carries the penalty: gate_proj's output channels (its MLP group)
    # and input channels (the hidden-size group) each add their coefficient, at least reg, up to reg + delta
    # after one update_reg (epoch 0) and up to reg + 2 * delta after two (epoch 1 starts at step 10)
    assert len(stepped) == 30
    for step in (0, 10):
        assert torch.equal(stepped[step], after.grads[step]) and not torch.equal(stepped[step], before.grads[step])
    gammas = [(after.grads[s] - before.grads[s]) / weights_at[s] for s in (0, 10)]
    for gamma in gammas:
        assert torch.allclose(gamma, gamma[:, :1] + gamma[:1, :] - gamma[0, 0], rtol=1e-3, atol=1e-5)
    assert gammas[0].min() >= 2 * reg * 0.999 and gammas[0].max() <= 2 * (reg + delta) * 1.001
    assert gammas[0].max() > 2 * reg + 0.5 * delta
    assert gammas[1].max() > 2 * reg + 1.5 * delta and gammas[1].max() <= 2 * (reg + 2 * delta) * 1.001

    # pruned at step 20 to exactly the model its new config describes
    assert callback.pruned_step == 20 and trainer.state.global_step == 30
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 64
    assert model.config.num_attention_heads == 4 and model.config.head_dim == 16  # heads keep their width
    expected = llama(vocab, hidden=32, intermediate=64, head_dim=16)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in expected.state_dict().items()}
    assert callback.params_before == params_before and callback.params_after == count(model) == count(expected)
    assert count(model) < 0.6 * params_before

    # the callback sliced the Trainer's optimizer when it pruned: the moments left are those of the kept
    # channels (the slices that turn the old weights into the kept ones turn the old moments into these)
    for name, parameter in model.named_parameters():
        old_weight, old_avg, old_avg_sq = before_pruning.taken[name]
        weight, avg, avg_sq = after_pruning.taken[name]
        assert torch.equal(replay(old_weight, parameter), weight), name
        assert avg.shape == avg_sq.shape == weight.shape, f"{name}: moments not sliced when pruned"
        assert torch.equal(avg, replay(old_avg, parameter)) and torch.equal(avg_sq, replay(old_avg_sq, parameter))
    # the Trainer's accelerate-wrapped optimizer and its LR schedule went on training the pruned parameters
    assert isinstance(trainer.optimizer, AcceleratedOptimizer)
    inner = unwrap_optimizer(trainer.optimizer)
    assert unwrap_optimizer(trainer.lr_scheduler.optimizer) is inner
    held = {id(p) for group in inner.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        assert id(parameter) in held, name
        state = inner.state[parameter]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == parameter.shape, name
        assert int(state["step"]) == 30, name
        assert not torch.equal(after_pruning.taken[name][0], parameter.detach()), f"{name} stopped training"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 30 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < losses[20]  # fine-tuning recovers from the cut

    # the checkpoint written at on_train_end reloads with the same logits
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "pruned")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids[:4]).logits, model(input_ids=ids[:4]).logits)


def test_step_schedule_gradient_accumulation_and_prune_when_ready(tmp_path):
    torch.manual_seed(1)
    ids, vocab = encode(docstring_sentences(64))
    model = llama(vocab, layers=1)
    pruner = tp.pruner.GrowingRegPruner(model, {"input_ids": ids[:1]}, tp.importance.MagnitudeImportance(),
                                        reg=0.01, delta_reg=0.1, schedule="greg2", reg_ceiling=0.3,
                                        pruning_ratio=0.5, prune_head_dims=False, ignored_layers=[model.lm_head])
    # reg grows at optimizer steps 0, 2 and 4 (0.11, 0.21, then the 0.3 ceiling): ready after step 4 ends
    callback = GrowingRegCallback(pruner, update_every="step", update_interval=2, prune_when_ready=True)
    gate = model.model.layers[0].mlp.gate_proj
    before, after = BeforeReg(gate.weight, (0, 2)), AfterReg(gate.weight, (0, 2))
    seen = []

    class Regs(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append((state.global_step, round(max(float(r.max()) for r in pruner.group_reg.values()), 6)))

    weights_at = {}

    class Weights(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            weights_at[state.global_step] = gate.weight.detach().clone()

    # 64 sentences, 8 a micro-batch, 2 micro-batches an optimizer step: 4 steps an epoch, 8 in all
    trainer = trainer_for(model, ids, [before, callback, after, Regs(), Weights()], tmp_path, epochs=2, batch=8,
                          accumulation=2)
    trainer.train()

    # update_reg runs once per optimizer step (not per micro-batch), every second one, until pruning
    assert [s for s, _ in seen] == list(range(8))
    assert [r for _, r in seen[:6]] == [0.11, 0.11, 0.21, 0.21, 0.3, 0.3]
    # the penalty is added once per optimizer step, to the accumulated gradient: gate_proj's in and out
    # channels both carry the uniform greg2 coefficient
    for step, coefficient in ((0, 0.11), (2, 0.21)):
        torch.testing.assert_close(after.grads[step] - before.grads[step], 2 * coefficient * weights_at[step],
                                   rtol=1e-4, atol=1e-7)
    assert callback.pruned_step == 5 and trainer.state.global_step == 8
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 64
    assert callback.params_after == count(model) < callback.params_before
    inner = unwrap_optimizer(trainer.optimizer)
    for name, parameter in model.named_parameters():
        assert inner.state[parameter]["exp_avg"].shape == parameter.shape, name
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)


def test_callback_checks_its_arguments_and_warns_when_training_ends_unpruned(tmp_path):
    torch.manual_seed(0)
    ids, vocab = encode(docstring_sentences(8))
    model = llama(vocab, hidden=32, intermediate=64, layers=1)
    pruner = tp.pruner.GrowingRegPruner(model, {"input_ids": ids[:1]}, tp.importance.MagnitudeImportance(),
                                        pruning_ratio=0.5, ignored_layers=[model.lm_head])
    with pytest.raises(ValueError, match="say when to prune"):
        GrowingRegCallback(pruner)
    with pytest.raises(TypeError, match="GrowingRegPruner"):
        GrowingRegCallback(tp.pruner.BasePruner(model, {"input_ids": ids[:1]}, tp.importance.MagnitudeImportance()),
                           prune_at_step=1)
    with pytest.raises(ValueError, match="update_every must be one of"):
        GrowingRegCallback(pruner, update_every="batch", prune_at_step=1)
    callback = GrowingRegCallback(pruner, prune_at_step=100)
    with pytest.warns(UserWarning, match="training ended at step 2 before pruning"):
        trainer_for(model, ids, [callback], tmp_path, epochs=1, batch=4).train()
    assert callback.pruned_step is None
    other = llama(vocab, hidden=32, intermediate=64, layers=1)
    with pytest.raises(ValueError, match="not the Trainer's model"):
        trainer_for(other, ids, [GrowingRegCallback(pruner, prune_at_step=1)], tmp_path, epochs=1, batch=4).train()
    distributed = types.SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="one process"):
        GrowingRegCallback(pruner, prune_at_step=1).on_train_begin(distributed, None, None, model=model)
