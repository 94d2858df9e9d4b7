"""The import structure of src/structprune, read from the source: no circle, no arrow from core to a family.

What counts (tests/import_graph.py): every import statement of a module of ours, lazy ones inside
functions included, is an arrow to the module it names.

The core is ``structprune.adapters.core`` (the adapter registry), ``structprune.adapters.families`` (the
registry of model families) and every module under ``structprune.graph``, ``structprune.layers``,
``structprune.importance`` and ``structprune.pruner``. A family is a module of ``structprune.adapters``
other than those two, ``layout`` and the package ``__init__`` (which imports the families so that they
register): ``adapters.torchvision``, ``adapters.timm``, ``adapters.ultralytics``, ``adapters.moe`` and
everything under ``adapters.hf``. Family knowledge also lives under ``structprune.hf`` (Hugging Face
configs) and ``structprune.integrations`` (where users train); the core imports neither.
"""
from functools import lru_cache
from pathlib import Path

from import_graph import circles, import_graph

ROOT = Path(__file__).resolve().parents[1] / "src" / "structprune"
CORE_PACKAGES = ("structprune.graph", "structprune.layers", "structprune.importance", "structprune.pruner")
CORE_MODULES = ("structprune.adapters.core", "structprune.adapters.families")
NOT_FAMILIES = ("structprune.adapters", "structprune.adapters.core", "structprune.adapters.families",
                "structprune.adapters.layout")
#: packages of family knowledge outside adapters/: what the core may not import either
FAMILY_PACKAGES = ("structprune.hf", "structprune.integrations")


@lru_cache(maxsize=1)
def structure() -> dict:
    return import_graph(ROOT, "structprune")


def is_core(module: str) -> bool:
    return module in CORE_MODULES or any(module == package or module.startswith(package + ".")
                                         for package in CORE_PACKAGES)


def is_family(module: str) -> bool:
    return module.startswith("structprune.adapters.") and module not in NOT_FAMILIES


def is_family_knowledge(module: str) -> bool:
    """A family module, or a module of the packages that hold family knowledge outside adapters/."""
    return is_family(module) or any(module == package or module.startswith(package + ".")
                                    for package in FAMILY_PACKAGES)


def core_arrows_to_families(graph: dict) -> list:
    """"core -> family" for every import of family knowledge by a core module."""
    return sorted(f"{module} -> {target}" for module, targets in graph.items() if is_core(module)
                  for target in targets if is_family_knowledge(target))


def test_the_reader_sees_lazy_imports_circles_and_relative_names(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import a\n")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def later():\n    from ..a import thing\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    graph = import_graph(package, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.a"},
                     "pkg.c": set()}
    assert circles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_no_import_circle():
    found = circles(structure())
    assert found == [], "modules importing each other (break the circle by moving what both need lower): " + \
        "; ".join(", ".join(members) for members in found)


def test_the_core_imports_no_family():
    graph = structure()
    assert any(is_core(module) for module in graph) and any(is_family(module) for module in graph)
    arrows = core_arrows_to_families(graph)
    assert arrows == [], ("core modules import model families (ask the adapter registry in adapters.core or the "
                          "family registry in adapters.families, or read layouts with adapters.layout): "
                          + "; ".join(arrows))


def test_an_arrow_from_the_core_to_family_knowledge_is_named():
    """The check above fails on each kind of arrow back up, naming it: to hf, integrations and a family."""
    graph = {module: set(targets) for module, targets in structure().items()}
    graph["structprune.pruner.base"] |= {"structprune.hf.config", "structprune.adapters.hf.family"}
    graph["structprune.graph.build"] |= {"structprune.integrations.transformers"}
    graph["structprune.importance.magnitude"] |= {"structprune.adapters.timm"}
    graph["structprune.pruner.verify"] |= {"structprune.adapters.layout", "structprune.adapters.families"}
    assert core_arrows_to_families(graph) == [
        "structprune.graph.build -> structprune.integrations.transformers",
        "structprune.importance.magnitude -> structprune.adapters.timm",
        "structprune.pruner.base -> structprune.adapters.hf.family",
        "structprune.pruner.base -> structprune.hf.config",
    ]


def test_families_register_through_the_core_only():
    """A family imports the registry and the layout helpers, never another family's private helpers; the
    package __init__ is the one place that imports the families."""
    graph = structure()
    families = {module for module in graph if is_family(module)}
    assert {"structprune.adapters.timm", "structprune.adapters.torchvision", "structprune.adapters.ultralytics",
            "structprune.adapters.moe", "structprune.adapters.hf"} <= families
    importers = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                       if target in families and module != "structprune.adapters"
                       and not (module.startswith("structprune.adapters.hf") and target.startswith("structprune.adapters.hf")))
    assert importers == [], "; ".join(importers)
