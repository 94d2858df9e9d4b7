"""Distillation from the unpruned model on its top-k logits, for recovery and for growing regularization.

A language model's full logits are large (Gemma 3: 262k per token) and a teacher forward per training step
doubles the cost of every step. The teacher's ``k`` largest logits at each position carry nearly all of its
distribution; computed once over a fixed pool of sequences, they make the teacher free during training, and
the student needs only those ``k`` logits per position too (rows of its output embedding times its last
hidden state), never the full vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TopKTeacher:
    """The teacher's top-``k`` logits (values, token ids) at every position of ``sequences`` [N, T].

    ``batch(step, size)`` cycles through the pool: step ``s`` gets rows ``s * size ... (s + 1) * size - 1``
    modulo ``N``, so any number of steps can run on a small pool. The teacher runs once, in eval mode, under
    ``no_grad``; its outputs are kept on the CPU in ``dtype`` (half the memory of float32 by default).
    """

    def __init__(self, teacher: nn.Module, sequences: torch.Tensor, k: int = 64, batch_size: int = 4,
                 dtype: torch.dtype = torch.bfloat16):
        if sequences.dim() != 2 or sequences.shape[0] == 0:
            raise ValueError(f"TopKTeacher needs token ids shaped [sequences, tokens], got {tuple(sequences.shape)}")
        if k < 1:
            raise ValueError(f"TopKTeacher needs k >= 1, got k={k}")
        self.sequences = sequences.cpu()
        device = next(teacher.parameters()).device
        values, indices = [], []
        was_training = teacher.training
        teacher.eval()
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                logits = _logits(teacher(input_ids=sequences[start:start + batch_size].to(device)))
                if k > logits.shape[-1]:
                    raise ValueError(f"TopKTeacher: k={k} exceeds the vocabulary ({logits.shape[-1]} logits)")
                top = logits.topk(k, dim=-1)
                values.append(top.values.to("cpu", dtype))
                indices.append(top.indices.cpu())
        teacher.train(was_training)
        self.values, self.indices = torch.cat(values), torch.cat(indices)

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, step: int, size: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids [B, T], teacher top-k values [B, T, k], their token ids [B, T, k]) of training step ``step``."""
        rows = torch.arange(step * size, (step + 1) * size) % len(self.sequences)
        return tuple(t[rows].to(device) if device is not None else t[rows]
                     for t in (self.sequences, self.values, self.indices))


def student_topk_logits(model: nn.Module, input_ids: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The student's logits at the teacher's top-k token ids only, [B, T, k].

    For a Hugging Face causal LM (``get_output_embeddings()`` and ``base_model``) this is the last hidden state
    times the chosen rows of the output embedding, plus their bias: the full vocabulary is never formed. Final
    logit soft-capping (Gemma 2's ``final_logit_softcapping``) is applied when the config sets it. Other models
    give their full logits, gathered.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if isinstance(head, nn.Linear) and base is not None and base is not model:
        hidden = base(input_ids=input_ids).last_hidden_state
        logits = torch.einsum("bth,btkh->btk", hidden, head.weight[indices])
        if head.bias is not None:
            logits = logits + head.bias[indices]
        cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
    return _logits(model(input_ids=input_ids)).gather(-1, indices)


def topk_kl(student_logits: torch.Tensor, teacher_values: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, both distributions renormalised over the same top-k tokens."""
    teacher = torch.log_softmax(teacher_values.float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    tokens = student_logits.shape[0] * student_logits.shape[1]
    return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="sum") / tokens


def distillation_loss(model: nn.Module, teacher: TopKTeacher, step: int, batch_size: int) -> torch.Tensor:
    """The top-k KL of training step ``step`` (see :class:`TopKTeacher` for which sequences it uses)."""
    device = next(model.parameters()).device
    ids, values, indices = teacher.batch(step, batch_size, device)
    return topk_kl(student_topk_logits(model, ids, indices), values)


def _logits(output) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError(
            f"distillation needs the model to return logits [batch, tokens, vocab] (a tensor or an output with "
            f".logits), got {type(output).__name__}"
        )
    return logits
