"""What the verified fallback of ``BasePruner.step()`` did, kept as data on the pruner.

The one-shot step prunes every planned group and runs the model once. When the model no longer runs,
the graph missed a size the forward depends on; the step is then redone group by group with one forward
each, keeping only groups after which the model still runs. Each time that happens a
:class:`FallbackRecord` is appended to ``pruner.fallback_history``, so reports and benchmarks can tell
whether (and for which groups) the graph alone was not enough.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FallbackRecord:
    """One step that fell back to verifying group by group."""

    step: int  #: the pruner's ``current_step`` when it happened
    error: str  #: why the one-shot step's model did not run (the exception, as text)
    kept: list[str] = field(default_factory=list)  #: roots of groups pruned one at a time and kept
    skipped: list[tuple[str, str]] = field(default_factory=list)  #: (root, error) of groups left unpruned

    @property
    def handled(self) -> int:
        """Groups the fallback had to redo one forward at a time."""
        return len(self.kept) + len(self.skipped)
