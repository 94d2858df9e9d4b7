"""structprune prune ultralytics:NAME.yaml / ultralytics:weights.pt writes a checkpoint YOLO(path) loads."""
import json

import torch

from structprune.cli import SOURCE_FILE, main


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_prune_a_yaml_then_its_checkpoint_from_the_command_line(tmp_path, capsys):
    from ultralytics import YOLO

    first = tmp_path / "first"
    assert main(["prune", "ultralytics:yolov8n.yaml", "--ratio", "0.5", "--input-shape", "1,3,64,64",
                 "--out", str(first)]) == 0
    printed = capsys.readouterr().out
    assert "params: 3.16M -> " in printed and str(first / "yolov8n.pt") in printed
    pruned = YOLO(first / "yolov8n.pt")
    params = _params(pruned.model)
    assert params < 0.3 * 3_157_200
    assert json.loads((first / SOURCE_FILE).read_text())["model"] == "ultralytics:yolov8n.yaml"
    with torch.no_grad():
        assert pruned.model.eval()(torch.zeros(1, 3, 64, 64))[0].shape == (1, 84, 84)

    second = tmp_path / "second"
    assert main(["prune", f"ultralytics:{first / 'yolov8n.pt'}", "--ratio", "0.3", "--importance", "l1",
                 "--input-shape", "1,3,64,64", "--out", str(second)]) == 0
    assert _params(YOLO(second / "yolov8n.pt").model) < params


def test_ultralytics_specs_fail_with_one_line(tmp_path, capsys):
    assert main(["prune", "ultralytics:missing.pt", "--ratio", "0.5", "--out", str(tmp_path)]) == 2
    assert "no such file (structprune never downloads weights)" in capsys.readouterr().err
    assert main(["prune", "ultralytics:yolov8n", "--ratio", "0.5", "--out", str(tmp_path)]) == 2
    assert "give a model yaml (yolov8n.yaml) or a weights file (.pt)" in capsys.readouterr().err
    assert main(["inspect", "ultralytics:yolov8n.yaml"]) == 2
    assert "are pruned with structprune prune ultralytics:yolov8n.yaml" in capsys.readouterr().err
