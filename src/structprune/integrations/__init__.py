"""Where users train: Ultralytics YOLO and the Hugging Face ``Trainer``.

``tp.integrations.ultralytics`` and ``tp.integrations.transformers`` are imported on first use, so
``import structprune`` never imports ultralytics or transformers (both are optional dependencies).
"""
from __future__ import annotations

import importlib

_SUBMODULES = ("ultralytics", "transformers")


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_SUBMODULES))
