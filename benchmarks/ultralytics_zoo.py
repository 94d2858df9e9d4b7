"""Ultralytics families through tp.integrations.ultralytics: prune, save, then YOLO(path) predict/val/ONNX/train.

Prints a table; run with `.venv/bin/python benchmarks/ultralytics_zoo.py [--models yolov8n.yaml,rtdetr-l.yaml]`.
Each model is built from Ultralytics' yaml with 2 classes (random init), pruned at ratio 0.5 on 64x64 images,
saved, reloaded with YOLO(path), and run through predict, val and 1 training epoch (trainer=tpu.trainer) on
a synthetic 4-image dataset, and exported to ONNX; nothing is downloaded. A cell says ok or the error;
"kept" is params after / before, "refused by the graph" the groups step() could not cut as planned.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integrations"))

from yolo_data import make_dataset, model_yaml, offline_ultralytics  # noqa: E402

DEFAULT = {"yolov8n.yaml": "detect", "yolov8n-seg.yaml": "segment", "yolov8n-pose.yaml": "pose",
           "yolov8n-cls.yaml": "classify", "yolov8n-obb.yaml": "obb", "yolo11n.yaml": "detect",
           "yolov10n.yaml": "detect", "rtdetr-l.yaml": "detect"}
RUN = dict(imgsz=64, batch=2, workers=0, plots=False, amp=False, device="cpu", verbose=False)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _attempt(action) -> str:
    try:
        action()
        return "ok"
    except Exception as error:  # noqa: BLE001 - the table reports it
        return f"{type(error).__name__}: {str(error)[:60]}"


def measure(name: str, task: str, root: Path) -> dict:
    import numpy as np
    import onnx
    from ultralytics import RTDETR, YOLO

    from structprune.integrations import ultralytics as tpu

    load = RTDETR if "rtdetr" in name else YOLO
    data = make_dataset(root / "data", task)
    yolo = load(model_yaml(root, name, nc=2))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, summary = tpu.prune(yolo, ratio=0.5, imgsz=64)
    seconds = time.perf_counter() - start
    path = root / "pruned.pt"
    yolo.save(path)
    image = np.full((64, 64, 3), 120, np.uint8)

    def train():
        model = load(path)
        model.train(data=str(data), epochs=1, project=str(root / "runs"), name="ft", trainer=tpu.trainer(model), **RUN)
        assert _params(model.model) == summary.params_after, "training changed the widths"

    def export():
        onnx.checker.check_model(onnx.load(load(path).export(format="onnx", imgsz=64, simplify=False)))

    kept = sorted({str(w.message).split("(", 1)[0].replace("structprune.integrations.ultralytics: left unpruned: ", "")
                   for w in caught if "left unpruned" in str(w.message)})
    # groups the graph refused, named by the step's shortfall warning ("...asked for: LAYER (0 of N: why). ...")
    short = sorted({str(w.message).split("asked for: ", 1)[1].split(". pruner.report()", 1)[0]
                    for w in caught if "channels its schedule asked for: " in str(w.message)})
    return {
        "before": summary.params_before, "after": summary.params_after, "seconds": seconds,
        "kept": "; ".join(k.strip() for k in kept) or "-", "short": "; ".join(short) or "-",
        "predict": _attempt(lambda: load(path).predict(image, imgsz=64, verbose=False)),
        "val": _attempt(lambda: load(path).val(data=str(data), project=str(root / "runs"), name="val", **RUN)),
        "train": _attempt(train), "onnx": _attempt(export),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT), help="comma-separated Ultralytics yaml names")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        offline_ultralytics(str(Path(folder) / "config"))
        rows = []
        for name in args.models.split(","):
            result = measure(name, DEFAULT.get(name, "detect"), Path(folder) / name)
            rows.append(f"| {name} | {result['before']:,} | {result['after']:,} | "
                        f"{result['after'] / result['before']:.2f} | {result['seconds']:.1f} | {result['kept']} | "
                        f"{result['short']} | {result['predict']} | {result['val']} | {result['train']} | "
                        f"{result['onnx']} |")
            print(rows[-1], flush=True)
    print("\n| model | params before | params after | kept | prune s | left whole (warned) | refused by the graph "
          "| predict | val | train | onnx |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
