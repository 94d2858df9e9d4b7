"""Drawing the computational graph, the dependency matrix and the pruning groups."""

import builtins
import struct

import pytest
import torch
from torch import nn

import structprune as sp
from structprune.utils import draw_computational_graph, draw_dependency_graph, draw_groups
from structprune.utils.draw import _font_size, computational_matrix, dependency_matrix, group_matrix

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "fc"]


class ResidualCNN(nn.Module):
    """conv-bn-relu x3; the second block is added back onto the first, so conv1 and conv2 are coupled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def DG():
    torch.manual_seed(0)
    return sp.DependencyGraph().build_dependency(ResidualCNN(), torch.randn(1, 3, 8, 8))


def _png_size(path):
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == PNG_SIGNATURE
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])  # width, height


def _row(names, matrix, name):
    return {names[j] for j in range(len(names)) if matrix[names.index(name), j]}


# -- pictures -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("draw", [draw_computational_graph, draw_dependency_graph, draw_groups])
def test_writes_png_of_requested_size(DG, tmp_path, draw):
    target = tmp_path / "nested" / "deeper" / f"{draw.__name__}.png"  # parent folders are created
    result = draw(DG, target, title="small CNN", figsize=(4, 3), dpi=50)
    assert result == str(target)
    assert target.stat().st_size > 0
    assert _png_size(target) == (200, 150)


def test_default_figure_size_and_string_path(DG, tmp_path):
    target = str(tmp_path / "groups.png")
    assert draw_groups(DG, target, figsize=(2, 2), dpi=40) == target
    assert _png_size(target) == (80, 80)


def test_blocked_rows_get_their_own_colour(DG, tmp_path):
    from matplotlib.colors import ListedColormap
    from matplotlib.image import imread

    target = tmp_path / "dependency.png"
    # pure blue for dependencies, pure red for the blocked group of fc (its channels are the model output)
    draw_dependency_graph(DG, target, figsize=(3, 3), dpi=60, cmap=ListedColormap(["#0000ff", "#ff0000"]))
    image = imread(str(target))[..., :3]
    red = (image[..., 0] > 0.95) & (image[..., 1] < 0.05) & (image[..., 2] < 0.05)
    blue = (image[..., 2] > 0.95) & (image[..., 0] < 0.05) & (image[..., 1] < 0.05)
    assert blue.sum() > 20 * red.sum() > 0  # one blocked cell against 28 dependency cells


def test_accepts_colormap_by_name(DG, tmp_path):
    target = tmp_path / "graph.png"
    draw_computational_graph(DG, target, figsize=(2, 2), dpi=40, cmap="viridis")
    draw_groups(DG, tmp_path / "groups.png", figsize=(2, 2), dpi=40, cmap="viridis")
    assert _png_size(target) == (80, 80)


def test_unwrapped_parameter_nodes_are_drawn(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.conv(x) * self.scale)

    graph = sp.DependencyGraph().build_dependency(Scaled(), torch.randn(1, 3, 4, 4))
    names, matrix = dependency_matrix(graph)
    assert "scale" in names
    assert _row(names, matrix, "conv") == {"conv", "scale", "head"}
    for draw in (draw_computational_graph, draw_dependency_graph, draw_groups):
        assert _png_size(draw(graph, tmp_path / f"{draw.__name__}.png", figsize=(2, 2), dpi=40)) == (80, 80)


def test_missing_matplotlib_is_reported_clearly(DG, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    for draw in (draw_computational_graph, draw_dependency_graph, draw_groups):
        with pytest.raises(ImportError, match="matplotlib") as info:
            draw(DG, tmp_path / "never.png")
        assert "demo" in str(info.value)
        assert isinstance(info.value.__cause__, ImportError)
    assert not (tmp_path / "never.png").exists()
    # the matrices need no matplotlib
    assert dependency_matrix(DG)[0] == NAMES


def test_font_shrinks_with_node_count():
    sizes = [_font_size(n, (16, 16)) for n in (5, 50, 200, 2000)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == 12.0 and sizes[-1] == 1.0


# -- matrices -------------------------------------------------------------------------------------------
def test_computational_matrix(DG):
    names, matrix = computational_matrix(DG)
    assert names == NAMES
    assert matrix.dtype == torch.bool
    assert torch.equal(matrix, matrix.T)
    assert not matrix.diagonal().any()
    assert _row(names, matrix, "conv1") == {"bn1"}
    assert _row(names, matrix, "bn1") == {"conv1", "conv2", "conv3"}  # the residual reaches conv3
    assert _row(names, matrix, "conv3") == {"bn1", "bn2", "bn3"}
    assert _row(names, matrix, "fc") == {"bn3"}
    assert int(matrix.sum()) == 2 * 7  # seven edges


def test_dependency_matrix(DG):
    names, matrix = dependency_matrix(DG)
    assert names == NAMES
    assert matrix.dtype == torch.bool and matrix.shape == (7, 7)
    coupled = {"conv1", "bn1", "conv2", "bn2", "conv3"}  # conv2's output is added onto conv1's
    for name in ("conv1", "bn1", "conv2", "bn2"):
        assert _row(names, matrix, name) == coupled
    assert matrix[names.index("conv1"), names.index("bn1")]
    assert matrix[names.index("conv1"), names.index("conv2")]
    assert not matrix[names.index("conv1"), names.index("fc")]
    for name in ("conv3", "bn3"):
        assert _row(names, matrix, name) == {"conv3", "bn3", "fc"}
    assert _row(names, matrix, "fc") == set()  # blocked: its outputs are the model's


def test_dependency_matrix_with_blocked_rows(DG):
    names, matrix = dependency_matrix(DG, include_blocked=True)
    assert _row(names, matrix, "fc") == {"fc"}
    assert torch.equal(matrix[:-1], dependency_matrix(DG)[1][:-1])


def test_group_matrix(DG):
    names, matrix = group_matrix(DG)
    assert names == NAMES
    assert matrix.dtype == torch.long
    first, second = 1, 2
    for name in ("conv1", "bn1", "conv2", "bn2"):  # all lose output channels in the first group
        row = matrix[names.index(name)].tolist()
        assert row == [first] * 5 + [0, 0]
    for name in ("conv3", "bn3"):
        assert matrix[names.index(name)].tolist() == [0, 0, 0, 0, second, second, second]
    assert not matrix[names.index("fc")].any()  # fc's group is blocked and not listed
    assert int(matrix.max()) == len(list(DG.get_all_groups()))
    # a layer pruned only on its inputs by a group is a column of that group, not a row
    assert matrix[names.index("conv1"), names.index("conv3")] == first
    _, with_blocked = group_matrix(DG, include_blocked=True)
    assert with_blocked[names.index("fc"), names.index("fc")] == 3


def test_matrices_follow_pruning(DG):
    model = ResidualCNN()
    graph = sp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 8, 8))
    graph.get_pruning_group(model.conv3, graph.get_pruner_of_module(model.conv3).prune_out_channels,
                            [0, 1]).prune()
    names, matrix = dependency_matrix(graph)
    assert _row(names, matrix, "conv3") == {"conv3", "bn3", "fc"}
    assert torch.equal(group_matrix(graph)[1], group_matrix(DG)[1])


@pytest.mark.parametrize("count", [1, 3, 15, 40])
def test_group_colours_are_distinct(count):
    from structprune.utils.draw import _group_colours, _Mpl

    colours = _group_colours(_Mpl(), count)
    assert len(colours) == count == len(set(colours))
