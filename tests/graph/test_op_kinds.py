"""Op kinds are registered with the op names they handle and their index map."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structprune as tp
from structprune.graph import ops
from structprune.graph.channels import ChannelState


class Mixed(nn.Module):
    def __init__(self, kv_heads=2):
        super().__init__()
        self.q = nn.Linear(8, 16)
        self.k = nn.Linear(8, 4 * kv_heads)
        self.v = nn.Linear(8, 4 * kv_heads)
        self.kv_heads = kv_heads

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, 4).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, 4).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.kv_heads != 4)
        return torch.relu(torch.cat([y, y], dim=-1)).sum(-1) * 2.0


def kinds(model):
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 8))
    return {call.name: ops.kind_of(call).name for call in graph.calls if call.kind == "function"}


def test_each_traced_op_gets_the_kind_registered_for_its_name():
    found = kinds(Mixed(kv_heads=2))
    assert found["view"] == found["transpose"] == found["cat"] == "movement"
    assert found["scaled_dot_product_attention"] == "grouped-query attention"
    assert found["sum"] == "reduction"
    assert found["relu"] == found["mul"] == "elementwise"
    # the same op name without grouped-query heads is a plain contraction
    assert kinds(Mixed(kv_heads=4))["scaled_dot_product_attention"] == "matmul"


def test_registry_lists_each_kind_with_its_names_and_index_map():
    by_name = {kind.name: kind for kind in ops.OP_KINDS}
    assert by_name["movement"].op_names == frozenset(ops.MOVEMENT)
    assert by_name["matmul"].contracts and by_name["reduction"].contracts and not by_name["movement"].contracts
    assert by_name["movement"].index_map is ops._movement
    assert [k.name for k in ops.OP_KINDS if not k.op_names] == ["elementwise", "same size"]


def test_a_new_kind_is_one_decorated_index_map():
    seen = []

    @ops.op_kind("test: reversal", {"structprune_test_reverse"})
    def _reverse(call, operand, state):
        seen.append(operand)
        width = call.in_shapes[0][-1]
        return [(1 - operand, ChannelState(state.dims, width - 1 - state.idxs, state.roots))]

    call = tp.graph.trace.Call("function", None, "structprune_test_reverse", [0], [(2, 5)], [1], [(2, 5)])
    mapped = ops.relate(call, 0, ChannelState((1,), torch.tensor([0, 3]), torch.tensor([0, 3])))
    assert seen == [0] and mapped[0][0] == 1 and mapped[0][1].idxs.tolist() == [1, 4]
    assert ops.kind_of(call).name == "test: reversal"


def recorded(fn, *shapes):
    """The call ``fn`` makes on fresh tensors of ``shapes``, as the tracer records it."""
    tracer = tp.graph.trace.Tracer(lambda module: False)
    tensors = [torch.randn(shape, requires_grad=True) for shape in shapes]
    tracer.run(nn.Module(), lambda: fn(*tensors))
    (call,) = {id(c): c for c in tracer.function_by_output.values()}.values()
    return call


def mapped(call, operand, dims, idxs):
    state = ChannelState(tuple(dims), torch.tensor(idxs), torch.tensor(idxs))
    return {other: (s.dims, s.idxs.tolist()) for other, s in ops.relate(call, operand, state)}


def test_each_kind_maps_channel_indices_on_its_own():
    # movement, concat fast path: the second piece's channels sit after the first piece's
    assert mapped(recorded(lambda a, b: torch.cat([a, b], 1), (1, 3, 2), (1, 4, 2)), 1, [1], [0, 2]) == {2: ((1,), [3, 5])}
    # movement, replayed on labels: a transpose moves the channel dim
    assert mapped(recorded(lambda a: a.transpose(1, 2), (1, 3, 5)), 0, [1], [2]) == {1: ((2,), [2])}
    # reduction over another dim keeps the channels; over the channel dim they are contracted away
    assert mapped(recorded(lambda a: a.sum(2), (1, 3, 5)), 0, [1], [1]) == {1: ((1,), [1])}
    assert mapped(recorded(lambda a: a.sum(1), (1, 3, 5)), 0, [1], [1]) == {}
    # matmul letters: F.linear's output features are the weight's rows
    assert mapped(recorded(lambda x, w: F.linear(x, w), (2, 4), (6, 4)), 1, [0], [5]) == {2: ((1,), [5])}
    # elementwise with a broadcast operand: a per-channel scale follows the channel dim it shares
    assert mapped(recorded(lambda x, s: x * s, (1, 3, 4, 4), (3, 1, 1)), 0, [1], [2]) == {1: ((0,), [2]), 2: ((1,), [2])}
    # same-size fallback: pooling keeps the dims whose size it does not change
    assert mapped(recorded(lambda x: F.max_pool2d(x, 2), (1, 3, 4, 4)), 0, [1], [0]) == {1: ((1,), [0])}


def test_grouped_query_kind_removes_a_key_head_only_with_every_query_head_it_serves():
    call = recorded(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                    (1, 4, 3, 2), (1, 2, 3, 2), (1, 2, 3, 2))
    assert ops.kind_of(call).name == "grouped-query attention"
    # key head 1 serves query heads 2 and 3: its channels (dim 1 of k) reach q's heads 2, 3 and v's head 1
    found = mapped(call, 1, [1], [1])
    assert found[0] == ((1,), [2, 3]) and found[2] == ((1,), [1])
    # query head 2 alone cannot free key head 1 (query head 3 still reads it) and leaves uneven groups
    with pytest.raises(tp.graph.Blocked, match="grouped-query attention"):
        mapped(call, 0, [1], [2])


def test_grid_sample_ties_each_sample_of_the_grid_to_the_values_it_samples():
    # deformable attention folds heads into N: input (N, C, H, W), grid (N, Hout, Wout, 2) -> (N, C, Hout, Wout)
    call = recorded(lambda x, grid: F.grid_sample(x, grid, align_corners=False), (6, 4, 5, 5), (6, 3, 2, 2))
    assert ops.kind_of(call).name == "grid sample"
    # a sample of N (a head's offsets) goes with that sample's values and output
    assert mapped(call, 1, [0], [2]) == {0: ((0,), [2]), 2: ((0,), [2])}
    # value channels reach the output only; the grid does not read them
    assert mapped(call, 0, [1], [3]) == {2: ((1,), [3])}
    assert mapped(call, 2, [1], [3]) == {0: ((1,), [3])}
    # a sample's x and y offsets go together with it
    assert mapped(call, 1, [0, 3], [4, 5]) == {0: ((0,), [2]), 2: ((0,), [2])}
    # one coordinate of the grid, or a spatial position of the input, is no channel anything else holds
    with pytest.raises(tp.graph.Blocked, match="grid_sample"):
        mapped(call, 1, [3], [0])
    with pytest.raises(tp.graph.Blocked, match="grid_sample"):
        mapped(call, 0, [2], [0])
