"""Print the import structure of structprune: rooms, arrows and import circles, read from the source.

    python benchmarks/import_structure.py [path/to/src/structprune]

A room is a top-level subpackage or module (``graph``, ``adapters``, ``serialization``); an arrow is an
import statement, lazy ones included (see tests/import_graph.py for the exact reading). A circle is a set
of modules that import each other, directly or around a loop. A core -> family arrow is a core module
(graph, layers, importance, pruner, the two registries in adapters) importing family knowledge (a family
module of adapters, hf, integrations), as tests/test_import_structure.py defines them; it must stay 0.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from import_graph import circles, import_graph, room_of  # noqa: E402  (a test helper, found on the path above)
from test_import_structure import core_arrows_to_families  # noqa: E402  (the test's definition of core and family)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "src" / "structprune"
    graph = import_graph(root, "structprune")
    arrows = sum(len(targets) for targets in graph.values())
    room_arrows = {(room_of(a), room_of(b)) for a, targets in graph.items() for b in targets
                   if room_of(a) != room_of(b)}
    found = circles(graph)
    rows = [("modules", len(graph)), ("module arrows", arrows),
            ("rooms", len({room_of(name) for name in graph})), ("room arrows", len(room_arrows)),
            ("import circles (modules)", len(found)), ("core -> family arrows", len(core_arrows_to_families(graph)))]
    width = max(len(label) for label, _ in rows)
    print(f"import structure of {root}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value:>5}")
    for number, members in enumerate(found, 1):
        print(f"  circle {number} ({len(members)} modules): {', '.join(members)}")
    for arrow in core_arrows_to_families(graph):
        print(f"  core -> family: {arrow}")


if __name__ == "__main__":
    main()
