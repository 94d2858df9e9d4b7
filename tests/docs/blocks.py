"""The ```python blocks of a Markdown file, so docs are executed by the suite and cannot rot."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(relative: str) -> list[str]:
    text = (ROOT / relative).read_text()
    blocks = _BLOCK.findall(text)
    assert blocks, f"{relative} has no python block"
    return blocks
