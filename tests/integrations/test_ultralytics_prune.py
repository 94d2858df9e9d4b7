"""tp.integrations.ultralytics.prune on Ultralytics' own model yamls (random init, 64x64 images)."""
import subprocess
import sys
import warnings

import pytest
import torch

from oracle import silence_consumers
from structprune.integrations import ultralytics as tpu

IMGSZ = 64
DECLARED = (torch.nn.Conv2d, torch.nn.Linear)

# yaml, fraction of parameters left at most after ratio 0.5 (YOLO11's and YOLOv10's PSA attention is pruned
# too: tests/integrations/test_ultralytics_attention.py)
FAMILIES = [
    ("yolov8n.yaml", 0.30),
    ("yolov8n-seg.yaml", 0.30),
    ("yolov8n-pose.yaml", 0.30),
    ("yolov8n-cls.yaml", 0.40),
    ("yolo11n.yaml", 0.30),
    ("yolov10n.yaml", 0.30),
]


def _yolo(name):
    from ultralytics import RTDETR, YOLO

    torch.manual_seed(0)
    return (RTDETR if "rtdetr" in name else YOLO)(name)


def _decoded(model, inputs):
    """Ultralytics' decoded predictions (boxes after DFL, class probabilities...)."""
    with torch.no_grad():
        output = model.eval()(inputs)
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("name,most_left", FAMILIES)
def test_prune_keeps_predictions_and_shrinks_the_model(name, most_left):
    yolo = _yolo(name)
    model = yolo.model
    inputs = tpu.make_example_inputs(model, IMGSZ)
    raw_shapes = [t.shape for t in tpu.head_outputs(model.eval(), inputs)]
    out_channels = {name: m.weight.shape[0] for name, m in model.named_modules() if isinstance(m, DECLARED)}
    decoded = _decoded(model, inputs)
    decoded_shape = [t.shape for t in decoded] if isinstance(decoded, tuple) else decoded.shape
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, summary = tpu.prune(yolo, ratio=0.5, imgsz=IMGSZ)
    assert result is yolo and yolo.model is model
    params = sum(p.numel() for p in model.parameters())
    assert summary.params_after == params < most_left * summary.params_before
    assert summary.macs_after < summary.macs_before
    assert [t.shape for t in tpu.head_outputs(model.eval(), inputs)] == raw_shapes
    decoded = _decoded(model, inputs)
    assert ([t.shape for t in decoded] if isinstance(decoded, tuple) else decoded.shape) == decoded_shape
    ours = [str(w.message) for w in caught if "structprune.integrations.ultralytics" in str(w.message)]
    assert ours == []
    assert all(reason == tpu.HEAD_REASON for reason in summary.kept.values())
    # the head's prediction layers keep their outputs (classes, 4 x reg_max box bins...)
    heads = [path for path, reason in summary.kept.items() if reason == tpu.HEAD_REASON]
    assert len(heads) >= 1 and all(out_channels[path] == model.get_submodule(path).weight.shape[0] for path in heads)
    # C2f-style blocks split at self.c in forward_split (used by ONNX export): c follows the pruned cv1
    for module in model.modules():
        if hasattr(module, "forward_split") and hasattr(module, "cv1") and isinstance(module.__dict__.get("c"), int):
            assert 2 * module.c == module.cv1.conv.out_channels


@pytest.mark.parametrize("name", ["yolov8n.yaml", "yolo11n.yaml"])
def test_every_pruned_group_is_lossless_once_its_channels_are_silenced(name):
    """The oracle: zero the input weights every consumer reads from the chosen channels, remove them, and
    the head's raw predictions must not move; run for every group the 50% step prunes."""
    model = _yolo(name).model
    inputs = tpu.make_example_inputs(model, IMGSZ)
    pruner = tpu.build_pruner(model, pruning_ratio=0.5, example_inputs=inputs, warn=False)
    pruned = 0
    for group in pruner.step(interactive=True):
        silence_consumers(group)
        with torch.no_grad():
            before = tpu.head_outputs(model.eval(), inputs)
        group.prune()
        with torch.no_grad():
            after = tpu.head_outputs(model.eval(), inputs)
        for b, a in zip(before, after, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        pruned += 1
    assert pruned > 20


def test_unknown_head_error_names_the_layer_and_what_to_pass():
    yolo = _yolo("yolov8n.yaml")
    model = yolo.model

    class MyHead(torch.nn.Module):
        def __init__(self, detect):
            super().__init__()
            self.inner = detect
            self.f, self.i, self.type = detect.f, detect.i, "MyHead"

        def forward(self, x):
            return self.inner(x)

    model.model[-1] = MyHead(model.model[-1])
    with pytest.raises(ValueError, match=r"model\.22 \(MyHead\) is a head .* pass ignored_layers=\["):
        tpu.prune(yolo, ratio=0.5, imgsz=IMGSZ)
    # given its final layers, the rest is pruned
    finals = [branch[-1] for branch in list(model.model[-1].inner.cv2) + list(model.model[-1].inner.cv3)]
    _, summary = tpu.prune(yolo, ratio=0.5, imgsz=IMGSZ, ignored_layers=finals + [model.model[-1].inner.dfl])
    assert summary.params_after < 0.5 * summary.params_before


def test_non_ultralytics_models_are_refused_with_a_pointer():
    with pytest.raises(TypeError, match="tp.pruner.BasePruner"):
        tpu.prune(torch.nn.Linear(2, 2))


def test_missing_ultralytics_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ultralytics", None)
    with pytest.raises(ImportError, match=r"pip install 'structprune\[yolo\]'"):
        tpu.prune(object())


def test_importing_structprune_imports_neither_ultralytics_nor_transformers():
    code = ("import sys, structprune as tp; tp.integrations; "
            "assert 'ultralytics' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
