"""Normalizers on small vectors, by hand."""
import math

import pytest
import torch

from structprune.importance import normalizers as N

X = torch.tensor([1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize("name, expected", [
    (None, [1, 2, 3, 4]),
    ("sum", [0.1, 0.2, 0.3, 0.4]),
    ("mean", [0.4, 0.8, 1.2, 1.6]),
    ("max", [0.25, 0.5, 0.75, 1.0]),
    ("standarization", [0, 1 / 3, 2 / 3, 1]),
    ("standardization", [0, 1 / 3, 2 / 3, 1]),
    ("gaussian", [(v - 2.5) / math.sqrt(5 / 3) for v in (1, 2, 3, 4)]),
    ("lamp", [1 / 10, 2 / 9, 3 / 7, 1.0]),
])
def test_normalizers_by_hand(name, expected):
    assert torch.allclose(N.NORMALIZERS[name](X), torch.tensor(expected, dtype=torch.float32), atol=1e-6)


def test_lamp_keeps_input_order():
    out = N.normalize_lamp(torch.tensor([3.0, 1.0, 4.0, 2.0]))
    assert torch.allclose(out, torch.tensor([3 / 7, 1 / 10, 1.0, 2 / 9]))


@pytest.mark.parametrize("name", [None, "sum", "mean", "max", "standarization", "gaussian", "lamp"])
def test_all_zero_scores_stay_finite(name):
    out = N.NORMALIZERS[name](torch.zeros(3))
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros(3))


def test_single_score_gaussian_is_zero():
    assert torch.equal(N.normalize_gaussian(torch.tensor([5.0])), torch.tensor([0.0]))


def test_rows_of_a_stack_normalize_separately():
    out = N.apply_normalizer(N.normalize_max, torch.tensor([[1.0, 2.0], [4.0, 2.0]]))
    assert torch.allclose(out, torch.tensor([[0.5, 1.0], [1.0, 0.5]]))


def test_get_normalizer():
    assert N.get_normalizer("lamp") is N.normalize_lamp
    double = lambda x: 2 * x  # noqa: E731
    assert N.get_normalizer(double) is double
    with pytest.raises(ValueError, match="normalizer"):
        N.get_normalizer("softmax")
