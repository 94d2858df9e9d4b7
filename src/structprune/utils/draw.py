"""Pictures of a built :class:`~structprune.DependencyGraph`: its computational graph, its channel
dependencies and its pruning groups, each as a node-by-node matrix saved to a PNG.

Rows and columns are the graph's nodes in the order of ``DG.module2node`` (the order the traced forward
first reached them), labelled by name. The matrices behind the pictures are available on their own
(:func:`computational_matrix`, :func:`dependency_matrix`, :func:`group_matrix`), so they can be checked
without drawing anything.

matplotlib is needed only for drawing; it is imported when a drawing function is called and renders
through the Agg canvas directly, so no global backend is switched and no window is ever opened.
"""
from __future__ import annotations

import os

import torch

from ..graph.side import Side

__all__ = [
    "computational_matrix",
    "dependency_matrix",
    "group_matrix",
    "draw_computational_graph",
    "draw_dependency_graph",
    "draw_groups",
]

_EDGE, _BLOCKED = 1, 2  # cell values; 0 is an empty cell


# -- matrices ---------------------------------------------------------------------------------------------
def _nodes(DG) -> list:
    return list(DG.module2node.values())


def _index(nodes) -> dict:
    return {id(node): index for index, node in enumerate(nodes)}


def computational_matrix(DG):
    """``(names, matrix)``: ``matrix[i, j]`` is True when an edge of the traced graph joins nodes i and j.

    Edges are the nearest-node links (``node.inputs`` / ``node.outputs``), so functional operations in
    between (activations, additions, reshapes) are looked through. The matrix is symmetric.
    """
    nodes = _nodes(DG)
    index = _index(nodes)
    matrix = torch.zeros(len(nodes), len(nodes), dtype=torch.bool)
    for i, node in enumerate(nodes):
        for other in list(node.inputs) + list(node.outputs):
            j = index.get(id(other))
            if j is not None:
                matrix[i, j] = matrix[j, i] = True
    return [node.name for node in nodes], matrix


def _dependency_rows(DG):
    """names, dependency matrix with every discovered row, and which rows come from blocked groups."""
    nodes = _nodes(DG)
    index = _index(nodes)
    n = len(nodes)
    matrix = torch.zeros(n, n, dtype=torch.bool)
    blocked = torch.zeros(n, dtype=torch.bool)
    for i, node in enumerate(nodes):
        module = node.module
        try:
            total = DG.get_out_channels(module)
            if not total:
                continue
            pruner = DG.get_pruner_of_module(module)
            group = DG.get_pruning_group(module, pruner.prune_out_channels, [0])
        except Exception:  # a node the graph cannot prune from its outputs: leave its row empty
            continue
        blocked[i] = bool(group.blocked)
        for item in group:
            j = index.get(id(item.dep.target))
            if j is not None:
                matrix[i, j] = True
    return [node.name for node in nodes], matrix, blocked


def dependency_matrix(DG, include_blocked: bool = False):
    """``(names, matrix)``: ``matrix[i, j]`` is True when removing output channels of node i requires
    pruning something (output or input channels) on node j.

    Each row is the pruning group of one output channel of the node, so the diagonal is set for every
    node that can be pruned from its outputs. Rows of nodes that cannot be (no output channels, no
    pruner, or an error while grouping) are empty, and so are rows whose group is blocked (its channels
    reach a model output, for instance) unless ``include_blocked``.
    """
    names, matrix, blocked = _dependency_rows(DG)
    if not include_blocked:
        matrix[blocked] = False
    return names, matrix


def group_matrix(DG, include_blocked: bool = False):
    """``(names, matrix)`` of integers: ``matrix[i, j] == g + 1`` when, in the g-th group of
    ``DG.get_all_groups()``, node i loses output channels and node j is pruned too; 0 elsewhere.

    A node loses output channels in at most one group, so every row belongs to one group at most and
    no cell is claimed twice; a node pruned only on its inputs (the consumer of a group) appears as a
    column of that group. ``include_blocked`` is passed to ``get_all_groups``.
    """
    nodes = _nodes(DG)
    index = _index(nodes)
    matrix = torch.zeros(len(nodes), len(nodes), dtype=torch.long)
    for number, group in enumerate(DG.get_all_groups(include_blocked=include_blocked), start=1):
        members = [index[id(item.dep.target)] for item in group if id(item.dep.target) in index]
        rows = [index[id(item.dep.target)] for item in group
                if id(item.dep.target) in index and _prunes_outputs(DG, item)]
        for i in rows:
            for j in members:
                if matrix[i, j] == 0:
                    matrix[i, j] = number
    return [node.name for node in nodes], matrix


def _prunes_outputs(DG, item) -> bool:
    return item.side is Side.OUT  # BatchNorm and the like: one side for both, the output


# -- drawing ----------------------------------------------------------------------------------------------
class _Mpl:
    """The few matplotlib pieces the drawings use, imported on first use."""

    def __init__(self):
        try:
            import numpy
            from matplotlib import colormaps, colors
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
            from matplotlib.patches import Patch
        except ImportError as error:
            raise ImportError(
                "drawing a dependency graph needs matplotlib, which is not installed; install it with "
                "the 'demo' extra: pip install 'structprune[demo]' (or pip install matplotlib)"
            ) from error
        self.np, self.colormaps, self.colors = numpy, colormaps, colors
        self.Figure, self.FigureCanvasAgg, self.Patch = Figure, FigureCanvasAgg, Patch


def _font_size(n: int, figsize) -> float:
    """Tick-label size in points: about three quarters of one row of the matrix, between 1 and 12."""
    if n == 0:
        return 10.0
    row_points = 0.7 * min(figsize) * 72 / n
    return float(max(1.0, min(12.0, 0.75 * row_points)))


def _render(mpl, matrix, names, save_as, title, figsize, dpi, cmap, vmax, legend=None):
    """Draw ``matrix`` (integers, 0 = empty, k = k-th colour of ``cmap``) and save it as a PNG."""
    n = len(names)
    figure = mpl.Figure(figsize=figsize, dpi=dpi)
    mpl.FigureCanvasAgg(figure)
    font = _font_size(n, figsize)
    longest = max((len(name) for name in names), default=0)
    # room for the longest label (about 0.6 em a character), at most 40% of the figure on each side
    margin_x = min(0.4, 0.03 + 0.6 * font * longest / 72 / figsize[0])
    margin_y = min(0.4, 0.03 + 0.6 * font * longest / 72 / figsize[1])
    title_font = max(font * 1.3, 10)
    legend_font = max(font, 6)
    # room above the matrix for the title and the legend, in points, as a fraction of the height
    head = 8 + (1.8 * title_font if title else 0) + (2.0 * legend_font if legend else 0)
    top = max(0.6, 1 - head / 72 / figsize[1])
    figure.subplots_adjust(left=margin_x, bottom=margin_y, right=0.97, top=top)
    ax = figure.add_subplot(1, 1, 1)
    values = mpl.np.asarray(matrix.tolist() if n else [[0]], dtype=float)
    cmap = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
    cmap = cmap.with_extremes(bad="white")  # empty cells are masked and stay blank whatever the colormap
    shown = mpl.np.ma.masked_equal(values, 0.0)
    ax.imshow(shown, cmap=cmap, vmin=0.5, vmax=vmax + 0.5, interpolation="nearest", aspect="auto")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(names, rotation=90, fontsize=font)
    ax.set_yticklabels(names, fontsize=font)
    # thin grid between cells keeps rows readable on large graphs
    ax.set_xticks([k - 0.5 for k in range(1, n)], minor=True)
    ax.set_yticks([k - 0.5 for k in range(1, n)], minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=0.3)
    ax.grid(which="major", visible=False)
    ax.tick_params(which="minor", length=0)
    if n == 0:
        ax.set_xlim(-0.5, 0.5)
        ax.set_ylim(0.5, -0.5)
    if title:
        figure.suptitle(title, fontsize=title_font, y=1 - 4 / 72 / figsize[1], va="top")
    if legend:
        handles = [mpl.Patch(facecolor=color, label=label) for label, color in legend]
        # above the matrix, so it hides no cell
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(handles),
                  frameon=False, fontsize=legend_font, borderaxespad=0.2)
    path = os.fspath(save_as)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")
    figure.clear()
    return path


_EDGE_COLOUR, _BLOCKED_COLOUR = "#1f77b4", "#d62728"


def _two_colours(mpl, cmap):
    return mpl.colors.ListedColormap([_EDGE_COLOUR, _BLOCKED_COLOUR]) if cmap is None else cmap


def draw_computational_graph(DG, save_as, title: str = "", figsize=(16, 16), dpi: int = 200, cmap=None):
    """Save the node-by-node adjacency matrix of the traced graph (see :func:`computational_matrix`)
    as a PNG at ``save_as`` (parent folders are created) and return that path."""
    mpl = _Mpl()
    names, matrix = computational_matrix(DG)
    values = matrix.to(torch.long) * _EDGE
    return _render(mpl, values, names, save_as, title, figsize, dpi, _two_colours(mpl, cmap), vmax=_BLOCKED)


def draw_dependency_graph(DG, save_as, title: str = "", figsize=(16, 16), dpi: int = 200, cmap=None):
    """Save the dependency matrix (see :func:`dependency_matrix`) as a PNG at ``save_as`` and return
    the path. Row i marks every node pruned along with output channels of node i; rows whose group is
    blocked (it cannot be pruned as a whole) are drawn in a second colour."""
    mpl = _Mpl()
    names, matrix, blocked = _dependency_rows(DG)
    values = matrix.to(torch.long) * _EDGE
    values[blocked] = values[blocked] * _BLOCKED
    legend = None
    if cmap is None:
        legend = [("dependency", _EDGE_COLOUR)]
        if bool(blocked.any()):
            legend.append(("blocked group", _BLOCKED_COLOUR))
    return _render(mpl, values, names, save_as, title, figsize, dpi, _two_colours(mpl, cmap),
                   vmax=_BLOCKED, legend=legend)


def draw_groups(DG, save_as, title: str = "", figsize=(16, 16), dpi: int = 200, cmap=None):
    """Save the pruning groups (see :func:`group_matrix`) as a PNG at ``save_as``, one colour per
    group, and return the path."""
    mpl = _Mpl()
    names, matrix = group_matrix(DG)
    count = max(int(matrix.max()) if matrix.numel() else 0, 1)
    if cmap is None:
        cmap = mpl.colors.ListedColormap(_group_colours(mpl, count))
    return _render(mpl, matrix, names, save_as, title, figsize, dpi, cmap, vmax=count)


def _group_colours(mpl, count: int) -> list:
    """``count`` colours, neighbours as far apart as possible: tab10, then tab20, then a spread of turbo."""
    if count <= 10:
        return [mpl.colormaps["tab10"](k) for k in range(count)]
    if count <= 20:
        base = mpl.colormaps["tab20"]
        return [base(k) for k in list(range(0, 20, 2)) + list(range(1, 20, 2))][:count]
    base = mpl.colormaps["turbo"]
    step = max(2, int(count ** 0.5))
    order = [k for start in range(step) for k in range(start, count, step)]
    return [base(0.05 + 0.9 * k / (count - 1)) for k in order]
