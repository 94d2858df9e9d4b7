"""Real English text that ships with Python: sentences from the standard library's docstrings.

The sources are parsed (``ast``), never imported, so no module runs (``antigravity``, ``this``); files are
read in sorted order, so a given Python version always yields the same sentences in the same order.
"""
from __future__ import annotations

import ast
import os
import random
import re
import sysconfig
from functools import lru_cache

#: directories of the standard library left out: tests, IDLE, demos, installers and third-party packages
_SKIPPED_DIRS = ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip", "tkinter",
                 "__pycache__", "config-3")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PARAGRAPH = re.compile(r"\n\s*\n")


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith(_SKIPPED_DIRS))
        files.extend(os.path.join(directory, name) for name in sorted(names) if name.endswith(".py"))
    return files


def _docstrings(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [text for node in ast.walk(tree) if isinstance(node, kinds) and (text := ast.get_docstring(node))]


def _is_prose(sentence: str, min_words: int, max_words: int) -> bool:
    words = sentence.split()
    if not min_words <= len(words) <= max_words or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    # code, tables and signatures are mostly punctuation and digits
    return sum(c.isalpha() or c == " " for c in sentence) >= 0.85 * len(sentence)


@lru_cache(maxsize=4)
def stdlib_sentences(limit: int | None = None, min_words: int = 6, max_words: int = 40) -> tuple[str, ...]:
    """Distinct prose sentences of the standard library's docstrings, in file order (deterministic).

    ``limit`` stops once that many are found (only the first files are parsed: fast, less varied).
    About 10,000 sentences on CPython 3.11.
    """
    seen, sentences = set(), []
    for path in _stdlib_files():
        for docstring in _docstrings(path):
            for paragraph in _PARAGRAPH.split(docstring):
                if ">>>" in paragraph or "::" in paragraph:  # doctests and literal blocks
                    continue
                for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
                    key = sentence.lower()
                    if key in seen or not _is_prose(sentence, min_words, max_words):
                        continue
                    seen.add(key)
                    sentences.append(sentence)
                    if limit is not None and len(sentences) >= limit:
                        return tuple(sentences)
    return tuple(sentences)


def split_sentences(sentences, held_out: int, train: int | None = None, seed: int = 0) -> tuple[list, list]:
    """A seeded shuffle cut into (train, held-out): ``held_out`` sentences, then up to ``train`` of the rest."""
    if held_out >= len(sentences):
        raise ValueError(f"asked for {held_out} held-out sentences of only {len(sentences)}")
    order = list(sentences)
    random.Random(seed).shuffle(order)
    rest = order[held_out:]
    return (rest if train is None else rest[:train]), order[:held_out]
