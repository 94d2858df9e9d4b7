"""benchmarks/quality: the committed Gemma rows back the numbers the README quotes, and plot.py draws them."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "benchmarks" / "quality" / "results" / "gemma_cpu.jsonl"


def _plot_module():
    spec = importlib.util.spec_from_file_location("quality_plot", ROOT / "benchmarks" / "quality" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(rows, ratio, scope, prefix):
    (row,) = [r for r in rows if r["ratio"] == ratio and r["scope"] == scope and r["method"].startswith(prefix)]
    return row


def test_the_readme_quality_table_is_the_committed_rows():
    rows = _plot_module().load(str(ROWS))
    readme = (ROOT / "README.md").read_text()
    quoted = {
        (0.2, "greg1 (activation)"): 31.9, (0.35, "greg1 (activation)"): 36.4, (0.5, "greg1 (activation)"): 49.6,
        (0.2, "taylor"): 32.5, (0.35, "taylor"): 41.5, (0.5, "taylor"): 65.2,
        (0.35, "activation + refit ->"): 38.2, (0.5, "activation + refit ->"): 45.3,
    }
    for (ratio, prefix), value in quoted.items():
        assert round(_row(rows, ratio, "mlp", prefix)["final"]["ppl"], 1) == value
        assert re.search(rf"\b{value}\b", readme), value
    assert round(_row(rows, 0.2, "mlp", "activation + refit ->")["pruned"]["ppl"], 1) == 35.9


def test_plot_keeps_the_last_of_repeated_rows_and_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    plot = _plot_module()
    base = dict(scope="mlp", ratio=0.2, params=90, unpruned_params=100, baseline=30.0)
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(dict(base, method="taylor -> 16 steps", pruned={"ppl": p},
                                              final={"ppl": f})) for p, f in ((50, 40), (45, 35))) + "\n")
    rows = plot.load(str(path))
    assert len(rows) == 1 and rows[0]["final"]["ppl"] == 35
    assert plot._clip([10.0, 1e6], 300.0) == [10.0, 300.0]
    out = tmp_path / "plot.png"
    plot.plot(plot.load(str(ROWS)), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
