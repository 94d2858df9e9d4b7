"""The ``structprune`` command line: inspect, prune, errors as one line, --help with examples."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import structprune as tp
from structprune import cli

SHAPE = "1,3,32,32"

FACTORY_SOURCE = '''
import torch
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    )
'''


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(FACTORY_SOURCE)
    return path


def test_inspect_resnet18_prints_groups_macs_params_and_what_pruning_leaves(capsys):
    assert cli.main(["inspect", "torchvision:resnet18", "--input-shape", SHAPE, "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    macs, params = tp.utils.count_ops_and_params(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    assert f"({int(macs):,})" in out and f"({int(params):,})" in out
    assert "12 prunable groups" in out
    # the stem group couples conv1 with bn1 and the residual stream of layer1
    stem = next(line for line in out.splitlines() if "conv1 (Conv2d)" in line and "layer1.0.conv1" not in line.split()[1])
    assert stem.split()[3] == "64" and "bn1[out]" in stem and "layer1.0.conv1[in]" in stem
    assert "layer4.0.conv2 (Conv2d)" in out and "fc[in]" in out
    # 0.5 per layer: roughly a quarter of the MACs left (both sides of most convs halve)
    left = [float(line.split("(")[1].split("%")[0]) for line in out.splitlines() if "% left" in line]
    assert len(left) == 2 and all(20.0 < value < 35.0 for value in left)


def test_prune_writes_a_folder_that_loads_into_a_fresh_resnet18_with_equal_outputs(tmp_path, capsys):
    out_dir = tmp_path / "pruned"
    assert cli.main(["prune", "torchvision:resnet18", "--input-shape", SHAPE, "--ratio", "0.5",
                     "--importance", "l2", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "MACs:" in printed and "params:" in printed and "% left" in printed
    assert {"model.safetensors", "plan.json", cli.SOURCE_FILE} <= {p.name for p in out_dir.iterdir()}

    # the same command's pruned model, rebuilt in-process from the same seed
    torch.manual_seed(0)
    expected = cli.load_model("torchvision:resnet18")
    inputs = cli.example_input((1, 3, 32, 32), 0)
    cli.prune_model(expected, inputs, 0.5, "l2")

    loaded = tp.load_pruned(torchvision.models.resnet18(), out_dir).eval()
    assert loaded.conv1.out_channels == expected.conv1.out_channels == 32
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in expected.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=1e-6)
    assert f"{tp.utils.count_ops_and_params(loaded, inputs)[0] / 1e6:.2f}M" in printed


def test_prune_factory_file_with_taylor_and_round_to(tmp_path, factory_file):
    out_dir = tmp_path / "net"
    assert cli.main(["prune", f"{factory_file}:build", "--input-shape", "2,3,8,8", "--ratio", "0.5",
                     "--importance", "taylor", "--round-to", "4", "--out", str(out_dir)]) == 0
    loaded = tp.load_pruned(_build_from_source(), out_dir).eval()
    # half of 16 and 24, already multiples of 4
    assert (loaded[0].out_channels, loaded[3].out_channels) == (8, 12)
    assert loaded[-1].out_features == 5  # the outputs keep their size
    assert loaded(torch.randn(3, 3, 8, 8)).shape == (3, 5)


def test_prune_global_ranks_channels_across_layers(tmp_path, factory_file):
    out_dir = tmp_path / "net"
    assert cli.main(["prune", f"{factory_file}:build", "--input-shape", "2,3,8,8", "--ratio", "0.5",
                     "--importance", "l1", "--global", "--out", str(out_dir)]) == 0
    loaded = tp.load_pruned(_build_from_source(), out_dir).eval()
    assert loaded[0].out_channels + loaded[3].out_channels == 20  # half of all 40 channels, anywhere
    assert loaded(torch.randn(3, 3, 8, 8)).shape == (3, 5)


def _build_from_source():
    namespace: dict = {}
    exec(FACTORY_SOURCE, namespace)
    return namespace["build"]()


@pytest.mark.parametrize("argv, mentions", [
    (["inspect", "torchvision:not_a_model"], "not_a_model"),
    (["inspect", "timm:not_a_model_either"], "not_a_model_either"),
    (["inspect", "torchvision:resnet18", "--input-shape", "1,3,abc"], "1,3,abc"),
    (["inspect", "torchvision:resnet18", "--input-shape", "1,0,32,32"], "positive"),
    (["prune", "torchvision:resnet18", "--ratio", "1.5", "--out", "unused"], "1.5"),
    (["prune", "torchvision:resnet18", "--ratio", "-0.1", "--out", "unused"], "[0, 1)"),
    (["inspect", "no/such/file.py:build"], "does not exist"),
    (["inspect", "resnet18"], "torchvision:NAME"),
    (["prune", "torchvision:resnet18", "--ratio", "0.5", "--importance", "l3", "--out", "unused"], "l3"),
    ([], "COMMAND"),
])
def test_bad_inputs_fail_with_one_line_and_no_traceback(argv, mentions, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("structprune: error:") and mentions in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_missing_factory_function_and_wrong_input_shape_fail_cleanly(factory_file, capsys):
    assert cli.main(["inspect", f"{factory_file}:nope"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no function 'nope'" in err[0]
    assert cli.main(["inspect", f"{factory_file}:build", "--input-shape", "1,5,8,8"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not run on inputs of shape (1, 5, 8, 8)" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("command, example", [
    ([], "structprune inspect torchvision:resnet18"),
    (["demo"], "structprune demo --method greg1"),
    (["inspect"], "structprune inspect timm:"),
    (["prune"], "structprune prune torchvision:resnet18 --ratio 0.5"),
])
def test_help_of_every_command_shows_examples(command, example, capsys):
    assert cli.main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and example in out


def test_console_script_help_and_error_exit_codes():
    script = Path(sys.executable).with_name("structprune")
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    assert "examples:" in shown.stdout and "structprune demo" in shown.stdout
    failed = subprocess.run([str(script), "prune", "torchvision:resnet18", "--ratio", "1.5", "--out", "x"],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0
    assert failed.stderr.strip().count("\n") == 0 and "Traceback" not in failed.stderr
