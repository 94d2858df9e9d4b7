"""``structprune demo`` end to end with one epoch per phase: the report folder and its numbers."""
import json

import pytest
import torch

import structprune as tp
from structprune import cli
from structprune.demo.data import TRAIN_SIZE, load_digits_split
from structprune.demo.model import DigitsCNN
from structprune.demo.report import STAGES, without_timings
from structprune.demo.train import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("reg_growth.png", "channel_norms.png", "accuracy.png")


def run(out, *extra):
    assert cli.main(["demo", "--epochs", "1", "--quiet", "--out", str(out), *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_report_folder_has_four_stages_plots_and_a_loadable_pruned_model_and_repeats_exactly(tmp_path):
    out = tmp_path / "a"
    summary = run(out)
    assert list(summary["stages"]) == list(STAGES)
    assert list(summary["ablation"]["stages"]) == ["baseline", "after_pruning", "after_finetuning"]
    for stages in (summary["stages"], summary["ablation"]["stages"]):
        for metrics in stages.values():
            assert 0.0 <= metrics["accuracy"] <= 1.0
            assert metrics["latency_b1_ms"] > 0 and metrics["latency_b64_ms"] > 0 and metrics["file_bytes"] > 0
    stages = summary["stages"]
    # 75% of the channels go: about (1/4)^2 of the conv MACs and params are left
    assert stages["after_pruning"]["params"] < 0.1 * stages["baseline"]["params"]
    assert stages["after_pruning"]["macs"] < 0.1 * stages["baseline"]["macs"]
    assert stages["after_pruning"]["file_bytes"] < 0.2 * stages["baseline"]["file_bytes"]
    assert stages["after_regularization"]["params"] == stages["baseline"]["params"]
    assert stages["after_finetuning"]["params"] == stages["after_pruning"]["params"]
    assert summary["ablation"]["stages"]["after_pruning"]["params"] == stages["after_pruning"]["params"]

    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    # one regularization epoch recorded, for each of the four groups, and it grew
    assert len(summary["reg_history"]) == 1
    assert set(summary["reg_history"][0]) == {"block1.0:prune_out_channels", "block2.0:prune_out_channels",
                                              "block3.0:prune_out_channels", "fc1:prune_out_channels"}
    assert all(entry["max"] > summary["config"]["hyperparameters"]["reg"]
               for entry in summary["reg_history"][0].values())
    norms = summary["channel_norms"]
    assert {group: (len(s["kept"]), len(s["removed"])) for group, s in norms.items()} == {
        "block1.0": (8, 24), "block2.0": (16, 48), "block3.0": (32, 96), "fc1": (32, 96)}

    loaded = tp.load_pruned(DigitsCNN(), out / "pruned_model")
    data = load_digits_split(0)
    assert len(data.y_train) == TRAIN_SIZE and len(data.y_test) == 397
    assert evaluate(loaded, data.x_test, data.y_test) == stages["after_finetuning"]["accuracy"]

    # same seed, same numbers (everything but the timings and the folder)
    again = without_timings(run(tmp_path / "b"))
    first = without_timings(summary)
    assert first["config"].pop("out") != again["config"].pop("out")
    assert first == again


def test_cli_prints_the_table_and_magnitude_method_has_no_regularization(tmp_path, capsys):
    summary = run(tmp_path, "--method", "magnitude", "--seed", "3")
    printed = capsys.readouterr().out
    for label in ("baseline", "after regularization", "right after pruning", "after fine-tuning"):
        assert label in printed
    assert "file KB" in printed and str(tmp_path) in printed
    assert summary["ablation"] is None and summary["reg_history"] == []
    stages = summary["stages"]
    assert stages["after_regularization"] == stages["baseline"]  # one-shot: nothing happens in between
    assert summary["config"]["seed"] == 3


def test_digits_split_depends_only_on_the_seed():
    a, b, c = load_digits_split(0), load_digits_split(0), load_digits_split(1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    assert a.x_train.min() >= 0.0 and a.x_train.max() <= 1.0 and a.x_train.shape[1:] == (1, 8, 8)


def test_greg1_method_regularizes_until_its_budget_or_readiness(tmp_path):
    summary = run(tmp_path, "--method", "greg1")
    assert summary["config"]["hyperparameters"]["update_every"] == 1
    # one epoch -> at most three of regularization, 22 iterations each
    assert 1 <= len(summary["reg_history"]) <= 3 and 0 < summary["regularization_iterations"] <= 66
    final = summary["reg_history"][-1]
    # GReg-1 grows only the channels it will remove (75%): the max moved, the mean moved by 3/4 of it
    for entry in final.values():
        assert entry["max"] > 1e-4
        assert entry["mean"] == pytest.approx(1e-4 + 0.75 * (entry["max"] - 1e-4), rel=1e-3)
    assert list(summary["stages"]) == list(STAGES)
