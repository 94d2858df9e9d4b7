"""Channel semantics the dependency graph must get right, each pinned by the lossless-removal oracle."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structprune as tp
from oracle import assert_lossless

torch.manual_seed(0)


def targets(group):
    return {(item.dep.target.name, item.dep.handler.__name__): item.idxs for item in group}


class Residual(nn.Module):
    def __init__(self, op="add"):
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x) + self.b(x) if self.op == "add" else self.a(x) * self.b(x)
        y = F.relu(self.bn(y)) * self.scale
        return self.head(F.dropout(F.max_pool2d(F.interpolate(y, scale_factor=2), 2), 0.0))


@pytest.mark.parametrize("op", ["add", "mul"])
def test_residual_and_broadcast_parameter(op):
    model = Residual(op)
    x = torch.randn(2, 3, 8, 8)
    group = assert_lossless(model, x, model.a, [1, 4, 6])
    t = targets(group)
    assert t[("a", "prune_out_channels")] == [1, 4, 6]
    assert t[("b", "prune_out_channels")] == [1, 4, 6]
    assert t[("bn", "prune_out_channels")] == [1, 4, 6]
    assert t[("scale", "prune_out_channels")] == [1, 4, 6]
    assert t[("head", "prune_in_channels")] == [1, 4, 6]
    assert model.scale.shape == (5, 1, 1) and model.a.out_channels == 5 and model.head.in_channels == 5


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(3, 5, 1)
        self.mid = nn.Conv2d(10, 10, 1)
        self.out = nn.Conv2d(15 + 8, 2, 1)
        self.side = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        ab = torch.cat([self.a(x), self.b(x)], dim=1)  # 10
        abc = torch.cat([self.mid(ab), self.c(x)], 1)  # cascaded: 15
        twice = torch.cat([self.a(x), self.a(x)], dim=1)  # the same tensor twice: 8
        spatial = torch.cat([self.side(x), self.side(x)], dim=2)  # non-channel axis
        return self.out(torch.cat([abc, twice], 1)), spatial


def test_concat_offsets_cascade_and_duplicates():
    model = Concat()
    x = torch.randn(1, 3, 5, 5)
    group = assert_lossless(model, x, model.b, [0, 5])
    assert targets(group)[("mid", "prune_in_channels")] == [4, 9]
    group = assert_lossless(model, x, model.c, [2])
    assert targets(group)[("out", "prune_in_channels")] == [12]
    group = assert_lossless(model, x, model.a, [1])
    t = targets(group)
    assert t[("mid", "prune_in_channels")] == [1]
    # abc is now 10 (mid) + 4 (c after pruning) = 14 wide; the duplicated block sits at 14..17 and 18..21
    assert t[("out", "prune_in_channels")] == [15, 19]


def test_concat_on_non_channel_axis_couples_nothing_extra():
    model = Concat()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 5, 5))
    group = graph.get_pruning_group(model.side, tp.prune_conv_out_channels, [0])
    # side feeds a model output directly: its channels are the output's
    assert group.blocked
    names = {item.dep.target.name for item in group}
    assert names == {"side"}


class Split(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 12, 1)
        self.left = nn.Conv2d(4, 2, 1)
        self.right = nn.Conv2d(8, 2, 1)
        self.merge = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        # split sizes follow the consumers, as real code does, so the pruned model still splits right
        n = self.left.in_channels
        if self.how == "split":
            a, b = torch.split(y, [n, self.right.in_channels], dim=1)
        elif self.how == "narrow":
            a, b = y.narrow(1, 0, n), y.narrow(1, n, self.right.in_channels)
        else:
            a, b = y[:, :n], y[:, n:]
        return self.left(a) + self.right(b) + self.merge(torch.cat([b, a], 1))


@pytest.mark.parametrize("how", ["split", "narrow", "slice"])
def test_split_then_concat(how):
    model = Split(how)
    group = assert_lossless(model, torch.randn(1, 3, 4, 4), model.conv, [1, 6])
    t = targets(group)
    assert t[("left", "prune_in_channels")] == [1]
    assert t[("right", "prune_in_channels")] == [2]
    assert t[("merge", "prune_in_channels")] == [2, 9]


def test_chunk_and_unbind():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.a = nn.Conv2d(4, 2, 1)
            self.b = nn.Conv2d(4, 2, 1)
            self.lin = nn.Linear(4, 3)
            self.proj = nn.Linear(2, 6)

        def forward(self, x):
            a, b = self.conv(x).chunk(2, dim=1)
            t = self.proj(x.mean((2, 3))[:, :2]).view(-1, 3, 2)  # [B, 3, 2]
            u0, u1, u2 = t.unbind(1)
            return self.a(a) + self.b(b), self.lin(torch.cat([u0, u2], -1)) + u1.sum()

    model = M()
    group = assert_lossless(model, torch.randn(2, 3, 4, 4), model.conv, [0, 5])
    t = targets(group)
    assert t[("a", "prune_in_channels")] == [0] and t[("b", "prune_in_channels")] == [1]


class FlattenNet(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(self.conv(x), 3)
        if self.how == "flatten":
            y = torch.flatten(y, 1)
        elif self.how == "view":
            y = y.view(y.size(0), -1)
        else:
            y = y.reshape(y.shape[0], -1)
        return self.fc(y)


@pytest.mark.parametrize("how", ["flatten", "view", "reshape"])
def test_flatten_maps_each_channel_to_hw_inputs(how):
    model = FlattenNet(how)
    group = assert_lossless(model, torch.randn(2, 3, 6, 6), model.conv, [1, 3])
    assert targets(group)[("fc", "prune_in_channels")] == list(range(9, 18)) + list(range(27, 36))
    assert model.fc.in_features == 18


def test_permute_channels_last_and_tokens():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 8)
            self.back = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.conv(x).permute(0, 2, 3, 1)  # channels last
            y = self.fc(y).permute(0, 3, 1, 2)
            tokens = self.conv(x).flatten(2).transpose(1, 2)  # [B, N, C]
            return self.back(y), self.norm(tokens)

    model = M()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 4, 4))
    t = targets(graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [2, 3]))
    assert t[("fc", "prune_in_channels")] == [2, 3]
    assert t[("norm", "prune_out_channels")] == [2, 3]
    # LayerNorm output is a model output: blocked, but the fc chain alone is lossless
    group = assert_lossless(model, torch.randn(1, 3, 4, 4), model.fc, [0, 7])
    assert targets(group)[("back", "prune_in_channels")] == [0, 7]


def test_shared_layer_and_unwrapped_parameters():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 8)
            self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
            self.pos = nn.Parameter(torch.randn(1, 4, 8))
            self.shared = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            t = self.embed(x)
            t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], 1) + self.pos
            t = self.shared(self.shared(t))  # weight sharing: its out == its in
            return self.head(t[:, 0])

    model = M()
    x = torch.randn(2, 3, 6)
    graph = tp.DependencyGraph().build_dependency(model, x)
    t = targets(graph.get_pruning_group(model.embed, tp.prune_linear_out_channels, [1]))
    assert t[("cls_token", "prune_out_channels")] == [1] and t[("pos", "prune_out_channels")] == [1]
    assert ("shared", "prune_out_channels") in t and ("shared", "prune_in_channels") in t
    assert_lossless(model, x, model.embed, [1, 5])
    assert model.cls_token.shape == (1, 1, 6) and model.pos.shape == (1, 4, 6)


def test_unwrapped_parameter_dim_override():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.gamma = nn.Parameter(torch.ones(6))
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.fc(x) * self.gamma)

    model = M()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(2, 4), unwrapped_parameters=[(model.gamma, 0)])
    assert graph.module2node[model.gamma].pruning_dim == 0
    graph.get_pruning_group(model.fc, tp.prune_linear_out_channels, [0, 1]).prune()
    assert model.gamma.shape == (4,) and model(torch.randn(2, 4)).shape == (2, 2)


class ConvPositionEmbedding(nn.Module):
    """Visformer's stem: a (1, C, H, W) position embedding added to a conv's output, used bare."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 8, 4, 4))
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.conv(x) + self.pos)


def test_a_bare_parameter_takes_the_dim_channels_first_arrive_on():
    """Its dim is only guessed (the last, for token layouts) until a group reaches it: channels arrive on
    dim 1 here, and pruning along it is lossless. Before, the group was refused (dim 3 guessed)."""
    torch.manual_seed(0)
    model = ConvPositionEmbedding()
    x = torch.randn(1, 3, 4, 4)
    group = assert_lossless(model, x, model.conv, [0, 5])
    assert targets(group)[("pos", "prune_out_channels")] == [0, 5]
    assert model.pos.shape == (1, 6, 4, 4)


def test_an_explicit_unwrapped_dim_is_kept_and_a_mismatch_refused():
    model = ConvPositionEmbedding()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 4, 4),
                                                  unwrapped_parameters=[(model.pos, 3)])
    group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [0])
    assert [reason.kind for reason in group.blocked] == [tp.graph.refusal.RefusalKind.DIM_MISMATCH]
    assert "pos (1, 8, 4, 4) is pruned along dim 3 but channels arrive on dim 1" in str(group.blocked[0])


class GQAProjections(nn.Module):
    """q of 4 heads x 4, k and v of 2 key/value heads x 4, o back to 16: forwards differ per test."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 8)
        self.v = nn.Linear(16, 8)
        self.o = nn.Linear(16, 16)


def assert_kv_head_one_takes_q_heads_two_and_three(graph, model):
    t = targets(graph.get_pruning_group(model.k, tp.prune_linear_out_channels, [4, 5, 6, 7]))
    assert t[("q", "prune_out_channels")] == list(range(8, 16))
    assert t[("v", "prune_out_channels")] == [4, 5, 6, 7]
    assert t[("o", "prune_in_channels")] == list(range(8, 16))


def test_repeat_kv_expand_on_head_axis():
    class GQA(GQAProjections):
        def forward(self, x):
            b, n, _ = x.shape
            q = self.q(x).view(b, n, 4, 4).transpose(1, 2)
            k = self.k(x).view(b, n, 2, 4).transpose(1, 2)
            v = self.v(x).view(b, n, 2, 4).transpose(1, 2)
            k = k[:, :, None].expand(b, 2, 2, n, 4).reshape(b, 4, n, 4)
            v = v.repeat_interleave(2, dim=1)
            att = F.scaled_dot_product_attention(q, k, v)
            return self.o(att.transpose(1, 2).reshape(b, n, 16))

    model = GQA()
    x = torch.randn(1, 5, 16)
    graph = tp.DependencyGraph().build_dependency(model, x)
    # removing kv head 1 removes k, v rows 4..7, q heads 2 and 3 and their o columns
    assert_kv_head_one_takes_q_heads_two_and_three(graph, model)
    # head dim 1 of every k head couples with dim 1 of every q head, not with v
    t = targets(graph.get_pruning_group(model.k, tp.prune_linear_out_channels, [1, 5]))
    assert t[("q", "prune_out_channels")] == [1, 5, 9, 13]
    assert ("v", "prune_out_channels") not in t


def test_matmul_couples_q_k_and_v_with_output_projection():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, 2, -1).permute(2, 0, 3, 1, 4)  # 2 heads, dim follows
            att = (q @ k.transpose(-2, -1)).softmax(-1)
            return self.proj((att @ v).transpose(1, 2).reshape(b, n, -1))

    model = Attn()
    x = torch.randn(1, 3, 8)
    graph = tp.DependencyGraph().build_dependency(model, x)
    # q/k/v rows are one grid [3, heads, dim]: v's dim 0 alone would leave q, k and v with unequal heads
    assert graph.get_pruning_group(model.qkv, tp.prune_linear_out_channels, [16, 20]).blocked
    # dim 1 of every head of q, k and v: proj loses input columns 1 and 5
    group = assert_lossless(model, x, model.qkv, [1, 5, 9, 13, 17, 21], producers=True)
    t = targets(group)
    assert t[("qkv", "prune_out_channels")] == [1, 5, 9, 13, 17, 21] and t[("proj", "prune_in_channels")] == [1, 5]
    # a whole head (head 1 of q, k and v; rows are now [3, 2, 3]) maps to its proj columns, but the reshape
    # spells out 2 heads, so removing one would silently regroup the rest: refused
    graph = tp.DependencyGraph().build_dependency(model, x)
    group = graph.get_pruning_group(model.qkv, tp.prune_linear_out_channels, [3, 4, 5, 9, 10, 11, 15, 16, 17])
    assert targets(group)[("proj", "prune_in_channels")] == [3, 4, 5]
    assert any("spells out the size" in reason for reason in group.blocked)


def test_channel_shuffle():
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.next = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            b, c, h, w = y.shape
            y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
            return self.next(y)

    model = Shuffle()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 3, 3))
    # the view re-splits channels into 2 groups at run time: removing different local channels from each
    # group would scramble the shuffle, so that is refused
    assert graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [0, 5]).blocked
    # the same local channel of both groups is fine: channel g*4+i moves to i*2+g
    group = assert_lossless(model, torch.randn(1, 3, 3, 3), model.conv, [1, 5])
    assert targets(group)[("next", "prune_in_channels")] == [2, 3]


def test_tracing_under_no_grad_is_refused():
    model = nn.Linear(3, 2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
        tp.DependencyGraph().build_dependency(model, torch.randn(1, 3))


def test_no_parameter_reaching_output_is_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return x * 2

    with pytest.raises(RuntimeError, match="no parameter"):
        tp.DependencyGraph().build_dependency(M(), torch.randn(1, 3))


def test_inputs_as_dict_and_outputs_as_dict():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x, scale=1.0):
            return {"logits": self.b(self.a(x) * scale), "aux": [self.a(x).sum()]}

    model = M()
    graph = tp.DependencyGraph().build_dependency(model, {"x": torch.randn(2, 3), "scale": 2.0})
    t = targets(graph.get_pruning_group(model.a, tp.prune_linear_out_channels, [0]))
    assert t[("b", "prune_in_channels")] == [0]


def test_grouped_query_sdpa_with_enable_gqa():
    class GQA(GQAProjections):
        def forward(self, x):
            b, n, _ = x.shape
            q = self.q(x).view(b, n, -1, 4).transpose(1, 2)
            k = self.k(x).view(b, n, -1, 4).transpose(1, 2)
            v = self.v(x).view(b, n, -1, 4).transpose(1, 2)
            att = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return self.o(att.transpose(1, 2).reshape(b, n, -1))

    model = GQA()
    x = torch.randn(1, 5, 16)
    graph = tp.DependencyGraph().build_dependency(model, x)
    assert_kv_head_one_takes_q_heads_two_and_three(graph, model)
    # one q head alone cannot go: its kv head still serves the other q head of the pair
    assert graph.get_pruning_group(model.q, tp.prune_linear_out_channels, [8, 9, 10, 11]).blocked
    assert_lossless(model, x, model.k, [4, 5, 6, 7], producers=True)


def test_channels_reached_as_whole_heads_still_get_their_own_group():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.o = nn.Linear(8, 8)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (layer(x).view(b, t, 2, -1).transpose(1, 2) for layer in (self.q, self.k, self.v))
            return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)) + x

    model = Attn()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 8))
    roots = {group[0].dep.target.name for group in graph.get_all_groups(include_blocked=True)}
    # k is q's one-to-one partner (covered); v appears in q's group only as whole heads, so it roots its own
    assert "q" in roots and "v" in roots and "k" not in roots


class SpaceToDepth(nn.Module):
    """Swin's patch merging: 2x2 neighbourhoods folded into channels after padding odd sizes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 2, stride=2)
        self.reduce = nn.Linear(24, 5)

    def forward(self, x):
        y = self.embed(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        # Swin's window path: pad, work on the padded tensor, crop back, add to the stream
        y = y + F.pad(y, (0, 0, 0, 1, 0, 1)).roll((1, 1), dims=(1, 2))[:, :3, :3] * 2
        y = F.pad(y, (0, 0, 0, 1, 0, 1))  # odd sizes padded to even before merging
        b, h, w, c = y.shape
        y = y.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduce(y)


def test_space_to_depth_removes_each_channel_from_every_folded_position():
    model = SpaceToDepth()
    x = torch.randn(2, 3, 6, 6)
    group = assert_lossless(model, x, model.embed, [1, 4])
    t = targets(group)
    # channel c sits at c, 6 + c, 12 + c, 18 + c of the folded 24 (four 2x2 positions)
    assert t[("reduce", "prune_in_channels")] == [1, 4, 7, 10, 13, 16, 19, 22]
    assert model.embed.out_channels == 4 and model.reduce.in_features == 16


def test_squeeze_state_drops_dims_the_removal_does_not_depend_on():
    from structprune.graph.channels import ChannelState, squeeze_state

    # channels 1 and 3 of 4, removed at every one of 3 positions along dim 1 of a (2, 3, 4) tensor
    idxs = torch.tensor([p * 4 + c for p in range(3) for c in (1, 3)])
    state = squeeze_state(ChannelState((1, 2), idxs, idxs % 4), (2, 3, 4))
    assert state.dims == (2,) and state.idxs.tolist() == [1, 3] and state.roots.tolist() == [1, 3]
    # removed at only some positions: the position dim stays
    partial = ChannelState((1, 2), torch.tensor([1, 3, 5]), torch.tensor([1, 3, 1]))
    assert squeeze_state(partial, (2, 3, 4)).dims == (1, 2)
    # same membership but different roots along dim 1: the dim stays (roots tell positions apart)
    roots = torch.tensor([0, 0, 1, 1, 2, 2])
    assert squeeze_state(ChannelState((1, 2), idxs, roots), (2, 3, 4)).dims == (1, 2)


class LiteralPieces(nn.Module):
    """Pieces cut with sizes the code writes as numbers: after a removal they would hold other channels."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(3, 8)
        self.first, self.second = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        y = self.fc(x)
        if self.how == "slices":
            a, b = y[:, :4], y[:, -4:]
        elif self.how == "split":
            a, b = y.split(4, dim=1)
        else:
            a, b = y.chunk(2, dim=1)
        return self.first(a) + self.second(b)


@pytest.mark.parametrize("how", ["slices", "split", "chunk"])
def test_pieces_with_literal_sizes_refuse_removals_that_shift_channels(how):
    model = LiteralPieces(how)
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(2, 3))
    group = graph.get_pruning_group(model.fc, tp.prune_linear_out_channels, [1])
    assert not graph.check_pruning_group(group)
    assert any("spells out the size of its pieces" in reason for reason in group.blocked), group.blocked


@pytest.mark.parametrize("how, idxs", [("split", [5]), ("chunk", [1, 5])])
def test_pieces_with_literal_sizes_allow_removals_that_keep_every_piece(how, idxs):
    # split(4) of 7 still gives the first piece channels 0-3; chunk(2) of 6 splits 3 + 3 where 1 and 5 went
    model = LiteralPieces(how)
    assert_lossless(model, torch.randn(2, 3), model.fc, idxs)


def test_selecting_one_channel_by_number_pins_the_others_before_it():
    class Select(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            y = self.fc(x)
            return self.head(y) * y[:, 3:4]  # channel 3 gates the output

    model = Select()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(2, 3))
    assert not graph.check_pruning_group(graph.get_pruning_group(model.fc, tp.prune_linear_out_channels, [1]))
    assert_lossless(model, torch.randn(2, 3), model.fc, [4, 5])  # after channel 3: nothing moves


class TiedByFunction(nn.Module):
    """nanoGPT-style weight tying: the logits reuse the embedding's weight through F.linear."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(50, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, ids):
        h = self.wte(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return F.linear(h, self.wte.weight)


def test_a_layer_weight_used_through_a_function_joins_its_layer_group():
    model = TiedByFunction()
    ids = torch.randint(0, 50, (2, 5))
    graph = tp.DependencyGraph().build_dependency(model, ids)
    group = graph.get_pruning_group(model.wte, tp.prune_embedding_out_channels, [1, 3])
    assert not group.blocked, group.blocked
    assert targets(group)[("fc1", "prune_in_channels")] == [1, 3]
    group.prune()
    assert model.wte.weight.shape == (50, 14) and model(ids).shape == (2, 5, 50)


class CalledBare(nn.Module):
    """A declared layer that is never called: its weight and bias go through F.linear (timm EVA/BEiT qkv)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 6)
        self.proj = nn.Linear(6, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = F.linear(self.fc(x), self.proj.weight, self.proj.bias)
        return self.head(torch.relu(y))


def test_a_layer_called_only_through_its_weights_prunes_both_sides_losslessly():
    model = CalledBare()
    x = torch.randn(2, 3)
    group = assert_lossless(model, x, model.fc, [0, 4])  # proj's inputs, reached through its weight
    assert targets(group)[("proj", "prune_in_channels")] == [0, 4]
    group = assert_lossless(model, x, model.proj, [2])  # proj as a root: starts from its weight and bias
    assert targets(group)[("head", "prune_in_channels")] == [2]
    assert model.proj.weight.shape == (3, 4) and model.proj.bias.shape == (3,)
