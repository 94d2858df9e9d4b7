"""A pruned YOLO goes through Ultralytics' own save/load, predict, val, ONNX export and training; growing
regularization runs inside Ultralytics training. Tiny synthetic data (4 images of 64x64), 1-2 epochs, CPU."""
import numpy as np
import onnx
import pytest
import torch

from structprune.integrations import ultralytics as tpu
from yolo_data import make_dataset, model_yaml

TRAIN = dict(imgsz=64, batch=2, workers=0, plots=False, amp=False, device="cpu", verbose=False)


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data", "detect")


def test_pruned_checkpoint_predicts_validates_exports_and_trains(tmp_path, data):
    from ultralytics import YOLO

    torch.manual_seed(0)
    yolo = YOLO(model_yaml(tmp_path, "yolov8n.yaml", nc=2))
    _, summary = tpu.prune(yolo, ratio=0.5, imgsz=64)
    path = tmp_path / "pruned.pt"
    yolo.save(path)

    loaded = YOLO(path)
    assert _params(loaded.model) == summary.params_after < 0.3 * summary.params_before
    assert tpu.is_pruned(loaded)
    image = np.full((64, 64, 3), 120, np.uint8)
    image[10:40, 20:50] = (230, 40, 40)
    result = loaded.predict(image, imgsz=64, conf=0.0, verbose=False)[0]
    assert result.boxes.data.shape[1] == 6 and len(result.boxes) > 0  # conf=0: every candidate survives NMS

    metrics = loaded.val(data=str(data), project=str(tmp_path / "runs"), name="val", **TRAIN)
    assert 0.0 <= metrics.box.map <= 1.0 and len(metrics.box.ap_class_index) >= 1

    onnx_file = YOLO(path).export(format="onnx", imgsz=64, simplify=False)
    graph = onnx.load(onnx_file)
    onnx.checker.check_model(graph)
    assert [d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim] == [1, 4 + 2, 84]

    # Ultralytics' own train() rebuilds the yaml's full widths; trainer() keeps the pruned ones
    tuned = YOLO(path)
    before = {name: p.detach().clone() for name, p in tuned.model.named_parameters()}
    tuned.train(data=str(data), epochs=1, project=str(tmp_path / "runs"), name="ft", trainer=tpu.trainer(tuned),
                **TRAIN)
    assert _params(tuned.model) == summary.params_after
    assert {n: p.shape for n, p in tuned.model.named_parameters()} == {n: p.shape for n, p in before.items()}
    assert any(not torch.equal(p.detach().float(), before[n].float()) for n, p in tuned.model.named_parameters()
               if n in before and "dfl" not in n)
    assert _params(YOLO(tmp_path / "runs" / "ft" / "weights" / "last.pt").model) == summary.params_after


def test_trainer_refuses_a_pruned_head_with_other_classes(tmp_path, data):
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml")  # 80 classes; the data has 2
    tpu.prune(yolo, ratio=0.5, imgsz=64)
    with pytest.raises(ValueError, match=r"model\.22 \(Detect\) of the pruned model predicts 80 classes but the "
                                         r"dataset .* has 2"):
        yolo.train(data=str(data), epochs=1, project=str(tmp_path / "runs"), name="nc", trainer=tpu.trainer(yolo),
                   **TRAIN)


def test_growing_regularization_then_pruning_then_fine_tuning_in_one_train_call(tmp_path, data):
    from ultralytics import YOLO

    torch.manual_seed(0)
    yolo = YOLO(model_yaml(tmp_path, "yolov8n.yaml", nc=2))
    seen = {}

    # optimizer pre-step hooks run in registration order: this one before structprune's, the next after it
    def gradient_before(trainer):
        conv = trainer.model.model[0].conv

        def record(*_):
            seen.setdefault("before", conv.weight.grad.clone())
        trainer.optimizer.register_step_pre_hook(record)

    def gradient_after(trainer):
        conv = trainer.model.model[0].conv

        def record(*_):
            if "after" not in seen:
                seen["after"], seen["weight"] = conv.weight.grad.clone(), conv.weight.detach().clone()
        trainer.optimizer.register_step_pre_hook(record)

    yolo.add_callback("on_pretrain_routine_end", gradient_before)
    yolo.add_callback("on_train_start", gradient_after)
    reg, delta = 1e-2, 1e-1
    trainer = tpu.growing_reg_trainer(yolo, ratio=0.5, reg_epochs=1, reg=reg, delta_reg=delta, imgsz=64)
    yolo.train(data=str(data), epochs=2, project=str(tmp_path / "runs"), name="greg", trainer=trainer, **TRAIN)

    # the penalty was added to the gradients between backward and the update: grad += gamma * w per output
    # channel, gamma = reg + delta * (standardized unimportance) after the first update_reg()
    gamma = (seen["after"] - seen["before"]) / seen["weight"]
    per_channel = gamma.flatten(1)
    assert torch.allclose(per_channel, per_channel[:, :1].expand_as(per_channel), rtol=1e-3, atol=1e-6)
    gamma = per_channel[:, 0]
    assert gamma.min() >= reg * 0.999 and gamma.max() <= (reg + delta) * 1.001
    assert gamma.max() > reg + 0.5 * delta  # the least important channels grew fastest

    run = yolo.trainer
    assert run.pruned_epoch == 1  # after reg_epochs=1 epoch of regularization
    assert run.summary["params_after"] < 0.3 * run.summary["params_before"]
    assert _params(yolo.model) == run.summary["params_after"]  # yolo holds the best pruned checkpoint
    weights = tmp_path / "runs" / "greg" / "weights"
    assert _params(YOLO(weights / "best.pt").model) == run.summary["params_after"]
    assert _params(YOLO(weights / "best_unpruned.pt").model) == run.summary["params_before"]


def test_growing_reg_trainer_checks_its_schedule(tmp_path, data):
    from ultralytics import YOLO

    yolo = YOLO(model_yaml(tmp_path, "yolov8n.yaml", nc=2))
    with pytest.raises(ValueError, match="reg_epochs=2 leaves no epoch to prune and fine-tune in epochs=2"):
        yolo.train(data=str(data), epochs=2, project=str(tmp_path / "runs"), name="short",
                   trainer=tpu.growing_reg_trainer(yolo, reg_epochs=2), **TRAIN)
    with pytest.raises(ValueError, match="update_every must be one of"):
        tpu.growing_reg_trainer(yolo, update_every="step")
