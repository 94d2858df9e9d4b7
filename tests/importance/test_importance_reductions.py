"""Group reductions on small stacks, by hand."""
import pytest
import torch

from structprune.importance import reductions as R

STACK = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 6.0]])
MASK = torch.tensor([[True, True, True], [True, False, True]])


@pytest.mark.parametrize("name, masked, plain", [
    ("sum", [5, 2, 9], [5, 2, 9]),
    ("mean", [2.5, 2, 4.5], [2.5, 1, 4.5]),
    ("max", [4, 2, 6], [4, 2, 6]),
    ("prod", [4, 2, 18], [4, 0, 18]),
    ("first", [1, 2, 3], [1, 2, 3]),
    ("gate", [4, 0, 6], [4, 0, 6]),
])
def test_reductions_by_hand(name, masked, plain):
    fn = R.REDUCTIONS[name]
    assert torch.allclose(fn(STACK, MASK), torch.tensor(masked, dtype=torch.float32))
    assert torch.allclose(fn(STACK), torch.tensor(plain, dtype=torch.float32))


def test_none_keeps_the_stack():
    assert torch.equal(R.REDUCTIONS[None](STACK, MASK), STACK)
    assert R.REDUCTIONS[None](STACK).shape == (2, 3)


@pytest.mark.parametrize("name", ["sum", "mean", "max", "prod", "first", "gate"])
def test_uncovered_channel_scores_zero(name):
    mask = torch.tensor([[True, False], [True, False]])
    out = R.REDUCTIONS[name](torch.tensor([[2.0, 7.0], [3.0, 9.0]]), mask)
    assert out[1] == 0


def test_max_of_negative_scores():
    stack = torch.tensor([[-3.0], [-1.0]])
    assert R.reduce_max(stack).item() == -1.0


def test_scatter_items_adds_repeated_roots():
    stack, mask = R.scatter_items(
        [torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])],
        [torch.tensor([0, 1]), torch.tensor([1, 1, 2])],
        3,
    )
    assert torch.equal(stack, torch.tensor([[1.0, 2.0, 0.0], [0.0, 3.0, 3.0]]))
    assert torch.equal(mask, torch.tensor([[True, True, False], [False, True, True]]))


def test_get_reduction():
    assert R.get_reduction("sum") is R.reduce_sum
    assert R.get_reduction(None) is R.reduce_none
    custom = lambda stack, mask: stack[0]  # noqa: E731
    assert R.get_reduction(custom) is custom
    with pytest.raises(ValueError, match="group_reduction"):
        R.get_reduction("median")
