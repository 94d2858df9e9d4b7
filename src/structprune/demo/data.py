"""The digits data set (scikit-learn's ``load_digits``): a fixed, seeded 1,400 / 397 split in [0, 1]."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

TRAIN_SIZE = 1400  # the remaining 397 of the 1,797 images are the test set


@dataclass(frozen=True)
class DigitsData:
    """Train and test tensors: images ``[N, 1, 8, 8]`` (float32 in [0, 1]) and labels ``[N]`` (int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0) -> DigitsData:
    """Load the digits and split them with a permutation drawn from ``seed`` (same seed, same split)."""
    from sklearn.datasets import load_digits  # imported here: only the demo and benchmarks need sklearn

    digits = load_digits()
    # pixel values are integers 0..16
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, test = order[:TRAIN_SIZE], order[TRAIN_SIZE:]
    return DigitsData(images[train], labels[train], images[test], labels[test])


def iterate_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``(x, y)``, shuffled with ``generator`` when given, in order otherwise.

    Plain tensor slicing: a DataLoader costs more than the model on 8x8 images.
    """
    count = len(y)
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for start in range(0, count, batch_size):
        idxs = order[start:start + batch_size]
        yield x[idxs], y[idxs]


def num_batches(count: int, batch_size: int) -> int:
    """How many mini-batches :func:`iterate_batches` yields for ``count`` samples."""
    return (count + batch_size - 1) // batch_size
